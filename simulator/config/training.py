"""How the job runs: workload, precision, optimizer, checkpointing, attention, inference quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .base import Strict

Precision = Literal["fp32", "bf16-amp", "fp16-amp", "bf16", "fp16", "fp8"]
"""fp32; 16-bit autocast over fp32 master weights (-amp); pure 16-bit weights and states; fp8 matmuls (torchao float8) over bf16."""

OptimizerName = Literal[
    "adamw", "adam", "sgd", "sgd-momentum", "adafactor", "lion",
    "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit",
    "galore-adamw", "galore-adamw-8bit", "galore-adafactor", "mezo",
]

TORCH_OPTIMIZERS = frozenset({"adamw", "adam", "sgd", "sgd-momentum"})
"""The torch.optim optimizers, whose implementation (``Optimizer.impl``: foreach, fused, for-loop) sets their memory
and time."""
BNB_8BIT_OPTIMIZERS = frozenset({"adamw-8bit", "paged-adamw-8bit"})
"""The bitsandbytes optimizers with blockwise 8-bit states (``optimizer_update_8bit_blockwise``)."""
BNB_OPTIMIZERS = BNB_8BIT_OPTIMIZERS | {"paged-adamw-32bit"}
"""The optimizers stepped by bitsandbytes' ``Optimizer8bit.step`` loop."""

GALORE_BASE: dict[str, str] = {"galore-adamw": "adamw", "galore-adamw-8bit": "adamw-8bit", "galore-adafactor": "adafactor"}
"""GaLore optimizer -> the optimizer its unprojected parameters (and its projected states) follow (galore-torch 1.0:
``GaLoreAdamW``, ``GaLoreAdamW8bit`` on bitsandbytes' ``Optimizer2State``, ``GaLoreAdafactor``)."""


@dataclass(frozen=True)
class GaLore:
    """Gradient low-rank projection settings (Zhao et al. 2024, arXiv 2403.03507; galore-torch 1.0; transformers
    ``optim="galore_*"``), read from the ``galore_*`` fields of :class:`Optimizer`."""

    rank: int
    update_proj_gap: int
    scale: float
    proj_type: str
    targets: tuple[str, ...]


class TrainWorkload(Strict):
    task: Literal["train"] = "train"
    micro_batch: int = Field(default=1, ge=1)
    """Sequences per forward/backward on one device."""
    seq_len: int = Field(default=2048, ge=1)
    """Tokens per sequence (padded length)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step (the pipeline's micro-batches under pipeline parallelism)."""
    total_tokens: float | None = Field(default=None, gt=0)
    """Tokens the whole run trains on (dataset tokens x epochs), for its time, cost and energy; none = per million tokens only."""


class InferWorkload(Strict):
    task: Literal["infer"] = "infer"
    batch: int = Field(default=1, ge=1)
    """Concurrent sequences."""
    prompt_len: int = Field(default=512, ge=1)
    """Prompt tokens per sequence (prefill)."""
    gen_len: int = Field(default=256, ge=0)
    """Generated tokens per sequence (decode)."""
    prefill_logits: Literal["last", "all"] = "last"
    """Positions the prefill computes logits for: 'last' is generation (transformers' ``generate`` passes
    ``logits_to_keep=1``; vLLM and TGI sample from the last position), 'all' a plain forward over the prompts
    that returns ``batch x prompt_len x vocab`` logits in the compute dtype (prompt scoring, perplexity and
    log-likelihood evaluation)."""


Workload = Annotated[Union[TrainWorkload, InferWorkload], Field(discriminator="task")]


class Optimizer(Strict):
    name: OptimizerName = "adamw"
    """Optimizer; the -8bit ones are bitsandbytes blockwise 8-bit, paged ones live in CUDA managed memory; mezo is
    MeZO's zeroth-order SGD (two forwards under inference mode per step, no backward, no gradients or states)."""
    impl: Literal["foreach", "foreach-torch2.0", "fused", "for-loop"] = "foreach"
    """torch.optim implementation: foreach (default on CUDA) holds ~one extra copy of the params being updated;
    foreach-torch2.0 is torch <= 2.0's Adam(W), which holds two (its ``denom`` was built out of place)."""
    beta1: bool = True
    """Adafactor and galore-adafactor only: keep a first moment (exp_avg)."""
    scale_parameter: bool = True
    """Adafactor only: transformers' ``scale_parameter``, the step scaled by the parameter's RMS, which the
    Python loop compares on the host -- one device synchronisation per parameter per step.  True is the
    class's default; the Trainer's ``optim="adafactor"`` passes False."""
    in_backward: bool = False
    """Step each parameter from its gradient hook during backward (torchtune optimizer_in_bwd, LOMO, layer-wise
    GaLore): gradients never exist all at once."""
    galore_rank: int = Field(default=128, ge=1)
    """GaLore only: projection rank r -- the optimizer states of an m x n weight are r x max(m, n) (proj_type std).
    Defaults are transformers' ``optim_args`` (rank 128, update_proj_gap 200, scale 0.25, proj_type std)."""
    galore_update_proj_gap: int = Field(default=200, ge=1)
    """GaLore only: steps between the SVDs that refresh each projector."""
    galore_scale: float = Field(default=0.25, gt=0)
    """GaLore only: scale of the projected-back update (no effect on memory)."""
    galore_proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    """GaLore only: which side is projected; std keeps the states on the longer side (r x max(m, n))."""
    galore_targets: list[str] = Field(default_factory=lambda: ["attn", "mlp"], min_length=1)
    """GaLore only: nn.Linear modules whose weights are projected -- a module matches when one of these is a
    substring of its path or a regex matching it whole (transformers' ``optim_target_modules``; the GaLore repo's
    attn, mlp); every other parameter keeps the base optimizer's full states."""

    @property
    def forward_only(self) -> bool:
        """MeZO: the step is two forwards under inference mode -- no backward, gradients or saved activations."""
        return self.name == "mezo"

    @property
    def galore(self) -> GaLore | None:
        """The projection settings of a galore-* optimizer; None for the others."""
        if self.name not in GALORE_BASE:
            return None
        return GaLore(self.galore_rank, self.galore_update_proj_gap, self.galore_scale, self.galore_proj_type,
                      tuple(self.galore_targets))


class Checkpointing(Strict):
    mode: Literal["none", "full", "every_k", "offload", "selective"] = "none"
    """Activation checkpointing: none, every block (full), every k-th block, every block with the
    checkpointed inputs offloaded to host memory (Unsloth's, torchtune's activation offloading), or
    every block under torchtitan's per-op selective policy (``selective``: the outputs of the attention
    kernel, of every addmm / bmm / _scaled_mm and of every other mm are kept, the rest recomputed)."""
    every_k: int = Field(default=1, ge=1)
    """With mode='every_k': checkpoint one block in k."""
    reentrant: bool = False
    """The backward reruns each checkpointed block's whole forward: ``torch.utils.checkpoint(use_reentrant=True)``
    (transformers before v5, whose ``gradient_checkpointing_enable`` passes it), DeepSpeed's and Megatron's
    checkpoint functions.  False: non-reentrant with torch's early stop, which ends the rerun at the last tensor
    the backward needs (a Llama block's down_proj is not rerun)."""

    @model_validator(mode="after")
    def _reentrant_mode(self) -> "Checkpointing":
        if self.reentrant and self.mode == "selective":
            raise ValueError("checkpointing.reentrant=True: selective checkpointing runs non-reentrant (torch's "
                             "selective checkpoint contexts need use_reentrant=False); use mode 'full', 'every_k' "
                             "or 'offload', or reentrant=False")
        return self


Attention = Literal["eager", "sdpa-math", "sdpa-mem-efficient", "sdpa-flash", "flash1", "flash2", "flash3"]


class InferenceQuant(Strict):
    weights: Literal["none", "int8", "nf4", "fp4", "gptq", "awq", "fp8"] = "none"
    """Weight storage at inference."""
    group_size: int = Field(default=128, gt=0)
    """GPTQ/AWQ group size."""
    double_quant: bool = False
    """bitsandbytes nested quantization of the 4-bit scales."""
    kv_dtype: Literal["auto", "bf16", "fp16", "fp32", "fp8", "int8"] = "auto"
    """KV-cache element type; 'auto' = compute dtype. int4 caches are not supported."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """What runs the generation: transformers' ``generate`` (eager kernels launched one by one, a KV cache that
    grows with the sequences), or a paged serving engine like vLLM (the KV pool is allocated up front to fill
    ``gpu_memory_utilization`` of the device, decode steps replay CUDA graphs, at most ``max_num_seqs``
    sequences run at once and the rest wait for a slot)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """engine='vllm': the share of the device's memory the engine takes (vLLM's default 0.9)."""
    max_num_seqs: int = Field(default=256, ge=1)
    """engine='vllm': the most sequences decoded at once (vLLM's default 256)."""
    kv_block_tokens: int = Field(default=16, ge=1)
    """engine='vllm': tokens per KV-cache block; each sequence holds whole blocks (vLLM's default 16)."""
    cuda_graphs: bool | None = None
    """Decode steps replayed from a captured CUDA graph (no per-kernel launch cost): vLLM's default, or
    transformers with a static cache under ``torch.compile(mode="reduce-overhead")``.  None: the engine's default
    (on for vllm, off for transformers' generate)."""

    @property
    def decode_graphs(self) -> bool:
        """Whether decode steps replay a CUDA graph (``cuda_graphs``, else the engine's default)."""
        return self.engine == "vllm" if self.cuda_graphs is None else self.cuda_graphs

    @model_validator(mode="before")
    @classmethod
    def _kv_int4(cls, data):
        if isinstance(data, dict) and data.get("kv_dtype") in ("int4", "int2", "nf4"):
            raise ValueError(
                f"kv_dtype={data['kv_dtype']!r} is not supported (no fused attention kernel reads it); "
                "allowed: auto, bf16, fp16, fp32, fp8, int8"
            )
        return data
