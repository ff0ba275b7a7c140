"""How the job is spread over devices: data parallel with ZeRO / FSDP sharding, offload, tensor,
sequence, context, pipeline and expert parallelism.

The degrees multiply: ``n_gpus = dp * tp * pp * cp``.  Expert parallelism reuses data-parallel ranks
(Megatron-Core, DeepSpeed-MoE), so ``ep`` divides ``dp * cp``.  Defaults follow the frameworks:
DeepSpeed's ``deepspeed/runtime/zero/config.py`` for the ZeRO buckets, PyTorch DDP's 25 MiB buckets,
FSDP2's ``reshard_after_forward=True``.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Literal

from pydantic import Field, model_validator

from .base import Strict


class ZeroStage(IntEnum):
    """DeepSpeed ZeRO stages: what is partitioned over the data-parallel ranks (ZeRO paper, arXiv 1910.02054)."""

    NONE = 0
    OPTIMIZER = 1  # optimizer states (incl. the fp32 master copy)
    GRADIENTS = 2  # + gradients
    PARAMETERS = 3  # + parameters


FsdpMode = Literal["none", "full_shard", "shard_grad_op", "hybrid_shard", "no_shard"]
Offload = Literal["none", "cpu", "nvme"]


class Parallel(Strict):
    dp: int = Field(default=1, ge=1)
    """Data-parallel degree (replicas, or the ZeRO/FSDP sharding group)."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree (Megatron column/row split of attention heads and MLP)."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel stages."""
    cp: int = Field(default=1, ge=1)
    """Context-parallel degree (ring attention: the sequence is split over cp ranks)."""
    ep: int = Field(default=1, ge=1)
    """Expert-parallel degree for MoE models (experts split over ep ranks taken from dp*cp)."""
    sp: bool = False
    """Sequence parallelism with TP: norms/dropouts run on s/tp tokens; all-reduces become all-gather + reduce-scatter."""
    zero: ZeroStage = ZeroStage.NONE
    """DeepSpeed ZeRO stage 0-3 (16-bit weights and grads, fp32 master copy in the optimizer states)."""
    fsdp: FsdpMode = "none"
    """PyTorch FSDP sharding: full_shard (ZeRO-3-like), shard_grad_op (ZeRO-2-like), hybrid_shard (full shard
    within a node, replicated across nodes), no_shard (DDP)."""
    fsdp_version: Literal[1, 2] = 2
    """FSDP1 (FlatParameter, record_stream) or FSDP2 (fully_shard, per-parameter dim-0 sharding)."""
    reshard_after_forward: bool = True
    """FSDP: free the gathered parameters of a unit after its forward (re-gathered in backward)."""
    fsdp_mixed_precision: bool = True
    """FSDP with a 16-bit precision: the sharded parameters, their gradients and the optimizer states stay fp32
    and 16-bit copies are gathered (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: torchtitan,
    Accelerate's FSDP plugin); False: FSDP shards the model's own 16-bit parameters, reduces 16-bit gradients and
    the optimizer keeps 16-bit states (torchtune's recipes call ``fully_shard`` without a policy)."""
    fsdp_embedding_units: bool = False
    """FSDP: the input embeddings and the output projection are units of their own, gathered only while they run
    (torchtune's ``custom_sharded_layers: ['tok_embeddings', 'output']``), instead of staying gathered with the
    root unit through the step."""
    fsdp_no_sync: bool = False
    """FSDP: gradient accumulation skips the reduce-scatter on every micro-batch but the last (FSDP1 ``no_sync()``,
    FSDP2 ``set_requires_gradient_sync(False)``; HF Accelerate / Trainer and Lightning Fabric's
    ``no_backward_sync`` do this by default), so each rank holds its unsharded gradients between micro-batches
    (PyTorch ``FullyShardedDataParallel.no_sync`` docs: "FSDP will accumulate the full model gradients
    (instead of gradient shards) until the eventual sync")."""
    fsdp1_mixed_units: bool = False
    """FSDP1 ``use_orig_params=True`` with units that mix frozen and trainable parameters (a LoRA model wrapped
    per transformer block, as Lightning Fabric / litgpt do): the unit's FlatParameter takes a gradient for every
    element, so gradient memory and the reduce-scatter are as if nothing were frozen (PyTorch FSDP docs warning,
    pytorch/pytorch PR #104967).  PEFT's ``fsdp_auto_wrap_policy`` (HF Trainer) wraps the adapters in units of
    their own and avoids it."""
    offload_optimizer: Offload = "none"
    """Optimizer states (and the fp32 master copy) on the host (ZeRO-Offload) or NVMe (ZeRO-Infinity); the step runs on the CPU."""
    offload_params: Offload = "none"
    """Parameters on the host or NVMe, fetched per layer (ZeRO-3 / FSDP only)."""
    pp_schedule: Literal["1f1b", "interleaved", "gpipe"] = "1f1b"
    """Pipeline schedule: 1F1B (PipeDream-flush), interleaved 1F1B with pp_virtual chunks per rank, or GPipe (all forwards first)."""
    pp_virtual: int = Field(default=1, ge=1)
    """Model chunks per pipeline rank (interleaved schedule)."""
    ddp_bucket_MiB: float = Field(default=25.0, gt=0)
    """DDP gradient bucket size (torch default bucket_cap_mb=25)."""
    ddp_bucket_view: bool = False
    """DDP gradient_as_bucket_view: gradients are views into the buckets (no second copy of the gradients)."""
    reduce_bucket_elems: int = Field(default=500_000_000, gt=0)
    """ZeRO reduce_bucket_size in elements (DeepSpeed default 5e8)."""
    contiguous_gradients: bool = True
    """ZeRO contiguous_gradients (DeepSpeed default on): gradients are copied into a reduce_bucket_size buffer
    allocated whole, however few parameters train."""
    overlap_comm: Literal["default", True, False] = "default"
    """ZeRO overlap_comm; 'default' = DeepSpeed's (on for stage 3, off for stages 1-2).  Stages 1-2 then
    allocate a second reduce_bucket_size buffer so one fills while the other reduces."""
    allgather_bucket_elems: int = Field(default=500_000_000, gt=0)
    """ZeRO-1/2 allgather_bucket_size in elements (DeepSpeed default 5e8)."""
    stage3_prefetch_bucket_elems: int = Field(default=50_000_000, gt=0)
    """ZeRO-3 stage3_prefetch_bucket_size in elements (DeepSpeed code default 5e7)."""
    stage3_max_live_parameters: int = Field(default=1_000_000_000, gt=0)
    """ZeRO-3 stage3_max_live_parameters: gathered parameters kept live at most (elements)."""
    stage3_param_persistence_threshold: int = Field(default=100_000, ge=0)
    """ZeRO-3: parameters smaller than this (elements) are not partitioned (DeepSpeed default 1e5)."""
    sub_group_size: int = Field(default=1_000_000_000, gt=0)
    """ZeRO-3 sub_group_size in elements: the optimizer steps the partition one sub-group at a time (DeepSpeed default 1e9)."""
    bf16_master_weights_and_grads: bool = False
    """DeepSpeed bf16 option: the master copy of the weights and the gradient partition the optimizer reads stay
    bf16 instead of fp32 (2 + 2 bytes per parameter instead of 4 + 4)."""
    bf16_optimizer_states: bool = False
    """DeepSpeed bf16 option: the optimizer moments (Adam's exp_avg, exp_avg_sq) are kept in bf16 instead of fp32."""

    @property
    def n_gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def shards_params(self) -> bool:
        """Parameters are partitioned over the data-parallel ranks (ZeRO-3, FSDP full/hybrid shard)."""
        return self.zero >= ZeroStage.PARAMETERS or self.fsdp in ("full_shard", "hybrid_shard")

    @property
    def shards_grads(self) -> bool:
        return self.zero >= ZeroStage.GRADIENTS or self.fsdp in ("full_shard", "hybrid_shard", "shard_grad_op")

    @property
    def shards_optimizer(self) -> bool:
        return self.zero >= ZeroStage.OPTIMIZER or self.fsdp in ("full_shard", "hybrid_shard", "shard_grad_op")

    @property
    def ipg_buffers(self) -> int:
        """DeepSpeed's reduce (IPG) buffers of reduce_bucket_size elements: stage 1-2 allocate one per backward,
        two with overlap_comm (``setup_buckets``); stage 3 one for the run (``DeepSpeedZeroOptimizer_Stage3``)."""
        if not self.deepspeed or not self.contiguous_gradients:
            return 0
        overlap = self.zero >= ZeroStage.PARAMETERS if self.overlap_comm == "default" else self.overlap_comm
        return 1 if self.zero >= ZeroStage.PARAMETERS or not overlap else 2

    @property
    def deepspeed(self) -> bool:
        """DeepSpeed's engine runs the step (ZeRO stage >= 1): 16-bit model, fp32 master copy in the optimizer."""
        return self.zero >= ZeroStage.OPTIMIZER

    @model_validator(mode="after")
    def _consistent(self) -> "Parallel":
        if self.zero > 0 and self.fsdp != "none":
            raise ValueError(f"parallel.zero={int(self.zero)} and parallel.fsdp={self.fsdp!r}: choose DeepSpeed ZeRO or FSDP, not both")
        if self.sp and self.tp == 1:
            raise ValueError("parallel.sp=True needs parallel.tp > 1 (sequence parallelism splits the TP-replicated regions)")
        if self.pp_virtual > 1 and self.pp_schedule != "interleaved":
            raise ValueError(f"parallel.pp_virtual={self.pp_virtual} needs pp_schedule='interleaved' (got {self.pp_schedule!r})")
        if self.pp_schedule == "interleaved" and self.pp == 1:
            raise ValueError("parallel.pp_schedule='interleaved' needs parallel.pp > 1")
        if (self.dp * self.cp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must divide dp*cp={self.dp * self.cp} (expert-parallel ranks come from the data-parallel ones)")
        if self.offload_params != "none" and not self.shards_params:
            raise ValueError(
                f"parallel.offload_params={self.offload_params!r} needs sharded parameters: zero=3 or fsdp='full_shard'/'hybrid_shard'"
            )
        if self.offload_optimizer != "none" and not self.shards_optimizer:
            raise ValueError(
                f"parallel.offload_optimizer={self.offload_optimizer!r} needs ZeRO (zero >= 1) or FSDP sharding"
            )
        if (self.bf16_master_weights_and_grads or self.bf16_optimizer_states) and self.zero < ZeroStage.OPTIMIZER:
            raise ValueError(
                "parallel.bf16_master_weights_and_grads / bf16_optimizer_states are DeepSpeed ZeRO options: use zero >= 1"
            )
        sharded = ("full_shard", "shard_grad_op", "hybrid_shard")
        if self.fsdp_no_sync and self.fsdp not in sharded:
            raise ValueError(f"parallel.fsdp_no_sync=True needs parallel.fsdp in {sharded} (got {self.fsdp!r})")
        if self.fsdp1_mixed_units and (self.fsdp not in sharded or self.fsdp_version != 1):
            raise ValueError(
                f"parallel.fsdp1_mixed_units=True needs parallel.fsdp_version=1 and parallel.fsdp in {sharded} "
                f"(got fsdp_version={self.fsdp_version}, fsdp={self.fsdp!r})"
            )
        if self.fsdp != "none" and self.offload_optimizer == "nvme":
            raise ValueError("parallel.offload_optimizer='nvme' is DeepSpeed ZeRO-Infinity: use zero=3, not FSDP")
        return self
