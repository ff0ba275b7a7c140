"""estimate(scenario) -> Estimate: memory over one step, FLOPs, fit and what would fit."""

from __future__ import annotations

from typing import Any


from hwprofiles import Device, get_device

from . import memory as mem
from .config import Scenario
from .config.training import InferWorkload, TrainWorkload
from .graph.compile import CostTable, compile_trace
from .graph.build import trace_model
from .graph.ir import basis
from .graph.transforms import plan_of
from .results import Estimate, FlopBreakdown, MemoryBreakdown, Suggestion
from .units import dtype_bytes


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
        ct = _TABLES[key] = compile_trace(trace_model(sc.model, plan_of(sc), sc.loss))
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


def kv_dtype(sc: Scenario, ct: CostTable) -> str:
    kv = sc.inference.kv_dtype
    return ct.plan.precision.compute_dtype if kv == "auto" else kv


def _train_memory(sc: Scenario, ct: CostTable, dev: Device
                  ) -> tuple[dict[str, float], dict[str, MemoryBreakdown], float, dict[str, float]]:
    w: TrainWorkload = sc.workload  # type: ignore[assignment]
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    opt = sc.optimizer
    weights = ct.frozen_dense_bytes + ct.quant_data_bytes
    scales = ct.quant_scale_bytes
    trainable = ct.trainable_bytes
    grads = trainable  # .grad in the parameter dtype
    states = mem.optimizer_state_bytes(ct.trainable_groups, opt.name, opt.beta1)
    states += mem.step_counter_bytes(ct.n_trainable_tensors, opt.name, opt.impl)
    paged = mem.optimizer_is_paged(opt.name)
    acts = ct.at(ct.saved, B)
    tokens = float(B[0])
    logits_n = ct.at(ct.logits_numel, B)
    loss_fwd, loss_bwd = mem.loss_transient_bytes(sc.loss, logits_n, ct.logits_dtype, ct.loss_dtype,
                                                  ct.loss_upcast_copy)
    blk_bwd = block_backward_transient_bytes(ct, tokens)
    recompute = ct.at(ct.max_layer_saved, B) if ct.plan.checkpointed else 0.0
    if ct.plan.offload_checkpoints:
        recompute += ct.at(ct.block_io, B)  # the block input copied back from host memory
    other = ct.at(ct.other_transient_bytes, B)
    deq = ct.max_dequant_bytes
    ws = dev.cublas_workspace_bytes * 2.0 + dev.cublaslt_workspace_bytes  # forward + autograd thread handles
    # torch.autocast's bf16 weight copies are in the saved activations: cached copies of trainable
    # leaves (autocast_mode.cpp caches only leaf tensors that require grad) and per-op copies of frozen
    # weights, each saved by its matmul when the input needs grad.
    g_acc = grads if w.grad_accum > 1 else 0.0
    st = 0.0 if paged else states
    base = weights + scales + trainable + st
    fwd_tr = max(loss_fwd, deq, other)
    bwd_tr = max(loss_bwd, blk_bwd + recompute + deq + other)
    # backward: early on the grads of the first (top) blocks exist; with accumulation all of them
    # the top-most trainable tensor's grad (e.g. lm_head) already exists when the loss grads are live
    bwd_grads = g_acc if g_acc else ct.largest_trainable_bytes
    if opt.in_backward:
        # each gradient is consumed by its parameter's step (one parameter's temporaries) as soon as it
        # is produced; the validator keeps grad_accum at 1
        grads = ct.largest_trainable_bytes
        opt_tr = mem.optimizer_temp_bytes(ct.trainable_groups, opt.name, "for-loop")
        bwd_tr += opt_tr
    else:
        opt_tr = mem.optimizer_temp_bytes(ct.trainable_groups, opt.name, opt.impl)
    phases = {
        "forward": base + g_acc + acts + fwd_tr + ws,
        "backward": base + bwd_grads + acts + bwd_tr + ws,
        "optimizer": base + grads + opt_tr + ws,
    }
    bd = {
        "forward": MemoryBreakdown(weights=weights, quant_scales=scales, trainable_weights=trainable, gradients=g_acc,
                                   optimizer_states=states, activations=acts, transients=fwd_tr, workspaces=ws),
        "backward": MemoryBreakdown(weights=weights, quant_scales=scales, trainable_weights=trainable,
                                    gradients=bwd_grads, optimizer_states=states, activations=acts, transients=bwd_tr,
                                    workspaces=ws),
        "optimizer": MemoryBreakdown(weights=weights, quant_scales=scales, trainable_weights=trainable, gradients=grads,
                                     optimizer_states=states, transients=opt_tr, workspaces=ws),
    }
    peak_transient = {"forward": fwd_tr, "backward": bwd_tr, "optimizer": opt_tr}
    return phases, bd, paged * states, peak_transient


def _infer_memory(sc: Scenario, ct: CostTable, dev: Device
                  ) -> tuple[dict[str, float], dict[str, MemoryBreakdown], float, dict[str, float]]:
    w: InferWorkload = sc.workload  # type: ignore[assignment]
    arch = ct.arch
    cd = dtype_bytes(ct.plan.precision.compute_dtype)
    weights = ct.frozen_dense_bytes + ct.quant_data_bytes + ct.trainable_bytes
    scales = ct.quant_scale_bytes
    ctx = w.prompt_len + w.gen_len
    window = dict(sliding_window=arch.sliding_window, full_layers=arch.full_attention_layers)
    kv = mem.kv_cache_bytes(arch.decoder_layers, arch.kv_heads, arch.d_head, ctx, w.batch, kv_dtype(sc, ct), **window)
    kv_prefill = mem.kv_cache_bytes(arch.decoder_layers, arch.kv_heads, arch.d_head, w.prompt_len, w.batch,
                                    kv_dtype(sc, ct), **window)
    if arch.arch == "encoder":  # one bidirectional forward: nothing is cached
        kv = kv_prefill = 0.0
    T = w.batch * w.prompt_len
    inter = arch.expert_intermediate * (arch.moe.top_k if arch.moe else 1)
    # prefill: one block's temporaries (gate, up, act*up) + residual/normed hidden states;
    # eager attention also materialises fp32 scores and their 16-bit copy per layer.
    prefill_tr = T * (3.0 * inter + 4.0 * arch.hidden) * cd
    if sc.attention in ("eager", "sdpa-math"):
        prefill_tr = max(prefill_tr, w.batch * arch.n_heads * w.prompt_len**2 * (4.0 + cd))
    # generate() computes logits for the last position only, upcast to fp32
    logits = w.batch * arch.vocab * (cd + 4.0)
    deq = ct.max_dequant_bytes
    prefill_tr = prefill_tr + max(logits, deq)
    decode_tr = w.batch * (3.0 * inter + 4.0 * arch.hidden) * cd + logits + deq
    ws = dev.cublas_workspace_bytes + dev.cublaslt_workspace_bytes
    phases = {
        "prefill": weights + scales + kv_prefill + prefill_tr + ws,
        "decode": weights + scales + kv + decode_tr + ws,
    }
    bd = {
        "prefill": MemoryBreakdown(weights=weights, quant_scales=scales, kv_cache=kv_prefill, transients=prefill_tr, workspaces=ws),
        "decode": MemoryBreakdown(weights=weights, quant_scales=scales, kv_cache=kv, transients=decode_tr, workspaces=ws),
    }
    return phases, bd, 0.0, {"prefill": prefill_tr, "decode": decode_tr}


def _flops(sc: Scenario, ct: CostTable) -> tuple[FlopBreakdown, int]:
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    w = sc.workload
    if isinstance(w, TrainWorkload):
        f, bw, rc = ct.at(ct.fwd_flops, B), ct.at(ct.bwd_flops, B), ct.at(ct.recompute_flops, B)
        tokens = w.micro_batch * w.seq_len * w.grad_accum
        per_step = (f + bw + rc) * w.grad_accum
        return FlopBreakdown(forward=f * w.grad_accum, backward=bw * w.grad_accum, recompute=rc * w.grad_accum,
                             per_step=per_step, per_token=per_step / tokens), tokens
    # inference: prefill over the prompt + one forward per generated token over a growing context
    f_prefill = ct.at(ct.fwd_flops, B)
    c = ct.fwd_flops.c  # over (T, K, A, B, S, Q, 1): per new token, T and K terms are per token, A per context position
    lin_per_tok = c[0] + c[1]
    att_coef = c[2]
    ctx_sum = w.gen_len * w.prompt_len + w.gen_len * (w.gen_len - 1) / 2  # sum of contexts over decode steps
    f_decode = w.batch * (lin_per_tok * w.gen_len + att_coef * ctx_sum)
    tokens = w.batch * (w.prompt_len + w.gen_len)
    total = f_prefill + f_decode
    return FlopBreakdown(forward=total, backward=0.0, recompute=0.0, per_step=total,
                         per_token=total / max(1, tokens)), tokens


def _peak(sc: Scenario, ct: CostTable, dev: Device) -> dict[str, Any]:
    phases, bd, paged, transient = (_train_memory if sc.is_training else _infer_memory)(sc, ct, dev)
    phase = max(phases, key=lambda k: phases[k])
    allocated = phases[phase]
    over = mem.reserved_overhead_bytes(transient[phase], allocated, sc.expandable_segments)
    reserved = allocated + over
    total = reserved + paged + dev.cuda_context_bytes
    b = bd[phase].model_copy(update={"allocator_overhead": over, "cuda_context": dev.cuda_context_bytes,
                                     "optimizer_states": bd[phase].optimizer_states})
    return dict(phases=phases, phase=phase, allocated=allocated, reserved=reserved, total=total, breakdown=b)


def _fits(sc: Scenario, ct: CostTable, dev: Device) -> tuple[bool, float]:
    p = _peak(sc, ct, dev)
    return p["total"] <= dev.memory_total_bytes, p["total"]


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
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _suggestions(sc: Scenario, dev: Device) -> list[Suggestion]:
    """Try the usual fixes one at a time and keep those that help most."""
    cands: list[tuple[str, dict[str, Any]]] = []
    if sc.is_training:
        w = sc.workload
        if sc.checkpointing.mode != "full":
            cands.append(("activation checkpointing on every block", {"checkpointing": {"mode": "full"}}))
        if w.micro_batch > 1:
            half = max(1, w.micro_batch // 2)
            cands.append((f"micro-batch {half} with grad accumulation x{w.grad_accum * (w.micro_batch // half)}",
                          {"workload": {**w.model_dump(), "micro_batch": half, "grad_accum": w.grad_accum * (w.micro_batch // half)}}))
        if sc.optimizer.name in ("adamw", "adam"):
            cands.append(("8-bit AdamW (bitsandbytes)", {"optimizer": {**sc.optimizer.model_dump(), "name": "adamw-8bit"}}))
        if sc.loss == "upcast":
            cands.append(("fused/chunked cross-entropy (no b*s*V fp32 logits)", {"loss": "fused"}))
        if sc.method.kind == "full":
            cands.append(("LoRA r=16 on all linear layers", {"method": {"kind": "lora", "r": 16, "targets": "all-linear"}}))
        if sc.method.kind in ("full", "lora"):
            cands.append(("QLoRA (NF4 base) r=16 on all linear layers",
                          {"method": {"kind": "qlora", "r": 16, "targets": "all-linear"}, "precision": "bf16"}))
        # the usual low-memory recipe, all at once
        cands.append(("QLoRA r=16 all-linear + checkpointing + paged 8-bit AdamW + chunked loss, micro-batch 1",
                      {"method": {"kind": "qlora", "r": 16, "targets": "all-linear"}, "precision": "bf16",
                       "checkpointing": {"mode": "full"}, "loss": "chunked",
                       "optimizer": {**sc.optimizer.model_dump(), "name": "paged-adamw-8bit", "in_backward": False},
                       "workload": {**w.model_dump(), "micro_batch": 1, "grad_accum": w.grad_accum * w.micro_batch}}))
    else:
        w = sc.workload
        if sc.inference.weights == "none":
            cands.append(("int8 weights", {"inference": {**sc.inference.model_dump(), "weights": "int8"}}))
            cands.append(("4-bit AWQ weights", {"inference": {**sc.inference.model_dump(), "weights": "awq"}}))
        if sc.inference.kv_dtype in ("auto", "bf16", "fp16", "fp32"):
            cands.append(("fp8 KV cache", {"inference": {**sc.inference.model_dump(), "kv_dtype": "fp8"}}))
        if w.batch > 1:
            cands.append((f"batch {w.batch // 2}", {"workload": {**w.model_dump(), "batch": w.batch // 2}}))
    out: list[Suggestion] = []
    for text, upd in cands:
        try:
            s2 = _with(sc, **upd)
        except ValueError:
            continue
        ok, peak = _fits(s2, cost_table_for(s2), dev)
        out.append(Suggestion(change=text, peak_memory_bytes=peak, fits=ok))
    out.sort(key=lambda x: (not x.fits, x.peak_memory_bytes))
    return out[:3]


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


def estimate(scenario: Scenario | dict | str, *, what_fits: bool = True) -> Estimate:
    """Estimate one setup on one device.  ``what_fits`` adds the largest batch/length and, if it
    does not fit, the changes that would make it fit (a few more estimates)."""
    sc = _coerce(scenario)
    return _estimate(sc, what_fits)


def _estimate(sc: Scenario, what_fits: bool) -> Estimate:
    dev = get_device(sc.gpu)
    ct = cost_table_for(sc)
    p = _peak(sc, ct, dev)
    flops, tokens = _flops(sc, ct)
    fits = p["total"] <= dev.memory_total_bytes
    b, s, skv = _dims(sc, ct)
    B = basis(b, s, skv)
    acts_by_layer = {k: ct.at(v, B) for k, v in ct.saved_by_layer.items()}
    warnings: list[str] = []
    notes: list[str] = []
    if sc.precision in ("bf16", "bf16-amp") and not dev.supports_bf16:
        warnings.append(f"{dev.name} has no native bf16; use fp16 or fp32")
    if sc.precision == "fp8" and not dev.supports_fp8:
        warnings.append(f"{dev.name} has no fp8 tensor cores")
    if sc.is_training and ct.n_trainable == 0:
        warnings.append(f"method {sc.method.kind!r} trains no parameter of {sc.model.name!r} (e.g. BitFit on a model without biases)")
    if sc.is_training and sc.workload.seq_len > sc.model.max_position_embeddings:
        warnings.append(f"seq_len {sc.workload.seq_len} exceeds the model's trained context {sc.model.max_position_embeddings}")
    if mem.optimizer_is_paged(sc.optimizer.name) and sc.is_training:
        notes.append("paged optimizer states live in CUDA managed memory: counted in the device total, not in max_memory_allocated")
    max_batch = max_len = None
    suggestions: list[Suggestion] = []
    if what_fits:
        field_b = "micro_batch" if sc.is_training else "batch"
        field_s = "seq_len" if sc.is_training else "prompt_len"
        cur_b = getattr(sc.workload, field_b)
        cur_s = getattr(sc.workload, field_s)
        cap_b = max(cur_b * 64, 64)
        max_batch = _largest(sc, ct, dev, field_b, 1, cap_b)
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
    return Estimate(
        model=sc.model.name, gpu=dev.name, task=sc.workload.task, method=sc.method.kind, fits=fits,
        peak_memory_bytes=p["total"], peak_allocated_bytes=p["allocated"], peak_reserved_bytes=p["reserved"],
        peak_phase=p["phase"], phase_allocated_bytes=p["phases"], memory_bytes=p["breakdown"],
        device_memory_bytes=dev.memory_total_bytes, headroom_bytes=dev.memory_total_bytes - p["total"],
        n_params=ct.n_params, n_trainable_params=ct.n_trainable, flops=flops, flops_per_step=flops.per_step,
        tokens_per_step=tokens, activations_by_layer=acts_by_layer, max_batch_that_fits=max_batch,
        max_seq_len_that_fits=max_len, suggestions=suggestions, warnings=warnings, notes=notes,
    )


def count_params(arch) -> int:
    """Total parameters of an architecture (tied weights once)."""
    return cost_table_for(Scenario(model=arch)).n_params
