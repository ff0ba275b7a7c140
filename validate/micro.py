"""The microbenchmark suite: the kernels the engine models, timed one at a time on this machine.

Each :class:`MicroCase` is one kernel at one shape; :func:`run_micro` builds its inputs, times it with
:func:`validate.harness.time_repeats_s` and returns a :class:`~validate.schema.Measurement` holding the
median time, every sample, and the FLOPs and bytes of one call computed by the formulas below;
:func:`predict_micro` gives the engine's time for the same case from ``simulator.compute`` /
``simulator.comm``, so a report can set predicted against measured case by case, and
:mod:`validate.calibrate` fits a device's efficiencies from a results file of this suite.

Kinds and what one call is:

* ``gemm`` — ``torch.mm`` of (m, k) @ (k, n) in bf16, fp16, fp32 (TF32 off), tf32 (TF32 on), or fp8
  e4m3 through ``torch._scaled_mm`` (per-tensor scales, bf16 output, fast accumulation; CUDA only on
  compute capability >= 8.9).  FLOPs 2mnk; bytes (mk + kn)·B_in + mn·B_out.
* ``sdpa`` — ``F.scaled_dot_product_attention`` of (b, h, s, d) q, k, v on one backend (flash, efficient,
  math), forward or forward + backward.  FLOPs as FlashAttention counts them: 4·b·h·s²·d forward and
  10·b·h·s²·d backward (2.5x: the scores are recomputed), halved under a causal mask (the kernel skips the
  masked blocks) — the engine's ``attention_time_s`` runs the same halved count, and ``extra['flops_counted']``
  keeps the unhalved one that FlopCounterMode and the MFU formulas report.  Bytes as the engine counts them:
  q, k, v read and o written, 4·b·h·s·d·B forward, the backward twice that.
* ``copy``, ``rmsnorm``, ``layernorm``, ``softmax`` — one (rows, cols) tensor read and one written,
  2·rows·cols·B (+ the weight and bias, cols·B each); ``cross_entropy`` — ``F.cross_entropy`` of
  (tokens, vocab) logits: log-softmax read and written, 2·T·V·B, plus T labels (8 B) and the T picked
  log-probabilities.
* ``fp8_cast``, ``fp8_cast_compiled`` — torchao's tensorwise float8 cast of a bf16 (rows, cols) tensor:
  ``amax = x.abs().max()``, scale, ``(x.float() * scale).clamp(...).to(float8_e4m3fn)``, eager or under
  ``torch.compile`` (CUDA only); bytes per element as ``simulator.compute.FP8_CAST_FWD_BYTES`` counts them
  (33 eager, 5 compiled), the cost float8 training pays per linear operand and pass.
* ``adamw`` — one ``torch.optim.AdamW.step()`` (fused or foreach) over fp32 parameters split into
  tensors of ``tensor_numel``: ``simulator.timing.optimizer_step_bytes`` (param, grad, both moments read,
  param and moments written: 28 B/param); ``bnb-8bit``: bitsandbytes' ``AdamW8bit`` over the same parameters
  (param and grad read, param written, both 8-bit states read and written: 16 B/param), its step one parameter
  at a time with a synchronize after each.
* ``dequant`` — bitsandbytes ``dequantize_4bit`` (nf4, blocksize 64, optionally double-quantised
  absmax) to bf16, or ``int8_vectorwise_dequant`` (row-wise int8 to fp32): the packed weight with its
  scales read (``simulator.graph.build.quant_storage_bytes``) and the dequantised copy written.  The int8
  one is a PyTorch composite of two elementwise kernels (x row scale, x 1/127), so it moves more than
  the one read and one write counted.
* ``h2d``, ``d2h`` — ``Tensor.copy_`` of ``size_bytes`` between host (pinned or pageable) and the GPU.
* ``all_reduce``, ``all_gather``, ``reduce_scatter`` — ``torch.distributed`` over ``n_ranks`` processes on
  one node (NCCL on GPUs, gloo on CPU); ``size_bytes`` is the message size in nccl-tests conventions
  (the reduced buffer; the full gathered / scattered buffer), ``extra['busbw_GBps']`` its bus bandwidth.

Timing: a few untimed calls, an estimate of one call, then warm-up for ~20 ms (clocks settle) and
enough repeats that the timed calls last >= 50 ms on a GPU (at least 10).  Kernels shorter than
:data:`INNER_TARGET_S` are timed in batches of back-to-back calls (``extra['inner']``) and each sample is
divided by the batch: one CUDA-event pair per tiny kernel would time the launch, not the kernel.

torch is imported inside the functions: the grid and the predictions work without it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .schema import Measurement

# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

MicroKind = Literal["gemm", "sdpa", "copy", "rmsnorm", "layernorm", "softmax", "cross_entropy", "fp8_cast",
                    "fp8_cast_compiled", "adamw", "dequant", "h2d", "d2h", "all_reduce", "all_gather", "reduce_scatter"]
ROW_KINDS: tuple[str, ...] = ("copy", "rmsnorm", "layernorm", "softmax", "cross_entropy", "fp8_cast",
                              "fp8_cast_compiled")
"""Memory-bound kernels over one (rows, cols) tensor."""
TRANSFER_KINDS: tuple[str, ...] = ("h2d", "d2h")
COLLECTIVE_KINDS: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter")

GemmDtype = Literal["bf16", "fp16", "fp32", "tf32", "fp8"]
FloatDtype = Literal["bf16", "fp16", "fp32"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, use_attribute_docstrings=True)


class GemmParams(_Strict):
    """(m, k) @ (k, n)."""

    m: int = Field(ge=1)
    """Rows of the left operand and of the output (tokens for a linear layer's forward)."""
    n: int = Field(ge=1)
    """Columns of the output (output features)."""
    k: int = Field(ge=1)
    """The reduced dimension (input features)."""
    dtype: GemmDtype
    """Operand dtype; tf32 is fp32 storage with TF32 tensor cores on, fp8 is e4m3 with bf16 output."""


class SdpaParams(_Strict):
    """Scaled dot-product attention of (batch, heads, seq, head_dim) q, k and v."""

    batch: int = Field(ge=1)
    """Sequences."""
    heads: int = Field(ge=1)
    """Attention heads (q, k and v alike)."""
    seq: int = Field(ge=1)
    """Tokens per sequence (queries = keys)."""
    head_dim: int = Field(ge=1)
    """Dimension of one head."""
    causal: bool
    """Causal mask (``is_causal=True``)."""
    backward: bool
    """Forward + backward (gradients of q, k and v) instead of forward only."""
    backend: Literal["flash", "efficient", "math"]
    """The SDPA backend forced with ``torch.nn.attention.sdpa_kernel``."""
    dtype: FloatDtype
    """q, k, v dtype."""


class RowsParams(_Strict):
    """One (rows, cols) tensor through a memory-bound kernel; cross_entropy: (tokens, vocab) logits."""

    rows: int = Field(ge=1)
    """Rows (tokens)."""
    cols: int = Field(ge=1)
    """Columns (hidden size; the vocabulary for cross_entropy)."""
    dtype: FloatDtype
    """Tensor dtype."""


class AdamwParams(_Strict):
    """One AdamW step over fp32 parameters."""

    numel: int = Field(ge=1)
    """Parameters updated."""
    tensor_numel: int = Field(ge=1)
    """Parameters per tensor (the last tensor takes the remainder)."""
    impl: Literal["fused", "foreach", "bnb-8bit"]
    """``fused=True`` (one kernel over all tensors), ``foreach=True`` (multi-tensor ops) or bitsandbytes'
    ``AdamW8bit`` (blockwise 8-bit states, one kernel per tensor)."""


class DequantParams(_Strict):
    """Dequantisation of one (out_features, in_features) weight."""

    out_features: int = Field(ge=1)
    """Rows of the weight."""
    in_features: int = Field(ge=1)
    """Columns of the weight."""
    quant: Literal["nf4", "int8", "gptq"]
    """nf4: bitsandbytes 4-bit NormalFloat, blocksize 64; int8: bitsandbytes row-wise int8; gptq: AutoGPTQ's
    PyTorch-op dequantization of 4-bit weights in groups of 128 (``qlinear_cuda_old``, the path fine-tuning
    takes), replayed with the same torch ops (no AutoGPTQ needed)."""
    double_quant: bool
    """nf4: absmax quantised to 8 bits (``compress_statistics=True``)."""

    @model_validator(mode="after")
    def _gptq_shape(self) -> DequantParams:
        if self.quant == "gptq" and (self.in_features % GPTQ_GROUP or self.out_features % 8):
            raise ValueError(f"gptq: in_features must be a multiple of {GPTQ_GROUP} and out_features of 8, got "
                             f"({self.out_features}, {self.in_features})")
        return self


class TransferParams(_Strict):
    """One copy between host and device memory."""

    size_bytes: int = Field(ge=1)
    """Bytes copied."""
    pinned: bool
    """Page-locked host memory (``pin_memory()``, asynchronous DMA) or ordinary pageable memory."""


class CollectiveParams(_Strict):
    """One collective over ranks of one node."""

    size_bytes: int = Field(ge=1)
    """Message size S (nccl-tests conventions): the all-reduced buffer, the full gathered or scattered buffer."""
    n_ranks: int = Field(ge=2)
    """Processes (one GPU each)."""
    dtype: FloatDtype
    """Element dtype."""


Params = Union[GemmParams, SdpaParams, RowsParams, AdamwParams, DequantParams, TransferParams, CollectiveParams]

PARAMS_BY_KIND: dict[str, type[BaseModel]] = {
    "gemm": GemmParams, "sdpa": SdpaParams, "adamw": AdamwParams, "dequant": DequantParams,
    **{k: RowsParams for k in ROW_KINDS}, **{k: TransferParams for k in TRANSFER_KINDS},
    **{k: CollectiveParams for k in COLLECTIVE_KINDS},
}
"""The parameter model of each kind."""


def _size(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


class MicroCase(_Strict):
    """One kernel at one shape."""

    suite: Literal["micro"] = "micro"
    """The suite (always 'micro')."""
    kind: MicroKind
    """Which kernel."""
    params: Params
    """The shape and options; :data:`PARAMS_BY_KIND` gives the model of each kind."""

    @model_validator(mode="after")
    def _params_match_kind(self) -> MicroCase:
        want = PARAMS_BY_KIND[self.kind]
        if type(self.params) is not want:
            raise ValueError(f"kind={self.kind!r} takes {want.__name__}, got {type(self.params).__name__}")
        return self

    @classmethod
    def of(cls, kind: str, **params: Any) -> MicroCase:
        """``MicroCase.of('gemm', m=4096, n=4096, k=4096, dtype='bf16')``."""
        return cls.from_spec(kind, params)

    @classmethod
    def from_spec(cls, kind: str, spec: dict[str, Any]) -> MicroCase:
        """Rebuild a case from its kind and :meth:`spec` (as stored in a results file)."""
        if kind not in PARAMS_BY_KIND:
            raise ValueError(f"unknown micro kind {kind!r}; allowed: {', '.join(PARAMS_BY_KIND)}")
        return cls(kind=kind, params=PARAMS_BY_KIND[kind].model_validate(spec))

    def spec(self) -> dict[str, Any]:
        """The parameters as plain JSON values (with the kind, everything needed to rebuild the case)."""
        return self.params.model_dump()

    @property
    def case_id(self) -> str:
        """Stable identifier: ``micro/<kind>/<parameters>``."""
        p = self.params
        if isinstance(p, GemmParams):
            tail = f"{p.dtype}/m{p.m}-n{p.n}-k{p.k}"
        elif isinstance(p, SdpaParams):
            tail = (f"{p.backend}/{p.dtype}/b{p.batch}-h{p.heads}-s{p.seq}-d{p.head_dim}/"
                    f"{'causal' if p.causal else 'full'}/{'fwd-bwd' if p.backward else 'fwd'}")
        elif isinstance(p, RowsParams):
            tail = f"{p.dtype}/{p.rows}x{p.cols}"
        elif isinstance(p, AdamwParams):
            tail = f"{p.impl}/n{p.numel}-t{p.tensor_numel}"
        elif isinstance(p, DequantParams):
            tail = f"{p.quant}{'-dq' if p.double_quant else ''}/{p.out_features}x{p.in_features}"
        elif isinstance(p, TransferParams):
            tail = f"{'pinned' if p.pinned else 'pageable'}/{_size(p.size_bytes)}"
        else:
            tail = f"{p.dtype}/r{p.n_ranks}/{_size(p.size_bytes)}"
        return f"micro/{self.kind}/{tail}"


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes of one call (pure, no torch)
# ---------------------------------------------------------------------------------------------

_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp8": 1}


def gemm_flops(p: GemmParams) -> float:
    """2mnk: one multiply and one add per (i, j, l)."""
    return 2.0 * p.m * p.n * p.k


def gemm_bytes(p: GemmParams) -> float:
    """Operands read once, output written once: (mk + kn)·B_in + mn·B_out (fp8 writes bf16)."""
    b_in = _ELEMENT_BYTES[p.dtype]
    b_out = 2 if p.dtype == "fp8" else b_in
    return float((p.m * p.k + p.k * p.n) * b_in + p.m * p.n * b_out)


def sdpa_counted_flops(p: SdpaParams) -> float:
    """FLOPs as torch's ``sdpa_flop_count`` / ``sdpa_backward_flop_count`` count them (no causal discount):
    QK^T and PV are 2·s²·d each per head, 4·b·h·s²·d forward; the backward recomputes QK^T and runs four
    more products, 10·b·h·s²·d."""
    per = p.batch * p.heads * p.seq * p.seq * p.head_dim
    return (4.0 + (10.0 if p.backward else 0.0)) * per


def sdpa_flops(p: SdpaParams) -> float:
    """FLOPs the kernel performs as FlashAttention's benchmarks count them: :func:`sdpa_counted_flops`,
    halved under a causal mask (the masked half of the score blocks is skipped)."""
    return sdpa_counted_flops(p) * (0.5 if p.causal else 1.0)


def sdpa_forward_bytes(p: SdpaParams) -> float:
    """q, k, v read and o written once: 4·b·h·s·d·B (the engine's ``attention`` op bytes)."""
    return 4.0 * p.batch * p.heads * p.seq * p.head_dim * _ELEMENT_BYTES[p.dtype]


def sdpa_bytes(p: SdpaParams) -> float:
    """Forward bytes, plus twice that for the backward (as the engine's ``part_time`` counts it)."""
    return sdpa_forward_bytes(p) * (3.0 if p.backward else 1.0)


def rows_bytes(kind: str, p: RowsParams) -> float:
    """One read and one write of the (rows, cols) tensor; norms also read their weight (and bias);
    cross_entropy adds the int64 labels and the picked log-probabilities; an fp8 cast moves what the engine
    charges a float8 linear per operand element."""
    if kind in ("fp8_cast", "fp8_cast_compiled"):
        from simulator.compute import FP8_CAST_FWD_BYTES

        return FP8_CAST_FWD_BYTES[kind == "fp8_cast_compiled"][0] * p.rows * p.cols
    b = _ELEMENT_BYTES[p.dtype]
    main = 2.0 * p.rows * p.cols * b
    extra = {"copy": 0.0, "softmax": 0.0, "rmsnorm": p.cols * b, "layernorm": 2.0 * p.cols * b,
             "cross_entropy": p.rows * (8.0 + b)}[kind]
    return main + extra


def adamw_bytes(p: AdamwParams) -> float:
    """``simulator.timing.optimizer_step_bytes`` for fp32 AdamW in the case's implementation: fused, 3 x 4 B
    param/grad/param-out + 4 x 4 B moments in and out = 28 B per parameter; foreach / for-loop, the 21
    parameter-sized accesses of its separate kernels = 84 B; bitsandbytes 8-bit, 3 x 4 B + 4 x 1 B = 16 B."""
    from simulator.timing import optimizer_step_bytes

    if p.impl == "bnb-8bit":
        return float(optimizer_step_bytes(p.numel, "adamw-8bit", "fp32", False))
    return float(optimizer_step_bytes(p.numel, "adamw", "fp32", False, p.impl))


def adamw_tensors(p: AdamwParams) -> list[int]:
    """The tensor sizes of the case: ``tensor_numel`` each, the last one the remainder."""
    return [p.tensor_numel] * (p.numel // p.tensor_numel) + ([p.numel % p.tensor_numel] if p.numel % p.tensor_numel
                                                             else [])


def dequant_out_dtype(p: DequantParams) -> str:
    """What the kernel writes: bf16 for nf4 (the compute dtype of QLoRA), fp32 for bitsandbytes' int8, fp16 for
    AutoGPTQ."""
    return {"nf4": "bf16", "int8": "fp32", "gptq": "fp16"}[p.quant]


def dequant_bytes(p: DequantParams) -> float:
    """The packed weight with its scales (``quant_storage_bytes``) read, the dequantised copy written; AutoGPTQ's
    PyTorch path: the packed storage and its intermediates (``GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT``), as the
    engine counts them in training."""
    from simulator.graph.build import GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT, quant_storage_bytes

    numel = p.out_features * p.in_features
    stored, _ = quant_storage_bytes(p.quant, numel, p.out_features, p.in_features, GPTQ_GROUP, p.double_quant)
    if p.quant == "gptq":
        return float(stored + GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT * numel)
    return float(stored + numel * _ELEMENT_BYTES[dequant_out_dtype(p)])


def case_flops(case: MicroCase) -> float | None:
    """FLOPs of one call (None for memory-bound kernels and transfers)."""
    if isinstance(case.params, GemmParams):
        return gemm_flops(case.params)
    if isinstance(case.params, SdpaParams):
        return sdpa_flops(case.params)
    return None


def case_bytes(case: MicroCase) -> float:
    """Bytes one call moves (for collectives: the message size S)."""
    p = case.params
    if isinstance(p, GemmParams):
        return gemm_bytes(p)
    if isinstance(p, SdpaParams):
        return sdpa_bytes(p)
    if isinstance(p, RowsParams):
        return rows_bytes(case.kind, p)
    if isinstance(p, AdamwParams):
        return adamw_bytes(p)
    if isinstance(p, DequantParams):
        return dequant_bytes(p)
    return float(p.size_bytes)


# ---------------------------------------------------------------------------------------------
# the grids
# ---------------------------------------------------------------------------------------------

MiB = 2**20
GiB = 2**30

LLM_MODELS: tuple[str, ...] = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b",
                               "qwen2.5-32b", "llama-3.1-70b")
"""Catalog models (0.5B-70B) whose linear layers give the LLM-shaped GEMMs."""
LLM_TOKENS: tuple[int, ...] = (1, 128, 2048, 8192)
"""Tokens per GEMM: one decode step, a small batch, one and four 2k sequences."""
SQUARES: dict[str, tuple[int, ...]] = {
    "bf16": (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 17408),
    "fp16": (256, 1024, 4096, 8192, 16384),
    "fp32": (256, 1024, 2048, 4096, 8192),
    "tf32": (256, 1024, 2048, 4096, 8192),
    "fp8": (256, 512, 1024, 2048, 4096, 8192, 16384),
}
"""Square GEMM sweeps per dtype: bf16 spans 2·128³ = 4e6 to 2·17408³ = 1.05e13 FLOPs."""
SDPA_SEQS: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
SDPA_TOKENS = 16384
"""batch x seq of every SDPA case (batch = 16384 / seq)."""
SDPA_HEADS = 32
MATH_MAX_SEQ = 4096
"""The math backend materialises the (b, h, s, s) scores: kept to s <= 4096."""
ROW_SIZES_BYTES: tuple[int, ...] = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
ROW_COLS = 4096
CE_SHAPES: tuple[tuple[int, int], ...] = ((1024, 32000), (4096, 32000), (1024, 128256), (4096, 128256),
                                          (1024, 151936), (4096, 151936))
"""(tokens, vocab) of the cross-entropy cases: Llama-2, Llama-3 and Qwen2.5 vocabularies."""
ADAMW_NUMELS: tuple[int, ...] = (10_000_000, 100_000_000, 1_000_000_000)
ADAMW_TENSOR_NUMEL = 2**24
DEQUANT_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (14336, 4096), (28672, 8192))
GPTQ_GROUP = 128
"""Group size of the gptq dequant cases (AutoGPTQ's default, the one Qwen's Int4 checkpoints use)."""
"""Llama-3 8B attention and MLP weights, Llama-3 70B MLP weight."""
TRANSFER_SIZES_BYTES: tuple[int, ...] = (1 * MiB, 16 * MiB, 256 * MiB, 1 * GiB)
COLLECTIVE_SIZES_BYTES: tuple[int, ...] = (8 * MiB, 512 * MiB)
COLLECTIVE_RANKS: tuple[int, ...] = (2, 4, 8)


def llm_gemm_shapes(models: tuple[str, ...] = LLM_MODELS,
                    tokens: tuple[int, ...] = LLM_TOKENS) -> list[tuple[int, int, int]]:
    """(m, n, k) of the linear layers of ``models``: fused qkv, attention output, MLP up (= gate) and down
    projections at every token count, the weight gradient of the up projection (m=hidden, n=ffn, k=tokens)
    at the training token counts (>= 2048), and the LM head at 2048 tokens.  Duplicates removed."""
    from simulator import get_model

    out: list[tuple[int, int, int]] = []
    for name in models:
        a = get_model(name)
        d = a.head_dim or a.hidden // a.n_heads
        kv = a.n_kv_heads or a.n_heads
        layers = [(a.hidden, (a.n_heads + 2 * kv) * d), (a.n_heads * d, a.hidden), (a.hidden, a.intermediate),
                  (a.intermediate, a.hidden)]
        for t in tokens:
            out += [(t, n_out, n_in) for n_in, n_out in layers]
            if t >= 2048:
                out.append((a.hidden, a.intermediate, t))
        out.append((2048, a.vocab, a.hidden))
    return list(dict.fromkeys(out))


def _gemm_cases() -> list[MicroCase]:
    cases = [MicroCase.of("gemm", m=n, n=n, k=n, dtype=dt) for dt, sizes in SQUARES.items() for n in sizes]
    cases += [MicroCase.of("gemm", m=m, n=n, k=k, dtype="bf16") for m, n, k in llm_gemm_shapes()]
    cases += [MicroCase.of("gemm", m=m, n=n, k=k, dtype="fp8")
              for m, n, k in llm_gemm_shapes(("llama-3.1-8b", "llama-3.1-70b"), (8192,))]
    return cases


def _sdpa_cases() -> list[MicroCase]:
    out = []
    for backend in ("flash", "efficient", "math"):
        for d in (64, 128):
            if backend == "math" and d != 128:
                continue
            for s in SDPA_SEQS:
                if backend == "math" and s > MATH_MAX_SEQ:
                    continue
                for causal in (True, False):
                    for backward in (False, True):
                        out.append(MicroCase.of("sdpa", batch=SDPA_TOKENS // s, heads=SDPA_HEADS, seq=s, head_dim=d,
                                                causal=causal, backward=backward, backend=backend, dtype="bf16"))
    return out


def _rows_cases() -> list[MicroCase]:
    out = []
    for kind, dtypes in (("copy", ("bf16", "fp32")), ("rmsnorm", ("bf16",)), ("layernorm", ("bf16",)),
                         ("softmax", ("bf16",))):
        for dt in dtypes:
            for size in ROW_SIZES_BYTES:
                out.append(MicroCase.of(kind, rows=size // (ROW_COLS * _ELEMENT_BYTES[dt]), cols=ROW_COLS, dtype=dt))
    out += [MicroCase.of("cross_entropy", rows=t, cols=v, dtype="bf16") for t, v in CE_SHAPES]
    # the operands float8 training casts: activations of 8k-32k tokens x 4096, an 8B model's largest weights
    out += [MicroCase.of(kind, rows=r, cols=c, dtype="bf16") for kind in ("fp8_cast", "fp8_cast_compiled")
            for r, c in ((8192, 4096), (32768, 4096), (14336, 4096))]
    return out


def gpu_cases() -> list[MicroCase]:
    """The full grid for one data-centre GPU (about 5 minutes on an H100; collectives only with >= 2 GPUs)."""
    cases = _gemm_cases() + _sdpa_cases() + _rows_cases()
    cases += [MicroCase.of("adamw", numel=n, tensor_numel=ADAMW_TENSOR_NUMEL, impl=impl)
              for n in ADAMW_NUMELS for impl in ("fused", "foreach", "bnb-8bit")]
    for out_f, in_f in DEQUANT_SHAPES:
        cases += [MicroCase.of("dequant", out_features=out_f, in_features=in_f, quant="nf4", double_quant=dq)
                  for dq in (False, True)]
        cases.append(MicroCase.of("dequant", out_features=out_f, in_features=in_f, quant="int8", double_quant=False))
        cases.append(MicroCase.of("dequant", out_features=out_f, in_features=in_f, quant="gptq", double_quant=False))
    cases += [MicroCase.of(kind, size_bytes=size, pinned=pinned)
              for kind in TRANSFER_KINDS for pinned in (True, False) for size in TRANSFER_SIZES_BYTES]
    cases += [MicroCase.of(kind, size_bytes=size, n_ranks=n, dtype="bf16")
              for kind in COLLECTIVE_KINDS for n in COLLECTIVE_RANKS for size in COLLECTIVE_SIZES_BYTES]
    return list({c.case_id: c for c in cases}.values())  # an LLM shape may repeat a square one


def cpu_cases() -> list[MicroCase]:
    """Tiny shapes, a few per kind: the same code paths in seconds on a CPU (CUDA-only kinds are skipped)."""
    sdpa = dict(batch=1, heads=2, seq=128, head_dim=32)
    return [
        MicroCase.of("gemm", m=64, n=96, k=128, dtype="bf16"),
        MicroCase.of("gemm", m=128, n=128, k=128, dtype="fp32"),
        MicroCase.of("gemm", m=64, n=64, k=64, dtype="fp16"),
        MicroCase.of("gemm", m=128, n=128, k=128, dtype="tf32"),
        MicroCase.of("gemm", m=32, n=64, k=32, dtype="fp8"),
        MicroCase.of("sdpa", **sdpa, causal=True, backward=False, backend="flash", dtype="fp32"),
        MicroCase.of("sdpa", **sdpa, causal=False, backward=True, backend="flash", dtype="bf16"),
        MicroCase.of("sdpa", **sdpa, causal=True, backward=True, backend="math", dtype="fp32"),
        MicroCase.of("sdpa", **sdpa, causal=True, backward=False, backend="efficient", dtype="fp32"),
        MicroCase.of("copy", rows=256, cols=1024, dtype="fp32"),
        MicroCase.of("rmsnorm", rows=64, cols=256, dtype="fp32"),
        MicroCase.of("layernorm", rows=64, cols=256, dtype="bf16"),
        MicroCase.of("softmax", rows=64, cols=256, dtype="fp32"),
        MicroCase.of("cross_entropy", rows=32, cols=1000, dtype="fp32"),
        MicroCase.of("fp8_cast", rows=64, cols=256, dtype="bf16"),
        MicroCase.of("fp8_cast_compiled", rows=64, cols=256, dtype="bf16"),
        MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="fused"),
        MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="foreach"),
        MicroCase.of("adamw", numel=100_000, tensor_numel=30_000, impl="bnb-8bit"),
        MicroCase.of("dequant", out_features=256, in_features=512, quant="nf4", double_quant=False),
        MicroCase.of("dequant", out_features=256, in_features=512, quant="nf4", double_quant=True),
        MicroCase.of("dequant", out_features=256, in_features=512, quant="int8", double_quant=False),
        MicroCase.of("dequant", out_features=256, in_features=512, quant="gptq", double_quant=False),
        MicroCase.of("h2d", size_bytes=1 * MiB, pinned=True),
        MicroCase.of("d2h", size_bytes=1 * MiB, pinned=False),
        MicroCase.of("all_reduce", size_bytes=1 * MiB, n_ranks=2, dtype="fp32"),
    ]


def micro_cases(scale: str) -> list[MicroCase]:
    """The cases of the micro suite at ``scale`` ('gpu' or 'cpu')."""
    if scale == "gpu":
        return gpu_cases()
    if scale == "cpu":
        return cpu_cases()
    raise ValueError(f"scale={scale!r}: allowed 'gpu', 'cpu'")


# ---------------------------------------------------------------------------------------------
# predictions: the engine's own per-op functions
# ---------------------------------------------------------------------------------------------


def _sdpa_predict_s(p: SdpaParams, dev) -> float:
    """The engine's time of one attention op (``simulator.compute.part_time`` of a part holding it alone):
    fused backends at the attention fraction for the case's length on the causally halved FLOPs (the efficient
    backend at its speed relative to flash), math on the GEMM curve."""
    from simulator.compute import Op, OpArrays, part_time
    from simulator.graph.ir import Poly, basis

    pairs = p.batch * p.seq * p.seq  # the basis's A = b * s * s_kv
    fwd = sdpa_counted_flops(SdpaParams(**{**p.model_dump(), "backward": False}))
    bwd = sdpa_counted_flops(p) - fwd
    op = Op(fwd_flops=Poly.att(fwd / pairs).c, bwd_flops=Poly.att(bwd / pairs).c,
            fwd_bytes=Poly.tok(sdpa_forward_bytes(p) / (p.batch * p.seq)).c,
            attention=True, causal=p.causal, tp_split=True, recomputed=False)
    part = OpArrays(where="block", layers=(0,), ops=(op,), elementwise_bytes=(0.0,) * 7, dequant_bytes=0.0,
                    n_kernels=0)
    t = part_time(part, basis(p.batch, p.seq), dev, p.dtype, 1, 1, p.backward, fused_attention=p.backend != "math",
                  attn_kernel="mem_efficient" if p.backend == "efficient" else "flash2")
    return t.forward_s + t.backward_s


def predict_micro(case_spec: dict[str, Any], kind: str, device_profile_name: str) -> float:
    """Predicted seconds of one call of the micro case ``(kind, case_spec)`` on ``device_profile_name``.

    GEMMs: ``simulator.compute.gemm_time_s`` (roofline on the GEMM curve); attention: ``part_time`` of the
    one op (``attention_time_s`` for flash / efficient, the GEMM path for math); memory-bound kernels,
    AdamW and dequantisation: ``memory_time_s`` of :func:`case_bytes`; transfers:
    ``simulator.comm.host_transfer_time_s`` on the device's one-GPU system; collectives:
    ``simulator.comm.group_collective_time_s`` on the device's ``n_ranks``-GPU system."""
    from hwprofiles.registry import get_device, system_for
    from simulator import comm
    from simulator.compute import gemm_time_s, gptq_torch_dequant_fraction, memory_time_s
    from simulator.timing import optimizer_kernel_s

    case = MicroCase.from_spec(kind, case_spec)
    dev = get_device(device_profile_name)
    p = case.params
    if isinstance(p, GemmParams):
        return float(gemm_time_s(gemm_flops(p), gemm_bytes(p), dev, p.dtype))
    if isinstance(p, SdpaParams):
        return _sdpa_predict_s(p, dev)
    if isinstance(p, TransferParams):
        system = system_for(dev.name, 1)
        return float(comm.host_transfer_time_s(system, p.size_bytes, dev.efficiency.host_transfer_fraction))
    if isinstance(p, CollectiveParams):
        system = system_for(dev.name, p.n_ranks)
        per_node = min(p.n_ranks, system.gpus_per_node)
        return float(comm.group_collective_time_s(system, case.kind, p.size_bytes, p.n_ranks, per_node))
    if isinstance(p, DequantParams) and p.quant == "gptq":
        return float(memory_time_s(case_bytes(case), dev) / gptq_torch_dequant_fraction(dev))
    if isinstance(p, AdamwParams) and p.impl == "bnb-8bit":
        return float(optimizer_kernel_s(case_bytes(case), 1.0, dev) + bnb_step_host_s(p))
    return float(memory_time_s(case_bytes(case), dev))


def bnb_step_host_s(p: AdamwParams) -> float:
    """The host time of bitsandbytes' step over the case's tensors, after each tensor's kernel (it synchronizes per
    tensor): ``simulator.timing``'s operators per tensor at its cost per operator."""
    from simulator.config import Optimizer
    from simulator.timing import OPTIMIZER_OP_HOST_S, optimizer_ops_per_tensor

    per_tensor = optimizer_ops_per_tensor(Optimizer(name="adamw-8bit"), "fp32", matrix=False)
    return len(adamw_tensors(p)) * per_tensor * OPTIMIZER_OP_HOST_S


# ---------------------------------------------------------------------------------------------
# running one case
# ---------------------------------------------------------------------------------------------

TARGET_TOTAL_S = {"cuda": 0.05, "cpu": 0.005}
"""Timed time per case: repeats are sized to last at least this long."""
WARMUP_S = {"cuda": 0.02, "cpu": 0.001}
"""Warm-up time after the estimate (GPU clocks and caches settle)."""
MIN_REPEATS = {"cuda": 10, "cpu": 3}
MAX_REPEATS = 1000
INNER_TARGET_S = 200e-6
"""Kernels faster than this are timed in batches of back-to-back calls lasting about this long."""
MAX_INNER = 256
COLLECTIVE_TIMEOUT_S = 300.0
"""A collective case whose processes have not finished after this long is stopped (a hung NCCL group)."""


def _skip(message: str) -> Exception:
    from .run import Skip

    return Skip(message)


def _platform(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32,
            "fp8": torch.float8_e4m3fn}[name]


def _estimate_call_s(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call, from one call (or ten when it is under a millisecond)."""
    from .harness import synchronize

    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    t = time.perf_counter() - t0
    if t < 1e-3:
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        synchronize(device)
        t = (time.perf_counter() - t0) / 10
    return max(t, 1e-9)


def _fixed_estimate_s(fn: Callable[[], Any], device: str, calls: int) -> float:
    """Mean wall time of ``calls`` calls (a fixed count: every rank of a collective must issue the same calls)."""
    from .harness import synchronize

    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return max((time.perf_counter() - t0) / calls, 1e-9)


def timing_plan(call_s: float, device: str) -> tuple[int, int, int]:
    """(inner, warmup, repeats) for a kernel of ``call_s``: calls per sample so that one sample lasts about
    :data:`INNER_TARGET_S`, warm-up samples lasting :data:`WARMUP_S`, and repeats lasting
    :data:`TARGET_TOTAL_S` (at least :data:`MIN_REPEATS`)."""
    plat = _platform(device)

    def at_least(ratio: float) -> int:  # ceil that ignores float dust (200e-6 / 1e-6 = 200.00000000000003)
        return math.ceil(ratio * (1 - 1e-9))

    inner = 1 if call_s >= INNER_TARGET_S else min(MAX_INNER, at_least(INNER_TARGET_S / call_s))
    sample_s = inner * call_s
    warmup = max(1, min(100, at_least(WARMUP_S[plat] / sample_s)))
    repeats = max(MIN_REPEATS[plat], min(MAX_REPEATS, at_least(TARGET_TOTAL_S[plat] / sample_s)))
    return inner, warmup, repeats


def _time_call(fn: Callable[[], Any], device: str) -> tuple[list[float], dict[str, float]]:
    """Per-call samples of ``fn`` (after two untimed calls and an estimate) and the plan used."""
    from .harness import time_repeats_s

    fn()
    fn()
    inner, warmup, repeats = timing_plan(_estimate_call_s(fn, device), device)

    def batch() -> None:
        for _ in range(inner):
            fn()

    samples = time_repeats_s(batch, warmup=warmup, repeats=repeats, device=device)
    return [s / inner for s in samples], {"inner": float(inner), "warmup": float(warmup), "repeats": float(repeats)}


def _measurement(case: MicroCase, samples: list[float], extra: dict[str, float]) -> Measurement:
    from .harness import median_s

    t = median_s(samples)
    flops = case_flops(case)
    nbytes = case_bytes(case)
    out = dict(extra)
    if t > 0:
        out["achieved_GBps"] = nbytes / t / 1e9
        if flops is not None:
            out["achieved_tflops"] = flops / t / 1e12
    return Measurement(time_s=t, time_samples_s=tuple(samples), flops=flops, bytes_moved=nbytes, extra=out)


def _require_cuda(device: str, what: str) -> None:
    if device == "cpu":
        raise _skip(f"{what} needs a CUDA device (run with --device cuda)")


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _gemm_fn(p: GemmParams, device: str) -> Callable[[], Any]:
    import torch

    if p.dtype == "fp8":
        if device != "cpu":
            if getattr(torch.version, "hip", None):
                raise _skip("fp8 _scaled_mm on ROCm uses e4m3fnuz; not covered by this suite")
            cc = torch.cuda.get_device_capability()
            if cc < (8, 9):
                raise _skip(f"fp8 _scaled_mm needs compute capability >= 8.9, this GPU is {cc[0]}.{cc[1]}")
        if p.m % 16 or p.n % 16 or p.k % 16:
            raise _skip(f"fp8 _scaled_mm needs m, n, k divisible by 16, got {p.m}, {p.n}, {p.k}")
        a = torch.randn(p.m, p.k, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        b = torch.randn(p.n, p.k, device=device, dtype=torch.bfloat16).to(torch.float8_e4m3fn).t()  # column-major
        one = torch.ones((), device=device, dtype=torch.float32)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)
    if p.dtype == "tf32":
        _require_cuda(device, "tf32 (a tensor-core mode)")
    dt = _torch_dtype(p.dtype)
    a = torch.randn(p.m, p.k, device=device, dtype=dt)
    b = torch.randn(p.k, p.n, device=device, dtype=dt)
    c = torch.empty(p.m, p.n, device=device, dtype=dt)
    return lambda: torch.mm(a, b, out=c)


_NO_KERNEL = ("no available kernel", "no viable backend")


def _run_gemm(case: MicroCase, device: str) -> Measurement:
    p = case.params
    fn = _gemm_fn(p, device)
    if device == "cpu":
        samples, extra = _time_call(fn, device)
    else:
        with _tf32(p.dtype == "tf32"):
            samples, extra = _time_call(fn, device)
    return _measurement(case, samples, extra)


def _run_sdpa(case: MicroCase, device: str) -> Measurement:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    p: SdpaParams = case.params
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}[p.backend]
    dt = _torch_dtype(p.dtype)
    shape = (p.batch, p.heads, p.seq, p.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dt, requires_grad=p.backward) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dt)

    if p.backward:
        def fn():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=p.causal)
            return torch.autograd.grad(out, (q, k, v), grad_out)
    else:
        def fn():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal)

    with sdpa_kernel(backend):
        try:
            fn()
        except RuntimeError as e:
            if any(s in str(e).lower() for s in _NO_KERNEL):
                raise _skip(f"SDPA backend {p.backend!r} has no kernel for {p.dtype}, d={p.head_dim} on {device}: "
                            f"{str(e).splitlines()[0][:200]}") from None
            raise
        samples, extra = _time_call(fn, device)
    extra["flops_counted"] = sdpa_counted_flops(p)
    return _measurement(case, samples, extra)


def _run_rows(case: MicroCase, device: str) -> Measurement:
    import torch
    import torch.nn.functional as F

    p: RowsParams = case.params
    dt = _torch_dtype(p.dtype)
    x = torch.randn(p.rows, p.cols, device=device, dtype=dt)
    if case.kind == "copy":
        y = torch.empty_like(x)
        fn = lambda: y.copy_(x)  # noqa: E731
    elif case.kind == "rmsnorm":
        w = torch.ones(p.cols, device=device, dtype=dt)
        fn = lambda: F.rms_norm(x, (p.cols,), w, 1e-6)  # noqa: E731
    elif case.kind == "layernorm":
        w = torch.ones(p.cols, device=device, dtype=dt)
        b = torch.zeros(p.cols, device=device, dtype=dt)
        fn = lambda: F.layer_norm(x, (p.cols,), w, b, 1e-5)  # noqa: E731
    elif case.kind == "softmax":
        fn = lambda: torch.softmax(x, dim=-1)  # noqa: E731
    elif case.kind in ("fp8_cast", "fp8_cast_compiled"):
        fn = _fp8_cast_fn(x, compiled=case.kind == "fp8_cast_compiled", device=device)
    else:
        labels = torch.randint(0, p.cols, (p.rows,), device=device)
        fn = lambda: F.cross_entropy(x, labels)  # noqa: E731
    with torch.no_grad():
        samples, extra = _time_call(fn, device)
    return _measurement(case, samples, extra)


def _fp8_cast_fn(x, *, compiled: bool, device: str) -> Callable[[], Any]:
    """torchao's tensorwise dynamic cast (float8_utils.tensor_to_amax, amax_to_scale,
    hp_tensor_and_scale_to_float8) of ``x`` to e4m3, as a call; compiled with inductor on CUDA only."""
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        raise _skip("this torch has no float8_e4m3fn")
    if compiled and device != "cuda":
        raise _skip("the compiled float8 cast is measured on CUDA only")
    fp8_max = torch.finfo(torch.float8_e4m3fn).max

    def cast(t):
        amax = torch.max(torch.abs(t)).to(torch.float64)
        scale = (fp8_max / torch.clamp(amax, min=1e-12)).to(torch.float32)
        return (t.to(torch.float32) * scale).clamp(min=-fp8_max, max=fp8_max).to(torch.float8_e4m3fn)

    fn = torch.compile(cast) if compiled else cast
    return lambda: fn(x)


def _run_adamw(case: MicroCase, device: str) -> Measurement:
    import torch

    p: AdamwParams = case.params
    sizes = adamw_tensors(p)
    params = [torch.randn(n, device=device, dtype=torch.float32) for n in sizes]
    for t in params:
        t.grad = torch.randn_like(t)
    if p.impl == "bnb-8bit":
        bnb, _ = _bnb()
        # min_8bit_size=1: every tensor gets 8-bit states, whatever its size
        opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=0.01, min_8bit_size=1)
        opt.step()  # the first step allocates the states
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **{p.impl: True})
    samples, extra = _time_call(opt.step, device)
    extra["tensors"] = float(len(sizes))
    return _measurement(case, samples, extra)


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - missing, or present but without a build for this platform
        raise _skip(f"bitsandbytes cannot be imported here ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                    "pip install 'fitsim[validate]'") from None
    return bitsandbytes, bnbf


def gptq_torch_dequant_fn(out_features: int, in_features: int, device: str, group: int = GPTQ_GROUP
                          ) -> Callable[[], Any]:
    """AutoGPTQ ``qlinear_cuda_old.QuantLinear``'s PyTorch dequantization of a random 4-bit (out, in) weight,
    op for op: unpack the zero points (shift, int8 cast, ``bitwise_and``, ``+ 1``) and the weights (shift of the
    expanded int32 ``qweight``, int8 cast, ``bitwise_and``), then ``scales * (weight - zeros)`` in fp16."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (in_features // 8, out_features), generator=g, dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (in_features // group, out_features // 8), generator=g,
                           dtype=torch.int32)
    qweight, qzeros = qweight.to(device), qzeros.to(device)
    scales = (torch.rand(in_features // group, out_features, generator=g) * 0.01).to(device, torch.float16)
    wf = torch.tensor(list(range(0, 32, 4)), dtype=torch.int32, device=device).unsqueeze(0)

    def fn():
        zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, 8), wf.unsqueeze(0)).to(torch.int8)
        torch.bitwise_and(zeros, 15, out=zeros)
        zeros = zeros + 1
        zeros = zeros.reshape(-1, 1, zeros.shape[1] * zeros.shape[2])
        weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, 8, -1), wf.unsqueeze(-1)).to(torch.int8)
        torch.bitwise_and(weight, 15, out=weight)
        weight = weight.reshape(-1, group, weight.shape[2])
        weight = scales.reshape(-1, 1, scales.shape[-1]) * (weight - zeros)
        return weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])

    fn.inputs = (qweight, qzeros, scales)  # for checking the replay against the packing format
    return fn


def _run_dequant(case: MicroCase, device: str) -> Measurement:
    import torch

    p: DequantParams = case.params
    if p.quant == "gptq":
        fn = gptq_torch_dequant_fn(p.out_features, p.in_features, device)
        with torch.no_grad():
            samples, extra = _time_call(fn, device)
        return _measurement(case, samples, extra)
    _, bnbf = _bnb()
    w = torch.randn(p.out_features, p.in_features, device=device, dtype=torch.bfloat16)
    if p.quant == "nf4":
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=p.double_quant)
        fn = lambda: bnbf.dequantize_4bit(packed, state)  # noqa: E731
    else:
        packed, stats, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))  # its CUDA kernel takes fp16 only
        fn = lambda: bnbf.int8_vectorwise_dequant(packed, stats)  # noqa: E731
    del w
    with torch.no_grad():
        samples, extra = _time_call(fn, device)
    return _measurement(case, samples, extra)


def _run_transfer(case: MicroCase, device: str) -> Measurement:
    import torch

    _require_cuda(device, "a host<->device copy")
    p: TransferParams = case.params
    host = torch.empty(p.size_bytes, dtype=torch.uint8)
    if p.pinned:
        host = host.pin_memory()
    host.fill_(1)  # touch every page before timing
    gpu = torch.empty(p.size_bytes, dtype=torch.uint8, device=device)
    src, dst = (host, gpu) if case.kind == "h2d" else (gpu, host)
    samples, extra = _time_call(lambda: dst.copy_(src, non_blocking=p.pinned), device)
    return _measurement(case, samples, extra)


# ---- collectives: one process per rank ----


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_fn(kind: str, size_bytes: int, world: int, dtype: str, device: str) -> Callable[[], Any]:
    """One call of ``kind`` on the default process group with a message of ``size_bytes`` (nccl-tests
    conventions): all_reduce of S; all_gather of S/world per rank into S; reduce_scatter of S into S/world."""
    import torch
    import torch.distributed as dist

    dt = _torch_dtype(dtype)
    elem = _ELEMENT_BYTES[dtype]
    numel = max(world, size_bytes // elem // world * world)
    if kind == "all_reduce":
        buf = torch.zeros(numel, dtype=dt, device=device)
        return lambda: dist.all_reduce(buf)
    if kind == "all_gather":
        out = torch.empty(numel, dtype=dt, device=device)
        shard = torch.zeros(numel // world, dtype=dt, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(out, shard)
    if kind == "reduce_scatter":
        full = torch.zeros(numel, dtype=dt, device=device)
        shard = torch.empty(numel // world, dtype=dt, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(shard, full)
    raise ValueError(f"unknown collective {kind!r}; allowed: {', '.join(COLLECTIVE_KINDS)}")


def _collective_worker(rank: int, kind: str, size_bytes: int, world: int, dtype: str, on_gpu: bool, port: int,
                       out_path: str) -> None:
    """One rank: join the group, agree on a timing plan with rank 0, time the collective; rank 0 writes
    the per-call samples and the plan to ``out_path`` as JSON."""
    import warnings

    import torch
    import torch.distributed as dist

    from .harness import time_repeats_s

    warnings.filterwarnings("ignore", category=FutureWarning)
    device = f"cuda:{rank}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(rank)
    kw = {"device_id": torch.device(device)} if on_gpu else {}
    dist.init_process_group("nccl" if on_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, **kw)
    try:
        timing_device = "cuda" if on_gpu else "cpu"
        fn = collective_fn(kind, size_bytes, world, dtype, device)
        for _ in range(3):
            fn()
        call_s = _fixed_estimate_s(fn, timing_device, calls=5)
        plan = torch.tensor(timing_plan(call_s, timing_device), dtype=torch.int64, device=device)
        dist.broadcast(plan, src=0)  # every rank runs the same number of calls
        inner, warmup, repeats = (int(x) for x in plan.tolist())

        def batch() -> None:
            for _ in range(inner):
                fn()

        dist.barrier()
        samples = time_repeats_s(batch, warmup=warmup, repeats=repeats, device=timing_device)
        if rank == 0:
            Path(out_path).write_text(json.dumps({"samples_s": [s / inner for s in samples], "inner": inner,
                                                  "warmup": warmup, "repeats": repeats}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_collective(case: MicroCase, device: str) -> Measurement:
    import torch
    import torch.multiprocessing as mp

    p: CollectiveParams = case.params
    on_gpu = device != "cpu"
    if on_gpu:
        visible = torch.cuda.device_count()
        if visible < p.n_ranks:
            raise _skip(f"{case.kind} over {p.n_ranks} ranks needs {p.n_ranks} GPUs on this node, {visible} visible")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.json")
        ctx = mp.start_processes(_collective_worker, nprocs=p.n_ranks, join=False, start_method="spawn",
                                 args=(case.kind, p.size_bytes, p.n_ranks, p.dtype, on_gpu, _free_port(), out_path))
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{case.case_id}: ranks still running after {COLLECTIVE_TIMEOUT_S:.0f} s; "
                                       "stopped")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()][-1]
            raise RuntimeError(f"a rank failed: {last[:400]}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
        got = json.loads(Path(out_path).read_text())
    from simulator.comm import bus_factor

    m = _measurement(case, got["samples_s"], {k: float(got[k]) for k in ("inner", "warmup", "repeats")})
    busbw = p.size_bytes * float(bus_factor(case.kind, p.n_ranks)) / m.time_s / 1e9 if m.time_s else 0.0
    return m.model_copy(update={"extra": {**m.extra, "busbw_GBps": busbw}})


_RUNNERS: dict[str, Callable[[MicroCase, str], Measurement]] = {
    "gemm": _run_gemm, "sdpa": _run_sdpa, "adamw": _run_adamw, "dequant": _run_dequant,
    **{k: _run_rows for k in ROW_KINDS}, **{k: _run_transfer for k in TRANSFER_KINDS},
    **{k: _run_collective for k in COLLECTIVE_KINDS},
}


def run_micro(case: MicroCase, device: str) -> Measurement:
    """Measure one case on ``device`` ('cuda' or 'cpu'); raises :class:`validate.run.Skip` when it cannot
    run here."""
    import torch

    if device != "cpu" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU")
    torch.manual_seed(0)
    return _RUNNERS[case.kind](case, device)


# ---------------------------------------------------------------------------------------------
# how long the grid takes
# ---------------------------------------------------------------------------------------------

CASE_OVERHEAD_S = 0.1
"""Per case: building inputs, first calls, the allocator emptied between cases."""
SLOWDOWN = 3.0
"""Planning margin: a kernel may run this much slower than the engine predicts."""
SPAWN_S = 10.0
"""Starting the processes of a collective case and joining the group."""


def estimated_case_s(case: MicroCase, device_profile_name: str, gpus: int = 1) -> float:
    """Seconds the case is expected to take on ``gpus`` GPUs of ``device_profile_name``: overhead, the
    estimate and warm-up calls, and the timed repeats, with kernels :data:`SLOWDOWN` x slower than predicted
    (0 for a collective that will be skipped)."""
    if case.kind in COLLECTIVE_KINDS and case.params.n_ranks > gpus:
        return 0.0
    call_s = SLOWDOWN * predict_micro(case.spec(), case.kind, device_profile_name)
    inner, warmup, repeats = timing_plan(call_s, "cuda")
    calls = 2 + (1 if call_s >= 1e-3 else 11) + inner * (warmup + repeats)
    setup = SPAWN_S if case.kind in COLLECTIVE_KINDS else 0.0
    return CASE_OVERHEAD_S + setup + calls * call_s
