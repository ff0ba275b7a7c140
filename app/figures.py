"""Plotly figures built from results: pure functions (no streamlit), one per chart.

Memory axes are in GiB (the bytes of the results divided by 2**30); each trace also carries the exact
byte counts in ``customdata`` so that a hover, or a test, reads the engine's numbers unrounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.graph_objects as go

from hwprofiles import Device
from simulator.report import CATEGORY_LABELS, TIME_LABELS, fmt_seconds
from simulator.results import CATEGORIES, Estimate
from simulator.units import GiB, fmt_bytes

CAPACITY_COLOR = "#d62728"
PEAK_COLOR = "#ff7f0e"
ALLOCATED_COLOR = "#1f77b4"


def _gib(n_bytes: float) -> float:
    return n_bytes / GiB


def _layout(fig: go.Figure, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(title=title, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2), **kw)
    return fig


def _capacity_trace(x: list[Any], capacity_bytes: float, name: str = "device memory") -> go.Scatter:
    """A horizontal line at the device's memory across the categorical axis ``x``."""
    return go.Scatter(x=x, y=[_gib(capacity_bytes)] * len(x), mode="lines", name=name,
                      line=dict(color=CAPACITY_COLOR, dash="dash"), customdata=[capacity_bytes] * len(x),
                      hovertemplate=f"{name}: {fmt_bytes(capacity_bytes)}<extra></extra>")


def memory_breakdown(e: Estimate) -> go.Figure:
    """One stacked bar: the bytes of each category (results.CATEGORIES) at the peak; zero categories
    are left out.  A dashed line marks the device's memory."""
    x = [f"peak ({e.peak_phase})"]
    fig = go.Figure()
    for c in CATEGORIES:
        v = getattr(e.memory_bytes, c)
        if not v:
            continue
        fig.add_trace(go.Bar(x=x, y=[_gib(v)], name=CATEGORY_LABELS.get(c, c), customdata=[v], meta=c,
                             hovertemplate=f"{CATEGORY_LABELS.get(c, c)}: {fmt_bytes(v)}<extra></extra>"))
    fig.add_shape(type="line", xref="paper", x0=0, x1=1, y0=_gib(e.device_memory_bytes), y1=_gib(e.device_memory_bytes),
                  line=dict(color=CAPACITY_COLOR, dash="dash"))
    fig.add_annotation(xref="paper", x=0, y=_gib(e.device_memory_bytes), text=f"{e.gpu}: {fmt_bytes(e.device_memory_bytes)}",
                       showarrow=False, xanchor="left", yanchor="bottom", font=dict(color=CAPACITY_COLOR))
    top = max(e.memory_bytes.total, e.device_memory_bytes)
    return _layout(fig, "Memory at the peak, by category", barmode="stack", yaxis_title="GiB", bargap=0.6,
                   yaxis_range=[0, _gib(top) * 1.1])


def memory_timeline(e: Estimate) -> go.Figure:
    """Allocated memory at the peak of each phase of one step, in order (forward -> backward -> optimizer,
    or prefill -> decode), the device total at the peak phase (reserved + CUDA context) and the capacity."""
    phases = list(e.phase_allocated_bytes)
    alloc = [e.phase_allocated_bytes[p] for p in phases]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=phases, y=[_gib(v) for v in alloc], mode="lines+markers", name="allocated",
                             line=dict(color=ALLOCATED_COLOR, shape="linear"), customdata=alloc,
                             hovertemplate="%{x}: %{customdata:.4s}B allocated<extra></extra>"))
    fig.add_trace(go.Scatter(x=[e.peak_phase], y=[_gib(e.peak_memory_bytes)], mode="markers+text", name="peak (device total)",
                             marker=dict(color=PEAK_COLOR, size=14, symbol="star"), customdata=[e.peak_memory_bytes],
                             text=[f"peak {fmt_bytes(e.peak_memory_bytes)}"], textposition="top left",
                             hovertemplate=f"peak during {e.peak_phase}: {fmt_bytes(e.peak_memory_bytes)} "
                                           "(reserved + CUDA context)<extra></extra>"))
    fig.add_trace(_capacity_trace(phases, e.device_memory_bytes))
    top = max(e.peak_memory_bytes, e.device_memory_bytes, *alloc)
    return _layout(fig, "Memory over one step", yaxis_title="GiB", yaxis_range=[0, _gib(top) * 1.15],
                   xaxis_title="phase")


def activations_by_layer(e: Estimate, top: int | None = None) -> go.Figure:
    """Saved-activation bytes per module (embeddings, each block, head and loss), in model order;
    with ``top``, only the largest ``top`` modules."""
    items = list(e.activations_by_layer.items())
    if top is not None:
        keep = {k for k, _ in sorted(items, key=lambda kv: -kv[1])[:top]}
        items = [kv for kv in items if kv[0] in keep]
    names = [k for k, _ in items]
    values = [v for _, v in items]
    fig = go.Figure(go.Bar(x=names, y=[_gib(v) for v in values], customdata=values, name="saved activations",
                           marker_color=ALLOCATED_COLOR,
                           hovertemplate="%{x}: %{customdata:.4s}B<extra></extra>"))
    return _layout(fig, "Saved activations by module", yaxis_title="GiB", xaxis_title="module", showlegend=False)


TRAIN_TIME_PARTS = tuple(k for k in TIME_LABELS if k != "prefill_s")
"""TimeBreakdown fields that add up to a training step, in the order they are drawn."""

DECODE = "decode"


def time_parts(e: Estimate) -> list[tuple[str, str, float]]:
    """(key, label, seconds) of each non-zero part of one step on the slowest rank: forward, backward,
    recompute, communication, pipeline bubble, optimizer, offload (training); prefill and decode, the
    decode being the rest of the step after the prefill (inference).  Empty without a time estimate."""
    t = e.time
    if t is None:
        return []
    if e.task == "infer":
        parts = [("prefill_s", TIME_LABELS["prefill_s"], t.prefill_s), (DECODE, DECODE, t.step_s - t.prefill_s)]
    else:
        parts = [(k, TIME_LABELS[k], getattr(t, k)) for k in TRAIN_TIME_PARTS]
    return [p for p in parts if p[2] > 0]


def time_breakdown(e: Estimate) -> go.Figure:
    """One horizontal stacked bar: where the time of one step goes (:func:`time_parts`); each trace holds
    the part's seconds in ``customdata`` and its TimeBreakdown field in ``meta``."""
    fig = go.Figure()
    what = "optimizer step" if e.task == "train" else "batch (prefill + decode)"
    y = [f"one {what}"]
    for key, label, secs in time_parts(e):
        fig.add_trace(go.Bar(y=y, x=[secs], name=label, orientation="h", customdata=[secs], meta=key,
                             hovertemplate=f"{label}: {fmt_seconds(secs)}<extra></extra>"))
    step = e.time.step_s if e.time is not None else 0.0
    return _layout(fig, f"Time of one step: {fmt_seconds(step)} on the slowest rank", barmode="stack",
                   xaxis_title="seconds", bargap=0.5, height=260)


def stage_peaks(e: Estimate) -> go.Figure:
    """Peak device memory of each pipeline stage's ranks (nvidia-smi view), the largest one highlighted,
    and a dashed line at the device's memory."""
    stages = sorted(e.stage_peak_bytes)
    x = [f"stage {s}" for s in stages]
    values = [e.stage_peak_bytes[s] for s in stages]
    colors = [PEAK_COLOR if s == e.peak_stage else ALLOCATED_COLOR for s in stages]
    fig = go.Figure(go.Bar(x=x, y=[_gib(v) for v in values], customdata=values, name="peak per stage",
                           marker_color=colors, hovertemplate="%{x}: %{customdata:.4s}B<extra></extra>"))
    fig.add_trace(_capacity_trace(x, e.device_memory_bytes, name=f"{e.gpu} memory"))
    top = max(e.device_memory_bytes, *values)
    return _layout(fig, "Peak memory per pipeline stage", yaxis_title="GiB", xaxis_title="pipeline stage",
                   yaxis_range=[0, _gib(top) * 1.1])


def comparison_bars(estimates: Sequence[Estimate], labels: Sequence[str]) -> go.Figure:
    """Grouped bars: for each memory category present in any estimate (and the device total at the peak),
    one bar per scenario; a marker per scenario shows its device's memory."""
    if len(estimates) != len(labels):
        raise ValueError(f"{len(estimates)} estimates but {len(labels)} labels")
    cats = [c for c in CATEGORIES if any(getattr(e.memory_bytes, c) for e in estimates)]
    x = [CATEGORY_LABELS.get(c, c) for c in cats] + ["peak (device total)"]
    fig = go.Figure()
    for e, label in zip(estimates, labels):
        values = [getattr(e.memory_bytes, c) for c in cats] + [e.peak_memory_bytes]
        fig.add_trace(go.Bar(x=x, y=[_gib(v) for v in values], name=label, customdata=values,
                             hovertemplate=f"{label}<br>%{{x}}: %{{customdata:.4s}}B<extra></extra>"))
    return _layout(fig, "Memory by category", barmode="group", yaxis_title="GiB")


def roofline(device: Device, intensity_range: tuple[float, float] | None = None) -> go.Figure:
    """Roofline of one device: for each dtype with a peak, attainable FLOP/s = min(peak, intensity x
    memory bandwidth) over arithmetic intensity (FLOP per byte of device memory traffic), the ridge
    point (peak / bandwidth) of each, and the achievable roof from the profile's measured fractions."""
    bw = device.memory_bandwidth_Bps
    dtypes = list(device.supported_dtypes)
    ridges = {d: device.peak_flops(d) / bw for d in dtypes}
    lo, hi = intensity_range or (10 ** math.floor(math.log10(min(ridges.values())) - 1),
                                 10 ** math.ceil(math.log10(max(ridges.values())) + 1))
    fig = go.Figure()
    for d in dtypes:
        peak = device.peak_flops(d)
        unit = "TOPS" if d == "int8" else "TFLOP/s"
        xs = [lo, ridges[d], hi]
        fig.add_trace(go.Scatter(x=xs, y=[min(peak, x * bw) / 1e12 for x in xs], mode="lines", meta=d,
                                 name=f"{d} ({peak / 1e12:g} {unit})",
                                 hovertemplate=f"{d}: %{{y:.1f}} {unit} at %{{x:.3g}} FLOP/B<extra></extra>"))
    fig.add_trace(go.Scatter(x=[ridges[d] for d in dtypes], y=[device.peak_flops(d) / 1e12 for d in dtypes],
                             mode="markers+text", name="ridge points", text=[f"{ridges[d]:.0f}" for d in dtypes],
                             textposition="top left", marker=dict(size=9, color="black"), customdata=dtypes,
                             hovertemplate="%{customdata}: ridge at %{x:.1f} FLOP/B<extra></extra>"))
    ref = "bf16" if "bf16" in dtypes else "fp16"
    eff = device.efficiency
    peak_eff = device.peak_flops(ref) * eff.max_fraction(ref)
    bw_eff = bw * eff.memory_bandwidth_fraction
    ridge_eff = peak_eff / bw_eff
    xs = [lo, ridge_eff, hi]
    fig.add_trace(go.Scatter(x=xs, y=[min(peak_eff, x * bw_eff) / 1e12 for x in xs], mode="lines",
                             name=f"achievable {ref} (profile fractions)", line=dict(dash="dot", color="gray"), meta="achievable",
                             hovertemplate="achievable: %{y:.1f} TFLOP/s at %{x:.3g} FLOP/B<extra></extra>"))
    return _layout(fig, f"Roofline: {device.display_name} ({device.hbm_bandwidth_GBps:g} GB/s)",
                   xaxis=dict(type="log", title="arithmetic intensity (FLOP / byte)"),
                   yaxis=dict(type="log", title="attainable TFLOP/s"))


def predicted_vs_measured(records: Iterable[dict], predictions: Iterable[dict],
                          metrics: Sequence[str] | None = None) -> go.Figure:
    """Predicted against measured memory for every published record predicted with status ok, one trace per
    source group (filled: comparable records, open: not comparable), with the line predicted = measured.
    Values are in the record's own unit (GB or GiB, as the source reports)."""
    from validate.published import MEMORY_METRICS
    from validate.score import group_of

    wanted = tuple(metrics) if metrics is not None else MEMORY_METRICS
    by_id = {p["id"]: p for p in predictions}
    groups: dict[str, list[tuple[dict, dict]]] = {}
    for r in records:
        p = by_id.get(r.get("id"))
        t = r.get("target") or {}
        if p is None or p.get("status") != "ok" or t.get("metric") not in wanted:
            continue
        if isinstance(t.get("value"), bool) or not isinstance(t.get("value"), (int, float)):
            continue
        if not isinstance(p.get("predicted"), (int, float)) or isinstance(p.get("predicted"), bool):
            continue
        groups.setdefault(group_of(r["id"]), []).append((r, p))
    fig = go.Figure()
    top = 0.0
    for g, pairs in sorted(groups.items()):
        xs = [r["target"]["value"] for r, _ in pairs]
        ys = [p["predicted"] for _, p in pairs]
        top = max(top, *xs, *ys)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=g, customdata=[[r["id"], p.get("unit") or ""] for r, p in pairs],
            marker=dict(size=8, symbol=["circle" if r["target"].get("comparable") else "circle-open" for r, _ in pairs]),
            hovertemplate="%{customdata[0]}<br>measured %{x} %{customdata[1]}<br>predicted %{y:.2f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=[0, top * 1.05], y=[0, top * 1.05], mode="lines", name="predicted = measured",
                             line=dict(color="gray", dash="dash"), hoverinfo="skip"))
    return _layout(fig, "Published memory measurements: predicted vs measured",
                   xaxis_title="measured (GB or GiB, as published)", yaxis_title="predicted (same unit)")


def gpu_measured_vs_predicted(comparisons: Iterable[dict], metric: str) -> go.Figure:
    """Predicted against measured for one metric of our own GPU runs (the report's comparisons as dicts),
    one trace per suite, log-log with the line predicted = measured and ±10 % guides."""
    rows = [c for c in comparisons if c["metric"] == metric and c["unit"] != "bool"]
    unit = "GiB" if rows and rows[0]["unit"] == "bytes" else "s"
    scale = 2.0**30 if unit == "GiB" else 1.0
    fig = go.Figure()
    values: list[float] = []
    for suite in sorted({c["suite"] for c in rows}):
        cs = [c for c in rows if c["suite"] == suite]
        xs, ys = [c["measured"] / scale for c in cs], [c["predicted"] / scale for c in cs]
        values += xs + ys
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=suite,
            customdata=[[c["case_id"], 100 * (c["predicted"] - c["measured"]) / c["measured"]] for c in cs],
            hovertemplate="%{customdata[0]}<br>measured %{x:.4g}<br>predicted %{y:.4g}<br>%{customdata[1]:+.1f}%"
                          "<extra></extra>"))
    if values:
        lo, hi = min(values), max(values)
        for f, dash, name in ((1.0, "dash", "predicted = measured"), (1.1, "dot", "+10%"), (0.9, "dot", "-10%")):
            fig.add_trace(go.Scatter(x=[lo, hi], y=[lo * f, hi * f], mode="lines", name=name, hoverinfo="skip",
                                     line=dict(color="gray", dash=dash, width=1)))
    fig = _layout(fig, f"GPU measurements: {metric}", xaxis_title=f"measured ({unit})",
                  yaxis_title=f"predicted ({unit})")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def plan_front_traces(ranked: Sequence[Any], pareto: Sequence[Any], best: Any | None = None) -> list[list[Any]]:
    """The rows behind each trace of :func:`plan_front`, in trace and point order (ranked, Pareto front
    sorted by time, best): a clicked point's (curve, index) names its row."""
    finite = lambda rs: [r for r in rs if math.isfinite(r.cost_key)]  # noqa: E731
    return [finite(ranked), finite(sorted(pareto, key=lambda r: r.time_key)), finite([best] if best is not None else [])]


def plan_point_row(event: Any, traces: list[list[Any]]) -> Any | None:
    """The plan row of the point clicked on :func:`plan_front` (``st.plotly_chart`` selection event), or
    none when nothing is selected."""
    points = ((event or {}).get("selection") or {}).get("points") or []
    for pt in points:
        curve, index = pt.get("curve_number"), pt.get("point_index")
        if curve is not None and index is not None and curve < len(traces) and index < len(traces[curve]):
            return traces[curve][index]
    return None


def plan_front(ranked: Sequence[Any], pareto: Sequence[Any], best: Any | None = None) -> go.Figure:
    """Time against dollars for a plan's setups (``simulator.planner.PlanRow``): the ranked setups as
    points, the Pareto front as a line through its points, the best setup as a star.  Time is the whole
    run in hours and cost its dollars when the job has a token count; otherwise seconds and dollars per
    million tokens.  ``customdata`` carries each row's exact (time in s, $) and its description."""
    rows = [*ranked, *pareto, *([best] if best is not None else [])]
    run = bool(rows) and all(r.run_time_s is not None for r in rows)
    scale = 3600.0 if run else 1.0

    traces = plan_front_traces(ranked, pareto, best)

    def trace(finite: Sequence[Any], name: str, **kw: Any) -> go.Scatter:
        return go.Scatter(
            x=[r.time_key / scale for r in finite], y=[r.cost_key for r in finite], name=name,
            customdata=[[r.time_key, r.cost_key, f"{r.n_gpus}x {r.gpu}, {r.method}, {r.parallel}",
                         fmt_seconds(r.time_key)] for r in finite],
            hovertemplate="%{customdata[2]}<br>%{customdata[3]}, $%{y:,.2f}<extra>" + name + "</extra>", **kw)

    fig = go.Figure()
    fig.add_trace(trace(traces[0], "ranked", mode="markers", meta="ranked",
                        marker=dict(size=8, color=ALLOCATED_COLOR, opacity=0.6)))
    fig.add_trace(trace(traces[1], "Pareto front", mode="lines+markers", meta="pareto",
                        marker=dict(size=10, color=PEAK_COLOR), line=dict(color=PEAK_COLOR, shape="hv")))
    if best is not None:
        fig.add_trace(trace(traces[2], "best", mode="markers", meta="best",
                            marker=dict(size=16, symbol="star", color=CAPACITY_COLOR)))
    return _layout(fig, "Time against cost (lower left is better)",
                   xaxis_title="run time (h)" if run else "seconds per million tokens",
                   yaxis_title="run cost ($)" if run else "$ per million tokens")
