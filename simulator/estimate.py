"""estimate(scenario) -> Estimate: memory over one step, FLOPs, fit and what would fit."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwprofiles import Device, diskcache, get_device

from . import compute, cost, timing
from . import galore as gl
from . import memory as mem
from . import sharding as sh
from ._code import ENGINE_CODE
from .config import Scenario
from .config.training import InferWorkload, TrainWorkload
from .graph.compile import CostTable, compile_trace
from .graph.build import trace_model
from .graph.ir import basis
from .graph.transforms import plan_of
from .results import Cost, EnginePool, Estimate, FlopBreakdown, MemoryBreakdown, Suggestion, TimeBreakdown
from .uncertainty import uncertainty
from .units import dtype_bytes, fmt_bytes, last_true


# ---------------------------------------------------------------------------------------------
# Cost-table cache: one per (model, method, precision, attention, checkpointing, loss, task)
# ---------------------------------------------------------------------------------------------


def _table_key(sc: Scenario) -> str:
    parts = [
        sc.model.model_dump_json(),
        sc.method.model_dump_json(),
        sc.precision,
        sc.attention,
        sc.checkpointing.model_dump_json(),
        sc.loss,
        str(sc.padded_batches),
        str(sc.compile),
        sc.implementation,
        sc.workload.task,
        sc.inference.weights,
        str(sc.inference.group_size),
        str(sc.inference.double_quant),
    ]
    return "|".join(parts)


_TABLES: dict[str, CostTable] = {}


def cost_table_for(sc: Scenario) -> CostTable:
    key = _table_key(sc)
    ct = _TABLES.get(key)
    if ct is None:
        if len(_TABLES) > 512:
            _TABLES.clear()
        ct = _TABLES[key] = diskcache.load_or_build(
            "cost-table", key, lambda: compile_trace(trace_model(sc.model, plan_of(sc), sc.loss)), code=ENGINE_CODE)
    return ct


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def block_backward_transient_bytes(ct: CostTable, tokens: float) -> float:
    """Gradient temporaries while one block runs backward: the MLP dominates -- the grads of the
    down-projection input and of the gate and up outputs (3 x tokens x intermediate) for a gated
    MLP, 2 x for a plain one (routed rows x top_k for MoE)."""
    arch, cd = ct.arch, dtype_bytes(ct.plan.precision.compute_dtype)
    inter = arch.expert_intermediate * (arch.moe.top_k if arch.moe else 1)
    k = 3.0 if arch.gated_mlp else 2.0
    return k * tokens * max(inter, arch.q_dim) * cd


def _dims(sc: Scenario, ct: CostTable) -> tuple[int, int, int]:
    """(micro-batch, query length, key length) of one forward."""
    w = sc.workload
    if isinstance(w, TrainWorkload):
        s = w.seq_len + ct.plan.prompt_tokens
        return w.micro_batch, s, s + ct.plan.prefix_tokens
    return w.batch, w.prompt_len, w.prompt_len


def _n_shard(sc: Scenario) -> int:
    """Ranks the model states are partitioned over (the node's ranks for hybrid sharding)."""
    par = sc.parallel
    return sh.shard_group_size(par, _system(sc).gpus_per_node if par.fsdp == "hybrid_shard" else par.n_gpus)


def _system(sc: Scenario):
    return _system_named(sc.system, sc.gpu, sc.parallel.n_gpus)


@functools.lru_cache(maxsize=256)
def _system_named(name: str | None, gpu: str, n_gpus: int):
    """The named system, checked against the job (its GPU kind, and room for ``n_gpus`` when it has no
    network between nodes), else the one :func:`hwprofiles.system_for` picks for the GPU."""
    from hwprofiles import get_system, system_for, systems_of

    if not name:
        return system_for(gpu, n_gpus)
    system, device = get_system(name), get_device(gpu)
    if system.device != device.name:
        holds = ", ".join(systems_of(device.name)) or "none in the catalog"
        raise ValueError(f"system: {system.name!r} holds {system.device} GPUs, not gpu {device.name!r}; systems "
                         f"with {device.name}: {holds} (or leave system out: one is derived from the GPU's links)")
    if n_gpus > system.gpus_per_node and not system.multi_node:
        raise ValueError(f"system: {system.name!r} is one node of {system.gpus_per_node} GPUs with no network "
                         f"between nodes; the parallel layout needs {n_gpus} GPUs (leave system out for a "
                         f"derived multi-node one, or use at most {system.gpus_per_node})")
    return system


def kv_dtype(sc: Scenario, ct: CostTable) -> str:
    kv = sc.inference.kv_dtype
    return ct.plan.precision.compute_dtype if kv == "auto" else kv


def stage_saved_bytes(ct: CostTable, par, B: tuple, stage: int):
    """Saved activations of one micro-batch on one rank of ``stage``: the stage's blocks (TP/SP/CP split),
    the embeddings on the first stage, the head on the last."""
    rep_div, split_div = sh.activation_split(par)
    if par.n_gpus == 1:
        return ct.at(ct.saved, B)
    layers = sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]
    acts = 0.0
    for var_layers, rep, split in ct.block_saved_tp:
        n = sum(1 for i in var_layers if i in layers)
        if n:
            acts += n * (ct.at(rep, B) / rep_div + ct.at(split, B) / split_div)
    if stage == 0:
        acts += (ct.at(ct.pre_saved, B) + ct.at(ct.shared_saved, B)) / rep_div
    if stage == par.pp - 1:
        acts += ct.at(ct.post_saved, B) / split_div  # vocab-parallel logits
    return acts


def rank_activations_by_layer(ct: CostTable, par, B: tuple, stage: int) -> dict[str, float]:
    """One micro-batch's saved bytes per layer on one rank of ``stage`` (:func:`stage_saved_bytes` layer by
    layer): the stage's blocks split over TP / SP / CP, the embeddings -- with the tensors every block shares --
    on the first stage, the head on the last.  One GPU: the model's layers as traced.  Encoder-decoder stacks
    keep the whole model's layers."""
    if par.n_gpus == 1 or ct.arch.arch == "encoder_decoder":
        return {k: ct.at(v, B) for k, v in ct.saved_by_layer.items()}
    rep_div, split_div = sh.activation_split(par)
    layers = sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]
    prefix = ct.trace.layers_prefix
    out: dict[str, float] = {}
    if stage == 0:
        out["embeddings"] = (ct.at(ct.pre_saved, B) + ct.at(ct.shared_saved, B)) / rep_div
    for var_layers, rep, split in ct.block_saved_tp:
        per_block = ct.at(rep, B) / rep_div + ct.at(split, B) / split_div
        for i in var_layers:
            if i in layers:
                out[f"{prefix}.{i}"] = per_block
    if stage == par.pp - 1:
        out["head"] = ct.at(ct.post_saved, B) / split_div
    return out


def _stage_activation_bytes(ct: CostTable, par, B: tuple, stage: int, n_micro):
    """Saved activations on one rank of ``stage`` times the micro-batches in flight."""
    return stage_saved_bytes(ct, par, B, stage) * sh.in_flight_microbatches(par, stage, n_micro)


@dataclass(frozen=True)
class RankBytes:
    """Bytes one training rank of a stage holds whatever the micro-batch (numbers, or arrays of setups)."""

    weights: Any  # dense + packed quantized weights
    quant_scales: Any
    trainable_weights: Any
    gradients: Any  # held from backward to the step
    accumulated_gradients: Any  # held between micro-batches while accumulating
    step_gradients: Any  # held at the optimizer step (one parameter's with the step in backward)
    optimizer_states: Any  # incl. paged states
    paged: Any
    paged_working: Any  # of them, the largest tensor's (stays on the device)
    bucket: Any
    gathered: Any
    gathered_grads: Any
    largest_trainable: Any
    optimizer_transient: Any
    backward_optimizer_transient: Any  # the step's temporaries inside backward (optimizer in backward)
    dequant: Any


def accumulated_gradient_bytes(rp: sh.RankParams, par, prec, n_shard: int, gradients: float) -> float:
    """Gradients a rank holds between micro-batches of one step.

    Normally its (sharded) gradients.  FSDP that accumulates without syncing keeps them unsharded:
    ``Parallel.fsdp_no_sync`` (FSDP1 ``no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``), and FSDP
    under pipeline parallelism, where ``torch.distributed.pipelining`` runs every micro-batch's backward but
    the last without gradient sync (``set_requires_gradient_sync``, ``set_reshard_after_backward`` false,
    ``_PipelineStageBase.backward_maybe_with_nosync``).  The trainable parameters' gradients are in the
    reduce dtype (fp32 under ``MixedPrecisionPolicy(reduce_dtype=float32)``, as FSDP2 upcasts accumulated
    gradients); an FSDP1 unit mixing frozen and trainable parameters adds its frozen weights' gradients."""
    no_sync = par.fsdp_no_sync or par.pp > 1
    if no_sync and par.fsdp not in ("none", "no_shard") and not par.deepspeed and n_shard > 1:
        elem = 4.0 if prec.compute_dtype in ("bf16", "fp16") else dtype_bytes(prec.param_dtype)
        return rp.trainable_numel * elem + sh.mixed_unit_grad_bytes(rp, par)
    return gradients


def rank_bytes(ct: CostTable, par, optimizer, stage: int, n_shard: int) -> tuple[RankBytes, sh.ModelStates]:
    opt = optimizer
    prec = ct.plan.precision
    rp = sh.rank_params(ct, par, stage)
    groups = list(rp.groups)
    galore = (opt.galore, gl.projected_groups(ct, opt.galore)) if opt.galore is not None else None
    ms = sh.model_state_bytes(rp, par, opt.name, opt.impl, opt.beta1, prec.param_dtype, prec.compute_dtype, n_shard,
                              galore)
    grads = step_grads = ms.gradients
    bwd_opt = 0.0
    # galore-torch's optimizers are for-loops: one parameter's temporaries at a time
    one_at_a_time = (gl.galore_step_transient_bytes(groups, galore[1], opt.name, opt.galore) if galore is not None
                     else None)
    if opt.in_backward:
        # each gradient is consumed by its parameter's step (one parameter's temporaries) as soon as it
        # is produced; the validator keeps grad_accum at 1
        step_grads = rp.largest_trainable_bytes
        opt_tr = bwd_opt = (one_at_a_time if one_at_a_time is not None
                            else mem.optimizer_temp_bytes(groups, opt.name, "for-loop"))
    elif one_at_a_time is not None:
        opt_tr = one_at_a_time
    elif par.offload_optimizer != "none":
        opt_tr = 0.0  # the step runs on the host
    else:
        opt_tr = mem.optimizer_temp_bytes(groups, opt.name, opt.impl)
        if par.shards_optimizer and n_shard > 1:
            opt_tr /= n_shard
        opt_tr += ms.step_temp_bytes
    rb = RankBytes(weights=ms.weights + ms.quant_data, quant_scales=ms.quant_scales,
                   trainable_weights=ms.trainable_weights, gradients=grads,
                   accumulated_gradients=accumulated_gradient_bytes(rp, par, prec, n_shard, grads),
                   step_gradients=step_grads,
                   optimizer_states=ms.optimizer_states + ms.paged_bytes, paged=ms.paged_bytes,
                   paged_working=ms.paged_working_bytes,
                   bucket=ms.bucket_bytes, gathered=ms.gathered_bytes, gathered_grads=ms.gathered_grad_bytes,
                   largest_trainable=rp.largest_trainable_bytes, optimizer_transient=opt_tr,
                   backward_optimizer_transient=bwd_opt, dequant=ct.max_dequant_bytes / par.tp)
    return rb, ms


@dataclass(frozen=True)
class MicroBytes:
    """Bytes that grow with one micro-batch on one rank of a stage (numbers, or arrays of setups)."""

    saved: Any  # saved activations of one micro-batch
    loss_forward: Any
    loss_backward: Any
    block_backward: Any
    recompute: Any
    other: Any
    cast_cache: Any = 0.0  # autocast's cached weight copies of checkpointed blocks, alive through the forward
    loss_stranded: Any = 0.0  # reserved, free and too small for the loss backward (memory.loss_stranded_bytes)
    loss_stranded_forward: Any = 0.0  # the same at the loss forward (memory.loss_forward_stranded_bytes)
    post_saved: Any = 0.0  # the head's and loss's share of ``saved``: freed once their backward has run


def micro_bytes(ct: CostTable, par, B: tuple, stage: int, loss: str) -> MicroBytes:
    rep_div, split_div = sh.activation_split(par)
    layers = sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]
    has_blocks = bool(layers)
    logits_n = ct.at(ct.logits_numel, B) / split_div if stage == par.pp - 1 else 0.0
    loss_fwd, loss_bwd = mem.loss_transient_bytes(loss, logits_n, ct.logits_dtype, ct.loss_dtype, ct.loss_upcast_copy,
                                                ct.loss_shift_dtype)
    blk_bwd = block_backward_transient_bytes(ct, B[0]) / split_div if has_blocks else 0.0
    recompute = ct.at(ct.max_layer_saved, B) / split_div if ct.plan.checkpointed and has_blocks else 0.0
    if ct.plan.offload_checkpoints and has_blocks:
        recompute += ct.at(ct.block_io, B) / rep_div  # the block input copied back from host memory
    other = ct.at(ct.other_transient_bytes, B) / split_div
    cache = 0.0
    if par.fsdp == "none" and not par.deepspeed:
        # the cache holds copies of resident fp32 leaves: FSDP's gathered parameters and DeepSpeed's 16-bit
        # module have none
        cache = sum(nb * sum(1 for i in ls if i in layers) for ls, nb in ct.checkpoint_cast_cache) / split_div
    stranded = mem.loss_stranded_bytes(loss, logits_n, ct.logits_dtype, ct.loss_upcast_copy, ct.loss_shift_dtype)
    stranded_fwd = mem.loss_forward_stranded_bytes(loss, logits_n, ct.logits_dtype, ct.loss_upcast_copy,
                                                   ct.loss_shift_dtype)
    post = ct.at(ct.post_saved, B) / split_div if stage == par.pp - 1 else 0.0
    return MicroBytes(stage_saved_bytes(ct, par, B, stage), loss_fwd, loss_bwd, blk_bwd, recompute, other, cache,
                      loss_stranded=stranded, post_saved=post, loss_stranded_forward=stranded_fwd)


def _where(cond, a, b):
    return np.where(cond, a, b) if isinstance(cond, np.ndarray) else (a if cond else b)


def _maximum(*xs):
    if any(isinstance(x, np.ndarray) for x in xs):
        out = xs[0]
        for x in xs[1:]:
            out = np.maximum(out, x)
        return out
    return max(xs)


def _minimum(a, b):
    return np.minimum(a, b) if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) else min(a, b)


def train_phase_bytes(rb: RankBytes, mb: MicroBytes, in_flight, grad_accum, workspace_bytes
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Allocated bytes of the forward, backward and optimizer phases, their transients and the gradients
    and activations held in each (any argument may hold arrays of setups)."""
    acts = mb.saved * in_flight
    ws = workspace_bytes
    # torch.autocast's bf16 weight copies are in the saved activations: cached copies of trainable
    # leaves (autocast_mode.cpp caches only leaf tensors that require grad) and per-op copies of frozen
    # weights, each saved by its matmul when the input needs grad.
    g_acc = _where(grad_accum > 1, rb.accumulated_gradients, 0.0)
    base = rb.weights + rb.quant_scales + rb.trainable_weights + (rb.optimizer_states - rb.paged) + rb.bucket
    fwd_tr = _maximum(mb.loss_forward, rb.dequant, mb.other) + rb.gathered + mb.cast_cache
    blocks_bwd = mb.block_backward + mb.recompute + rb.dequant + mb.other
    # autograd frees a node's saved tensors once its backward has run: the blocks' backward (and the
    # recompute) runs after the loss and head have released theirs (the fp32 log-softmax, the logits)
    loss_first = mb.loss_backward >= blocks_bwd - mb.post_saved
    bwd_tr = _where(loss_first, mb.loss_backward, blocks_bwd) + rb.gathered + rb.gathered_grads
    acts_bwd = acts - _where(loss_first, 0.0, mb.post_saved)
    # backward: early on the grads of the first (top) blocks exist; with accumulation all of them
    # the top-most trainable tensor's grad (e.g. lm_head) already exists when the loss grads are live
    bwd_grads = _where(g_acc != 0, g_acc, _minimum(rb.gradients, rb.largest_trainable))
    bwd_tr = bwd_tr + rb.backward_optimizer_transient
    opt_tr = rb.optimizer_transient
    phases = {
        "forward": base + g_acc + acts + fwd_tr + ws,
        "backward": base + bwd_grads + acts_bwd + bwd_tr + ws,
        "optimizer": base + rb.step_gradients + opt_tr + ws,
    }
    transients = {"forward": fwd_tr, "backward": bwd_tr, "optimizer": opt_tr}
    # the loss backward is the backward's peak: the forward's 16-bit logit blocks sit cached beside it; the loss
    # forward is the forward's peak where it is the largest forward transient
    loss_peak_fwd = mb.loss_forward >= _maximum(rb.dequant, mb.other)
    stranded = {"forward": _where(loss_peak_fwd, mb.loss_stranded_forward, 0.0),
                "backward": _where(loss_first, mb.loss_stranded, 0.0)}
    held = {"gradients": {"forward": g_acc, "backward": bwd_grads, "optimizer": rb.step_gradients},
            "activations": {"forward": acts, "backward": acts_bwd}, "stranded": stranded}
    return phases, transients, held


def peak_of_phases(phases: dict[str, Any], transients: dict[str, Any], expandable_segments: bool,
                   stranded: dict[str, Any] | None = None, limit: Any = None):
    """(peak phase -- an index into the phases when they hold arrays --, allocated, allocator overhead) at the peak:
    the phase with the most allocated bytes (the first of equals), and reserved minus its allocated bytes, where
    reserved is the most any phase reserves: its allocated bytes, the segment its transient opens, the blocks
    ``stranded`` (by phase; none where absent) cached beside it and the fragmentation share.  The caching allocator
    keeps its segments, so ``max_memory_reserved`` is the largest phase's even where another allocates more.

    Stranded blocks are whole free segments: when a request finds the device full, the allocator releases its
    free segments and retries (c10/cuda/CUDACachingAllocator.cpp ``release_cached_blocks``), so past ``limit``
    (the bytes the allocator can have) they cost nothing but the limit."""
    stranded = stranded or {}
    names = list(phases)
    vals = [phases[k] for k in names]
    kept = [v + mem.reserved_overhead_bytes(transients[k], v, expandable_segments) for k, v in zip(names, vals)]
    reserved = [r + stranded.get(k, 0.0) for k, r in zip(names, kept)]
    if any(isinstance(v, np.ndarray) for v in (*vals, *reserved, limit)):
        idx, allocated, most, floor = 0, vals[0], reserved[0], kept[0]
        for j in range(1, len(names)):
            later = vals[j] > allocated  # strictly: the first of equal phases is the peak
            idx = np.where(later, j, idx)
            allocated = np.where(later, vals[j], allocated)
            most = np.maximum(most, reserved[j])
            floor = np.maximum(floor, kept[j])
        if limit is not None:
            most = np.maximum(floor, np.minimum(most, limit))
        return idx, allocated, most - allocated
    j = max(range(len(names)), key=lambda i: vals[i])
    most = max(reserved)
    if limit is not None:
        most = max(max(kept), min(most, limit))
    return names[j], vals[j], most - vals[j]


def _train_memory(sc: Scenario, ct: CostTable, dev: Device, stage: int = 0
                  ) -> tuple[dict[str, float], dict[str, MemoryBreakdown], float, dict[str, float], sh.ModelStates]:
    w: TrainWorkload = sc.workload  # type: ignore[assignment]
    par = sc.parallel
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    rb, ms = rank_bytes(ct, par, sc.optimizer, stage, _n_shard(sc))
    mb = micro_bytes(ct, par, B, stage, sc.loss)
    ws = dev.cublas_workspace_bytes * 2.0 + dev.cublaslt_workspace_bytes  # forward + autograd thread handles
    phases, transients, held = train_phase_bytes(rb, mb, sh.in_flight_microbatches(par, stage, w.grad_accum),
                                                 w.grad_accum, ws)
    common = dict(weights=rb.weights, quant_scales=rb.quant_scales, trainable_weights=rb.trainable_weights,
                  optimizer_states=rb.optimizer_states, workspaces=ws + rb.bucket)
    grads, acts = held["gradients"], held["activations"]
    bd = {
        "forward": MemoryBreakdown(**common, gradients=grads["forward"], activations=acts["forward"],
                                   transients=transients["forward"]),
        "backward": MemoryBreakdown(**common, gradients=grads["backward"], activations=acts["backward"],
                                    transients=transients["backward"]),
        "optimizer": MemoryBreakdown(**common, gradients=grads["optimizer"], transients=transients["optimizer"]),
    }
    return phases, bd, rb.paged, transients, held["stranded"], ms


def forward_block_transient_bytes(sc: Scenario, ct: CostTable, batch: int, seq: int) -> float:
    """One block's temporaries in a forward that saves nothing (inference mode): the MLP's gate, up and
    act*up and the residual / normed hidden states; eager attention also materialises fp32 scores and their
    16-bit copy."""
    arch, par = ct.arch, sc.parallel
    cd = dtype_bytes(ct.plan.precision.compute_dtype)
    inter = arch.expert_intermediate * (arch.moe.top_k if arch.moe else 1)
    out = batch * seq * (3.0 * inter / par.tp + 4.0 * arch.hidden) * cd
    if sc.attention in ("eager", "sdpa-math"):
        out = max(out, batch * arch.n_heads / par.tp * seq**2 * (4.0 + cd))
    return out


def _mezo_memory(sc: Scenario, ct: CostTable, dev: Device, stage: int = 0
                 ) -> tuple[dict[str, float], dict[str, MemoryBreakdown], float, dict[str, float], sh.ModelStates]:
    """MeZO: the weights, the transients of a forward under inference mode with its loss (no saved activations,
    gradients or optimizer states), then the in-place parameter perturbations and update, a tensor at a time."""
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    rp = sh.rank_params(ct, sc.parallel, stage)
    logits_n = ct.at(ct.logits_numel, B)
    loss_fwd, _ = mem.loss_transient_bytes(sc.loss, logits_n, ct.logits_dtype, ct.loss_dtype, ct.loss_upcast_copy,
                                           ct.loss_shift_dtype)
    fwd_tr = max(forward_block_transient_bytes(sc, ct, b, s), loss_fwd, ct.max_dequant_bytes)
    step_tr = mem.mezo_step_transient_bytes(rp.largest_trainable_bytes)
    ws = dev.cublas_workspace_bytes + dev.cublaslt_workspace_bytes
    common = dict(weights=rp.frozen_bytes + rp.quant_bytes, quant_scales=rp.scale_bytes,
                  trainable_weights=rp.trainable_bytes, workspaces=ws)
    base = rp.frozen_bytes + rp.quant_bytes + rp.scale_bytes + rp.trainable_bytes + ws
    phases = {"forward": base + fwd_tr, "optimizer": base + step_tr}
    bd = {"forward": MemoryBreakdown(**common, transients=fwd_tr),
          "optimizer": MemoryBreakdown(**common, transients=step_tr)}
    return phases, bd, 0.0, {"forward": fwd_tr, "optimizer": step_tr}, {}, sh.weights_only_states(rp, rp.trainable_bytes)


def _infer_memory(sc: Scenario, ct: CostTable, dev: Device, stage: int = 0
                  ) -> tuple[dict[str, float], dict[str, MemoryBreakdown], float, dict[str, float], sh.ModelStates]:
    w: InferWorkload = sc.workload  # type: ignore[assignment]
    par = sc.parallel
    arch = ct.arch
    cd = dtype_bytes(ct.plan.precision.compute_dtype)
    rp = sh.rank_params(ct, par, stage)
    weights = rp.frozen_bytes + rp.quant_bytes + rp.trainable_bytes
    scales = rp.scale_bytes
    ctx = w.prompt_len + w.gen_len
    paged = engine_pool(sc)
    seqs = w.batch
    if paged:  # whole blocks per sequence, for the sequences the engine runs at once
        ctx = mem.paged_context_tokens(ctx, sc.inference.kv_block_tokens)
        seqs = running_sequences(sc)
    # KV heads split over TP ranks; with tp > n_kv_heads each rank keeps one (replicated) head
    kv_heads = max(1, arch.kv_heads // par.tp) if arch.kv_heads >= par.tp else 1
    n_layers = round(arch.decoder_layers * len(sh.stage_layer_ranges(ct.n_blocks, par.pp)[stage]) / max(1, ct.n_blocks))
    window = dict(sliding_window=arch.sliding_window,
                  full_layers=None if arch.full_attention_layers is None else
                  round(arch.full_attention_layers * n_layers / max(1, arch.decoder_layers)))
    kv = mem.kv_cache_bytes(n_layers, kv_heads, arch.d_head, ctx, seqs, kv_dtype(sc, ct), **window)
    kv_prefill = (kv if paged else  # the pool exists before the first prompt
                  mem.kv_cache_bytes(n_layers, kv_heads, arch.d_head, w.prompt_len, w.batch, kv_dtype(sc, ct), **window))
    if arch.arch == "encoder":  # one bidirectional forward: nothing is cached
        kv = kv_prefill = 0.0
    T = w.batch * w.prompt_len
    prefill_tr = forward_block_transient_bytes(sc, ct, w.batch, w.prompt_len)
    if paged:
        # the engine sizes its pool after profiling one forward over its token budget (vLLM's
        # max_num_batched_tokens: at least 2048, a whole prompt without chunking); the pool then fills what is left
        T = max(mem.VLLM_PROFILE_TOKENS, w.prompt_len)
        prefill_tr = forward_block_transient_bytes(sc, ct, 1, T)
    last = stage == par.pp - 1
    # generate() computes logits for the last position only and copies them to fp32 (on the last stage)
    logits = mem.generation_logits_bytes(seqs, arch.vocab, cd, par.tp) if last else 0.0
    deq = ct.max_dequant_bytes / par.tp
    if w.prefill_logits == "all" and last:
        # a plain forward returns every position's logits; at the head the normed hidden states are live too
        prefill_tr = max(prefill_tr, mem.prefill_head_bytes(T, arch.hidden, arch.vocab, cd, par.tp)) + deq
    else:
        prefill_tr = prefill_tr + max(logits, deq)
    decode_tr = forward_block_transient_bytes(sc, ct, seqs, 1) + logits + deq
    ws = dev.cublas_workspace_bytes + dev.cublaslt_workspace_bytes
    phases = {
        "prefill": weights + scales + kv_prefill + prefill_tr + ws,
        "decode": weights + scales + kv + decode_tr + ws,
    }
    bd = {
        "prefill": MemoryBreakdown(weights=weights, quant_scales=scales, kv_cache=kv_prefill, transients=prefill_tr, workspaces=ws),
        "decode": MemoryBreakdown(weights=weights, quant_scales=scales, kv_cache=kv, transients=decode_tr, workspaces=ws),
    }
    ms = sh.weights_only_states(rp, 0.0)
    return phases, bd, 0.0, {"prefill": prefill_tr, "decode": decode_tr}, {}, ms


def _flops(sc: Scenario, ct: CostTable) -> tuple[FlopBreakdown, int]:
    """FLOPs of one step of the whole job (every data-parallel replica; TP/PP/CP ranks share one replica's)."""
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    w = sc.workload
    if isinstance(w, TrainWorkload):
        reps = sc.parallel.dp * w.grad_accum
        f, bw, rc = ct.at(ct.fwd_flops, B) * reps, ct.at(ct.bwd_flops, B) * reps, ct.at(ct.recompute_flops, B) * reps
        if sc.optimizer.forward_only:  # MeZO: two forwards (+eps z and -eps z), no backward
            f, bw, rc = 2.0 * f, 0.0, 0.0
        tokens = w.micro_batch * w.seq_len * reps
        per_step = f + bw + rc
        sf, sb, sr = compute.causal_skipped_flops(ct, B)
        skipped = (2.0 * sf if sc.optimizer.forward_only else sf + sb + sr) * reps
        return FlopBreakdown(forward=f, backward=bw, recompute=rc, per_step=per_step, per_token=per_step / tokens,
                             executed_per_step=per_step - skipped), tokens
    # inference: prefill over the prompt + one forward per generated token over a growing context
    f_prefill = ct.at(ct.fwd_flops, B)
    head_B = timing.prefill_head_basis(w)
    if head_B is not None:  # the head runs on the last position only
        f_prefill += compute.head_fwd_flops(ct, head_B) - compute.head_fwd_flops(ct, B)
    c = ct.fwd_flops.c  # over (T, K, A, B, S, Q, 1): per new token, T and K terms are per token, A per context position
    lin_per_tok = c[0] + c[1]
    att_coef = c[2]
    ctx_sum = w.gen_len * w.prompt_len + w.gen_len * (w.gen_len - 1) / 2  # sum of contexts over decode steps
    f_decode = w.batch * (lin_per_tok * w.gen_len + att_coef * ctx_sum)
    tokens = w.batch * (w.prompt_len + w.gen_len)
    total = f_prefill + f_decode
    # the prefill's causal attention skips its masked half; a decode step's one query sees every key
    skipped = compute.causal_skipped_flops(ct, B)[0]
    return FlopBreakdown(forward=total, backward=0.0, recompute=0.0, per_step=total,
                         per_token=total / max(1, tokens), executed_per_step=total - skipped), tokens


def allocator_limit_bytes(dev: Device, paged_working):
    """The most PyTorch's caching allocator can reserve: the device less the CUDA context and the paged states
    that must stay (the driver evicts the other managed pages to make room for cudaMalloc)."""
    return dev.memory_total_bytes - paged_working - dev.cuda_context_bytes


def device_bytes(reserved, paged, paged_working, dev: Device):
    """(device total, bytes that must fit, paged bytes spilled to host memory) of a rank that reserves ``reserved``
    bytes and holds ``paged`` bytes of paged optimizer states (numbers or arrays): the paged states fill what is
    free (:func:`memory.paged_resident_bytes`) and only their working set must fit."""
    resident = mem.paged_resident_bytes(paged, dev.memory_total_bytes - reserved - dev.cuda_context_bytes,
                                        paged_working)
    total = reserved + resident + dev.cuda_context_bytes
    return total, reserved + paged_working + dev.cuda_context_bytes, paged - resident


def _stage_peak(sc: Scenario, ct: CostTable, dev: Device, stage: int) -> dict[str, Any]:
    memory = (_infer_memory if not sc.is_training else _mezo_memory if sc.optimizer.forward_only else _train_memory)
    phases, bd, paged, transient, stranded, ms = memory(sc, ct, dev, stage)
    phase, allocated, over = peak_of_phases(phases, transient, sc.expandable_segments, stranded,
                                            allocator_limit_bytes(dev, ms.paged_working_bytes))
    reserved = allocated + over
    total, needed, spilled = device_bytes(reserved, paged, ms.paged_working_bytes, dev)
    evictable = total - needed
    b = bd[phase].model_copy(update={"allocator_overhead": over, "cuda_context": dev.cuda_context_bytes,
                                     "optimizer_states": bd[phase].optimizer_states - spilled})
    limit, running, spare = memory_limit_bytes(sc, dev), total, 0.0
    if engine_pool(sc):
        # the serving engine starts when its share holds the weights, the profiled forward and one sequence; it
        # then allocates its KV pool up front to fill the share (the device shows the share) and runs as many
        # sequences at once as the pool holds, the others waiting
        one_seq = b.kv_cache / running_sequences(sc)
        needed = total - b.kv_cache + one_seq
        if needed <= limit:
            spare = limit - total  # negative where the pool holds fewer than the requested sequences
            allocated, reserved, total = allocated + spare, reserved + spare, limit
            b = b.model_copy(update={"kv_cache": b.kv_cache + spare})
            phases = {k: v + spare for k, v in phases.items()}  # the pool is allocated through every phase
    return dict(phases=phases, phase=phase, allocated=allocated, reserved=reserved, total=total, breakdown=b,
                limit=limit, needed=needed, running=running, pool_spare=spare,
                stage=stage, host_bytes=ms.host_bytes + spilled, nvme_bytes=ms.nvme_bytes, paged_spilled=spilled,
                evictable=evictable,
                model_states=ms.weights + ms.quant_data + ms.quant_scales + ms.trainable_weights + ms.gradients
                + ms.optimizer_states + ms.paged_bytes)


def _peak(sc: Scenario, ct: CostTable, dev: Device) -> dict[str, Any]:
    """The rank with the largest peak (over pipeline stages), with every checked stage's total."""
    peaks = [_stage_peak(sc, ct, dev, st) for st in sh.stages_to_check(sc.parallel.pp)]
    worst = max(peaks, key=lambda p: p["needed"])
    return {**worst, "stage_totals": {p["stage"]: p["total"] for p in peaks}}


def engine_pool_of(sc: Scenario, p: dict[str, Any]) -> EnginePool | None:
    """A serving engine's KV pool and the sequences it decodes at once: the batch, capped by its max_num_seqs and
    by the sequences of ``prompt_len + gen_len`` tokens (whole blocks) the pool holds, at least one; None
    without a pool-sizing engine."""
    if not engine_pool(sc):
        return None
    w = sc.workload
    seqs = running_sequences(sc)
    kv_needed = p["breakdown"].kv_cache - p["pool_spare"]  # the requested sequences'
    pool = max(0.0, p["limit"] - (p["running"] - kv_needed))
    seq_tokens = mem.paged_context_tokens(w.prompt_len + w.gen_len, sc.inference.kv_block_tokens)
    per_seq = kv_needed / seqs if seqs else 0.0
    held = int(pool // per_seq) if per_seq > 0 else seqs
    run = max(1, min(seqs, held))
    return EnginePool(share_bytes=p["limit"], needed_bytes=p["running"], pool_bytes=pool,
                      pool_tokens=int(pool // (per_seq / seq_tokens)) if per_seq > 0 else 0,
                      sequences_held=held, concurrency=run, waves=-(-w.batch // run))


def _time_and_cost(sc: Scenario, ct: CostTable, dev: Device, flops: FlopBreakdown, tokens: int,
                   concurrency: int | None = None, paged_spilled: float = 0.0) -> tuple[TimeBreakdown, Cost]:
    system = _system(sc)
    n = sc.parallel.n_gpus
    dtype = compute.matmul_dtype(ct.plan.precision.compute_dtype, sc.precision)
    peak = compute.peak_flops(dev, dtype)
    if sc.is_training:
        b, s, skv = _dims(sc, ct)
        t = timing.train_step_time(sc, ct, dev, system, basis(b, s, skv), paged_spilled)
        step = t.step_s
        parts = {k: getattr(t, k) for k in ("forward_s", "backward_s", "recompute_s", "tp_comm_s", "cp_comm_exposed_s",
                                            "ep_comm_s", "pp_p2p_s", "pp_bubble_s", "dp_comm_s", "dp_comm_exposed_s",
                                            "optimizer_s", "offload_s")}
        model_flops = flops.forward + flops.backward
    else:
        t = timing.infer_time(sc, ct, dev, system, concurrency)
        step = t.total_s
        parts = dict(prefill_s=t.prefill_s, decode_per_token_s=t.decode_per_token_s, tp_comm_s=t.tp_comm_s)
        model_flops = flops.forward
    # inference throughput is the serving convention: generated tokens per second
    out_tokens = tokens if sc.is_training else sc.workload.batch * max(1, sc.workload.gen_len)
    tps = out_tokens / step if step > 0 else 0.0
    tb = TimeBreakdown(step_s=step, **parts, tokens_per_s=tps, tokens_per_s_per_gpu=tps / n,
                       mfu=model_flops / (step * n * peak) if step > 0 else 0.0,
                       hfu=flops.executed_per_step / (step * n * peak) if step > 0 else 0.0)
    price = system.price_usd_per_gpu_hour if (system.price_usd_per_gpu_hour and system.device == dev.name) else dev.price_usd_per_hour
    price_src = (system.price_source if price == system.price_usd_per_gpu_hour else dev.price_source) if price else None
    if system.node_power_per_gpu_W and system.device == dev.name:
        watts, power_src = system.node_power_per_gpu_W, f"{system.name}: node_power_W / gpus_per_node (host included)"
    elif dev.tdp_W:
        watts, power_src = dev.tdp_W, f"{dev.name}: tdp_W (board power limit, the GPU alone)"
    else:  # no power figure: no energy rather than zero energy
        watts, power_src = None, f"no power figure: {system.name} states no node_power_W and {dev.name} no tdp_W"
    usd_step = cost.run_cost_usd(step, n, price) if price else None
    kwh_step = cost.energy_kwh(step, n, watts) if watts else None
    run_tokens = getattr(sc.workload, "total_tokens", None)
    run = {}
    if run_tokens:
        run_time = step * run_tokens / tokens
        run = dict(run_tokens=run_tokens, run_time_s=run_time,
                   run_usd=cost.run_cost_usd(run_time, n, price) if price else None,
                   run_kwh=cost.energy_kwh(run_time, n, watts) if watts else None)
    c = Cost(usd_per_gpu_hour=price, price_source=price_src, watts_per_gpu=watts, power_source=power_src,
             usd_per_step=usd_step,
             usd_per_million_tokens=cost.per_million_tokens(usd_step, out_tokens) if usd_step is not None else None,
             kwh_per_million_tokens=cost.per_million_tokens(kwh_step, out_tokens) if kwh_step is not None else None,
             **run)
    return tb, c


def engine_pool(sc: Scenario) -> bool:
    """Inference under a serving engine that allocates its KV pool up front (InferenceQuant.engine)."""
    return not sc.is_training and sc.inference.engine == "vllm"


def running_sequences(sc: Scenario) -> int:
    """Sequences a serving engine is asked to run at once: the batch, up to its max_num_seqs."""
    return min(sc.workload.batch, sc.inference.max_num_seqs)


def memory_limit_bytes(sc: Scenario, dev: Device) -> float:
    """The device memory a setup may use: all of it, or a serving engine's share (gpu_memory_utilization)."""
    if engine_pool(sc):
        return sc.inference.gpu_memory_utilization * dev.memory_total_bytes
    return dev.memory_total_bytes


def _fits(sc: Scenario, ct: CostTable, dev: Device) -> tuple[bool, float]:
    p = _peak(sc, ct, dev)
    return p["needed"] <= p["limit"], p["needed"]


def _with(sc: Scenario, **upd: Any) -> Scenario:
    data = sc.model_dump()
    for k, v in upd.items():
        data[k] = v
    return Scenario.model_validate(data)


def _largest(sc: Scenario, ct: CostTable, dev: Device, field: str, lo: int, hi: int) -> int | None:
    """Largest value of a workload field (batch / length) in [lo, hi] that fits, by bisection (memory is
    monotone in it).  Sizes do not change the cost table, so each probe is one evaluation of it."""
    def fits(v: int) -> bool:
        s2 = sc.model_copy(update={"workload": sc.workload.model_copy(update={field: v})})
        return _fits(s2, ct, dev)[0]
    if not fits(lo):
        return None
    if fits(hi):
        return hi
    return last_true(fits, lo, hi)


SUGGESTIONS_SHOWN = 3


def _sharding_candidates(sc: Scenario) -> list[tuple[str, dict[str, Any]]]:
    """Changes that spread the job thinner over the same GPUs: the next ZeRO stages (or FSDP's full shard),
    sequence parallelism beside tensor parallelism, and trading data-parallel ranks for tensor or pipeline
    ones (an invalid split -- heads or layers that do not divide -- is dropped by the caller)."""
    par = sc.parallel
    pd = par.model_dump()
    out: list[tuple[str, dict[str, Any]]] = []
    if par.dp > 1 and par.fsdp == "none":
        for stage in sorted({min(3, int(par.zero) + 1), 3} - {int(par.zero)}):
            what = {1: "optimizer states", 2: "optimizer states and gradients",
                    3: "parameters, gradients and optimizer states"}[stage]
            out.append((f"ZeRO-{stage}: {what} sharded over the {par.dp} data-parallel ranks",
                        {"parallel": {**pd, "zero": stage}}))
    if par.dp > 1 and par.fsdp in ("shard_grad_op", "no_shard", "hybrid_shard"):
        out.append((f"FSDP full_shard over the {par.dp} data-parallel ranks", {"parallel": {**pd, "fsdp": "full_shard"}}))
    if par.tp > 1 and not par.sp:
        out.append(("sequence parallelism beside tensor parallelism (norms and dropout split over the TP ranks)",
                    {"parallel": {**pd, "sp": True}}))
    if par.dp % 2 == 0:
        out.append((f"tensor parallel {par.tp * 2} instead of {par.tp}, data parallel {par.dp // 2}",
                    {"parallel": {**pd, "dp": par.dp // 2, "tp": par.tp * 2}}))
        out.append((f"pipeline parallel {par.pp * 2} instead of {par.pp}, data parallel {par.dp // 2}",
                    {"parallel": {**pd, "dp": par.dp // 2, "pp": par.pp * 2}}))
    return out


def _more_gpus_candidates(sc: Scenario) -> list[tuple[str, dict[str, Any]]]:
    """More GPUs of the same kind that shard what one holds: FSDP full_shard over 2, 4 or 8 for a single GPU,
    twice the data-parallel ranks where the parameters or optimizer states are already sharded."""
    par = sc.parallel
    pd = par.model_dump()
    if par.n_gpus == 1:
        return [(f"{k} GPUs with FSDP full_shard", {"parallel": {**pd, "dp": k, "fsdp": "full_shard"}}) for k in (2, 4, 8)]
    if par.shards_params or par.zero >= 1:
        return [(f"{2 * par.n_gpus} GPUs: data parallel {2 * par.dp}, same sharding", {"parallel": {**pd, "dp": 2 * par.dp}})]
    return []


MAX_SUGGESTED_GPUS = 1024
"""The largest job :func:`_fewest_gpus` proposes."""


def _fewest_gpus(sc: Scenario, dev: Device) -> tuple[str, dict[str, Any]] | None:
    """The same training job on the fewest GPUs of its kind that hold it: the data-parallel degree doubled
    until it fits (at most :data:`MAX_SUGGESTED_GPUS`), the parameters sharded (the ZeRO-3 or FSDP it uses,
    else FSDP full_shard; ZeRO-1/2 become ZeRO-3) and every block checkpointed.  More ranks shrink only the
    sharded model states, so a job whose activations alone overflow gets None."""
    par = sc.parallel
    shard: dict[str, Any] = {}
    if not par.shards_params:
        shard = {"zero": 3} if par.zero >= 1 else {"fsdp": "full_shard"}
    ck = {} if sc.checkpointing.mode == "full" else {"checkpointing": {"mode": "full"}}
    dp, others = par.dp, par.n_gpus // par.dp
    while others * dp * 2 <= MAX_SUGGESTED_GPUS:
        dp *= 2
        upd = {"parallel": {**par.model_dump(), **shard, "dp": dp}, **ck}
        try:
            s2 = _with(sc, **upd)
            ok, _ = _fits(s2, cost_table_for(s2), dev)
        except ValueError:
            return None
        if ok:
            how = [f"data parallel {dp}"]
            if shard:
                how.append("ZeRO-3" if "zero" in shard else "FSDP full_shard")
            if ck:
                how.append("checkpointing every block")
            return f"{others * dp} GPUs, the fewest that hold this job ({', '.join(how)})", upd
    return None


def _suggestions(sc: Scenario, dev: Device) -> list[Suggestion]:
    """Try the usual fixes one at a time; list those that fit, least disruptive first -- the order of the
    candidates: the same job on the same GPUs (recompute, smaller micro-batches, a chunked loss, sharding
    and splits), then leaner optimizer states, offload, more GPUs, and last a different fine-tuning method
    -- then those that do not, closest to fitting first."""
    cands: list[tuple[str, dict[str, Any]]] = []
    if sc.is_training:
        w = sc.workload
        opt = sc.optimizer.model_dump()
        if sc.checkpointing.mode in ("none", "every_k") and sc.attention not in ("eager", "sdpa-math"):
            # recomputes less than full checkpointing (the matmuls it keeps are not rerun), so it comes first
            cands.append(("selective activation checkpointing (torchtitan's per-op policy) on every block",
                          {"checkpointing": {"mode": "selective"}}))
        if sc.checkpointing.mode != "full":
            cands.append(("activation checkpointing on every block", {"checkpointing": {"mode": "full"}}))
        if w.micro_batch > 1:
            half = max(1, w.micro_batch // 2)
            cands.append((f"micro-batch {half} with grad accumulation x{w.grad_accum * (w.micro_batch // half)}",
                          {"workload": {**w.model_dump(), "micro_batch": half, "grad_accum": w.grad_accum * (w.micro_batch // half)}}))
        if sc.loss in ("upcast", "upcast-shift"):
            cands.append(("fused/chunked cross-entropy (no b*s*V fp32 logits)", {"loss": "fused"}))
        cands += _sharding_candidates(sc)
        if sc.optimizer.name in ("adamw", "adam"):
            cands.append(("8-bit AdamW (bitsandbytes)", {"optimizer": {**opt, "name": "adamw-8bit"}}))
        if sc.optimizer.galore is not None and not sc.optimizer.in_backward and w.grad_accum == 1 and sc.parallel.n_gpus == 1:
            cands.append(("layer-wise GaLore (each weight stepped in backward)",
                          {"optimizer": {**opt, "in_backward": True}}))
        par = sc.parallel
        if (par.zero >= 1 or par.fsdp != "none") and par.offload_optimizer == "none":
            cands.append(("optimizer states offloaded to CPU memory (the step runs on the host)",
                          {"parallel": {**par.model_dump(), "offload_optimizer": "cpu"}}))
        cands += _more_gpus_candidates(sc)
        fewest = _fewest_gpus(sc, dev)
        if fewest is not None:
            cands.append(fewest)
        if sc.method.kind == "full":
            cands.append(("LoRA r=16 on all linear layers", {"method": {"kind": "lora", "r": 16, "targets": "all-linear"}}))
        if sc.method.kind in ("full", "lora"):
            cands.append(("QLoRA (NF4 base) r=16 on all linear layers",
                          {"method": {"kind": "qlora", "r": 16, "targets": "all-linear"}, "precision": "bf16"}))
        # the usual low-memory recipe, all at once
        cands.append(("QLoRA r=16 all-linear + checkpointing + paged 8-bit AdamW + chunked loss, micro-batch 1",
                      {"method": {"kind": "qlora", "r": 16, "targets": "all-linear"}, "precision": "bf16",
                       "checkpointing": {"mode": "full"}, "loss": "chunked",
                       "optimizer": {**opt, "name": "paged-adamw-8bit", "in_backward": False},
                       "workload": {**w.model_dump(), "micro_batch": 1, "grad_accum": w.grad_accum * w.micro_batch}}))
    else:
        w = sc.workload
        if w.batch > 1:
            cands.append((f"batch {w.batch // 2}", {"workload": {**w.model_dump(), "batch": w.batch // 2}}))
        if sc.inference.kv_dtype in ("auto", "bf16", "fp16", "fp32"):
            cands.append(("fp8 KV cache", {"inference": {**sc.inference.model_dump(), "kv_dtype": "fp8"}}))
        if sc.inference.weights == "none":
            cands.append(("int8 weights", {"inference": {**sc.inference.model_dump(), "weights": "int8"}}))
            cands.append(("4-bit AWQ weights", {"inference": {**sc.inference.model_dump(), "weights": "awq"}}))
        if sc.parallel.n_gpus == 1:
            cands += [(f"tensor parallel over {k} GPUs", {"parallel": {**sc.parallel.model_dump(), "tp": k}})
                      for k in (2, 4, 8)]
    tried: list[tuple[int, Suggestion]] = []
    seen: set[str] = set()
    for rank, (text, upd) in enumerate(cands):
        try:
            s2 = _with(sc, **upd)
            key = s2.model_dump_json()
            if key in seen:  # the same setup reached by two routes: its first (least disruptive) wording
                continue
            seen.add(key)
            ok, peak = _fits(s2, cost_table_for(s2), dev)
        except ValueError:  # a split the model or the system does not allow
            continue
        tried.append((rank, Suggestion(change=text, peak_memory_bytes=peak, fits=ok)))
    tried.sort(key=lambda x: (not x[1].fits, x[0] if x[1].fits else x[1].peak_memory_bytes))
    return [s for _, s in tried[:SUGGESTIONS_SHOWN]]


# ---------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------


def _coerce(sc: Scenario | dict | str) -> Scenario:
    if isinstance(sc, Scenario):
        return sc
    if isinstance(sc, dict):
        return Scenario.model_validate(sc)
    if isinstance(sc, str):
        return Scenario.from_yaml(sc)
    raise TypeError(f"estimate() takes a Scenario, a dict or YAML text, not {type(sc).__name__}")


def estimate(scenario: Scenario | dict | str, *, what_fits: bool = True, timing: bool = True) -> Estimate:
    """Estimate one setup: per-rank memory over one step, FLOPs, and (``timing``) step time, throughput
    and cost.  ``what_fits`` adds the largest batch/length and, if it does not fit, the changes that
    would make it fit (a few more estimates)."""
    sc = _coerce(scenario)
    return _estimate(sc, what_fits, timing)


def _estimate(sc: Scenario, what_fits: bool, with_time: bool = True) -> Estimate:
    dev = get_device(sc.gpu)
    ct = cost_table_for(sc)
    p = _peak(sc, ct, dev)
    flops, tokens = _flops(sc, ct)
    fits = p["needed"] <= p["limit"]
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    mezo = sc.is_training and sc.optimizer.forward_only  # its forwards run in inference mode: nothing saved
    acts_by_layer = {} if mezo else rank_activations_by_layer(ct, sc.parallel, B, p["stage"])
    warnings: list[str] = []
    notes: list[str] = []
    if sc.precision in ("bf16", "bf16-amp") and not dev.supports_bf16:
        warnings.append(f"{dev.name} has no native bf16; use fp16 or fp32")
    if sc.precision == "fp8" and not dev.supports_fp8:
        warnings.append(f"{dev.name} has no fp8 tensor cores")
    if sc.is_training and sc.model.arch == "encoder":
        notes.append(f"{sc.model.name} is estimated with its masked-LM head: b x s x {sc.model.vocab:,} logits and "
                     "their loss; a sequence-classification head (pooler + num_labels classifier) has no such logits")
    if sc.model.family == "deberta_v2" and sc.attention != "eager":
        notes.append(f"attention {sc.attention!r}: transformers runs DeBERTa-v2's disentangled attention eagerly "
                     "(no SDPA or flash path); that is what is modelled")
    attention_warning = compute.attention_support_warning(sc.attention, dev)
    if attention_warning:
        (notes if sc.attention == "sdpa-flash" else warnings).append(attention_warning)
    if sc.is_training and ct.n_trainable == 0:
        warnings.append(f"method {sc.method.kind!r} trains no parameter of {sc.model.name!r} (e.g. BitFit on a model without biases)")
    if sc.is_training and sc.workload.seq_len > sc.model.max_position_embeddings:
        warnings.append(f"seq_len {sc.workload.seq_len} exceeds the model's trained context {sc.model.max_position_embeddings}")
    system = _system(sc)
    host_need, host_ram = sh.node_host_bytes(p["host_bytes"], sc.parallel.n_gpus, system.gpus_per_node), \
        sh.host_ram_bytes(system)
    if host_ram is not None and host_need > host_ram:
        warnings.append(f"host RAM: the node's ranks offload {host_need / 2**30:.1f} GiB > "
                        f"{host_ram / 2**30:.1f} GiB of host RAM on {system.name}")
    if sc.is_training and sc.parallel.offload_optimizer != "none" and system.host.cpu_adam_params_per_s is None:
        notes.append(f"optimizer step on the host: {system.name} states no CPU-Adam throughput, so the step time "
                     "counts the PCIe traffic but not the CPU update")
    if mem.optimizer_is_paged(sc.optimizer.name) and sc.is_training:
        notes.append("paged optimizer states live in CUDA managed memory: counted in the device total, not in max_memory_allocated")
        if p["paged_spilled"] > 0:
            notes.append(f"{fmt_bytes(p['paged_spilled'])} of the paged optimizer states do not fit beside the rest: the "
                         "driver keeps them in host memory and migrates them over the host link at every step "
                         "(in the time as offload)")
    max_batch = max_len = None
    suggestions: list[Suggestion] = []
    if what_fits:
        field_b = "micro_batch" if sc.is_training else "batch"
        field_s = "seq_len" if sc.is_training else "prompt_len"
        cur_b = getattr(sc.workload, field_b)
        cur_s = getattr(sc.workload, field_s)
        cap_b = max(cur_b * 64, 64)
        # a serving engine queues what it cannot run: its batch limit is what it runs at once (below)
        max_batch = None if engine_pool(sc) else _largest(sc, ct, dev, field_b, 1, cap_b)
        lo_s = (ct.plan.prefix_tokens or ct.plan.prompt_tokens) + 1
        # learned position tables cannot go past their length; RoPE models are searched to 4x their context
        cap_s = (sc.model.max_position_embeddings - ct.plan.prompt_tokens if sc.model.position == "learned"
                 else max(cur_s, sc.model.max_position_embeddings * 4))
        if not sc.is_training:
            cap_s = max(1, cap_s - sc.workload.gen_len) if sc.model.position == "learned" else cap_s
        max_len = _largest(sc, ct, dev, field_s, min(lo_s, cap_s), cap_s)
        if max_batch == cap_b:
            notes.append(f"largest {field_b} searched up to {cap_b}: it fits there, the real limit is higher")
        if max_len == cap_s:
            notes.append(f"largest {field_s} searched up to {cap_s} (the search limit for this model)")
        if not fits:
            suggestions = _suggestions(sc, dev)
    time = cost_ = None
    pool = engine_pool_of(sc, p)
    if pool is not None:
        w = sc.workload
        if what_fits and fits:
            max_batch = min(sc.inference.max_num_seqs, pool.sequences_held)
        notes.append(f"{sc.inference.engine}: the KV pool ({fmt_bytes(pool.pool_bytes)}) holds {pool.pool_tokens:,} "
                     f"tokens; {pool.concurrency} of the {w.batch} sequences of {w.prompt_len + w.gen_len} tokens run at "
                     f"once (max_num_seqs {sc.inference.max_num_seqs})"
                     + (f", the batch in {pool.waves} waves" if pool.waves > 1 else "")
                     + "; decode steps replay CUDA graphs")
    if with_time:
        time, cost_ = _time_and_cost(sc, ct, dev, flops, tokens, pool.concurrency if pool else None,
                                     p["paged_spilled"])
    unc = uncertainty(p["needed"], dev.cuda_context_bytes, p["limit"], time.step_s if time else None,
                      sc.parallel.n_gpus, sc.workload.task, sc.method.kind)
    return Estimate(
        n_gpus=sc.parallel.n_gpus, system=system.name, peak_stage=p["stage"],
        stage_peak_bytes=p["stage_totals"], host_memory_bytes=p["host_bytes"], nvme_bytes=p["nvme_bytes"],
        paged_host_bytes=p["paged_spilled"], evictable_paged_bytes=p["evictable"],
        model_state_bytes=p["model_states"],
        time=time, cost=cost_,
        model=sc.model.name, gpu=dev.name, task=sc.workload.task, method=sc.method.kind, fits=fits,
        peak_memory_bytes=p["total"], peak_allocated_bytes=p["allocated"], peak_reserved_bytes=p["reserved"],
        peak_phase=p["phase"], phase_allocated_bytes=p["phases"], memory_bytes=p["breakdown"],
        device_memory_bytes=dev.memory_total_bytes, headroom_bytes=p["limit"] - p["needed"],
        n_params=ct.n_params, n_trainable_params=ct.n_trainable, flops=flops, flops_per_step=flops.per_step,
        tokens_per_step=tokens, activations_by_layer=acts_by_layer, max_batch_that_fits=max_batch,
        max_seq_len_that_fits=max_len, suggestions=suggestions, warnings=warnings, notes=notes, uncertainty=unc,
        engine_pool=pool,
    )


def count_params(arch) -> int:
    """Total parameters of an architecture (tied weights once)."""
    return cost_table_for(Scenario(model=arch)).n_params
