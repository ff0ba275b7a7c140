"""Step time: compute per pipeline stage, the collectives of each parallel dimension, what overlaps
with what, the pipeline bubble, the optimizer step and offload traffic.

Overlap rules (each as the frameworks implement it):

* DDP all-reduces gradient buckets while backward runs; only what does not fit under the last
  micro-batch's backward is exposed, plus the last bucket (PyTorch DDP design notes).
* ZeRO-3 / FSDP prefetch the next unit's all-gather during the current unit's compute and
  reduce-scatter gradients during backward: exposed = max(0, comm - compute) per pass.
* ZeRO-1/2 reduce-scatter during backward (overlap_comm) and all-gather the updated 16-bit weights
  after the step (not overlapped).
* Megatron tensor-parallel all-reduces (2 forward + 2 backward per block; sequence parallelism turns
  each into an all-gather + reduce-scatter of the same volume) sit on the critical path (reference 6.5).
* Pipeline: (m + (p-1)/v) micro-batch slots per step, i.e. bubble / ideal = (p-1)/(v m)
  (Narayanan et al. 2021).
* Ring attention (context parallelism) overlaps each K/V hop with the attention of the previous one.
* Expert parallelism: an all-to-all to dispatch and one to combine per MoE block, forward and backward,
  not overlapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprofiles import Device

from . import compute as cp_
from . import sharding as sh
from .memory import MEZO_OPS_PER_TENSOR, MEZO_STEP_ACCESSES
from .config.training import BNB_8BIT_OPTIMIZERS, BNB_OPTIMIZERS, GALORE_BASE
from .graph.compile import CostTable
from .units import dtype_bytes


@dataclass(frozen=True)
class Layout:
    """How many members of each process group share a node (ranks ordered tp, cp, dp, pp: Megatron's order)."""

    tp: int
    cp: int
    dp: int
    pp_cross_node: bool


def layout(par, gpus_per_node: int) -> Layout:
    g = max(1, gpus_per_node)
    tp = min(par.tp, g)
    cp = max(1, min(par.cp, g // max(1, par.tp)))
    dp = max(1, min(par.dp, g // max(1, par.tp * par.cp)))
    return Layout(tp, cp, dp, par.tp * par.cp * par.dp >= g)


class _Comm:
    """``simulator.comm`` on first use: it works on numpy arrays, which a single-GPU estimate never needs."""

    def __getattr__(self, name: str):
        from . import comm as module

        return getattr(module, name)


comm = _Comm()


def _maximum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return max(a, b)


def _minimum(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.minimum(a, b)
    return min(a, b)


def _where(cond, a, b):
    if isinstance(cond, np.ndarray):
        return np.where(cond, a, b)
    return a if cond else b


_COLL_MEMO: dict[tuple, tuple] = {}


def _coll(system, op: str, nbytes, n: int, per_node: int):
    """One collective over ``n`` ranks (0 for one rank or nothing to send); ``nbytes`` may be an array
    (the times of arrays are remembered: many setups of a plan send the same messages)."""
    if n <= 1:
        return 0.0
    if isinstance(nbytes, np.ndarray):
        key = (id(system), op, n, per_node, nbytes.shape, nbytes.dtype.str, nbytes.tobytes())
        hit = _COLL_MEMO.get(key)
        if hit is not None and hit[0] is system:
            return hit[1]
        if len(_COLL_MEMO) > 4096:
            _COLL_MEMO.clear()
        out = np.where(nbytes > 0, comm.group_collective_time_s(system, op, nbytes, n, per_node), 0.0)
        _COLL_MEMO[key] = (system, out)
        return out
    if nbytes <= 0:
        return 0.0
    return float(comm.group_collective_time_s(system, op, nbytes, n, per_node))


@dataclass(frozen=True)
class StageCompute:
    forward_s: Any
    backward_s: Any
    recompute_s: Any
    attention_s: Any
    n_blocks: int


def part_counts(ct: CostTable, pp: int, stage: int, decode_step: bool = False) -> tuple[int, ...]:
    """Instances of each part of ``op_arrays(ct)`` one rank of ``stage`` runs.  ``decode_step``: one
    generated token, so an encoder-decoder model runs its decoder only (the encoder output is computed
    once, at prefill)."""
    layers = sh.stage_layer_ranges(ct.n_blocks, pp)[stage]
    out = []
    for part in cp_.op_arrays(ct):
        if decode_step and part.encoder:
            out.append(0)
        elif part.where == "pre":
            out.append(int(stage == 0))
        elif part.where == "post":
            out.append(int(stage == pp - 1))
        else:
            out.append(sum(1 for i in part.layers if i in layers))
    return tuple(out)


def combine_parts(times: list, counts: tuple[int, ...], n_blocks: int, training: bool,
                  fetch_host_s: tuple[float, ...] | None = None, fetch_waits: bool = True,
                  host: bool = True, wheres: tuple[str, ...] | None = None, host_sync: bool = False) -> StageCompute:
    """A stage's compute from its parts' times (``None`` where the stage runs none of a part).
    ``fetch_host_s``: per part, the host time of its ZeRO-3 parameter fetches in each pass.  ``fetch_waits``
    (:func:`zero3_fetch_waits`): the fetches wait on all-gathers, so a module's kernels wait for its fetch and
    that time adds to the pass on the GPU's clock too; else it is host time like the kernels' launches, which
    runs ahead of the GPU and shows only where the host is the slower.  ``host`` False: the kernels are replayed
    from a CUDA graph, one launch for the whole pass, so no per-kernel host time.  ``host_sync``
    (``Scenario.host_sync_per_block``): the forward of every block (``wheres`` names each part's place) waits
    for the GPU once, so a block's launches and its kernels add up instead of overlapping, in the forward and
    its recompute (the backward runs autograd's engine, which does not run that code)."""
    f = b = r = attn = 0.0
    hf = hb = hr = 0.0
    fx = rx = 0.0  # fetch time per pass: the whole stage, and the recomputed part of it
    fs = rs = 0.0  # blocks whose forward waits for the GPU: launches plus kernels
    for i, (t, n) in enumerate(zip(times, counts)):
        if not n:
            continue
        if host_sync and host and wheres is not None and wheres[i] == "block":
            fs = fs + n * (t.forward_s + t.host_forward_s)
            rs = rs + _where(t.recompute_s != 0, n * (t.recompute_s + t.host_forward_s), 0.0)
        else:
            f = f + n * t.forward_s
            r = r + n * t.recompute_s
            hf += n * t.host_forward_s
            hr = hr + _where(t.recompute_s != 0, n * t.host_forward_s, 0.0)
        b = b + n * t.backward_s
        attn = attn + n * t.attention_s
        hb += n * t.host_backward_s
        if fetch_host_s:
            fx += n * fetch_host_s[i]
            rx = rx + _where(t.recompute_s != 0, n * fetch_host_s[i], 0.0)
    # the GPU waits for the host when issuing the kernels takes longer than running them; fetches that wait on
    # all-gathers delay both
    if not fetch_waits:
        hf, hb, hr, fx, rx = hf + fx, hb + fx, hr + rx, 0.0, 0.0
    if not host:
        hf = hb = hr = 0.0
    return StageCompute(_maximum(f, hf) + fs + fx, _maximum(b, hb) + fx if training else 0.0,
                        _maximum(r, hr) + rs + rx if training else 0.0, attn, n_blocks)


def stage_compute(ct: CostTable, par, B: tuple, dev: Device, dtype: str, stage: int, training: bool,
                  decode_step: bool = False, rows=None, head_B: tuple | None = None,
                  graphs: bool = False, host_sync: bool = False) -> StageCompute:
    """Compute of one micro-batch on one rank of ``stage`` (``decode_step``: see :func:`part_counts`;
    ``rows``: input rows of each GEMM in an inference forward, which picks fused dequantizing kernels;
    ``head_B``: the basis the head part (final norm, LM head) runs at when it sees fewer positions than the
    blocks -- a prefill that keeps the last position's logits; ``graphs``: the pass replays a CUDA graph)."""
    fused_attention = ct.plan.attention not in ("eager", "sdpa-math")
    counts = part_counts(ct, par.pp, stage, decode_step)
    fq = cp_.fused_dequant(ct.plan.base_quant, rows) if (rows is not None and not training) else False
    kernel = cp_.attention_kernel(ct.plan)
    parts = cp_.op_arrays(ct)
    times = [cp_.part_time(part, head_B if (head_B is not None and part.where == "post") else B, dev, dtype,
                           par.tp, par.cp, training, fused_attention, fq, kernel) if n else None
             for part, n in zip(parts, counts)]
    return combine_parts(times, counts, len(sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]), training,
                         fetch_host_times(ct, zero3_fetch_threshold(par)), zero3_fetch_waits(par), not graphs,
                         tuple(p.where for p in parts), host_sync)


def zero3_fetch_waits(par) -> bool:
    """Whether ZeRO-3's per-module fetches hold the host on collectives: the coordinator launches each module's
    all-gather and synchronizes on the all-gather stream's events once more than two are in flight
    (deepspeed/runtime/zero/partitioned_param_coordinator.py ``__max_ongoing_fetch_events = 2``), so across
    ranks the hooks advance with the gathers, which share the GPU with the kernels.  One rank (dp = 1) gathers
    nothing: the hooks are plain Python that runs ahead of the GPU like any launch overhead -- the Qwen README's
    Qwen-1.8B full fine-tuning on one A100 under ZeRO-3 costs 2.1-2.3 s per step from 256 to 2048 tokens and
    then grows only with the compute (2.8 s at 4096 tokens, 5.6 s at 8192)."""
    return par.dp * par.cp > 1


def zero3_fetch_threshold(par) -> int | None:
    """DeepSpeed ZeRO-3's persistence threshold when parameters are fetched per module, else None."""
    return par.stage3_param_persistence_threshold if par.deepspeed and par.shards_params else None


def fetch_host_times(ct: CostTable, threshold: int | None) -> tuple[float, ...] | None:
    """Per part of ``op_arrays(ct)``, the host time of its ZeRO-3 fetches per pass (None without ZeRO-3)."""
    if threshold is None:
        return None
    return tuple(cp_.zero3_fetch_host_s(part, threshold) for part in cp_.op_arrays(ct))


@dataclass(frozen=True)
class TrainTime:
    forward_s: float
    backward_s: float
    recompute_s: float
    tp_comm_s: float
    cp_comm_exposed_s: float
    ep_comm_s: float
    pp_p2p_s: float
    pp_bubble_s: float
    dp_comm_s: float
    dp_comm_exposed_s: float
    optimizer_s: float
    offload_s: float
    step_s: float


def optimizer_step_bytes(numel, name: str, param_dtype: str, deepspeed: bool, impl: str = "foreach",
                         beta1: bool = True):
    """Device-memory traffic of one optimizer step over ``numel`` parameters (bytes read + written), as the
    kernels of each implementation move them (``validate.cpu_truth.optimizer_step_traffic`` counts them on
    the real optimizers).

    torch Adam(W), foreach or for-loop (torch/optim/adam.py): the weight decay ``mul_`` of the parameter (AdamW
    only), ``lerp_`` of exp_avg, ``mul_`` + ``addcmul_`` of exp_avg_sq, ``sqrt``, ``div_`` and ``add_`` of a
    denominator temporary, ``addcdiv_`` into the parameter: 21 accesses of a parameter-sized tensor in the
    parameter's dtype (19 for Adam), where the fused kernel makes 7 (read param, grad, both moments, write
    param and moments).  Under DeepSpeed (fused Adam on the fp32 master) the 16-bit copy is written back.
    transformers' Adafactor works in fp32: the squared gradient and its row / column means, the factored
    update, its RMS clip, the first moment, the parameter update (26 fp32 accesses; 21 without beta1), plus
    the fp32 copies of a 16-bit gradient and parameter and the copy back.  bitsandbytes' 8-bit and 32-bit
    kernels are fused (states at 1 or 4 B).  SGD: foreach momentum ``mul_`` + ``add_`` into the buffer and
    ``add_`` into the parameter (8 accesses; 5 fused; 3 without momentum).  MeZO: its three perturbations and
    the update (``memory.MEZO_STEP_ACCESSES``)."""
    p = 4.0 if deepspeed else dtype_bytes(param_dtype)
    if name in GALORE_BASE:
        # a projected weight: read its gradient, write the projected-back update, scale it (read + write), add it to
        # the weight (read both, write); the low-rank states are r/max(m, n) of that.  The SVD refreshing each
        # projector every update_proj_gap steps is not timed.
        return numel * 7.0 * p
    fused = deepspeed or impl == "fused"
    if name in ("adamw", "adam") and not fused:
        out = (21.0 if name == "adamw" else 19.0) * p
    elif name in ("adamw", "adam", "paged-adamw-32bit"):
        s = 4.0 if (deepspeed or name == "paged-adamw-32bit") else p
        out = 3.0 * p + 4.0 * s
    elif name == "adafactor":
        out = (26.0 if beta1 else 21.0) * 4.0 + (3.0 * p + 12.0 if p < 4.0 else 0.0)
    elif name == "mezo":
        out = MEZO_STEP_ACCESSES * p
    elif name in BNB_8BIT_OPTIMIZERS:
        out = 3.0 * p + 4.0 * 1.0
    elif name == "sgd-momentum":
        out = (5.0 if fused else 8.0) * p
    elif name == "lion":
        out = 3.0 * p + 2.0 * p
    else:
        out = 3.0 * p
    if deepspeed:
        out += 2.0  # the 16-bit weight copy written back
    return numel * out


# One operator an optimizer's Python loop issues: under no_grad there is no autograd recording and no module call,
# so it pays the dispatcher + launch cost the backward's kernels pay.
OPTIMIZER_OP_HOST_S = cp_.BACKWARD_HOST_PER_OP_S


def steps_in_bnb(name: str, which: frozenset[str] = BNB_OPTIMIZERS) -> bool:
    """Whether optimizer ``name`` is stepped by one of ``which`` bitsandbytes optimizers (GaLore's 8-bit AdamW runs
    bitsandbytes' loop on its base)."""
    return GALORE_BASE.get(name, name) in which


BNB_DISPATCHED_OPS_PER_TENSOR = 2
"""Operators bitsandbytes' step dispatches per parameter (counted on the real optimizer on CPU): the ``detach`` of
``update_step`` and the fused ``bitsandbytes::optimizer_update_8bit_blockwise`` / ``optimizer_update_32bit``."""


def bnb_cuda_calls_per_tensor(name: str) -> int:
    """CUDA runtime calls bitsandbytes' step makes per parameter on a GPU besides its operators
    (bitsandbytes/optim/optimizer.py ``Optimizer8bit.step``): ``sync_gpu(p)`` -- a ``torch.cuda.synchronize()``
    after every parameter's update --, and for a paged optimizer ``prefetch_state``'s two
    ``cudaMemPrefetchAsync`` (``F.prefetch_tensor`` of both states)."""
    return 1 + (2 if name.startswith("paged-") else 0)


def optimizer_ops_per_tensor(opt, param_dtype: str, matrix: bool) -> int:
    """Operators a for-loop optimizer dispatches per parameter tensor and step (0 where the step runs as
    multi-tensor or fused kernels, whose launches are per group).  Counted on the real optimizers
    (``validate.cpu_truth.optimizer_step_traffic``): torch's single-tensor AdamW: step ``add_`` and ``item``,
    weight decay, lerp, mul, addcmul, sqrt, div, add, addcdiv (Adam: no weight decay); SGD: the parameter
    ``add_`` (+ the buffer's ``mul_`` and ``add_`` with momentum); transformers' Adafactor: 26 for a factored
    matrix, 16 for a vector, +2 for the first moment, +3 for ``scale_parameter`` (the RMS compared on the
    host), +3 for a 16-bit parameter (its fp32 copies and the copy back); MeZO: ``memory.MEZO_OPS_PER_TENSOR``;
    bitsandbytes: :data:`BNB_DISPATCHED_OPS_PER_TENSOR` plus its CUDA calls (:func:`bnb_cuda_calls_per_tensor`)."""
    if opt.name == "mezo":
        return MEZO_OPS_PER_TENSOR
    if steps_in_bnb(opt.name):
        return BNB_DISPATCHED_OPS_PER_TENSOR + bnb_cuda_calls_per_tensor(opt.name)
    if opt.name == "adafactor":
        return ((26 if matrix else 16) + (2 if opt.beta1 else 0) + (3 if opt.scale_parameter else 0)
                + (3 if dtype_bytes(param_dtype) < 4 else 0))
    if opt.impl != "for-loop":
        return 0
    return {"adamw": 10, "adam": 9, "sgd": 1, "sgd-momentum": 3}.get(opt.name, 0)


def optimizer_host_s(groups, opt, deepspeed: bool) -> float:
    """Host time of a for-loop optimizer's Python loop over the rank's parameter tensors ``groups`` ((numel,
    dtype, shape, count) rows)."""
    if deepspeed:
        return 0.0
    return sum(c * optimizer_ops_per_tensor(opt, d, len(shape) >= 2) for _, d, shape, c in groups) * OPTIMIZER_OP_HOST_S


def optimizer_syncs_per_tensor(opt) -> bool:
    """Whether the loop waits for the device once per parameter, so that its host time and kernels run one after
    the other: Adafactor's ``scale_parameter`` (the RMS is a device tensor compared on the host) and every
    bitsandbytes optimizer (``sync_gpu(p)`` after each update, :func:`bnb_cuda_calls_per_tensor`)."""
    return (opt.name == "adafactor" and opt.scale_parameter) or steps_in_bnb(opt.name)


def bnb_optimizer_fraction(dev: Device) -> float:
    """The share of the streaming rate bitsandbytes' blockwise 8-bit optimizer kernel reaches on ``dev``: its
    calibrated figure (``Efficiency.bnb_optimizer_fraction``), else the streaming rate itself."""
    own = dev.efficiency.bnb_optimizer_fraction
    return own if own is not None else 1.0


def optimizer_kernel_s(nbytes, bnb8, dev: Device):
    """Device time of an optimizer step's kernels moving ``nbytes``: streaming, and where ``bnb8`` (a flag, or an
    array of them) bitsandbytes' 8-bit blockwise kernel at its share of the streaming rate
    (:func:`bnb_optimizer_fraction`)."""
    t = cp_.memory_time_s(nbytes, dev)
    return _where(bnb8 > 0, t / bnb_optimizer_fraction(dev), t)


def optimizer_step_s(rank: RankState, n_updated, dev: Device):
    """One on-device optimizer step over ``n_updated`` parameters: its kernels' traffic, or a for-loop's host time
    where that is longer -- their sum where the loop waits for the device per parameter."""
    gpu = optimizer_kernel_s(n_updated * rank.opt_step_bytes_per_param, rank.opt_bnb8, dev)
    return _where(rank.opt_host_serial > 0, gpu + rank.opt_host_s, _maximum(gpu, rank.opt_host_s))


def paged_migration_s(system, spilled_bytes, dev: Device):
    """Seconds per step to migrate the paged optimizer states that do not stay on the device: each update touches
    every tensor's states once, in the same order every step, so the pages the driver evicted (least recently
    migrated first) are the ones needed next -- ``spilled_bytes`` come in from host memory while as many go out,
    both directions at once over the full-duplex host link, on the stream the update waits on."""
    if not isinstance(spilled_bytes, np.ndarray) and spilled_bytes <= 0:
        return 0.0  # nothing spilled (a single setup): no transfer, and no import of the array-based comm module
    return comm.host_transfer_time_s(system, spilled_bytes, dev.efficiency.host_transfer_fraction)


def _setup(sc, ct: CostTable, system):
    """(parallel, workload, precision plan, GEMM dtype, compute-dtype bytes, group layout) of a scenario."""
    prec = ct.plan.precision
    return (sc.parallel, sc.workload, prec, cp_.matmul_dtype(prec.compute_dtype, sc.precision),
            dtype_bytes(prec.compute_dtype), layout(sc.parallel, system.gpus_per_node))


@dataclass(frozen=True)
class RankState:
    """What the step time needs of one pipeline stage's rank besides its compute (numbers, or arrays of setups)."""

    trainable_numel: Any
    grad_elem_bytes: Any  # bytes per gradient element sent over the data-parallel group
    all_params_16_bytes: Any  # every parameter of the rank as the compute sees it (FSDP / ZeRO-3 gathers)
    frozen_grad_bytes: Any  # gradients of frozen weights FSDP1 reduces anyway (units mixing frozen and trainable)
    opt_step_bytes_per_param: Any  # device traffic of the optimizer step per updated parameter
    opt_host_s: Any = 0.0  # host time of a for-loop optimizer's Python loop
    opt_host_serial: Any = 0.0  # 1 where that loop waits for the device per parameter (no overlap with its kernels)
    opt_bnb8: Any = 0.0  # 1 where bitsandbytes' 8-bit blockwise kernel runs the step (its rate: bnb_optimizer_fraction)


def rank_state(ct: CostTable, par, stage: int, optimizer) -> RankState:
    prec = ct.plan.precision
    rp = sh.rank_params(ct, par, stage)
    cd = dtype_bytes(prec.compute_dtype)
    wdt = sh.deepspeed_weight_dtype(prec.compute_dtype, prec.param_dtype) if par.deepspeed else None
    grad_elem = dtype_bytes(wdt) if wdt else (rp.trainable_bytes / rp.trainable_numel if rp.trainable_numel else 4.0)
    if sh.fsdp_fp32_states(par, prec.compute_dtype):
        grad_elem = 4.0  # reduce_dtype fp32
    all_params_16 = (rp.frozen_bytes + rp.quant_bytes + rp.scale_bytes) + rp.trainable_numel * cd
    return RankState(rp.trainable_numel, grad_elem, all_params_16, sh.mixed_unit_grad_bytes(rp, par),
                     optimizer_step_bytes(1.0, optimizer.name, prec.param_dtype, par.deepspeed, optimizer.impl,
                                          optimizer.beta1),
                     optimizer_host_s(rp.groups, optimizer, par.deepspeed),
                     float(optimizer_syncs_per_tensor(optimizer)), float(steps_in_bnb(optimizer.name, BNB_8BIT_OPTIMIZERS)))


@dataclass(frozen=True)
class StepModel:
    """What the step time needs of the model and its numerics (numbers, or arrays of setups)."""

    compute_bytes: Any  # bytes per element of the compute dtype
    tp_collectives: Any  # tensor-parallel collectives per block and micro-batch
    hidden: int
    kv_heads: int
    d_head: int
    moe_top_k: int | None


def step_model(ct: CostTable) -> StepModel:
    arch = ct.arch
    # tensor parallel: 2 all-reduces forward, 2 backward per block, 2 more when the block is recomputed
    return StepModel(dtype_bytes(ct.plan.precision.compute_dtype), 4 + (2 if ct.plan.checkpointed else 0),
                     arch.hidden, arch.kv_heads, arch.d_head, arch.moe.top_k if arch.moe is not None else None)


def mezo_step_time(sc, ct: CostTable, dev: Device, system, B: tuple) -> TrainTime:
    """MeZO on one GPU: two forwards of the batch, and the three perturbations and the update streaming every
    trainable parameter (``memory.MEZO_STEP_ACCESSES`` accesses each), issued tensor by tensor from Python."""
    par, w, prec, dtype, cd, lay = _setup(sc, ct, system)
    fwd = stage_compute(ct, par, B, dev, dtype, 0, False, host_sync=sc.host_sync_per_block).forward_s
    rank = rank_state(ct, par, 0, sc.optimizer)
    opt = optimizer_step_s(rank, rank.trainable_numel, dev)
    return TrainTime(forward_s=2.0 * fwd, backward_s=0.0, recompute_s=0.0, tp_comm_s=0.0, cp_comm_exposed_s=0.0,
                     ep_comm_s=0.0, pp_p2p_s=0.0, pp_bubble_s=0.0, dp_comm_s=0.0, dp_comm_exposed_s=0.0,
                     optimizer_s=opt, offload_s=0.0, step_s=2.0 * fwd + opt)


def train_step_time(sc, ct: CostTable, dev: Device, system, B: tuple, paged_spilled=0.0) -> TrainTime:
    """One optimizer step of ``sc`` (``paged_spilled``: see :func:`step_time`)."""
    if sc.optimizer.forward_only:
        return mezo_step_time(sc, ct, dev, system, B)
    par, w, prec, dtype, cd, lay = _setup(sc, ct, system)
    stages = {st: stage_compute(ct, par, B, dev, dtype, st, True, host_sync=sc.host_sync_per_block)
              for st in sh.stages_to_check(par.pp)}
    ranks = {st: rank_state(ct, par, st, sc.optimizer) for st in stages}
    return step_time(stages, ranks, step_model(ct), par, dev, system, w.grad_accum, B[0], paged_spilled)


_STAGE_FIELDS = ("forward_s", "backward_s", "recompute_s", "attention_s", "n_blocks")


def _slowest(stages: dict[int, StageCompute], ranks: dict[int, RankState]) -> tuple[StageCompute, RankState]:
    """The stage whose compute of one micro-batch takes longest (the first of equals), per setup."""
    order = list(stages)
    keys = [stages[st].forward_s + stages[st].backward_s + stages[st].recompute_s for st in order]
    if len(order) == 1 or not any(isinstance(k, np.ndarray) for k in keys):
        st = order[max(range(len(order)), key=lambda i: keys[i])]
        return stages[st], ranks[st]
    first = order[0]
    slow = {f: getattr(stages[first], f) for f in _STAGE_FIELDS}
    rank = {f: getattr(ranks[first], f) for f in RankState.__dataclass_fields__}
    best = keys[0]
    for st, key in zip(order[1:], keys[1:]):
        later = key > best  # strictly: the first of equal stages is the slowest
        best = np.where(later, key, best)
        slow = {f: np.where(later, getattr(stages[st], f), v) for f, v in slow.items()}
        rank = {f: np.where(later, getattr(ranks[st], f), v) for f, v in rank.items()}
    return StageCompute(**slow), RankState(**rank)


def step_time(stages: dict[int, StageCompute], ranks: dict[int, RankState], model: StepModel, par, dev: Device,
              system, m, micro_tokens, paged_spilled=0.0) -> TrainTime:
    """One optimizer step of ``m`` micro-batches of ``micro_tokens`` tokens each, from the stages' compute.
    ``par``, ``dev`` and ``system`` are one setup's; every other number may be an array of setups.
    ``paged_spilled``: paged optimizer states kept in host memory, migrated every step (:func:`paged_migration_s`,
    part of the offload time)."""
    lay = layout(par, system.gpus_per_node)
    slow, rank = _slowest(stages, ranks)
    cd = model.compute_bytes
    tokens = micro_tokens / par.cp  # tokens of one micro-batch on one rank
    h = model.hidden
    act_bytes = tokens * h * cd
    tp_s = slow.n_blocks * model.tp_collectives * _coll(system, "all_reduce", act_bytes, par.tp, lay.tp)
    # context parallel: (cp - 1) K/V hops per block forward, twice that backward, hidden under attention
    cp_s = 0.0
    if par.cp > 1:
        kv = 2.0 * tokens * model.kv_heads / par.tp * model.d_head * cd
        hop = comm.p2p_time_s(system, kv, lay.cp < par.cp)
        comm_s = 3.0 * (par.cp - 1) * hop * slow.n_blocks
        cp_s = _maximum(0.0, comm_s - 3.0 * slow.attention_s)
    # expert parallel: dispatch + combine all-to-all, forward and backward, per MoE block
    ep_s = 0.0
    if par.ep > 1 and model.moe_top_k is not None:
        a2a = tokens * model.moe_top_k * h * cd / (par.tp if par.sp else 1)
        ep_s = slow.n_blocks * 4 * _coll(system, "all_to_all", a2a, par.ep, min(par.ep, lay.dp * lay.cp))
    # pipeline: activations to the next stage forward, their gradients back
    p2p_s = 0.0
    if par.pp > 1:
        p2p_s = 2.0 * comm.p2p_time_s(system, act_bytes / (par.tp if par.sp else 1), lay.pp_cross_node)
    micro_s = slow.forward_s + slow.backward_s + slow.recompute_s + tp_s + cp_s + ep_s + p2p_s
    slots = m + (par.pp - 1) / par.pp_virtual if par.pp > 1 else m
    pipe_s = slots * micro_s
    bubble_s = (slots - m) * micro_s
    # data parallel
    n_shard = sh.shard_group_size(par, system.gpus_per_node)
    grad_elem = rank.grad_elem_bytes
    grad_bytes = rank.trainable_numel * grad_elem + rank.frozen_grad_bytes
    n_rs = 1 if par.fsdp_no_sync else m  # under no_sync only the last micro-batch reduce-scatters
    all_params_16 = rank.all_params_16_bytes
    dp_s = dp_exposed = 0.0
    dp_ranks = par.dp * par.cp  # gradients are averaged over data- and context-parallel ranks
    dp_per_node = lay.dp * lay.cp
    if dp_ranks > 1 and (isinstance(grad_bytes, np.ndarray) or grad_bytes > 0):
        if par.shards_params:
            ag = _coll(system, "all_gather", all_params_16, n_shard, min(n_shard, dp_per_node))
            rs = _coll(system, "reduce_scatter", grad_bytes, n_shard, min(n_shard, dp_per_node))
            n_ag = 2 if (par.reshard_after_forward or par.deepspeed) else 1
            hybrid = 0.0
            if par.fsdp == "hybrid_shard" and dp_ranks > n_shard:
                hybrid = _coll(system, "all_reduce", grad_bytes / n_shard, dp_ranks // n_shard, 1)
            dp_s = m * n_ag * ag + n_rs * rs + hybrid
            fwd_exp = _maximum(0.0, ag - slow.forward_s)
            bwd_busy = slow.backward_s + slow.recompute_s
            bwd_exp = _maximum(0.0, (n_ag - 1) * ag + rs - bwd_busy)
            bwd_exp_no_rs = _maximum(0.0, (n_ag - 1) * ag - bwd_busy)
            dp_exposed = (m * fwd_exp + n_rs * bwd_exp + (m - n_rs) * bwd_exp_no_rs + hybrid
                          + ag / _maximum(1, slow.n_blocks))  # the first unit's gather
        elif par.shards_grads:  # ZeRO-2 / shard_grad_op: reduce-scatter every micro-batch, all-gather after the step
            rs = _coll(system, "reduce_scatter", grad_bytes, dp_ranks, dp_per_node)
            ag = _coll(system, "all_gather", rank.trainable_numel * cd, dp_ranks, dp_per_node)
            dp_s = n_rs * rs + ag
            dp_exposed = n_rs * _maximum(0.0, rs - slow.backward_s) + ag
        else:  # DDP / ZeRO-1: one gradient all-reduce (or reduce-scatter + all-gather) per optimizer step
            ar = _coll(system, "all_reduce", grad_bytes, dp_ranks, dp_per_node)
            bucket = _minimum(grad_bytes, par.ddp_bucket_MiB * 2**20)
            last = _coll(system, "all_reduce", bucket, dp_ranks, dp_per_node)
            dp_s = ar
            dp_exposed = _maximum(0.0, ar - slow.backward_s) + last
        dp_s = _where(grad_bytes > 0, dp_s, 0.0)
        dp_exposed = _where(grad_bytes > 0, dp_exposed, 0.0)
    # optimizer step
    n_upd = rank.trainable_numel / (n_shard if par.shards_optimizer else 1)
    opt_s = off_s = 0.0
    if par.offload_optimizer != "none":
        # gradients down and updated 16-bit weights up over PCIe; the step on the host CPU
        pcie = comm.host_transfer_time_s(system, n_upd * (grad_elem + cd), dev.efficiency.host_transfer_fraction)
        node_ranks = lay.dp * lay.tp * lay.cp  # the node's ranks share its host
        # the host's CPU-Adam throughput is the node's: its ranks share the cores (DeepSpeed --bind_cores_to_rank)
        rate = system.host.cpu_adam_params_per_s
        cpu = n_upd * node_ranks / rate if rate else 0.0
        # ZeRO-Infinity: the fp32 master and both moments (12 B/param) read and written back per step,
        # the node's ranks sharing its NVMe bandwidth
        nvme = comm.nvme_transfer_time_s(system, 2.0 * 12.0 * n_upd * node_ranks) \
            if par.offload_optimizer == "nvme" else 0.0
        off_s = _maximum(pcie, cpu) + nvme
    else:
        opt_s = optimizer_step_s(rank, n_upd, dev)
    if par.offload_params != "none":
        shard = all_params_16 / max(1, n_shard)
        pcie = comm.host_transfer_time_s(system, 2.0 * shard, dev.efficiency.host_transfer_fraction) * m
        off_s = off_s + _maximum(0.0, pcie - (slow.forward_s + slow.backward_s) * m)
    off_s = off_s + paged_migration_s(system, paged_spilled, dev)
    step = pipe_s + dp_exposed + opt_s + off_s
    return TrainTime(
        forward_s=slow.forward_s * m, backward_s=slow.backward_s * m, recompute_s=slow.recompute_s * m,
        tp_comm_s=tp_s * m, cp_comm_exposed_s=cp_s * m, ep_comm_s=ep_s * m, pp_p2p_s=p2p_s * m,
        pp_bubble_s=bubble_s, dp_comm_s=dp_s, dp_comm_exposed_s=dp_exposed, optimizer_s=opt_s, offload_s=off_s,
        step_s=step,
    )


@dataclass(frozen=True)
class InferTime:
    prefill_s: float
    decode_per_token_s: float
    tp_comm_s: float
    total_s: float


def prefill_head_basis(w) -> tuple | None:
    """Where the prefill's head part (final norm, LM head) runs: at one position per sequence when only the
    last position's logits are kept (generation), else (``prefill_logits='all'``) with the blocks (None).
    The final norm runs over every position before the slice, a ``prompt_len x hidden`` elementwise pass
    this leaves out."""
    from .graph.ir import basis

    return basis(w.batch, 1, w.prompt_len) if w.prefill_logits == "last" else None


def infer_time(sc, ct: CostTable, dev: Device, system, concurrency: int | None = None) -> InferTime:
    """Prefill of the prompts and the decode of ``gen_len`` tokens (one token per sequence per step).

    Decode reads every weight and the KV cache once per step; the operator tables carry both (the
    GEMMs' weight bytes, the attention's K/V bytes at the current context), so the roofline makes it
    memory-bound at small batch.  Pipeline stages run one after another for a batch.

    A serving engine (``inference.engine`` 'vllm') runs ``concurrency`` sequences at once (its max_num_seqs, or
    what its KV pool holds): the batch in full waves of that many and a last wave of the rest.  Decode steps
    replayed from CUDA graphs (vLLM's default, vllm/worker/model_runner.py ``capture_model``;
    ``inference.cuda_graphs``) cost the GPU's time only."""
    w = sc.workload
    run = w.batch if concurrency is None else max(1, min(w.batch, concurrency))
    full, rest = divmod(w.batch, run)
    one = _wave_time(sc, ct, dev, system, run)
    total, tp = full * one.total_s, full * one.tp_comm_s
    if rest:
        last = _wave_time(sc, ct, dev, system, rest)
        total, tp = total + last.total_s, tp + last.tp_comm_s
    return InferTime(prefill_s=one.prefill_s, decode_per_token_s=one.decode_per_token_s, tp_comm_s=tp, total_s=total)


def _wave_time(sc, ct: CostTable, dev: Device, system, batch: int) -> InferTime:
    """:func:`infer_time` of ``batch`` sequences run together."""
    from .graph.ir import basis

    par, w, prec, dtype, cd, lay = _setup(sc, ct, system)
    graphs = sc.inference.decode_graphs
    if batch != w.batch:
        w = w.model_copy(update={"batch": batch})
    Bp = basis(w.batch, w.prompt_len, w.prompt_len)
    head_B = prefill_head_basis(w)
    mid = w.prompt_len + w.gen_len / 2.0
    Bd = basis(w.batch, 1, mid)
    h = ct.arch.hidden
    prefill = decode = tp_p = tp_d = 0.0
    sync = sc.host_sync_per_block
    for st in range(par.pp):
        sp_ = stage_compute(ct, par, Bp, dev, dtype, st, False, rows=w.batch * w.prompt_len, head_B=head_B,
                            host_sync=sync)
        sd = stage_compute(ct, par, Bd, dev, dtype, st, False, decode_step=True, rows=w.batch, graphs=graphs,
                           host_sync=sync)
        prefill += sp_.forward_s
        decode += sd.forward_s
        tp_p += sp_.n_blocks * 2 * _coll(system, "all_reduce", w.batch * w.prompt_len * h * cd, par.tp, lay.tp)
        tp_d += sd.n_blocks * 2 * _coll(system, "all_reduce", w.batch * h * cd, par.tp, lay.tp)
    if par.pp > 1:
        hop = float(comm.p2p_time_s(system, w.batch * h * cd, lay.pp_cross_node))
        decode += (par.pp - 1) * hop
        prefill += (par.pp - 1) * float(comm.p2p_time_s(system, w.batch * w.prompt_len * h * cd, lay.pp_cross_node))
    prefill += tp_p
    decode += tp_d
    total = prefill + w.gen_len * decode
    return InferTime(prefill_s=prefill, decode_per_token_s=decode, tp_comm_s=tp_p + w.gen_len * tp_d, total_s=total)
