"""Compute time on one device: a roofline per operator with the device's measured efficiencies.

Each traced operator (GEMM, attention kernel) takes ``max(flops / (peak * f(flops)), bytes / (bw * g))``
where ``f`` is the device's GEMM efficiency curve (``Efficiency.matmul_curve``: achievable fraction
as a function of the FLOPs of one call) and ``g`` its streaming-bandwidth fraction.  Everything
else a block does (norms, activations, residual adds, casts, RoPE, dropout) is memory-bound: each
tensor it creates is written once and read once in forward, and the backward moves twice that
(the gradient of each, plus the saved input it reads) -- the usual estimate for unfused eager
PyTorch (Korthikanti et al. 2022 count the same elementwise tensors for memory).  QLoRA's
dequantization reads the packed weight and writes a 16-bit copy before every use (forward and the
input-gradient GEMM of backward).

The operator tables are built once per cost table as coefficient tuples over the (T, K, A, B, S, Q, 1)
basis, so one evaluation is a few dot products per operator.  Every function here takes plain numbers
or numpy arrays: :func:`part_time` evaluates all operators of a part at once, and the basis values, the
tensor- and context-parallel degrees may be arrays of setups (``plan`` evaluates many at once).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprofiles import Device
from hwprofiles.schema import interp_clamped

from .graph.build import GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT, GPTQ_TORCH_DEQUANT_KERNELS, attention_kernel, is_moe_router  # noqa: F401
from .config.methods import BNB_QUANTS
from .graph.compile import CostTable, recomputed_ops
from .units import dtype_bytes


# Host-side cost of one eager PyTorch operator in a forward: Python call, autograd recording, ATen dispatch,
# backend selection and cudaLaunchKernel ("~5-25 us of CPU-side work per op", jiahuanglin.xyz, "From PyTorch op
# to kernel launch", dispatch-chain table), plus the nn.Module calls and views around it that the trace does not
# count (it counts tensor-producing operators only).  The GPU runs asynchronously, so a pass takes the longer of
# its GPU time and the host time to issue its kernels; small decode steps and small micro-batches are host-bound.
# The figure per traced operator is fitted to published batch-1 generation, which is host-bound: the Qwen README
# (transformers, A100: 0.77 ms per block of 29 traced operators, 26.5 us) and litgpt's resource tables
# (generate/base.py, A100: 1.0 ms per block of 31, 32 us).
EAGER_OP_OVERHEAD_S = 28e-6

# Host-side cost of one DeepSpeed ZeRO-3 parameter fetch: the module's pre-forward / pre-backward hooks walk
# its parameters, launch the all-gather, record and wait on its events and release the partitions after
# (deepspeed/runtime/zero/partitioned_param_coordinator.py).  Paid once per pass (forward, recompute,
# backward) for every module that owns a partitioned parameter, in Python, before the module's kernels can
# be issued, so it adds to the pass rather than hiding behind it: DeepSpeed issue #1069 (stage 3 at a third
# of stage 2's throughput at the same batch), PR #6649 (coalescing the fetches of fine-grained modules:
# +40 %), PR #3622 ("zero3 performance optimizations").  The figure is fitted to the published step times of
# DeepSpeed ZeRO-3 fine-tuning at micro-batch 1 (Qwen README: 7B full on 2 A100s and 72B LoRA on 4, 256 to
# 8192 tokens), each run in DeepSpeed's bf16 engine (no autocast, adapters cast to bf16): 0.4 ms leaves them
# 10 % too fast on average, 0.6 ms 8 % too slow; at 0.5 ms the short 7B runs stay 9-32 % fast, the 72B 7-14 % slow.
ZERO3_FETCH_HOST_S = 0.5e-3

# The backward runs in autograd's C++ engine without Python: about two kernels per forward operator at the
# dispatcher + launch cost (~6 us each, the low end of the range above).  An assumption: the published step
# times do not move when it goes from 8 to 16 us.
BACKWARD_HOST_PER_OP_S = 12e-6

# bitsandbytes' quantized linears add their Python wrappers per call (``Linear4bit.forward`` ->
# ``matmul_4bit`` with its quant-state handling, or ``MatMul4Bit`` / ``MatMul8bitLt`` autograd functions): fitted
# to litgpt's batch-1 generation with ``--quantize bnb.nf4`` against bf16 on the same models (+0.5-0.6 ms
# per Llama block of 7 quantized linears, 7B to 70B).
BNB_CALL_HOST_S = 90e-6

# Weight-only quantized GEMMs with few input rows run fused kernels that read the packed weights and
# dequantize in registers, never writing a 16-bit copy: bitsandbytes ``matmul_4bit`` calls ``gemv_4bit``
# when the input is a single row and needs no gradient (``A.numel() == A.shape[-1]``, bitsandbytes >= 0.40,
# bitsandbytes/autograd/_functions.py); GPTQ (ExLlama v1/v2, Marlin) and AWQ (GEMV / fused GEMM) kernels up to
# a few dozen rows -- ExLlamaV2 switches to dequantize + cuBLAS from ``MAX_Q_GEMM_ROWS`` = 50 rows
# (exllamav2/exllamav2_ext/config.h), AutoAWQ from 1024 (``FP16_MATMUL_HEURISTIC_CONDITION``).
FUSED_DEQUANT_MAX_ROWS: dict[str, int] = {"nf4": 1, "fp4": 1, "gptq": 50, "awq": 1024}


# AutoGPTQ's PyTorch dequantization (``GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT``) moves its bytes at about half the rate
# of a streaming copy: its first kernel shifts a stride-0 expansion of the packed int32 weights by a broadcast
# shift table into an int32 tensor, which TensorIterator cannot run on its contiguous vectorised path, and the
# int8 / fp16 kernels after it are as many passes again over int8 data.  Fitted on QwenLM/Qwen's published
# Q-LoRA step times (README "Profiling of Memory and Speed": Qwen-1.8B/7B/14B/72B-Chat-Int4 on one A100-80GB,
# 256 to 1,024 tokens, gradient checkpointing), where the dequantization of every quantized linear in the forward
# and its recompute is 40-60 % of the step: each of the four sizes needs 2.0-2.2x the streaming time of 16.5 B per
# weight.  A device's own figure, from the micro suite's gptq dequant cases, replaces it
# (``Efficiency.gptq_torch_dequant_fraction``).
GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION = 0.48

# Float8 training (torchao ``Float8Linear``, tensorwise dynamic scaling; torchao/float8/float8_linear.py
# ``matmul_with_hp_or_float8_args``) casts each linear's operands to fp8 around its ``_scaled_mm``: the forward
# casts the input and the weight; the backward casts the output's gradient twice (for dX and for dW), the weight
# again and the saved 16-bit input again.  One cast is ``torch.max(torch.abs(x))`` (float8_utils.tensor_to_amax)
# then ``(x.to(float32) * scale).clamp(...).to(float8)`` (hp_tensor_and_scale_to_float8).  Compiled (how torchao
# and torchtitan run it), a cast is an amax reduction reading the 16-bit tensor and one fused kernel reading it
# again and writing fp8 in the layout the GEMM needs: 5 B per element, 2 kernels; the two casts of the gradient
# share one amax (common subexpression): 8 B.  Eager, each of abs (r2 w2), max (r2), to-fp32 (r2 w4), mul (r4 w4),
# clamp (r4 w4) and to-fp8 (r4 w1) is its own kernel: 33 B over 9 kernels (with the scale's own three), and the
# backward's GEMM operands that are in the wrong layout for ``_scaled_mm`` (row-major A, column-major B) are
# copied (fp8 read + write, 2 B): the weight, the gradient's transpose and the input.
# (bytes per input element, per weight element, per output-gradient element) forward and backward, and kernels per
# linear forward, compiled or eager.
FP8_CAST_FWD_BYTES = {True: (5.0, 5.0, 0.0), False: (33.0, 33.0, 0.0)}
FP8_CAST_BWD_BYTES = {True: (5.0, 5.0, 8.0), False: (35.0, 35.0, 68.0)}
FP8_CAST_KERNELS = {True: 4, False: 18}


def gptq_torch_dequant_fraction(dev):
    """The share of the streaming rate AutoGPTQ's PyTorch dequantization reaches on ``dev`` (its calibrated figure,
    else :data:`GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION`; an array over several :class:`Devices`)."""
    own = dev.efficiency.gptq_torch_dequant_fraction
    if isinstance(own, np.ndarray):  # several devices: each one's figure, defaults filled in
        return own
    return own if own is not None else GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION


def dequant_time_s(part: "OpArrays", nbytes, dev):
    """Time of a part's dequantization kernels moving ``nbytes``: streaming, or AutoGPTQ's PyTorch path at its
    share of the streaming rate."""
    t = memory_time_s(nbytes, dev)
    return t / gptq_torch_dequant_fraction(dev) if part.torch_dequant else t


def fused_dequant(quant: str, rows) -> Any:
    """Whether a GEMM on ``quant`` weights with ``rows`` input rows (tokens x batch of one forward) reads the
    packed weights in a fused kernel (numbers or arrays)."""
    limit = FUSED_DEQUANT_MAX_ROWS.get(quant)
    if limit is None:
        return np.zeros_like(rows, dtype=bool) if isinstance(rows, np.ndarray) else False
    return rows <= limit


def _dot(c: tuple[float, ...], B: tuple[float, ...]) -> float:
    return c[0] * B[0] + c[1] * B[1] + c[2] * B[2] + c[3] * B[3] + c[4] * B[4] + c[5] * B[5] + c[6] * B[6]


@dataclass(frozen=True)
class Op:
    fwd_flops: tuple[float, ...]  # coefficients over the basis
    bwd_flops: tuple[float, ...]
    fwd_bytes: tuple[float, ...]
    attention: bool
    causal: bool  # a causal attention kernel skips the masked half of the score blocks
    tp_split: bool  # split over tensor-parallel ranks (all but the MoE router)
    recomputed: bool  # rerun in backward under checkpointing
    fused_saving_bytes: float = 0.0  # quantized weight: 16-bit weight bytes a fused kernel reads as packed instead


@dataclass(frozen=True)
class OpArrays:
    """The operators of one part of the model (embeddings, one block variant, head)."""

    where: str  # "pre" | "block" | "post"
    layers: tuple[int, ...]
    ops: tuple[Op, ...]
    elementwise_bytes: tuple[float, ...]  # bytes of non-parameter tensors created in forward (coefficients)
    dequant_bytes: float  # QLoRA: packed bytes read + 16-bit bytes written per forward
    n_kernels: int  # operators issued per forward (tensor-producing ops of the trace)
    encoder: bool = False  # the encoder stack of an encoder-decoder model (runs once per prompt, not per decode step)
    param_module_numels: tuple[int, ...] = ()  # per module owning parameters: its largest one (ZeRO-3 fetches)
    n_bnb_calls: int = 0  # bitsandbytes quantized linears called per forward (their Python wrappers)
    n_dequant_kernels: int = 0  # dequantization kernels per forward (in n_kernels; none when fused)
    dequant_in_backward: bool = True  # the backward dequantizes again (bitsandbytes) or reuses a saved copy
    torch_dequant: bool = False  # AutoGPTQ's PyTorch-op dequantization (:func:`dequant_time_s`)
    # float8 training: bytes the fp8 casts of the linears move per forward, backward, and recompute (coefficients)
    cast_fwd_bytes: tuple[float, ...] = (0.0,) * 7
    cast_bwd_bytes: tuple[float, ...] = (0.0,) * 7
    cast_rec_bytes: tuple[float, ...] = (0.0,) * 7

    @property
    def host_forward_s(self) -> float:
        """Host time to issue one forward of the part (eager operators and bitsandbytes wrappers)."""
        return self.n_kernels * EAGER_OP_OVERHEAD_S + self.n_bnb_calls * BNB_CALL_HOST_S

    def host_forward_fused_s(self, fused_quant):
        """:attr:`host_forward_s` where fused dequantizing kernels issue no separate dequantize kernels
        (``fused_quant``: a flag or an array of flags)."""
        saved = self.n_dequant_kernels * EAGER_OP_OVERHEAD_S
        if isinstance(fused_quant, np.ndarray):
            return self.host_forward_s - np.where(fused_quant, saved, 0.0)
        return self.host_forward_s - (saved if fused_quant else 0.0)

    @property
    def host_backward_s(self) -> float:
        """Host time to issue the part's backward: autograd's C++ engine, no Python (bitsandbytes' autograd
        functions are Python and run again)."""
        return self.n_kernels * BACKWARD_HOST_PER_OP_S + self.n_bnb_calls * BNB_CALL_HOST_S

    @property
    def has_attention(self) -> bool:
        return any(op.attention for op in self.ops)

    @functools.cached_property
    def any_recomputed(self) -> bool:
        """Some operator of the part reruns in the backward (checkpointing)."""
        return any(op.recomputed for op in self.ops)

    @functools.cached_property
    def matrix(self) -> "OpMatrix":
        """The operators as coefficient matrices and flags (one row per operator)."""
        def coeffs(name: str) -> np.ndarray:
            return np.array([getattr(op, name) for op in self.ops], dtype=float).reshape(len(self.ops), 7)

        def flags(name: str) -> np.ndarray:
            return np.array([getattr(op, name) for op in self.ops], dtype=bool)

        return OpMatrix(coeffs("fwd_flops"), coeffs("bwd_flops"), coeffs("fwd_bytes"), flags("attention"),
                        flags("causal"), flags("tp_split"), flags("recomputed"),
                        np.array([op.fused_saving_bytes for op in self.ops], dtype=float))


@dataclass(frozen=True)
class OpMatrix:
    """A part's operators as arrays: (n_ops, 7) coefficients over the basis and (n_ops,) flags."""

    fwd_flops: np.ndarray
    bwd_flops: np.ndarray
    fwd_bytes: np.ndarray
    attention: np.ndarray
    causal: np.ndarray
    tp_split: np.ndarray
    recomputed: np.ndarray
    fused_saving: np.ndarray


def made_tensors(tr) -> list:
    """The tensors one trace part's own ops create (parameters and dequantized weight copies aside)."""
    return [t for t in tr.tensors if not t.is_param and not t.weight_copy]


def compiled_kernels(tr, made: list) -> tuple[set[int], int]:
    """Under torch.compile: the ids of the tensors of one trace part (``made``: :func:`made_tensors`) that still
    go through memory -- what a matmul / attention kernel reads or returns, what is saved for backward, and the
    part's last tensor (its output) -- and the kernels one forward issues: each such kernel and at most one fused
    pointwise kernel after it, plus the one before the first (never more than the eager ops)."""
    keep = set(tr.extern_inputs) | {i for op in tr.ops for i in op.outputs} | {tid for _, tid in tr.saves}
    if made:
        keep.add(made[-1].id)
    n_extern = sum(1 for op in tr.ops if op.aten)
    return keep, min(len(made), 2 * n_extern + 1)


def _part(where, layers, tr, arch, recomputed: frozenset[int], quant_rows, encoder: bool = False,
          bnb: bool = False, torch_dequant: bool = False, compiled: bool = False) -> OpArrays:
    """``recomputed``: indices of the ops a checkpointed block reruns in backward.  ``torch_dequant``: the
    quantized linears dequantize with PyTorch ops once per forward and keep the 16-bit weight for backward
    (AutoGPTQ in training)."""
    # a quantized GEMM's operator reads its weight as the 16-bit copy; fused, it reads the packed storage
    saving = {r.path.rsplit(".", 1)[0]: r.numel * dtype_bytes(r.dtype) - r.storage_bytes for r in quant_rows}
    ops = tuple(
        Op(tuple(op.fwd_flops.c), tuple(op.bwd_flops.c), tuple(op.fwd_bytes.c), op.op == "attention",
           op.op == "attention" and arch.arch == "decoder",
           not is_moe_router(arch, op.module),
           i in recomputed,
           saving.get(op.module, 0.0) if op.op == "linear" else 0.0)
        for i, op in enumerate(tr.ops))
    made = made_tensors(tr)  # the eager ops' own tensors
    n_made = len(made)
    if compiled:
        keep, n_made = compiled_kernels(tr, made)
        made = [t for t in made if t.id in keep]
    ew = [0.0] * 7
    for t in made:
        k = dtype_bytes(t.dtype)
        for i, c in enumerate(t.numel.c):
            ew[i] += c * k
    # bytes moved per weight besides the packed read, and kernels, of one dequantization
    per_weight, kernels = ((GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT, GPTQ_TORCH_DEQUANT_KERNELS) if torch_dequant
                           else (2.0, 1))
    deq = sum(r.storage_bytes + per_weight * r.numel for r in quant_rows)
    n_deq = kernels * len(quant_rows)
    casts = [(i, op.fp8_cast) for i, op in enumerate(tr.ops) if op.fp8_cast is not None]
    cast_f, cast_b, cast_r = fp8_cast_bytes(casts, recomputed, compiled)
    n_kernels = n_made + n_deq + FP8_CAST_KERNELS[compiled] * len(casts)
    largest: dict[str, int] = {}
    for p in tr.params:
        module = p.path.rsplit(".", 1)[0]
        largest[module] = max(largest.get(module, 0), p.numel)
    return OpArrays(where, tuple(layers), ops, tuple(ew), deq, n_kernels, encoder, tuple(largest.values()),
                    len(quant_rows) if bnb else 0, n_deq, not torch_dequant, torch_dequant, cast_f, cast_b, cast_r)


def fp8_cast_bytes(casts: list, recomputed: frozenset[int], compiled: bool) -> tuple[tuple[float, ...], ...]:
    """(forward, backward, recompute) bytes, as basis coefficients, of the fp8 casts of float8 linears
    (``casts``: (op index, (input, weight, output) element polynomials)) per :data:`FP8_CAST_FWD_BYTES`; the
    recompute casts again the linears it reruns."""
    fwd, bwd, rec = [0.0] * 7, [0.0] * 7, [0.0] * 7
    for i, elems in casts:
        for n, bf, bb in zip(elems, FP8_CAST_FWD_BYTES[compiled], FP8_CAST_BWD_BYTES[compiled]):
            for j, c in enumerate(n.c):
                fwd[j] += c * bf
                bwd[j] += c * bb
                if i in recomputed:
                    rec[j] += c * bf
    return tuple(fwd), tuple(bwd), tuple(rec)


def cast_time_s(coeffs: tuple[float, ...], B: tuple, tp, cp, dev: Device):
    """Time of fp8 cast bytes (basis coefficients from :func:`fp8_cast_bytes`) on one rank: the activations' and
    gradients' share of the tokens splits over the tensor- and context-parallel ranks, the weights' (the constant
    term) over the tensor-parallel ranks only -- every context-parallel rank casts the whole weight."""
    per_token = sum(c * b for c, b in zip(coeffs[:6], B[:6]))
    return memory_time_s((per_token / cp + coeffs[6] * B[6]) / tp, dev)


def zero3_fetch_host_s(part: OpArrays, persistence_threshold: int) -> float:
    """Host time of one pass's ZeRO-3 parameter fetches in one instance of ``part``: its modules that own a
    partitioned parameter (parameters under ``stage3_param_persistence_threshold`` stay whole, unfetched)."""
    return sum(1 for n in part.param_module_numels if n >= persistence_threshold) * ZERO3_FETCH_HOST_S


def op_arrays(ct: CostTable) -> tuple[OpArrays, ...]:
    """The operator tables of ``ct`` (built on first use and kept on the table)."""
    cached = ct.__dict__.get("_ops")
    if cached is not None:
        return cached
    mt = ct.trace
    global_ids = {t.id for t in mt.globals_}
    quant_by_part: dict[str, list] = {"pre": [], "post": [], "block": []}
    for r in ct.param_rows:
        if r.quantized:
            quant_by_part[r.where].append(r)
    bnb = ct.plan.base_quant in BNB_QUANTS
    tdq = ct.plan.base_quant == "gptq" and ct.plan.training
    cc = ct.plan.compiled
    parts = [_part("pre", (0,), mt.pre, ct.arch, frozenset(), quant_by_part["pre"], bnb=bnb, torch_dequant=tdq,
                   compiled=cc)]
    for v in mt.variants:
        until = frozenset()
        if v.checkpointed:
            until = frozenset(recomputed_ops(v.trace, ct.plan, global_ids))
        rows = [r for r in quant_by_part["block"] if r.layers == tuple(v.layers)]
        # encoder-decoder variants are keyed (..., is_decoder) and the encoder's final norm ("encoder_final_norm",)
        encoder = ct.arch.arch == "encoder_decoder" and (v.key[-1] is False or v.key == ("encoder_final_norm",))
        parts.append(_part("block", v.layers, v.trace, ct.arch, until, rows, encoder, bnb, tdq, cc))
    parts.append(_part("post", (0,), mt.post, ct.arch, frozenset(), quant_by_part["post"], bnb=bnb, torch_dequant=tdq,
                       compiled=cc))
    out = tuple(parts)
    ct.__dict__["_ops"] = out
    return out


def causal_skipped_flops(ct: CostTable, B: tuple) -> tuple[float, float, float]:
    """(forward, backward, recompute) FLOPs of one micro-batch at basis ``B`` that are counted for causal
    attention but never run: FlopCounterMode and the MFU formulas count the whole score matrix, a fused
    (flash / memory-efficient) kernel skips its masked half (:func:`attention_time_s`).  Eager and SDPA-math
    attention compute the full matrix and skip nothing."""
    if ct.plan.attention in ("eager", "sdpa-math"):
        return 0.0, 0.0, 0.0
    f = bw = rc = 0.0
    for part in op_arrays(ct):
        n = len(part.layers)
        for op in part.ops:
            if op.attention and op.causal:
                half = 0.5 * n * _dot(op.fwd_flops, B)
                f += half
                bw += 0.5 * n * _dot(op.bwd_flops, B)
                rc += half if op.recomputed else 0.0
    return f, bw, rc


def head_fwd_flops(ct: CostTable, B: tuple) -> float:
    """Forward FLOPs of the head part (final norm, LM head) at basis ``B``."""
    return sum(_dot(op.fwd_flops, B) for part in op_arrays(ct) if part.where == "post" for op in part.ops)


def matmul_dtype(compute_dtype: str, precision: str) -> str:
    """The tensor-core path the GEMMs take: fp8 under float8 training, fp32 (no TF32 by default in
    torch.matmul) for fp32, else the 16-bit compute dtype."""
    if precision == "fp8":
        return "fp8"
    return compute_dtype if compute_dtype in ("bf16", "fp16") else "fp32"


def attention_dtype(matmul_dtype_: str) -> str:
    """The dtype attention's score and value products run in: float8 training (torchao ``Float8Linear``,
    Transformer Engine's fp8 ``Linear``) converts the linear layers only, so SDPA / flash attention and the
    eager batched matmuls stay in 16 bits."""
    return "bf16" if matmul_dtype_ == "fp8" else matmul_dtype_


def peak_flops(dev: Device, dtype: str) -> float:
    """Dense peak of the matmul dtype (fp16's where the device has no path for it)."""
    if isinstance(dev, Devices):
        return dev.peak_flops(dtype)
    return dev.peak_flops(dtype if getattr(dev.peak_tflops, dtype) is not None else "fp16")


class _Efficiencies:
    """The efficiency figures of several devices, as arrays over their axis."""

    def __init__(self, devices: tuple[Device, ...], shape: tuple[int, ...], axis: int) -> None:
        self._devices, self._shape, self._axis = devices, shape, axis
        self.memory_bandwidth_fraction = np.array(
            [d.efficiency.memory_bandwidth_fraction for d in devices]).reshape(shape)
        att = [d.efficiency.attention_fraction for d in devices]
        self.attention_fraction = np.array([math.nan if a is None else a for a in att]).reshape(shape)
        self.gptq_torch_dequant_fraction = np.array([gptq_torch_dequant_fraction(d) for d in devices]).reshape(shape)

    def _each(self, values, fraction) -> np.ndarray:
        """``fraction(efficiency, slice)`` of each device on its slice of ``values`` (broadcast to the
        devices' axis)."""
        out = np.empty(np.broadcast_shapes(np.shape(values), self._shape))
        values = np.broadcast_to(np.asarray(values, dtype=float), out.shape)
        for i, d in enumerate(self._devices):
            at = (Ellipsis, i) + (slice(None),) * (-1 - self._axis)
            out[at] = fraction(d.efficiency, values[at])
        return out

    def attention_fraction_at(self, tokens) -> np.ndarray:
        """Each device's attention fraction at ``tokens`` per sequence (NaN where it has none)."""
        if tokens is None:
            return self.attention_fraction
        return self._each(tokens, lambda e, t: math.nan if e.attention_fraction is None
                          else e.attention_fraction_at(t))

    def matmul_fraction(self, flops_per_gemm: np.ndarray, dtype: str) -> np.ndarray:
        """Each device's own curve on its slice of ``flops_per_gemm``."""
        return self._each(flops_per_gemm, lambda e, f: e.matmul_fraction(f, dtype))

    def attention_kernel_ratio(self, kernel: str, tokens, backward: bool = False) -> np.ndarray:
        """Each device's speed of ``kernel`` relative to FlashAttention-2 (1 where it has no figure)."""
        return self._each(1.0 if tokens is None else tokens,
                          lambda e, t: e.attention_kernel_ratio(kernel, None if tokens is None else t, backward))


class Devices:
    """Several device profiles as one for :func:`part_time` and the roofline functions: each figure is an
    array over the devices, on axis ``axis`` (negative, counted from the end) of the arrays of setups."""

    def __init__(self, devices: list[Device], axis: int = -3) -> None:
        self.devices = tuple(devices)
        self.shape = (len(devices),) + (1,) * (-1 - axis)
        self.memory_bandwidth_Bps = np.array([d.memory_bandwidth_Bps for d in devices]).reshape(self.shape)
        self.efficiency = _Efficiencies(self.devices, self.shape, axis)

    def peak_flops(self, dtype: str) -> np.ndarray:
        return np.array([peak_flops(d, dtype) for d in self.devices]).reshape(self.shape)


def _maximum(a, b):
    """max(a, b) of two numbers, or element-wise of arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


def gemm_time_s(flops, nbytes, dev: Device, dtype: str):
    """Roofline time of one GEMM-like call: compute at the achievable fraction of peak for calls of that
    size, or memory traffic at the streaming fraction, whichever is longer."""
    if not isinstance(flops, np.ndarray) and not isinstance(nbytes, np.ndarray):
        return _roofline(dev, dtype).gemm_time_s(flops, nbytes)  # one setup: the cached scalar roofline
    t_compute = flops / (peak_flops(dev, dtype) * dev.efficiency.matmul_fraction(flops, dtype))
    return _maximum(t_compute, memory_time_s(nbytes, dev))


# The GPUs each fused attention kernel is built for (NVIDIA compute capability, major.minor): FlashAttention 1
# Turing and Ampere (flash-attn 1.x README: sm75/sm80, Hopper through its sm80 path), FlashAttention-2 Ampere,
# Ada and Hopper (flash-attn README: "Ampere, Ada, or Hopper GPUs"), FlashAttention-3 Hopper only (its README:
# "H100 / H800"); SDPA's flash backend sm80 and newer (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp
# check_flash_attention_hardware_support), below which SDPA runs its memory-efficient kernel (sm50+).
ATTENTION_MIN_CC = {"flash1": (7, 5), "flash2": (8, 0), "flash3": (9, 0), "sdpa-flash": (8, 0)}
ATTENTION_ONLY_MAJOR = {"flash3": 9}  # kernels built for one architecture generation alone


def _cc(dev: Device) -> tuple[int, int] | None:
    """The device's CUDA compute capability as (major, minor); None for AMD (gfx targets)."""
    if dev.vendor != "nvidia" or "." not in dev.compute_capability:
        return None
    major, minor = dev.compute_capability.split(".")
    return int(major), int(minor)


def attention_support_warning(attention: str, dev: Device) -> str | None:
    """Why ``attention`` cannot run as asked on ``dev`` (None when it can): a fused kernel built for newer (or,
    FlashAttention-3, other) GPUs.  SDPA's flash request is no error: SDPA then runs its memory-efficient kernel,
    which stores the same tensors."""
    cc = _cc(dev)
    lo, only = ATTENTION_MIN_CC.get(attention), ATTENTION_ONLY_MAJOR.get(attention)
    if cc is None or lo is None or (cc >= lo and (only is None or cc[0] == only)):
        return None
    where = f"{dev.name} is sm{cc[0]}{cc[1]}"
    need = f"sm{only}0 only" if only is not None else f"sm{lo[0]}{lo[1]} or newer"
    if attention == "sdpa-flash":
        return f"SDPA's flash kernel needs {need} and {where}: SDPA runs its memory-efficient kernel instead (same memory)"
    return f"attention {attention!r} runs on {need} and {where}: use 'sdpa-flash', 'sdpa-mem-efficient' or 'eager'"


def attention_time_s(flops, nbytes, dev: Device, dtype: str, causal, tokens=None, kernel: str = "flash2",
                     backward: bool = False):
    """A fused attention kernel: the FLOPs it runs (half the counted ones under a causal mask, which
    FlopCounterMode and the MFU formulas count in full) at the device's attention fraction of peak for
    sequences of ``tokens`` keys per call (the long-sequence figure when None), times ``kernel``'s speed
    relative to FlashAttention-2 (``Efficiency.attention_kernels``; ``backward``: the backward's).  ``causal``
    may be an array of flags beside arrays of FLOPs, ``tokens`` an array of setups."""
    if (not isinstance(flops, np.ndarray) and flops <= 0) or dev.efficiency.attention_fraction is None:
        return gemm_time_s(flops, nbytes, dev, dtype)
    frac = dev.efficiency.attention_fraction_at(tokens)
    if kernel != "flash2":
        frac = frac * dev.efficiency.attention_kernel_ratio(kernel, tokens, backward)
    run = flops * (np.where(causal, 0.5, 1.0) if isinstance(causal, np.ndarray) else (0.5 if causal else 1.0))
    t = _maximum(run / (peak_flops(dev, dtype) * frac), memory_time_s(nbytes, dev))
    if isinstance(frac, np.ndarray) and np.isnan(frac).any():  # devices without a fused-attention figure
        t = np.where(np.isnan(frac), gemm_time_s(flops, nbytes, dev, dtype), t)
    return t


def memory_time_s(nbytes, dev: Device):
    """Time to stream ``nbytes`` through device memory at the achievable bandwidth."""
    return nbytes / (dev.memory_bandwidth_Bps * dev.efficiency.memory_bandwidth_fraction)


@dataclass(frozen=True)
class PartTime:
    forward_s: float  # GPU time
    backward_s: float
    recompute_s: float
    attention_s: float
    host_forward_s: float  # host time to issue the forward's kernels
    host_backward_s: float = 0.0  # host time to issue the backward's kernels


def _rows(coeffs: np.ndarray, B: tuple, shape: tuple[int, ...]) -> np.ndarray:
    """Each operator's value at the basis values: (n_ops, *shape), summed in the order of :func:`_dot`."""
    c = coeffs.reshape(coeffs.shape + (1,) * len(shape))
    out = c[:, 0] * B[0]
    for i in range(1, 7):
        out = out + c[:, i] * B[i]
    return np.broadcast_to(out, (len(coeffs), *shape))


def _sum_rows(a: np.ndarray) -> np.ndarray:
    """Sum over the operators in their order (one setup or many: the same additions either way)."""
    if a.shape[0] == 0:
        return np.zeros(a.shape[1:])
    if a[0].size <= 1:
        return np.cumsum(a, axis=0)[-1]
    return a.sum(axis=0)


def _out(x):
    return float(x) if np.ndim(x) == 0 else x


def part_time(part: OpArrays, B: tuple, dev: Device, dtype: str, tp, cp, training: bool,
              fused_attention: bool = True, fused_quant=False, attn_kernel: str = "flash2") -> PartTime:
    """One instance of a part (one block, the embeddings or the head) for one micro-batch on one rank.
    ``fused_attention``: the attention runs as one flash / SDPA kernel (not eager matmul + softmax).
    ``B``, ``tp`` and ``cp`` may be arrays of setups and ``dev`` several :class:`Devices` (broadcast
    together); the times are then arrays, computed over all operators at once with the same arithmetic
    as one setup's loop over them.  ``fused_quant`` (:func:`fused_dequant`): the quantized GEMMs read their
    packed weights in fused kernels, with no dequantized copy (a forward without gradients).  ``attn_kernel``:
    the fused attention kernel (:func:`attention_kernel`)."""
    if part.where != "block":
        dtype = attention_dtype(dtype)  # float8 converts the blocks' linears; the LM head stays 16-bit
    if not isinstance(dev, Devices) and not any(isinstance(x, np.ndarray) for x in (*B, tp, cp, fused_quant)):
        return _part_time_one(part, B, dev, dtype, tp, cp, training, fused_attention, bool(fused_quant), attn_kernel)
    return _part_time_many(part, B, dev, dtype, tp, cp, training, fused_attention, fused_quant, attn_kernel)


def attention_tokens(B: tuple, cp=1):
    """Keys per sequence one attention call sees: ``K / B`` of the basis, split over the context-parallel
    ranks (ring attention runs the kernel on one rank's chunk at a time); None without sequences."""
    b = B[3]
    if isinstance(b, np.ndarray) or isinstance(cp, np.ndarray):
        return np.divide(B[1], np.maximum(b, 1e-30)) / cp
    return B[1] / b / cp if b > 0 else None


class _Roofline:
    """One device's GEMM roofline for one dtype, as plain floats: :func:`gemm_time_s` of one setup without
    the attribute lookups per call (the same arithmetic, so the same numbers to the last bit)."""

    __slots__ = ("peak_flops", "max_fraction", "log_flops", "fractions", "bytes_per_s")

    def __init__(self, dev: Device, dtype: str) -> None:
        eff = dev.efficiency
        self.peak_flops = peak_flops(dev, dtype)
        self.max_fraction = eff.max_fraction(dtype)
        self.log_flops, self.fractions = eff.log_matmul_curve
        self.bytes_per_s = dev.memory_bandwidth_Bps * eff.memory_bandwidth_fraction

    def gemm_time_s(self, flops: float, nbytes: float) -> float:
        t_memory = nbytes / self.bytes_per_s
        if flops <= 0:
            return t_memory
        frac = interp_clamped(math.log10(max(flops, 1.0)), self.log_flops, self.fractions)
        return max(flops / (self.peak_flops * (frac * self.max_fraction)), t_memory)


_ROOFLINES: dict[tuple[int, str], tuple[Device, _Roofline]] = {}


def _roofline(dev: Device, dtype: str) -> _Roofline:
    """The cached :class:`_Roofline` of (``dev``, ``dtype``); keyed by the profile object (kept alive with it)."""
    hit = _ROOFLINES.get((id(dev), dtype))
    if hit is not None and hit[0] is dev:
        return hit[1]
    roof = _Roofline(dev, dtype)
    _ROOFLINES[(id(dev), dtype)] = (dev, roof)
    return roof


def _part_time_one(part: OpArrays, B: tuple, dev: Device, dtype: str, tp: int, cp: int, training: bool,
                   fused_attention: bool, fused_quant: bool = False, kernel: str = "flash2") -> PartTime:
    fwd = bwd = rec = attn = 0.0
    seq = attention_tokens(B, cp)
    adt = attention_dtype(dtype)
    roofs = {dtype: _roofline(dev, dtype), adt: _roofline(dev, adt)}
    b0, b1, b2, b3, b4, b5, b6 = B
    for op in part.ops:
        div = (tp if op.tp_split else 1) * cp
        c = op.fwd_flops
        f = (c[0] * b0 + c[1] * b1 + c[2] * b2 + c[3] * b3 + c[4] * b4 + c[5] * b5 + c[6] * b6) / div
        c = op.fwd_bytes
        nb = (c[0] * b0 + c[1] * b1 + c[2] * b2 + c[3] * b3 + c[4] * b4 + c[5] * b5 + c[6] * b6) / div
        if fused_quant:
            nb -= op.fused_saving_bytes / div
        fused = op.attention and fused_attention
        dt = adt if op.attention else dtype
        t_f = attention_time_s(f, nb, dev, dt, op.causal, seq, kernel) if fused else roofs[dt].gemm_time_s(f, nb)
        fwd += t_f
        if op.attention:
            attn += t_f
        if op.recomputed:
            rec += t_f
        if training:
            c = op.bwd_flops
            bf = (c[0] * b0 + c[1] * b1 + c[2] * b2 + c[3] * b3 + c[4] * b4 + c[5] * b5 + c[6] * b6) / div
            if bf > 0:
                # a backward call runs up to two GEMMs the size of the forward one (dX, dW)
                if fused:
                    bwd += attention_time_s(bf, 2.0 * nb, dev, dt, op.causal, seq, kernel, backward=True)
                else:
                    n_mm = max(1.0, round(bf / f)) if f > 0 else 1.0
                    bwd += n_mm * roofs[dt].gemm_time_s(bf / n_mm, 2.0 * nb / n_mm)
    t_ew = memory_time_s(2.0 * _dot(part.elementwise_bytes, B) / (tp * cp), dev)
    t_deq = 0.0 if fused_quant else dequant_time_s(part, part.dequant_bytes / tp, dev)
    fwd += t_ew + t_deq + cast_time_s(part.cast_fwd_bytes, B, tp, cp, dev)
    if training:
        bwd += 2.0 * t_ew + (t_deq if part.dequant_in_backward else 0.0) \
            + cast_time_s(part.cast_bwd_bytes, B, tp, cp, dev)
        if part.any_recomputed:
            rec += t_ew + t_deq + cast_time_s(part.cast_rec_bytes, B, tp, cp, dev)
    return PartTime(fwd, bwd, rec, attn, part.host_forward_fused_s(fused_quant), part.host_backward_s)


def _part_time_many(part: OpArrays, B: tuple, dev: Device, dtype: str, tp, cp, training: bool,
                    fused_attention: bool, fused_quant=False, kernel: str = "flash2") -> PartTime:
    m = part.matrix
    shape = np.broadcast_shapes(*(np.shape(x) for x in (*B, tp, cp, fused_quant)), getattr(dev, "shape", ()))
    nd = len(shape)

    def col(flags: np.ndarray) -> np.ndarray:
        return flags.reshape(flags.shape + (1,) * nd)

    div = np.where(col(m.tp_split), tp, 1) * cp
    f = _rows(m.fwd_flops, B, shape) / div
    nb = _rows(m.fwd_bytes, B, shape) / div
    fq = np.broadcast_to(np.asarray(fused_quant, dtype=bool), shape)
    nb = nb - np.where(fq, col(m.fused_saving), 0.0) / div
    fused = m.attention & fused_attention
    has_fused = bool(fused.any())
    adt = attention_dtype(dtype)
    eager_attn = m.attention & ~fused
    t_f = np.array(gemm_time_s(f, nb, dev, dtype), dtype=float)
    if adt != dtype and eager_attn.any():
        t_f[eager_attn] = gemm_time_s(f[eager_attn], nb[eager_attn], dev, adt)
    seq = attention_tokens(B, cp)
    if has_fused:
        t_f[fused] = attention_time_s(f[fused], nb[fused], dev, adt, col(m.causal[fused]), seq, kernel)
    fwd = _sum_rows(t_f)
    attn = _sum_rows(t_f[m.attention])
    rec = _sum_rows(t_f[m.recomputed])
    bwd = np.zeros(shape)
    if training:
        bf = _rows(m.bwd_flops, B, shape) / div
        # a backward call runs up to two GEMMs the size of the forward one (dX, dW)
        n_mm = np.ones_like(bf)
        ratio = np.divide(bf, f, out=np.ones_like(bf), where=f > 0)
        n_mm = np.where(f > 0, np.maximum(1.0, np.round(ratio)), n_mm)
        t_b = np.array(n_mm * gemm_time_s(bf / n_mm, 2.0 * nb / n_mm, dev, dtype), dtype=float)
        if adt != dtype and eager_attn.any():
            e = eager_attn
            t_b[e] = n_mm[e] * gemm_time_s(bf[e] / n_mm[e], 2.0 * nb[e] / n_mm[e], dev, adt)
        if has_fused:
            t_b[fused] = attention_time_s(bf[fused], 2.0 * nb[fused], dev, adt, col(m.causal[fused]), seq, kernel,
                                          backward=True)
        bwd = _sum_rows(np.where(bf > 0, t_b, 0.0))
    t_ew = memory_time_s(2.0 * _dot(part.elementwise_bytes, B) / (tp * cp), dev)
    t_deq = np.where(fq, 0.0, dequant_time_s(part, part.dequant_bytes / tp, dev))
    fwd = fwd + (t_ew + t_deq + cast_time_s(part.cast_fwd_bytes, B, tp, cp, dev))
    if training:
        bwd = bwd + (2.0 * t_ew + (t_deq if part.dequant_in_backward else 0.0)
                     + cast_time_s(part.cast_bwd_bytes, B, tp, cp, dev))
        if m.recomputed.any():
            rec = rec + (t_ew + t_deq + cast_time_s(part.cast_rec_bytes, B, tp, cp, dev))
    full = np.zeros(shape)
    return PartTime(_out(fwd + full), _out(bwd + full), _out(rec + full), _out(attn + full),
                    _out(part.host_forward_fused_s(fq)), part.host_backward_s)
