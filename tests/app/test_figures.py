"""The figure builders are pure: their traces carry exactly the Estimate's (and the profile's) numbers."""

from __future__ import annotations

import pytest

pytest.importorskip("plotly")

from app import figures  # noqa: E402
from hwprofiles import get_device  # noqa: E402
from simulator import estimate  # noqa: E402
from simulator.results import CATEGORIES  # noqa: E402
from simulator.units import GiB  # noqa: E402


@pytest.fixture(scope="module")
def train():
    return estimate({"model": "llama-3.2-1b", "gpu": "rtx-4090-24gb", "method": {"kind": "lora"},
                     "workload": {"micro_batch": 2, "seq_len": 1024}})


@pytest.fixture(scope="module")
def infer():
    return estimate({"model": "llama-3.2-1b", "workload": {"task": "infer", "batch": 4}})


def test_memory_breakdown(train):
    fig = figures.memory_breakdown(train)
    nonzero = [c for c in CATEGORIES if getattr(train.memory_bytes, c)]
    assert [t.meta for t in fig.data] == nonzero
    for t in fig.data:
        assert t.customdata[0] == getattr(train.memory_bytes, t.meta)
        assert t.y[0] == pytest.approx(t.customdata[0] / GiB)
    # the stack adds up to the peak the verdict uses
    assert sum(t.customdata[0] for t in fig.data) == pytest.approx(train.peak_memory_bytes)
    assert fig.layout.barmode == "stack"
    assert fig.layout.shapes[0].y0 == pytest.approx(train.device_memory_bytes / GiB)


@pytest.mark.parametrize("which, phases", [("train", ["forward", "backward", "optimizer"]), ("infer", ["prefill", "decode"])])
def test_memory_timeline(which, phases, request):
    e = request.getfixturevalue(which)
    fig = figures.memory_timeline(e)
    alloc, peak, capacity = fig.data
    assert list(alloc.x) == phases == list(e.phase_allocated_bytes)
    assert list(alloc.customdata) == [e.phase_allocated_bytes[p] for p in phases]
    assert list(alloc.y) == pytest.approx([e.phase_allocated_bytes[p] / GiB for p in phases])
    assert list(peak.x) == [e.peak_phase] and peak.customdata[0] == e.peak_memory_bytes
    # the peak phase is the phase of the largest allocation
    assert e.peak_phase == max(phases, key=e.phase_allocated_bytes.get)
    assert list(capacity.y) == pytest.approx([e.device_memory_bytes / GiB] * len(phases))
    assert list(capacity.x) == phases


def test_activations_by_layer(train):
    fig = figures.activations_by_layer(train)
    (bar,) = fig.data
    assert list(bar.x) == list(train.activations_by_layer)
    assert list(bar.customdata) == list(train.activations_by_layer.values())
    top = figures.activations_by_layer(train, top=3).data[0]
    largest = sorted(train.activations_by_layer.values(), reverse=True)[:3]
    assert sorted(top.customdata, reverse=True) == largest


def test_comparison_bars(train, infer):
    fig = figures.comparison_bars([train, infer], ["a", "b"])
    assert [t.name for t in fig.data] == ["a", "b"]
    assert fig.layout.barmode == "group"
    for t, e in zip(fig.data, (train, infer)):
        assert t.x[-1] == "peak (device total)" and t.customdata[-1] == e.peak_memory_bytes
        assert len(t.x) == len(t.y) == len(t.customdata)
    with pytest.raises(ValueError, match="2 estimates but 1 labels"):
        figures.comparison_bars([train, infer], ["a"])


@pytest.mark.parametrize("name", ["h100-sxm-80gb", "v100-sxm-32gb", "mi300x-192gb"])
def test_roofline(name):
    d = get_device(name)
    fig = figures.roofline(d)
    dtypes = list(d.supported_dtypes)
    roofs = [t for t in fig.data if t.meta in dtypes]
    assert [t.meta for t in roofs] == dtypes
    assert len(fig.data) == len(dtypes) + 2  # the roofs, the ridge points, the achievable roof
    bw = d.hbm_bandwidth_GBps * 1e9
    for t in roofs:
        peak = getattr(d.peak_tflops, t.meta)
        assert max(t.y) == pytest.approx(peak)  # flat roof at the dense peak, TFLOP/s
        assert t.x[1] == pytest.approx(peak * 1e12 / bw)  # ridge point in FLOP per byte
        assert t.y[0] == pytest.approx(t.x[0] * bw / 1e12)  # the bandwidth slope below it
    ridges = next(t for t in fig.data if t.name == "ridge points")
    assert list(ridges.customdata) == dtypes
    achievable = next(t for t in fig.data if t.meta == "achievable")
    ref = "bf16" if d.supports_bf16 else "fp16"
    assert max(achievable.y) == pytest.approx(getattr(d.peak_tflops, ref) * d.efficiency.max_fraction(ref))
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def test_predicted_vs_measured():
    def rec(i, group, value, comparable=True, metric="peak_memory_per_gpu_GB"):
        return {"id": f"{group}-{i:03d}", "target": {"metric": metric, "value": value, "comparable": comparable}}

    records = [rec(1, "a", 10.0), rec(2, "a", 20.0, comparable=False), rec(1, "b", 30.0),
               rec(2, "b", 5.0), rec(3, "b", True, metric="fits"), rec(4, "b", 7.0)]
    preds = [{"id": "a-001", "status": "ok", "predicted": 11.0, "unit": "GiB"},
             {"id": "a-002", "status": "ok", "predicted": 18.0, "unit": "GiB"},
             {"id": "b-001", "status": "ok", "predicted": 33.0, "unit": "GB"},
             {"id": "b-002", "status": "unsupported", "predicted": None},
             {"id": "b-003", "status": "ok", "predicted": True},
             {"id": "b-004", "status": "ok", "predicted": 6.5, "unit": "GB"}]
    fig = figures.predicted_vs_measured(records, preds)
    a, b, diagonal = fig.data
    assert (a.name, list(a.x), list(a.y)) == ("a", [10.0, 20.0], [11.0, 18.0])
    assert list(a.marker.symbol) == ["circle", "circle-open"]  # open: not comparable
    assert (b.name, list(b.x), list(b.y)) == ("b", [30.0, 7.0], [33.0, 6.5])
    assert diagonal.x == diagonal.y


@pytest.fixture(scope="module")
def pipeline():
    return estimate({"model": "llama-3.2-1b", "parallel": {"dp": 2, "pp": 2, "zero": 1}, "workload": {"grad_accum": 4}})


@pytest.mark.parametrize("which", ["train", "pipeline"])
def test_time_breakdown_training(which, request):
    e = request.getfixturevalue(which)
    fig = figures.time_breakdown(e)
    assert fig.layout.barmode == "stack" and all(t.orientation == "h" for t in fig.data)
    keys = [t.meta for t in fig.data]
    assert keys == [k for k in figures.TRAIN_TIME_PARTS if getattr(e.time, k)]
    for t in fig.data:
        assert t.customdata[0] == t.x[0] == getattr(e.time, t.meta)
    assert sum(t.x[0] for t in fig.data) == pytest.approx(e.time.step_s)  # the parts make the step
    if which == "pipeline":
        assert "pp_bubble_s" in keys


def test_time_breakdown_inference(infer):
    fig = figures.time_breakdown(infer)
    prefill, decode = fig.data
    assert (prefill.meta, decode.meta) == ("prefill_s", "decode")
    assert prefill.x[0] == infer.time.prefill_s
    assert prefill.x[0] + decode.x[0] == pytest.approx(infer.time.step_s)


def test_stage_peaks(pipeline):
    fig = figures.stage_peaks(pipeline)
    bars, capacity = fig.data
    stages = sorted(pipeline.stage_peak_bytes)
    assert list(bars.x) == [f"stage {s}" for s in stages]
    assert list(bars.customdata) == [pipeline.stage_peak_bytes[s] for s in stages]
    assert list(bars.y) == pytest.approx([pipeline.stage_peak_bytes[s] / GiB for s in stages])
    assert max(bars.customdata) == pytest.approx(pipeline.peak_memory_bytes)
    assert bars.marker.color[pipeline.peak_stage] == figures.PEAK_COLOR
    assert list(capacity.customdata) == [pipeline.device_memory_bytes] * len(stages)


def test_plan_front():
    from simulator.planner import plan

    res = plan("llama-3.2-1b", "finetune", {"max_gpus": 2}, "cost", {"gpus": ["rtx-4090-24gb", "a100-sxm-80gb"]},
               total_tokens=20e6)
    fig = figures.plan_front(res.ranked, res.pareto, res.best)
    ranked, front, best = fig.data
    assert [t.meta for t in fig.data] == ["ranked", "pareto", "best"]
    assert [c[0] for c in ranked.customdata] == [r.run_time_s for r in res.ranked]
    assert list(ranked.y) == [r.run_usd for r in res.ranked]
    assert list(ranked.x) == pytest.approx([r.run_time_s / 3600 for r in res.ranked])
    assert [c[1] for c in front.customdata] == sorted(r.run_usd for r in res.pareto)[::-1]  # fastest first
    assert [c[0] for c in front.customdata] == sorted(r.run_time_s for r in res.pareto)
    assert best.y[0] == res.best.run_usd and best.marker.symbol == "star"
    assert fig.layout.xaxis.title.text == "run time (h)"
    # without a token count: per million tokens
    per_m = plan("llama-3.2-1b", "finetune", {"max_gpus": 1}, "time", {"gpus": ["rtx-4090-24gb"]}, pareto=False)
    fig = figures.plan_front(per_m.ranked, per_m.pareto)
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == pytest.approx([1e6 / r.tokens_per_s for r in per_m.ranked])
    assert fig.layout.yaxis.title.text == "$ per million tokens"


def test_a_clicked_plan_point_names_its_row():
    from simulator.planner import plan

    clicked_row = figures.plan_point_row
    res = plan(model="llama-3.2-1b", task="finetune", seq_len=1024, total_tokens=2e7, top_n=5, pareto=False,
               space={"gpus": ["a100-sxm-80gb"], "gpu_counts": [1, 2], "micro_batches": [1, 4]})
    traces = figures.plan_front_traces(res.ranked, res.pareto, res.best)
    fig = figures.plan_front(res.ranked, res.pareto, res.best)
    # every trace's points are its rows, in order: a click (curve, index) maps back to the row it shows
    for curve, rows in enumerate(traces):
        assert list(fig.data[curve].x) == [r.time_key / 3600.0 for r in rows]
    event = {"selection": {"points": [{"curve_number": 0, "point_index": 1}]}}
    assert clicked_row(event, traces) is traces[0][1]
    assert clicked_row({"selection": {"points": []}}, traces) is None
    assert clicked_row(None, traces) is None
