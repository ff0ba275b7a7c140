"""Serving plans: for a request rate, the GPU type, GPUs per replica (tensor parallel), replicas, weight
format and concurrency that meet the TTFT / TPOT / latency targets, cheapest first.

How a search runs:

1. Families are (weight format, GPU, tensor-parallel degree).  Each is estimated at batch 1 (does one
   sequence fit beside the weights?); the most sequences whose KV cache fits is found from the memory
   slope between batch 1 and 2 and confirmed with memory-only estimates around that guess.
2. Every batch of the ladder (powers of two, the memory limit and, under a TPOT target, the largest
   batch whose decode step meets it; or the space's ``micro_batches`` when given) that fits gets one
   ``estimate()``: prefill of the batch, decode step, peak memory per GPU.
3. For each (family, batch), :func:`simulator.serving.replicas_needed` gives the fewest replicas meeting
   the utilization cap and the targets; the fleet's $/hour, $/million tokens and latencies follow.
4. Rows are ranked by the objective, the best batch of each family once (the Pareto front of p99
   latency against $/hour is over every row); families without a row get their binding reason with
   numbers.
   When nothing qualifies, each target is dropped in turn: the one whose removal admits a setup is
   named with the cheapest setup meeting all the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from . import serving as sv
from .units import last_true

GiB = float(2**30)
LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MAX_BATCH = 2048
"""Most concurrent sequences per replica searched (vLLM's default max_num_seqs is 256)."""
STAGES = ("invalid", "memory", "max_tpot_s", "max_ttft_s", "max_latency_s", "max_gpus", "budget_usd")


def check_serving_fields(job: Any, cons: Any) -> None:
    """TTFT and TPOT targets need a request rate (they describe a request stream, not one batch)."""
    for name in ("max_ttft_s", "max_tpot_s"):
        if getattr(cons, name) is not None and job.request_rate_per_s is None:
            raise ValueError(f"constraints.{name} needs job.request_rate_per_s (requests per second, task 'infer'); "
                             "without a rate the planner sizes one batch against max_latency_s")


@dataclass
class _Cand:
    """One (family, batch): the scenario and estimate() of one replica at that concurrency."""

    batch: int
    scenario: Any
    estimate: Any
    kv_decode_bytes: float
    """KV cache per GPU at the final context (the decode phase), whichever phase holds the peak."""


@dataclass
class _Family:
    weights: str
    gpu: str
    tp: int
    usable: float
    invalid: str | None = None
    memory: str | None = None
    prefill_one_s: float = 0.0
    max_batch: int = 0
    overflow_text: str = ""
    cands: list[_Cand] = field(default_factory=list)
    searched: int = 0

    @property
    def label(self) -> str:
        return f"weights {self.weights} on {self.tp}x {self.gpu}"


def _memory_text(e: Any, batch: int, usable: float) -> str:
    m = e.memory_bytes
    w = m.weights + m.quant_scales
    other = e.peak_memory_bytes - w - m.kv_cache
    seqs = "sequence" if batch == 1 else "sequences"
    digits = 2 if f"{e.peak_memory_bytes / GiB:.2f}" != f"{usable / GiB:.2f}" else 4
    return (f"KV cache for {batch} {seqs} {m.kv_cache / GiB:.2f} GiB + weights {w / GiB:.2f} GiB + runtime "
            f"{other / GiB:.2f} GiB = {e.peak_memory_bytes / GiB:.{digits}f} GiB > {usable / GiB:.{digits}f} GiB usable")


def _scenario(job: Any, gpu: str, tp: int, weights: str, precision: str, batch: int) -> Any:
    from .config import Scenario

    return Scenario.model_validate({
        "model": job.model, "gpu": gpu, "precision": precision, "parallel": {"tp": tp},
        # a continuous-batching server replays its decode steps from CUDA graphs (vLLM, TGI, SGLang)
        "inference": {"weights": weights, "cuda_graphs": True},
        "workload": {"task": "infer", "batch": batch, "prompt_len": job.prompt_len, "gen_len": job.gen_len}})


def _cand(sc: Any, e: Any) -> _Cand:
    from hwprofiles import get_device

    from .estimate import _infer_memory, cost_table_for

    bd = _infer_memory(sc, cost_table_for(sc), get_device(sc.gpu))[1]
    return _Cand(sc.workload.batch, sc, e, bd["decode"].kv_cache)


def _largest(ok: Any, guess: int, cap: int) -> int:
    """Largest b in [1, cap] with ok(b), for a property that holds at 1 and, once lost, stays lost as b
    grows (memory and decode time only grow with the batch): galloping from ``guess``, then bisection."""
    lo, hi = 1, cap + 1
    g = min(max(1, guess), cap)
    step = 1
    if ok(g):
        lo = g
        while lo < cap:
            t = min(cap, lo + step)
            if not ok(t):
                hi = t
                break
            lo, step = t, step * 2
    else:
        hi = g
        while lo + 1 < hi:
            t = max(lo + 1, hi - step)
            if ok(t):
                lo = t
                break
            hi, step = t, step * 2
    return last_true(ok, lo, hi)


def _families(ctx: Any) -> list[_Family]:
    from hwprofiles import get_device

    from .estimate import _estimate, _system_named
    from .planner import _first_error, _gpus

    job, sp, cons = ctx.job, ctx.space, ctx.cons
    cap = cons.max_gpus or max(sp.gpu_counts)
    given = "micro_batches" in sp.model_fields_set
    precision = sp.precisions[0]
    out = []
    for g in _gpus(ctx):
        dev = get_device(g)
        usable = (1.0 - cons.min_headroom_fraction) * dev.memory_total_bytes
        for tp in sp.tp:
            for wq in sp.infer_weights:
                fam = _Family(wq, g, tp, usable)
                out.append(fam)
                per_node = _system_named(None, g, tp).gpus_per_node
                if tp > per_node:
                    fam.invalid = f"tp={tp} spans nodes ({per_node} GPUs per node)"
                    continue
                if cons.n_gpus is not None and cons.n_gpus % tp:
                    fam.invalid = f"tp={tp} does not divide n_gpus={cons.n_gpus}"
                    continue
                if tp > (cons.n_gpus or cap):
                    fam.invalid = f"tp={tp} needs more GPUs than the {cons.n_gpus or cap} allowed"
                    continue
                cache: dict[int, Any] = {}
                scenarios: dict[int, Any] = {}

                def scenario(b: int, _k=(g, tp, wq)) -> Any:
                    sc = scenarios.get(b)
                    if sc is None:
                        sc = scenarios[b] = _scenario(job, _k[0], _k[1], _k[2], precision, b)
                    return sc

                def timed(b: int) -> Any:
                    e = cache.get(b)
                    if e is None or e.time is None:
                        e = cache[b] = _estimate(scenario(b), False)
                    return e

                def peak(b: int) -> Any:
                    e = cache.get(b)
                    if e is None:
                        e = cache[b] = _estimate(scenario(b), False, False)
                    return e

                try:
                    e1 = timed(1)
                except ValidationError as err:
                    fam.invalid = _first_error(err)
                    continue
                fam.prefill_one_s = e1.time.prefill_s
                if e1.peak_memory_bytes > usable:
                    fam.memory = _memory_text(e1, 1, usable)
                    fam.searched = len(sp.micro_batches) if given else 1
                    continue
                slope = peak(2).peak_memory_bytes - e1.peak_memory_bytes
                guess = sv.max_concurrency(usable, e1.peak_memory_bytes - slope, slope)
                hi = max(sp.micro_batches) if given else MAX_BATCH
                fam.max_batch = _largest(lambda b: peak(b).peak_memory_bytes <= usable, guess, hi)
                if fam.max_batch < hi:
                    fam.overflow_text = _memory_text(peak(fam.max_batch + 1), fam.max_batch + 1, usable)
                if given:
                    batches = [b for b in sp.micro_batches if b <= fam.max_batch]
                    fam.searched = len(sp.micro_batches)
                    if not batches:
                        b0 = min(sp.micro_batches)
                        fam.overflow_text = (f"{_memory_text(peak(b0), b0, usable)}; at {fam.max_batch} "
                                             f"sequence{'s' if fam.max_batch > 1 else ''} it fits")
                else:
                    batches = sorted({b for b in LADDER if b <= fam.max_batch} | {fam.max_batch})
                    t = cons.max_tpot_s
                    t1 = e1.time.decode_per_token_s
                    t_max = timed(fam.max_batch).time.decode_per_token_s
                    if t is not None and job.gen_len > 0 and t1 <= t < t_max:
                        # the decode step grows about linearly with the batch (KV reads): start there
                        guess = 1 + int((t - t1) / (t_max - t1) * (fam.max_batch - 1))
                        batches = sorted(set(batches) | {
                            _largest(lambda b: timed(b).time.decode_per_token_s <= t, guess, fam.max_batch)})
                    fam.searched = len(batches)
                fam.cands = [_cand(scenario(b), timed(b)) for b in batches]
    return out


@dataclass
class _Limits:
    max_ttft_s: float | None
    max_tpot_s: float | None
    max_latency_s: float | None
    max_gpus: int | None
    n_gpus: int | None
    budget_usd: float | None
    max_utilization: float

    def without(self, name: str) -> "_Limits":
        return _Limits(**{**self.__dict__, name: None})


@dataclass
class _Fail:
    stage: int
    field: str
    text: str
    order: float  # among failures of one stage, the smallest is reported


def _fleet(ctx: Any, fam: _Family, c: _Cand, lim: _Limits) -> tuple[Any, _Fail | None]:
    """The PlanRow of the cheapest fleet of this (family, batch), or why there is none."""
    from .planner import PlanRow

    job = ctx.job
    rate = job.request_rate_per_s
    e = c.estimate
    t = e.time
    fixed = lim.n_gpus // fam.tp if lim.n_gpus is not None else None
    max_rep = fixed if fixed is not None else (lim.max_gpus // fam.tp if lim.max_gpus is not None else None)
    limits = sv.ServingLimits(max_ttft_s=lim.max_ttft_s, max_tpot_s=lim.max_tpot_s, max_latency_s=lim.max_latency_s,
                              max_utilization=lim.max_utilization, max_replicas=max_rep)
    point, why, text = sv.replicas_needed(rate, c.batch, fam.prefill_one_s, t.prefill_s, t.decode_per_token_s,
                                          job.gen_len, limits)
    if point is None:
        order = c.batch if why in ("max_tpot_s", "max_ttft_s", "max_latency_s") else -c.batch
        return None, _Fail(STAGES.index(why), why, text, order)
    if fixed is not None and point.replicas != fixed:
        p = sv.serving_point(rate, fixed, c.batch, fam.prefill_one_s, t.prefill_s, t.decode_per_token_s, job.gen_len)
        point = sv.ServingPoint(rate_per_s=rate, replicas=fixed, batch=c.batch,
                                capacity_per_replica_per_s=point.capacity_per_replica_per_s,
                                utilization=float(p["utilization"][0]), tpot_s=t.decode_per_token_s,
                                tpot_mean_s=float(p["tpot_mean"][0]), queue_wait_mean_s=float(p["wait_mean"][0]),
                                queue_wait_tail_s=float(p["wait_tail"][0]), ttft_mean_s=float(p["ttft_mean"][0]),
                                ttft_tail_s=float(p["ttft_tail"][0]), latency_tail_s=float(p["latency"][0]))
    n = point.replicas * fam.tp
    price = e.cost.usd_per_gpu_hour
    out_tps = rate * (job.gen_len if job.gen_len > 0 else job.prompt_len)
    all_tps = rate * (job.prompt_len + job.gen_len)
    usd_h = sv.usd_per_hour(point.replicas, fam.tp, price) if price else None
    usd_m = sv.usd_per_million_tokens(usd_h, out_tps) if usd_h is not None else None
    if lim.budget_usd is not None and (usd_m is None or usd_m > lim.budget_usd):
        text = (f"${usd_m:,.4g} per million output tokens > budget ${lim.budget_usd:,.4g} ({n} GPUs at "
                f"${usd_h:,.2f}/hour)" if usd_m is not None else f"{fam.gpu} has no price to check budget_usd against")
        return None, _Fail(STAGES.index("budget_usd"), "budget_usd", text, usd_m if usd_m is not None else math.inf)
    metrics = sv.ServingMetrics(
        request_rate_per_s=rate, replicas=point.replicas, gpus_per_replica=fam.tp, weights=fam.weights,
        batch=c.batch, max_batch_fits=fam.max_batch, batch_limit="",
        kv_cache_bytes_per_sequence=sv.kv_cache_bytes_per_sequence(c.kv_decode_bytes, c.batch),
        prefill_one_s=fam.prefill_one_s, prefill_batch_s=t.prefill_s, tpot_s=t.decode_per_token_s,
        tpot_mean_s=point.tpot_mean_s, ttft_mean_s=point.ttft_mean_s, ttft_p99_s=point.ttft_tail_s,
        queue_wait_mean_s=point.queue_wait_mean_s, queue_wait_p99_s=point.queue_wait_tail_s,
        latency_p99_s=point.latency_tail_s, capacity_per_replica_per_s=point.capacity_per_replica_per_s,
        capacity_per_s=point.capacity_per_replica_per_s * point.replicas, utilization=point.utilization,
        usd_per_hour=usd_h, usd_per_million_output_tokens=usd_m,
        usd_per_million_tokens=sv.usd_per_million_tokens(usd_h, all_tps) if usd_h is not None else None,
        peak_memory_bytes_per_gpu=e.peak_memory_bytes, usable_memory_bytes_per_gpu=fam.usable)
    sc = c.scenario
    row = PlanRow(
        scenario=sc.model_dump(mode="json"), gpu=e.gpu, n_gpus=n, method=f"serve weights={fam.weights}",
        precision=sc.precision, optimizer="-", micro_batch=c.batch, grad_accum=1, checkpointing="-",
        parallel=f"{point.replicas} replica{'s' if point.replicas > 1 else ''} x tp{fam.tp}",
        peak_memory_bytes=e.peak_memory_bytes, usable_memory_bytes=fam.usable,
        headroom_bytes=e.device_memory_bytes - e.peak_memory_bytes, step_time_s=t.step_s, tokens_per_s=out_tps,
        usd_per_million_tokens=usd_m,
        kwh_per_million_tokens=sv.kwh_per_million_tokens(n, e.cost.watts_per_gpu, out_tps) if e.cost.watts_per_gpu else None,
        serving=metrics)
    return row, None


def _batch_limit(fam: _Family, i: int, outcomes: list[tuple[Any, _Fail | None]], given: bool) -> str:
    """Why the family's batch ``fam.cands[i]`` is not larger."""
    b = fam.cands[i].batch
    step_here = fam.cands[i].estimate.time.decode_per_token_s
    mean_here = outcomes[i][0].serving.tpot_mean_s
    for c, (row, fail) in zip(fam.cands[i + 1:], outcomes[i + 1:]):
        if fail is not None:
            if fail.text.startswith("TPOT"):
                return f"batch {c.batch}: {fail.text}; batch {b} gives {step_here * 1e3:.1f} ms"
            if fail.text.startswith("mean TPOT"):
                return f"batch {c.batch}: {fail.text}; batch {b} gives {mean_here * 1e3:.1f} ms"
            return f"batch {c.batch}: {fail.text}"
        return f"batch {c.batch} also meets every target, no better by the objective"
    if fam.overflow_text and b == fam.max_batch:
        return f"the most sequences whose KV cache fits: {fam.overflow_text}"
    if fam.overflow_text:
        return f"the largest batch searched that fits; {fam.max_batch + 1} sequences do not: {fam.overflow_text}"
    return f"the largest batch searched ({'the space' if given else f'search limit {MAX_BATCH}'})"


def _evaluate(ctx: Any, fams: list[_Family], lim: _Limits) -> tuple[list[Any], dict[str, tuple[_Fail, str]]]:
    """All qualifying rows and, per family without one, its binding failure."""
    given = "micro_batches" in ctx.space.model_fields_set
    rows, fails = [], {}
    for fam in fams:
        if fam.invalid is not None:
            fails[fam.label] = _Fail(0, "invalid", fam.invalid, 0.0)
            continue
        if fam.memory is not None:
            fails[fam.label] = _Fail(1, "memory", fam.memory, 0.0)
            continue
        outcomes = [_fleet(ctx, fam, c, lim) for c in fam.cands]
        got = False
        for i, (row, fail) in enumerate(outcomes):
            if row is not None:
                got = True
                rows.append(row.model_copy(update={"serving": row.serving.model_copy(
                    update={"batch_limit": _batch_limit(fam, i, outcomes, given)})}))
        if not got:
            failed = [(c.batch, f) for c, (_, f) in zip(fam.cands, outcomes)]
            worst = max((f for _, f in failed), key=lambda f: (f.stage, -f.order), default=None)
            if worst is None:  # the space's batches all overflow
                worst = _Fail(1, "memory", fam.overflow_text or "no batch of the space fits", 0.0)
            else:
                # what stops the batches above the reported one (e.g. a TPOT target above a GPU cap)
                at = next(b for b, f in failed if f is worst)
                above = next(((b, f) for b, f in failed if b > at and f.stage < worst.stage), None)
                if above is not None:
                    worst = _Fail(worst.stage, worst.field, f"{worst.text}; batch {above[0]}: {above[1].text}",
                                  worst.order)
            fails[fam.label] = worst
    return rows, fails


def _key(row: Any, objective: str) -> tuple:
    s = row.serving
    usd = s.usd_per_hour if s.usd_per_hour is not None else math.inf
    if objective == "cost":
        k = (usd, s.latency_p99_s, row.n_gpus)
    elif objective == "time":
        k = (s.latency_p99_s, usd, row.n_gpus)
    elif objective == "throughput":
        k = (-s.capacity_per_s, usd, row.n_gpus)
    else:
        k = (row.n_gpus, usd, s.latency_p99_s)
    return (*k, json.dumps(row.scenario, sort_keys=True))


def serving_pareto(rows: list[Any]) -> list[Any]:
    """Rows no other row beats on both p99 latency and $/hour (fastest first)."""
    out, best = [], math.inf
    for r in sorted(rows, key=lambda r: _key(r, "time")):
        usd = r.serving.usd_per_hour if r.serving.usd_per_hour is not None else math.inf
        if usd < best:
            out.append(r)
            best = usd
    return out


def describe(row: Any) -> str:
    """One line for a serving row: fleet, format, concurrency and what it delivers."""
    s = row.serving
    usd = f", ${s.usd_per_hour:,.2f}/hour" if s.usd_per_hour is not None else ""
    return (f"{s.replicas} replica{'s' if s.replicas > 1 else ''} x {s.gpus_per_replica}x {row.gpu} "
            f"({row.n_gpus} GPU{'s' if row.n_gpus > 1 else ''}), weights {s.weights}, batch {s.batch}: p99 TTFT {s.ttft_p99_s:.3g} s, "
            f"TPOT {s.tpot_mean_s * 1e3:.1f} ms, utilization {s.utilization:.0%}{usd}")


_FIELD_TEXT = {
    "max_tpot_s": lambda c: f"constraints.max_tpot_s={c.max_tpot_s * 1e3:g} ms",
    "max_ttft_s": lambda c: f"constraints.max_ttft_s={c.max_ttft_s:g} s",
    "max_latency_s": lambda c: f"constraints.max_latency_s={c.max_latency_s:g} s",
    "max_gpus": lambda c: f"constraints.max_gpus={c.max_gpus}" if c.max_gpus else "the largest GPU count searched",
    "n_gpus": lambda c: f"constraints.n_gpus={c.n_gpus}",
    "budget_usd": lambda c: f"constraints.budget_usd=${c.budget_usd:,.4g} per million output tokens",
}


_METRIC = {
    "max_tpot_s": lambda r: r.serving.tpot_mean_s,
    "max_ttft_s": lambda r: r.serving.ttft_p99_s,
    "max_latency_s": lambda r: r.serving.latency_p99_s,
}


def _what_it_has(name: str, row: Any) -> str:
    s = row.serving
    if name == "max_tpot_s":
        return f"has mean TPOT {s.tpot_mean_s * 1e3:.1f} ms"
    if name == "max_ttft_s":
        return f"has p99 TTFT {s.ttft_p99_s:.3g} s"
    if name == "max_latency_s":
        return f"has p99 latency {s.latency_p99_s:.3g} s"
    if name in ("max_gpus", "n_gpus"):
        return f"needs {row.n_gpus} GPUs"
    return f"costs ${s.usd_per_million_output_tokens:,.4g} per million output tokens"


def _explain(ctx: Any, fams: list[_Family], lim: _Limits, fails: dict[str, _Fail]) -> Exception:
    from .planner import PlanError

    reasons = {k: f.text for k, f in fails.items()}
    if all(f.stage == 0 for f in fails.values()):
        detail = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
        return PlanError(f"no valid setup in the search space ({detail or 'empty space'})", reasons)
    if all(f.stage <= 1 for f in fails.values()):
        best = min((f for f in fails.values() if f.stage == 1), key=lambda f: f.text)
        label = next(k for k, f in fails.items() if f is best)
        return PlanError(
            f"no setup fits in GPU memory with {ctx.cons.min_headroom_fraction:.0%} headroom (memory is binding); "
            f"closest: {label}: {best.text}; allow larger GPUs, more tensor parallelism or smaller weight formats",
            reasons)
    unlock = []
    names = [n for n in ("max_tpot_s", "max_ttft_s", "max_latency_s", "n_gpus", "max_gpus", "budget_usd")
             if getattr(lim, n) is not None]
    for name in names:
        rows, _ = _evaluate(ctx, fams, lim.without(name))
        if rows:
            unlock.append((name, min(rows, key=lambda r: _key(r, "cost")), rows))
    if unlock:
        name, row, rows = min(unlock, key=lambda x: _key(x[1], "cost"))
        if name == "max_gpus" and ctx.cons.max_gpus is None:
            msg = (f"the most GPUs searched ({max(ctx.space.gpu_counts)}, the largest of space.gpu_counts) is binding: "
                   f"the cheapest setup meeting every other constraint needs {row.n_gpus} GPUs ({describe(row)}); "
                   "set constraints.max_gpus higher")
        else:
            msg = (f"{_FIELD_TEXT[name](ctx.cons)} is binding: the cheapest setup meeting every other constraint "
                   f"{_what_it_has(name, row)} ({describe(row)})")
            metric = _METRIC.get(name)
            if metric is not None:
                best = min(rows, key=lambda r: (metric(r), _key(r, "cost")))
                if metric(best) < metric(row):
                    msg += f"; the lowest any such setup reaches: {describe(best)}"
        others = [n for n, _, _ in unlock if n != name]
        if others:
            msg += "; relaxing " + " or ".join(others) + " alone would also admit a setup"
        return PlanError(msg, reasons, row)
    top = sorted(fails.items(), key=lambda kv: -kv[1].stage)[:3]
    return PlanError("no setup meets every constraint, nor all but one: " + "; ".join(f"{k}: {f.text}" for k, f in top),
                     reasons)


def plan_serving(ctx: Any, t0: float) -> Any:
    """PlanResult for ``ctx.job.request_rate_per_s`` under ``ctx.cons`` (see the module docstring)."""
    import time

    from .planner import PlanResult

    cons, sp = ctx.cons, ctx.space
    if cons.max_gpus is not None and cons.max_gpus < min(sp.tp):
        raise ValueError(f"constraints.max_gpus={cons.max_gpus}: no tensor-parallel degree of the space "
                         f"({sp.tp}) is that small")
    fams = _families(ctx)
    lim = _Limits(cons.max_ttft_s, cons.max_tpot_s, cons.max_latency_s,
                  None if cons.n_gpus is not None else (cons.max_gpus or max(sp.gpu_counts)),
                  cons.n_gpus, cons.budget_usd, cons.max_utilization)
    rows, fails = _evaluate(ctx, fams, lim)
    evaluated = sum(f.searched for f in fams)
    estimated = sum(len(f.cands) for f in fams)
    if not rows:
        raise _explain(ctx, fams, lim, fails)
    rows.sort(key=lambda r: _key(r, ctx.objective))
    ranked, seen = [], set()
    for r in rows:  # one row per family: its best batch
        fam = (r.gpu, r.serving.gpus_per_replica, r.serving.weights)
        if fam not in seen:
            seen.add(fam)
            ranked.append(r)
    return PlanResult(
        objective=ctx.objective, best=rows[0], ranked=ranked[:ctx.top_n], pareto=serving_pareto(rows),
        pareto_complete=True, rejected_reasons={k: f.text for k, f in sorted(fails.items())},
        candidates_evaluated=evaluated, candidates_pruned=evaluated - estimated, candidates_estimated=estimated,
        search_time_s=time.perf_counter() - t0)
