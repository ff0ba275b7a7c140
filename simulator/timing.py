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

from hwprofiles import Device

from . import compute as cp_
from . import sharding as sh
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


def _coll(system, op: str, nbytes: float, n: int, per_node: int) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return float(comm.group_collective_time_s(system, op, nbytes, n, per_node))


@dataclass(frozen=True)
class StageCompute:
    forward_s: float
    backward_s: float
    recompute_s: float
    attention_s: float
    n_blocks: int


def stage_compute(ct: CostTable, par, B: tuple, dev: Device, dtype: str, stage: int, training: bool,
                  decode_step: bool = False) -> StageCompute:
    """Compute of one micro-batch on one rank of ``stage``.  ``decode_step``: one generated token, so an
    encoder-decoder model runs its decoder only (the encoder output is computed once, at prefill)."""
    fused_attention = ct.plan.attention not in ("eager", "sdpa-math")
    layers = sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]
    f = b = r = attn = 0.0
    hf = hb = hr = 0.0
    for part in cp_.op_arrays(ct):
        if part.where == "pre":
            n = int(stage == 0)
        elif part.where == "post":
            n = int(stage == par.pp - 1)
        else:
            n = sum(1 for i in part.layers if i in layers)
        if not n or (decode_step and part.encoder):
            continue
        t = cp_.part_time(part, B, dev, dtype, par.tp, par.cp, training, fused_attention)
        f += n * t.forward_s
        b += n * t.backward_s
        r += n * t.recompute_s
        attn += n * t.attention_s
        hf += n * t.host_forward_s
        hb += n * 2.0 * t.host_forward_s
        hr += n * t.host_forward_s if t.recompute_s else 0.0
    # the GPU waits for the host when issuing the kernels takes longer than running them
    return StageCompute(max(f, hf), max(b, hb) if training else 0.0, max(r, hr) if training else 0.0, attn, len(layers))


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


def optimizer_step_bytes(numel: float, name: str, param_dtype: str, deepspeed: bool) -> float:
    """Device-memory traffic of one optimizer step over ``numel`` parameters (reads + writes).

    AdamW: read param, grad, exp_avg, exp_avg_sq, write param and both moments (7 accesses); under
    DeepSpeed the fp32 master is updated and a 16-bit copy written back; 8-bit states move 1 B each;
    SGD reads param and grad and writes the param (+ a momentum read and write)."""
    p = 4.0 if deepspeed else dtype_bytes(param_dtype)
    if name in ("adamw", "adam", "paged-adamw-32bit", "adafactor"):
        s = 4.0 if (deepspeed or name == "paged-adamw-32bit") else p
        out = 3.0 * p + 4.0 * s
    elif name in ("adamw-8bit", "paged-adamw-8bit"):
        out = 3.0 * p + 4.0 * 1.0
    elif name in ("sgd-momentum", "lion"):
        out = 3.0 * p + 2.0 * p
    else:
        out = 3.0 * p
    if deepspeed:
        out += 2.0  # the 16-bit weight copy written back
    return numel * out


def _setup(sc, ct: CostTable, system):
    """(parallel, workload, precision plan, GEMM dtype, compute-dtype bytes, group layout) of a scenario."""
    prec = ct.plan.precision
    return (sc.parallel, sc.workload, prec, cp_.matmul_dtype(prec.compute_dtype, sc.precision),
            dtype_bytes(prec.compute_dtype), layout(sc.parallel, system.gpus_per_node))


def train_step_time(sc, ct: CostTable, dev: Device, system, B: tuple) -> TrainTime:
    par, w, prec, dtype, cd, lay = _setup(sc, ct, system)
    m = w.grad_accum
    stages = {st: stage_compute(ct, par, B, dev, dtype, st, True) for st in sh.stages_to_check(par.pp)}
    slow_stage = max(stages, key=lambda st: stages[st].forward_s + stages[st].backward_s + stages[st].recompute_s)
    slow = stages[slow_stage]
    tokens = float(B[0]) / par.cp  # tokens of one micro-batch on one rank
    h = ct.arch.hidden
    act_bytes = tokens * h * cd
    # tensor parallel: 2 all-reduces forward, 2 backward per block, 2 more when the block is recomputed
    n_tp = 4 + (2 if ct.plan.checkpointed else 0)
    tp_s = slow.n_blocks * n_tp * _coll(system, "all_reduce", act_bytes, par.tp, lay.tp)
    # context parallel: (cp - 1) K/V hops per block forward, twice that backward, hidden under attention
    cp_s = 0.0
    if par.cp > 1:
        kv = 2.0 * tokens * ct.arch.kv_heads / par.tp * ct.arch.d_head * cd
        hop = float(comm.p2p_time_s(system, kv, lay.cp < par.cp))
        comm_s = 3.0 * (par.cp - 1) * hop * slow.n_blocks
        cp_s = max(0.0, comm_s - 3.0 * slow.attention_s)
    # expert parallel: dispatch + combine all-to-all, forward and backward, per MoE block
    ep_s = 0.0
    if par.ep > 1 and ct.arch.moe is not None:
        a2a = tokens * ct.arch.moe.top_k * h * cd / (par.tp if par.sp else 1)
        ep_s = slow.n_blocks * 4 * _coll(system, "all_to_all", a2a, par.ep, min(par.ep, lay.dp * lay.cp))
    # pipeline: activations to the next stage forward, their gradients back
    p2p_s = 0.0
    if par.pp > 1:
        p2p_s = 2.0 * float(comm.p2p_time_s(system, act_bytes / (par.tp if par.sp else 1), lay.pp_cross_node))
    micro_s = slow.forward_s + slow.backward_s + slow.recompute_s + tp_s + cp_s + ep_s + p2p_s
    slots = m + (par.pp - 1) / par.pp_virtual if par.pp > 1 else m
    pipe_s = slots * micro_s
    bubble_s = (slots - m) * micro_s
    # data parallel
    rp = sh.rank_params(ct, par, slow_stage)
    n_shard = sh.shard_group_size(par, system.gpus_per_node)
    wdt = sh.deepspeed_weight_dtype(prec.compute_dtype, prec.param_dtype) if par.deepspeed else None
    grad_elem = dtype_bytes(wdt) if wdt else (rp.trainable_bytes / rp.trainable_numel if rp.trainable_numel else 4.0)
    grad_bytes = rp.trainable_numel * grad_elem
    all_params_16 = (rp.frozen_bytes + rp.quant_bytes + rp.scale_bytes) + rp.trainable_numel * cd
    dp_s = dp_exposed = 0.0
    dp_ranks = par.dp * par.cp  # gradients are averaged over data- and context-parallel ranks
    dp_per_node = lay.dp * lay.cp
    if dp_ranks > 1 and grad_bytes > 0:
        if par.shards_params:
            ag = _coll(system, "all_gather", all_params_16, n_shard, min(n_shard, dp_per_node))
            rs = _coll(system, "reduce_scatter", grad_bytes, n_shard, min(n_shard, dp_per_node))
            n_ag = 2 if (par.reshard_after_forward or par.deepspeed) else 1
            hybrid = 0.0
            if par.fsdp == "hybrid_shard" and dp_ranks > n_shard:
                hybrid = _coll(system, "all_reduce", grad_bytes / n_shard, dp_ranks // n_shard, 1)
            dp_s = m * (n_ag * ag + rs) + hybrid
            fwd_exp = max(0.0, ag - slow.forward_s)
            bwd_exp = max(0.0, (n_ag - 1) * ag + rs - (slow.backward_s + slow.recompute_s))
            dp_exposed = m * (fwd_exp + bwd_exp) + hybrid + ag / max(1, slow.n_blocks)  # the first unit's gather
        elif par.shards_grads:  # ZeRO-2 / shard_grad_op: reduce-scatter every micro-batch, all-gather after the step
            rs = _coll(system, "reduce_scatter", grad_bytes, dp_ranks, dp_per_node)
            ag = _coll(system, "all_gather", rp.trainable_numel * cd, dp_ranks, dp_per_node)
            dp_s = m * rs + ag
            dp_exposed = m * max(0.0, rs - slow.backward_s) + ag
        else:  # DDP / ZeRO-1: one gradient all-reduce (or reduce-scatter + all-gather) per optimizer step
            ar = _coll(system, "all_reduce", grad_bytes, dp_ranks, dp_per_node)
            bucket = min(grad_bytes, par.ddp_bucket_MiB * 2**20)
            last = _coll(system, "all_reduce", bucket, dp_ranks, dp_per_node)
            dp_s = ar
            dp_exposed = max(0.0, ar - slow.backward_s) + last
    # optimizer step
    n_upd = rp.trainable_numel / (n_shard if par.shards_optimizer else 1)
    opt_s = off_s = 0.0
    if par.offload_optimizer != "none":
        # gradients down and updated 16-bit weights up over PCIe; the step on the host CPU
        pcie = float(comm.host_transfer_time_s(system, n_upd * (grad_elem + cd), dev.efficiency.host_transfer_fraction))
        rate = system.host.cpu_adam_params_per_s
        cpu = n_upd / rate if rate else 0.0
        # ZeRO-Infinity: the fp32 master and both moments (12 B/param) read and written back per step,
        # the node's ranks sharing its NVMe bandwidth
        nvme = float(comm.nvme_transfer_time_s(system, 2.0 * 12.0 * n_upd * lay.dp * lay.tp * lay.cp)) \
            if par.offload_optimizer == "nvme" else 0.0
        off_s = max(pcie, cpu) + nvme
    else:
        opt_s = float(cp_.memory_time_s(optimizer_step_bytes(n_upd, sc.optimizer.name, prec.param_dtype,
                                                             par.deepspeed), dev))
    if par.offload_params != "none":
        shard = all_params_16 / max(1, n_shard)
        pcie = float(comm.host_transfer_time_s(system, 2.0 * shard, dev.efficiency.host_transfer_fraction)) * m
        off_s += max(0.0, pcie - (slow.forward_s + slow.backward_s) * m)
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


def infer_time(sc, ct: CostTable, dev: Device, system) -> InferTime:
    """Prefill of the prompts and the decode of ``gen_len`` tokens (one token per sequence per step).

    Decode reads every weight and the KV cache once per step; the operator tables carry both (the
    GEMMs' weight bytes, the attention's K/V bytes at the current context), so the roofline makes it
    memory-bound at small batch.  Pipeline stages run one after another for a batch."""
    from .graph.ir import basis

    par, w, prec, dtype, cd, lay = _setup(sc, ct, system)
    Bp = basis(w.batch, w.prompt_len, w.prompt_len)
    mid = w.prompt_len + w.gen_len / 2.0
    Bd = basis(w.batch, 1, mid)
    h = ct.arch.hidden
    prefill = decode = tp_p = tp_d = 0.0
    for st in range(par.pp):
        sp_ = stage_compute(ct, par, Bp, dev, dtype, st, False)
        sd = stage_compute(ct, par, Bd, dev, dtype, st, False, decode_step=True)
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
