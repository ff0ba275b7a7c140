"""Typed results (frozen pydantic models; ``model_dump(mode='json')`` is the CLI's --json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["forward", "backward", "optimizer", "prefill", "decode"]

CATEGORIES = (
    "weights",
    "quant_scales",
    "trainable_weights",
    "gradients",
    "optimizer_states",
    "activations",
    "transients",
    "kv_cache",
    "allocator_overhead",
    "cuda_context",
    "workspaces",
)


class Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MemoryBreakdown(Result):
    """Bytes per category at the peak (PyTorch MemTracker vocabulary plus KV cache and runtime)."""

    weights: float = 0.0
    quant_scales: float = 0.0
    trainable_weights: float = 0.0
    gradients: float = 0.0
    optimizer_states: float = 0.0
    activations: float = 0.0
    transients: float = 0.0
    kv_cache: float = 0.0
    allocator_overhead: float = 0.0
    cuda_context: float = 0.0
    workspaces: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, c) for c in CATEGORIES)


class Suggestion(Result):
    change: str
    peak_memory_bytes: float
    fits: bool


class FlopBreakdown(Result):
    forward: float
    backward: float
    recompute: float
    per_step: float  # all micro-batches of one optimizer step (or one full generation)
    per_token: float
    executed_per_step: float  # per_step less the causal-masked half that fused attention kernels skip


class TimeBreakdown(Result):
    """Where the time of one step goes on the slowest rank (training: one optimizer step; inference: the
    whole generation of one batch).  ``*_exposed_s`` is what overlapping could not hide."""

    step_s: float
    forward_s: float = 0.0
    backward_s: float = 0.0
    recompute_s: float = 0.0
    tp_comm_s: float = 0.0
    cp_comm_exposed_s: float = 0.0
    ep_comm_s: float = 0.0
    pp_p2p_s: float = 0.0
    pp_bubble_s: float = 0.0
    dp_comm_s: float = 0.0
    dp_comm_exposed_s: float = 0.0
    optimizer_s: float = 0.0
    offload_s: float = 0.0
    prefill_s: float = 0.0
    decode_per_token_s: float = 0.0
    tokens_per_s: float  # all GPUs together
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs (no recompute; causal attention counted in full, the PaLM / Megatron / torchtitan
    #             convention) / (time x GPUs x dense peak of the matmul dtype)
    hfu: float  # FLOPs the kernels execute (recompute included, the masked half of causal attention not) / the same


class Cost(Result):
    """Money and energy; prices and power come from the system / device profiles with their sources."""

    usd_per_gpu_hour: float | None
    price_source: str | None
    watts_per_gpu: float | None
    """None where neither the system nor the device profile states a power figure."""
    power_source: str
    usd_per_step: float | None
    usd_per_million_tokens: float | None
    kwh_per_million_tokens: float | None
    run_tokens: float | None = None
    run_time_s: float | None = None
    run_usd: float | None = None
    run_kwh: float | None = None


class Uncertainty(Result):
    """How far the measurement may land from the prediction: bands from fitsim's measured residuals
    (``simulator.uncertainty`` says how they are derived) and the probability of running out of memory."""

    interval: Literal["p10-p90", "p5-p95"]
    """Quantiles of the bands: p10-p90 holds 80% of the measured setups of the cell."""
    peak_memory_lo_bytes: float
    peak_memory_hi_bytes: float
    p_oom: float = Field(ge=0.0, le=1.0)
    """P(the measured device peak exceeds the device memory)."""
    memory_cell: str
    """The residual cell used ('memory/single/train/lora')."""
    memory_n: int
    """Measurements in it."""
    memory_bias_ratio: float
    """Median measured / predicted peak in the cell (1.10: the engine reads 10% low there)."""
    step_time_lo_s: float | None = None
    step_time_hi_s: float | None = None
    time_cell: str | None = None
    time_n: int | None = None
    time_bias_ratio: float | None = None
    """Median measured / predicted step time in the cell."""
    basis: str
    """Which measurements the residuals come from."""


class EnginePool(Result):
    """A serving engine's preallocated KV pool (inference.engine 'vllm'), per rank."""

    share_bytes: float  # gpu_memory_utilization x device memory: what the engine takes
    needed_bytes: float  # what the setup needs for all its sequences at once: weights, profiled forward, their KV
    pool_bytes: float  # the KV pool: the share less everything else
    pool_tokens: int  # tokens of KV cache the pool holds
    sequences_held: int  # sequences of prompt_len + gen_len tokens the pool holds at once
    concurrency: int  # sequences decoded at once: the batch, capped by max_num_seqs and by the pool
    waves: int  # rounds of ``concurrency`` sequences the batch takes


class Estimate(Result):
    model: str
    gpu: str
    task: Literal["train", "infer"]
    method: str
    fits: bool
    peak_memory_bytes: float  # device memory needed at the peak: reserved + CUDA context (nvidia-smi view)
    peak_allocated_bytes: float  # torch.cuda.max_memory_allocated
    peak_reserved_bytes: float  # torch.cuda.max_memory_reserved
    peak_phase: Phase
    phase_allocated_bytes: dict[str, float]
    memory_bytes: MemoryBreakdown
    device_memory_bytes: float
    headroom_bytes: float  # negative: shortfall
    n_params: int
    n_trainable_params: int
    flops: FlopBreakdown
    flops_per_step: float
    tokens_per_step: int
    activations_by_layer: dict[str, float]
    max_batch_that_fits: int | None = None
    max_seq_len_that_fits: int | None = None
    n_gpus: int = 1
    system: str | None = None
    peak_stage: int = 0  # pipeline stage of the rank with the largest peak
    stage_peak_bytes: dict[int, float] = {}  # pipeline stage -> peak of its ranks (nvidia-smi view)
    model_state_bytes: float = 0.0  # per rank: weights (incl. quantized and scales) + gradients + optimizer states
    host_memory_bytes: float = 0.0  # per rank: offloaded states / parameters in host RAM
    nvme_bytes: float = 0.0  # per rank: offloaded to NVMe
    paged_host_bytes: float = 0.0  # per rank: paged optimizer states the driver keeps in host memory (in host_memory_bytes)
    evictable_paged_bytes: float = 0.0  # of the peak: paged optimizer states the driver evicts when PyTorch needs the room
    time: TimeBreakdown | None = None
    cost: Cost | None = None
    suggestions: list[Suggestion] = []
    warnings: list[str] = []
    notes: list[str] = []
    uncertainty: Uncertainty | None = None
    engine_pool: EnginePool | None = None

    @property
    def required_memory_bytes(self) -> float:
        """The device memory the setup must have: the peak less the paged optimizer states the driver would evict
        (what ``fits`` and the planner compare with the device)."""
        return self.peak_memory_bytes - self.evictable_paged_bytes
