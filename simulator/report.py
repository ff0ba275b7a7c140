"""Plain-text rendering of an :class:`~simulator.results.Estimate` (no third-party dependencies).

Every function here is pure: it takes results (and, optionally, the scenario they came from) and
returns text.  ``render`` is what ``fitsim estimate`` prints; the section functions can be used on
their own (for a notebook cell or a log line).
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import Scenario
from .config.training import TORCH_OPTIMIZERS, TrainWorkload
from .results import CATEGORIES, Estimate
from .units import fmt_bytes, fmt_count, fmt_flops

CATEGORY_LABELS: dict[str, str] = {
    "weights": "frozen weights",
    "quant_scales": "quantization scales",
    "trainable_weights": "trainable weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "saved activations",
    "transients": "temporaries",
    "kv_cache": "KV cache",
    "allocator_overhead": "allocator cache (reserved - allocated)",
    "cuda_context": "CUDA context",
    "workspaces": "cuBLAS workspaces + comm buckets",
}
"""Readable names of the :data:`~simulator.results.CATEGORIES` (PyTorch MemTracker vocabulary)."""

TOP_ACTIVATION_CONSUMERS = 5
"""How many modules the activation section lists."""


# ------------------------------------------------------------------------------------------- helpers


def table(rows: Sequence[Sequence[str]], align: str, indent: int = 2, gap: int = 2) -> list[str]:
    """Aligned columns: ``align`` holds one 'l' or 'r' per column.  Returns the lines (no trailing spaces)."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(align))]
    out = []
    for r in rows:
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        out.append((" " * indent + (" " * gap).join(cells)).rstrip())
    return out


def pct(part: float, whole: float) -> str:
    """'12.3%' (or '-' when the whole is zero)."""
    if not whole:
        return "-"
    x = 100.0 * part / whole
    return "<0.1%" if 0 < abs(x) < 0.05 else f"{x:.1f}%"


def _share(part: float, whole: float) -> str:
    """Like :func:`pct` but keeps two significant digits below 1% (trainable share of LoRA: '0.042%')."""
    if not whole:
        return "-"
    x = 100.0 * part / whole
    return f"{x:.2g}%" if 0 < x < 1 else f"{x:.1f}%"


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", title, *lines] if lines else []


# ------------------------------------------------------------------------------------------ sections


def workload_line(scenario: Scenario) -> str:
    """One line describing what one step does."""
    w = scenario.workload
    if isinstance(w, TrainWorkload):
        tokens = w.micro_batch * w.seq_len * w.grad_accum
        return (f"train: micro-batch {w.micro_batch} x seq_len {w.seq_len} x grad-accum {w.grad_accum}"
                f" = {fmt_count(tokens)} tokens per optimizer step")
    return f"infer: batch {w.batch} x (prompt {w.prompt_len} + generate {w.gen_len} tokens)"


def optimizer_text(opt) -> str:
    """The optimizer with what changes its memory: the torch implementation, GaLore's projection, a step in backward."""
    if opt.galore is not None:
        g = opt.galore
        text = f"{opt.name} (rank {g.rank}, {g.proj_type}, on {'/'.join(g.targets)})"
    elif opt.name in TORCH_OPTIMIZERS:
        text = f"{opt.name} ({opt.impl})"
    else:  # bitsandbytes, transformers' Adafactor, MeZO: torch's foreach / fused switch does not apply
        text = opt.name
    return text + (", stepped in backward" if opt.in_backward else "")


def runtime_line(scenario: Scenario) -> str:
    """One line with the numerics and runtime knobs."""
    parts = [f"precision {scenario.precision}", f"attention {scenario.attention}"]
    if scenario.is_training:
        c = scenario.checkpointing
        ckpt = f"every {c.every_k} blocks" if c.mode == "every_k" else c.mode
        parts += [f"optimizer {optimizer_text(scenario.optimizer)}", f"checkpointing {ckpt}", f"loss {scenario.loss}"]
    else:
        inf = scenario.inference
        parts += [f"weights {'unquantized' if inf.weights == 'none' else inf.weights}", f"KV cache {inf.kv_dtype}"]
    if scenario.compile:
        parts.append("torch.compile")
    if scenario.expandable_segments:
        parts.append("expandable segments")
    return ", ".join(parts)


def _fmt_value(v: object) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def method_text(e: Estimate, scenario: Scenario | None = None) -> str:
    """'qlora (quant=nf4, r=8, alpha=16, targets=q_proj,v_proj)'; inference says so."""
    if e.task == "infer":
        return "none (inference)"
    if scenario is None:
        return e.method
    m = scenario.method
    keys = ("quant", "r", "alpha", "targets", "n_virtual_tokens", "bottleneck", "n_trainable_layers",
            "prompt_length", "start_layer", "v2")
    fields = [f"{k}={_fmt_value(getattr(m, k)) if getattr(m, k) is not None else 'PEFT default'}"
              for k in keys if k in type(m).__pydantic_fields__]
    if getattr(m, "fp32_unquantized", "none") != "none":
        fields.append(f"fp32_unquantized={m.fp32_unquantized}")
    kind = "qdora" if getattr(m, "use_dora", False) else m.kind
    return kind + (f" ({', '.join(fields)})" if fields else "")


def header(e: Estimate, scenario: Scenario | None = None) -> list[str]:
    """Model, parameters (total / trainable), method, GPU and its memory, and the workload."""
    rows = [
        ["model", f"{e.model}: {fmt_count(e.n_params)} parameters, {fmt_count(e.n_trainable_params)} trainable "
                  f"({_share(e.n_trainable_params, e.n_params)})"],
        ["method", method_text(e, scenario)],
        ["gpu", f"{e.gpu}: {fmt_bytes(e.device_memory_bytes)} device memory"],
    ]
    if scenario is not None:
        rows += [["step", workload_line(scenario)], ["runtime", runtime_line(scenario)],
                 ["parallel", parallel_line(scenario) + (f" on {e.system}" if e.system else "")]]
    return [f"fitsim estimate: {e.model} on {e.gpu}", *table(rows, "ll")]


def verdict(e: Estimate) -> str:
    """'FITS with 12.30 GiB headroom' or 'DOES NOT FIT: short by 4.10 GiB'; under a serving engine, of its share."""
    pool = e.engine_pool
    if pool is not None:
        share = f"the engine's {fmt_bytes(pool.share_bytes)} ({pct(pool.share_bytes, e.device_memory_bytes)} of the device)"
        if e.fits:
            return (f"FITS in {share}: its KV pool holds {pool.pool_tokens:,} tokens, {pool.concurrency} sequences "
                    f"at once" + (f" ({pool.waves} waves)" if pool.waves > 1 else ""))
        return f"DOES NOT FIT in {share}: short by {fmt_bytes(-e.headroom_bytes)} for one sequence"
    if e.fits:
        return f"FITS with {fmt_bytes(e.headroom_bytes)} headroom"
    return f"DOES NOT FIT: short by {fmt_bytes(-e.headroom_bytes)}"


def peak(e: Estimate) -> list[str]:
    """Device peak (reserved + CUDA context), the allocated and reserved peaks, and the phase."""
    dev = e.device_memory_bytes
    rows = [
        ["device total", fmt_bytes(e.peak_memory_bytes), pct(e.peak_memory_bytes, dev),
         "reserved + CUDA context (what nvidia-smi shows)"],
        ["reserved", fmt_bytes(e.peak_reserved_bytes), pct(e.peak_reserved_bytes, dev), "torch.cuda.max_memory_reserved"],
        ["allocated", fmt_bytes(e.peak_allocated_bytes), pct(e.peak_allocated_bytes, dev), "torch.cuda.max_memory_allocated"],
    ]
    band = memory_band_line(e)
    if e.engine_pool is not None and band:  # the band is of what the engine needs to start; it shows the share
        band = band.replace(f"  {e.uncertainty.interval}", "  to start: ", 1)
    return [f"Peak memory {fmt_bytes(e.peak_memory_bytes)} ({pct(e.peak_memory_bytes, dev)} of {fmt_bytes(dev)}), "
            f"during {e.peak_phase}", *([band] if band else []),
            *table(rows, "lrrl")]


def _ratio(x: float) -> str:
    """1.10 -> 'reads 10% low', 0.95 -> 'reads 5% high' (the median measured / predicted of a cell)."""
    d = round(100 * (x - 1.0))
    return "unbiased" if d == 0 else f"reads {abs(d)}% {'low' if d > 0 else 'high'}"


def memory_band_line(e: Estimate) -> str | None:
    """'  p10-p90 38.9-44.0 GiB from 49 published measurements (memory/single/train/lora, reads 10% low);
    P(OOM) 3%' -- None without bands."""
    u = e.uncertainty
    if u is None:
        return None
    return (f"  {u.interval} {fmt_bytes(u.peak_memory_lo_bytes)} - {fmt_bytes(u.peak_memory_hi_bytes)} "
            f"from {u.memory_n} {u.basis} ({u.memory_cell}, {_ratio(u.memory_bias_ratio)}); "
            f"P(OOM) {fmt_probability(u.p_oom)}")


def time_band_line(e: Estimate) -> str | None:
    """'  step p10-p90 1.20 s - 1.90 s from 38 published measurements (time/single/train/lora, ...)'."""
    u = e.uncertainty
    if u is None or u.step_time_lo_s is None or u.step_time_hi_s is None:
        return None
    return (f"  step {u.interval} {fmt_seconds(u.step_time_lo_s)} - {fmt_seconds(u.step_time_hi_s)} from {u.time_n} "
            f"{u.basis} ({u.time_cell}, {_ratio(u.time_bias_ratio or 1.0)})")


def fmt_probability(p: float) -> str:
    """'3%', '<1%', '>99%'."""
    if p < 0.005:
        return "<1%"
    if p > 0.995:
        return ">99%"
    return f"{100 * p:.0f}%"


def breakdown(e: Estimate) -> list[str]:
    """Bytes per category at the peak with % of the peak; zero rows skipped."""
    mb = e.memory_bytes
    total = e.peak_memory_bytes
    rows = [[CATEGORY_LABELS.get(c, c), fmt_bytes(getattr(mb, c)), pct(getattr(mb, c), total)]
            for c in CATEGORIES if getattr(mb, c)]
    rows.append(["total", fmt_bytes(mb.total), pct(mb.total, total)])
    return table(rows, "lrr")


def phases(e: Estimate) -> list[str]:
    """Allocated bytes at the peak of each phase of the step."""
    rows = [[ph, fmt_bytes(v), "<- peak" if ph == e.peak_phase else ""] for ph, v in e.phase_allocated_bytes.items()]
    return table(rows, "lrl")


def flops(e: Estimate) -> list[str]:
    """FLOPs per step (forward / backward / recompute) and per token."""
    f = e.flops
    if e.task == "infer":
        rows = [["per generation", fmt_flops(f.per_step), "prefill + every decode step, all sequences"]]
    else:
        rows = [["forward", fmt_flops(f.forward), pct(f.forward, f.per_step)],
                ["backward", fmt_flops(f.backward), pct(f.backward, f.per_step)]]
        if f.recompute:
            rows.append(["recompute", fmt_flops(f.recompute), pct(f.recompute, f.per_step)])
        rows.append(["per step", fmt_flops(f.per_step), ""])
    rows.append(["per token", fmt_flops(f.per_token), f"{fmt_count(e.tokens_per_step)} tokens"])
    if f.executed_per_step < f.per_step:
        rows.append(["executed", fmt_flops(f.executed_per_step),
                     "counted as above (causal attention in full, as FlopCounterMode and MFU count it); "
                     "fused kernels skip the masked half"])
    return table(rows, "lrl")


def what_fits(e: Estimate, scenario: Scenario | None = None) -> list[str]:
    """The largest batch and sequence length that fit (the other knobs held)."""
    if e.max_batch_that_fits is None and e.max_seq_len_that_fits is None and e.fits:
        return []  # not computed (estimate(..., what_fits=False))
    train = e.task == "train"
    b_name, s_name = ("micro-batch", "seq_len") if train else ("batch", "prompt_len")
    held_b = held_s = ""
    if scenario is not None:
        w = scenario.workload
        held_b = f" (at {s_name} {w.seq_len if train else w.prompt_len})"  # type: ignore[union-attr]
        held_s = f" (at {b_name} {w.micro_batch if train else w.batch})"  # type: ignore[union-attr]

    def val(v: int | None, held: str) -> str:
        return f"{v}{held}" if v is not None else f"none: not even the smallest{held}"

    seq = val(e.max_seq_len_that_fits, held_s)
    ctx = scenario.model.max_position_embeddings if scenario is not None else None
    if ctx is not None and e.max_seq_len_that_fits is not None and e.max_seq_len_that_fits > ctx:
        seq += f"; beyond the model's context of {ctx}"
    return table([[f"largest {b_name}", val(e.max_batch_that_fits, held_b)], [f"largest {s_name}", seq]], "ll")


def suggestions(e: Estimate) -> list[str]:
    """Each suggested change with its peak and whether it fits."""
    rows = [[s.change, fmt_bytes(s.peak_memory_bytes), "fits" if s.fits else "does not fit"] for s in e.suggestions]
    return table(rows, "lrl")


def top_activations(e: Estimate, n: int = TOP_ACTIVATION_CONSUMERS) -> list[str]:
    """The ``n`` modules that save the most activation bytes."""
    items = sorted(((k, v) for k, v in e.activations_by_layer.items() if v > 0), key=lambda kv: -kv[1])
    total = sum(v for _, v in items)
    rows = [[k, fmt_bytes(v), pct(v, total)] for k, v in items[:n]]
    if len(items) > n:
        rows.append([f"({len(items) - n} more)", fmt_bytes(sum(v for _, v in items[n:])), pct(sum(v for _, v in items[n:]), total)])
    return table(rows, "lrr")


def parallel_line(scenario: Scenario) -> str:
    """'8 GPUs: dp 2 x tp 4 (sp), ZeRO-3, offload optimizer to cpu' or '1 GPU'."""
    par = scenario.parallel
    if par.n_gpus == 1 and par.zero == 0 and par.fsdp == "none":
        return "1 GPU"
    dims = [f"{k} {getattr(par, k)}" for k in ("dp", "tp", "pp", "cp", "ep") if getattr(par, k) > 1] or ["dp 1"]
    extra = []
    if par.sp:
        extra.append("sequence parallel")
    if par.zero:
        extra.append(f"ZeRO-{int(par.zero)}")
    if par.fsdp != "none":
        extra.append(f"FSDP{par.fsdp_version} {par.fsdp}")
    if par.pp > 1:
        extra.append(f"{par.pp_schedule} schedule" + (f", {par.pp_virtual} chunks/rank" if par.pp_virtual > 1 else ""))
    for what in ("optimizer", "params"):
        where = getattr(par, f"offload_{what}")
        if where != "none":
            extra.append(f"{what} offloaded to {where}")
    return f"{par.n_gpus} GPUs: " + " x ".join(dims) + (f"; {', '.join(extra)}" if extra else "")


def ranks(e: Estimate) -> list[str]:
    """Peak per pipeline stage (when they differ) and host / NVMe use per rank."""
    rows = []
    if len(e.stage_peak_bytes) > 1:
        for st, v in sorted(e.stage_peak_bytes.items()):
            rows.append([f"stage {st}", fmt_bytes(v), "<- largest" if st == e.peak_stage else ""])
    if e.host_memory_bytes:
        what = "offloaded states / parameters"
        if e.paged_host_bytes:
            what = (f"of which {fmt_bytes(e.paged_host_bytes)} paged optimizer states the device has no room for"
                    if e.paged_host_bytes < e.host_memory_bytes else "paged optimizer states the device has no room for")
        rows.append(["host RAM per rank", fmt_bytes(e.host_memory_bytes), what])
    if e.nvme_bytes:
        rows.append(["NVMe per rank", fmt_bytes(e.nvme_bytes), "offloaded to NVMe"])
    return table(rows, "lrl") if rows else []


def fmt_seconds(t: float) -> str:
    if t >= 86400:
        return f"{t / 86400:.2f} d"
    if t >= 3600:
        return f"{t / 3600:.2f} h"
    if t >= 1:
        return f"{t:.3f} s"
    return f"{t * 1e3:.2f} ms"


TIME_LABELS = {
    "forward_s": "forward", "backward_s": "backward", "recompute_s": "recompute",
    "tp_comm_s": "tensor-parallel all-reduces", "cp_comm_exposed_s": "ring attention (exposed)",
    "ep_comm_s": "expert all-to-all", "pp_p2p_s": "pipeline send/recv", "pp_bubble_s": "pipeline bubble",
    "dp_comm_exposed_s": "data-parallel comm (exposed)", "optimizer_s": "optimizer step", "offload_s": "offload (exposed)",
    "prefill_s": "prefill",
}


def timing(e: Estimate) -> list[str]:
    """Step time and its parts, throughput, MFU."""
    t = e.time
    if t is None:
        return []
    labels = TIME_LABELS if not e.paged_host_bytes else {**TIME_LABELS, "offload_s": "offload (exposed; paged migration)"}
    rows = [[labels[k], fmt_seconds(getattr(t, k)), pct(getattr(t, k), t.step_s)]
            for k in labels if getattr(t, k)]
    if e.task == "infer":
        rows.append(["per output token (decode)", fmt_seconds(t.decode_per_token_s), ""])
    if t.dp_comm_s:
        rows.append(["data-parallel comm (total)", fmt_seconds(t.dp_comm_s), "overlapped with backward except the exposed part"])
    what = "one optimizer step" if e.task == "train" else "one batch: prefill + decode"
    rows.append([f"step ({what})", fmt_seconds(t.step_s), ""])
    rows.append(["throughput", f"{t.tokens_per_s:,.0f} tokens/s", f"{t.tokens_per_s_per_gpu:,.0f} per GPU"])
    rows.append(["MFU / HFU", f"{t.mfu * 100:.1f}% / {t.hfu * 100:.1f}%",
                 "of the dense peak of the matmul dtype (HFU: the FLOPs the kernels run)"])
    band = time_band_line(e)
    return table(rows, "lrl") + ([band] if band else [])


def cost(e: Estimate) -> list[str]:
    c = e.cost
    if c is None:
        return []
    rows = []
    if c.usd_per_million_tokens is not None:
        rows.append(["$ per million tokens", f"${c.usd_per_million_tokens:,.4g}", f"at ${c.usd_per_gpu_hour:.2f}/GPU-hour ({c.price_source})"])
    else:
        rows.append(["$ per million tokens", "-", "no price in the profiles for this GPU"])
    if c.kwh_per_million_tokens is None:
        rows.append(["kWh per million tokens", "unknown", c.power_source])
    else:
        rows.append(["kWh per million tokens", f"{c.kwh_per_million_tokens:,.4g}",
                     f"{c.watts_per_gpu:.0f} W per GPU ({c.power_source})"])
    if c.run_tokens:
        rows.append([f"run of {fmt_count(c.run_tokens)} tokens", fmt_seconds(c.run_time_s or 0.0),
                     (f"${c.run_usd:,.2f}" if c.run_usd is not None else "no price")
                     + (f", {c.run_kwh:,.1f} kWh" if c.run_kwh is not None else ", energy unknown")])
    return table(rows, "lrl")


def render(e: Estimate, scenario: Scenario | None = None) -> str:
    """The full plain-text report (``fitsim estimate``)."""
    lines = header(e, scenario)
    lines += ["", verdict(e), *peak(e)]
    lines += _section(f"Breakdown at the peak ({e.peak_phase})", breakdown(e))
    lines += _section("Allocated peak per phase", phases(e))
    lines += _section("Ranks", ranks(e))
    lines += _section("Time", timing(e))
    lines += _section("Cost and energy", cost(e))
    lines += _section("FLOPs", flops(e))
    lines += _section("What fits on this GPU", what_fits(e, scenario))
    if not e.fits:
        lines += _section("Suggestions", suggestions(e) or ["  (no single change tried makes a difference)"])
    lines += _section("Warnings", [f"  ! {w}" for w in e.warnings])
    lines += _section("Notes", [f"  - {n}" for n in e.notes])
    where = ""
    if e.n_gpus > 1:
        where = " (one micro-batch on one GPU" + (f" of pipeline stage {e.peak_stage}" if len(e.stage_peak_bytes) > 1
                                                 else "") + ")"
    lines += _section("Top activation consumers" + where, top_activations(e))
    return "\n".join(lines) + "\n"


def models_table(rows: Sequence[dict]) -> str:
    """``fitsim models``: one row per catalog model (dicts from ``simulator.cli.model_rows``)."""
    head = ["name", "family", "arch", "params", "layers", "hidden", "heads", "kv", "vocab", "context"]
    body = [[str(r["name"]), str(r["family"]), str(r["arch"]), fmt_count(r["params"]) if r.get("params") else "?",
             str(r["n_layers"]), str(r["hidden"]), str(r["n_heads"]), str(r["n_kv_heads"]), str(r["vocab"]),
             str(r["max_position_embeddings"])] for r in rows]
    return "\n".join(table([head, *body], "lllrrrrrrr", indent=0)) + f"\n{len(body)} models\n"


def systems_table(rows: Sequence[dict]) -> str:
    """``fitsim systems``: one row per node profile."""
    head = ["name", "device", "GPUs/node", "intra-node", "GB/s/GPU", "inter-node", "$/GPU-h"]
    body = [[r["name"], r["device"], str(r["gpus_per_node"]), r["intra_node"], f"{r['intra_node_GBps']:.0f}",
             f"{r['nics_per_node']}x {r['inter_node']}" if r["inter_node"] else "-",
             "-" if r["price_usd_per_gpu_hour"] is None else f"{r['price_usd_per_gpu_hour']:.2f}"] for r in rows]
    return "\n".join(table([head, *body], "llrlrlr", indent=0)) + f"\n{len(body)} systems\n"


def gpus_table(rows: Sequence[dict]) -> str:
    """``fitsim gpus``: one row per device profile (dicts from ``simulator.cli.gpu_rows``)."""
    head = ["name", "product", "memory", "bf16 TFLOPS", "GB/s", "$/h"]

    def num(v: float | None, f: str) -> str:
        return "-" if v is None else format(v, f)

    body = [[r["name"], r["display_name"], fmt_bytes(r["memory_total_bytes"]), num(r["bf16_tflops"], ".0f"),
             num(r["hbm_bandwidth_GBps"], ".0f"), num(r["price_usd_per_hour"], ".2f")] for r in rows]
    return ("\n".join(table([head, *body], "llrrrr", indent=0)) + f"\n{len(body)} devices (dense TFLOPS; "
            "'-' = no bf16 tensor path or no price collected)\n")
