"""simulator.uncertainty: the residual distribution of a cell, bands, P(OOM), the band file, and their use in
estimate(), the report and the planner."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from simulator import estimate
from simulator.planner import Constraints, plan
from simulator.report import render
from simulator.uncertainty import (
    BANDS_PATH,
    BandCell,
    BandFileError,
    ErrorBands,
    cell_chain,
    cell_for,
    load_bands,
    memory_band_bytes,
    oom_probability,
    parse_bands,
    residual_cdf,
    time_band_s,
)

GiB = 2.0**30

# r quantiles of a made-up cell: the engine reads 10% low at the median (p50 = ln 1.1)
Q = dict(p5=-0.20, p10=-0.10, p25=0.0, p50=math.log(1.1), p75=0.2, p90=0.3, p95=0.4)


def _cell(**upd) -> BandCell:
    data = dict(metric="memory", gpus="single", task="train", method="lora", n=40, n_groups=2,
                groups={"a": 30, "b": 10}, quantiles=Q, bias=Q["p50"], robust_scale=0.15)
    data.update(upd)
    return BandCell.model_validate(data)


CELL = _cell()


# ------------------------------------------------------------------------------------ distribution


def test_cdf_passes_through_the_stored_quantiles():
    levels = dict(p5=0.05, p10=0.10, p25=0.25, p50=0.50, p75=0.75, p90=0.90, p95=0.95)
    for name, level in levels.items():
        assert residual_cdf(Q[name], CELL) == pytest.approx(level)
    # halfway between p25 (0.0) and p50 (ln 1.1) in r: halfway in probability (linear between knots)
    assert residual_cdf(Q["p50"] / 2, CELL) == pytest.approx(0.375)


def test_tails_halve_every_outer_quantile_gap():
    # beyond p95 the survival halves every p95 - p90 = 0.1: 0.05 at p95, 0.025 at p95 + 0.1
    assert 1 - residual_cdf(0.5, CELL) == pytest.approx(0.025)
    # below p5 the CDF halves every p10 - p5 = 0.1
    assert residual_cdf(-0.3, CELL) == pytest.approx(0.025)
    # r = 3: 0.05 x 2^-((3 - 0.4) / 0.1) = 0.05 x 2^-26
    assert 1 - residual_cdf(3, CELL) == pytest.approx(0.05 * 2.0**-26)


def test_oom_probability_at_the_median_and_p90_points():
    pred = 40 * GiB
    assert oom_probability(pred, pred * 1.1, CELL) == pytest.approx(0.5)  # median-corrected prediction
    assert oom_probability(pred, pred * math.exp(Q["p90"]), CELL) == pytest.approx(0.10)
    assert oom_probability(pred, pred * math.exp(Q["p95"]), CELL) == pytest.approx(0.05)
    # exactly the prediction as usable memory: P(r > 0) = 1 - F(0) = 1 - 0.25 (p25 is r = 0 here)
    assert oom_probability(pred, pred, CELL) == pytest.approx(0.75)


def test_oom_probability_is_monotone_in_usable_memory():
    pred = 20 * GiB
    ps = [oom_probability(pred, pred * (0.5 + 0.01 * i), CELL) for i in range(200)]
    assert all(b <= a for a, b in zip(ps, ps[1:]))
    assert ps[0] > 0.99  # usable = half the prediction: r = ln 0.5 = -0.69, far below p5 = -0.2
    # usable = 2.49 x the prediction: r = ln 2.49 beyond p95 = 0.4, survival 0.05 x 2^-((r - 0.4) / 0.1)
    assert ps[-1] == pytest.approx(0.05 * 2.0 ** -((math.log(2.49) - 0.4) / 0.1))
    assert oom_probability(pred, 0.0, CELL) == 1.0
    assert oom_probability(0.0, pred, CELL) == 0.0


def test_fixed_part_is_not_scaled():
    ctx, pred = 0.5 * GiB, 10.5 * GiB
    lo, hi = memory_band_bytes(pred, CELL, fixed_bytes=ctx)
    assert lo == pytest.approx(ctx + 10 * GiB * math.exp(Q["p10"]))
    assert hi == pytest.approx(ctx + 10 * GiB * math.exp(Q["p90"]))
    assert oom_probability(pred, ctx + 10 * GiB * 1.1, CELL, fixed_bytes=ctx) == pytest.approx(0.5)
    assert oom_probability(pred, ctx, CELL, fixed_bytes=ctx) == 1.0


def test_bands_read_the_quantiles():
    assert memory_band_bytes(100.0, CELL) == pytest.approx((100 * math.exp(-0.1), 100 * math.exp(0.3)))
    assert memory_band_bytes(100.0, CELL, "p5-p95") == pytest.approx((100 * math.exp(-0.2), 100 * math.exp(0.4)))
    assert time_band_s(2.0, CELL) == pytest.approx((2 * math.exp(-0.1), 2 * math.exp(0.3)))
    with pytest.raises(ValueError, match="interval"):
        memory_band_bytes(100.0, CELL, "p1-p99")  # type: ignore[arg-type]


def test_tied_quantiles_stay_monotone():
    flat = _cell(quantiles=dict(p5=0.1, p10=0.1, p25=0.1, p50=0.1, p75=0.1, p90=0.1, p95=0.1), bias=0.1,
                 robust_scale=0.0)
    rs = [0.1 + 0.0005 * i for i in range(-40, 41)]
    cdf = [residual_cdf(r, flat) for r in rs]
    assert all(b >= a for a, b in zip(cdf, cdf[1:]))
    assert cdf[0] < 0.05 and cdf[-1] > 0.95


def test_cell_rules():
    with pytest.raises(ValidationError, match="must not decrease"):
        _cell(quantiles={**Q, "p90": 0.1})
    with pytest.raises(ValidationError, match="median"):
        _cell(bias=0.0)
    with pytest.raises(ValidationError, match="add up"):
        _cell(n=41)
    with pytest.raises(ValidationError, match="order"):
        _cell(gpus=None)


def test_lookup_falls_back_to_the_pooled_cell():
    assert cell_chain("memory", 8, "train", "qlora") == (
        "memory/multi/train/qlora", "memory/multi/train", "memory/multi", "memory")
    assert cell_chain("time", 1, "infer", "full")[0] == "time/single/infer/inference"
    bands = load_bands()
    c = cell_for(bands, "memory", 1, "train", "ia3")  # no IA3 cell: the single-GPU training one
    assert c is not None and c.key == "memory/single/train"


# --------------------------------------------------------------------------------------- band file


def test_committed_band_file_loads_with_provenance():
    bands = load_bands()
    prov = bands.provenance
    assert prov.sources and prov.sources[0].kind == "published" and len(prov.sources[0].sha256) == 64
    # the top-level cells split every residual pair of every source (published records, own GPU runs) once
    assert sum(src.n_pairs for src in prov.sources) == sum(c.n for k, c in bands.cells.items() if k in ("memory", "time"))
    assert all(src.kind in ("published", "gpu-run") for src in prov.sources)
    assert prov.fitsim_commit and prov.created_utc and prov.command.startswith("python -m validate bands")
    assert {"memory", "time", "memory/single", "memory/multi", "time/single", "time/multi"} <= set(bands.cells)
    for c in bands.cells.values():
        assert c.n >= bands.min_n and c.n_groups >= bands.min_groups
        assert c.quantiles.p10 <= c.quantiles.p50 <= c.quantiles.p90


def _doc() -> dict:
    return json.loads(BANDS_PATH.read_text())


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("provenance"), "provenance"),
    (lambda d: d.update(schema_version=2), "schema_version 2"),
    (lambda d: d["cells"]["memory"].update(n="many"), "cells.memory.n"),
    (lambda d: d["cells"].update({"memory/x": d["cells"]["memory"]}), "holds the residuals of 'memory'"),
    (lambda d: d.update(min_n=10_000), "below min_n"),
    (lambda d: d.update(extra_key=1), "extra_key"),
])
def test_band_file_of_the_wrong_schema_is_a_clear_error(mutate, match):
    d = _doc()
    mutate(d)
    with pytest.raises(BandFileError, match=match):
        parse_bands(json.dumps(d), "bands.json")


def test_unreadable_band_files(tmp_path):
    with pytest.raises(BandFileError, match="not valid JSON"):
        parse_bands('{"schema_version": 1, ', "cut.json")
    with pytest.raises(BandFileError, match="expected a JSON object"):
        parse_bands("[1, 2]", "list.json")
    with pytest.raises(BandFileError, match="cannot read"):
        load_bands(str(tmp_path / "missing.json"))
    good = tmp_path / "bands.json"
    good.write_text(BANDS_PATH.read_text())
    assert isinstance(load_bands(str(good)), ErrorBands)


# ---------------------------------------------------------------------------------------- estimate

LORA = {"model": "llama-3.1-8b", "gpu": "a100-sxm-80gb", "method": {"kind": "lora", "r": 16},
        "workload": {"task": "train", "micro_batch": 2, "seq_len": 2048}}


def test_estimate_carries_the_bands_of_its_cell():
    e = estimate(LORA, what_fits=False)
    u = e.uncertainty
    bands = load_bands()
    cell = cell_for(bands, "memory", 1, "train", "lora")
    assert u is not None and u.memory_cell == cell.key and u.memory_n == cell.n
    ctx = e.memory_bytes.cuda_context
    assert (u.peak_memory_lo_bytes, u.peak_memory_hi_bytes) == pytest.approx(
        memory_band_bytes(e.peak_memory_bytes, cell, fixed_bytes=ctx))
    assert u.p_oom == pytest.approx(oom_probability(e.peak_memory_bytes, e.device_memory_bytes, cell, ctx))
    tcell = cell_for(bands, "time", 1, "train", "lora")
    assert (u.step_time_lo_s, u.step_time_hi_s) == pytest.approx(time_band_s(e.time.step_s, tcell))
    assert u.memory_bias_ratio == pytest.approx(math.exp(cell.bias))
    d = e.model_dump(mode="json")
    assert d["uncertainty"]["p_oom"] == u.p_oom and d["uncertainty"]["memory_cell"] == cell.key


def test_multi_gpu_and_no_timing():
    e = estimate({**LORA, "parallel": {"dp": 4}}, what_fits=False, timing=False)
    assert e.uncertainty.memory_cell.startswith("memory/multi")
    assert e.uncertainty.step_time_lo_s is None and e.uncertainty.time_cell is None


def test_p_oom_grows_as_the_setup_nears_the_device_memory():
    ps = [estimate({**LORA, "workload": {"task": "train", "micro_batch": mb, "seq_len": 2048}},
                   what_fits=False).uncertainty.p_oom for mb in (1, 2, 4, 8, 16)]
    assert all(b >= a for a, b in zip(ps, ps[1:])) and ps[0] < 0.01 and ps[-1] > 0.99


def test_report_lines():
    text = render(estimate(LORA, what_fits=False))
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("Peak memory"))
    assert "p10-p90" in lines[i + 1] and "P(OOM)" in lines[i + 1] and "measurements" in lines[i + 1]
    assert "published" in lines[i + 1]
    assert any(line.strip().startswith("step p10-p90") for line in lines)


# ----------------------------------------------------------------------------------------- planner

SPACE = dict(gpus=["rtx4090-24gb"], gpu_counts=[1], precisions=["bf16"],
             methods=[{"kind": "lora", "r": 16, "targets": "all-linear"}, {"kind": "qlora", "r": 16, "targets": "all-linear"}],
             optimizers=["adamw"], micro_batches=[1, 2, 4], checkpointing=["none", "full"], sharding=["none"], tp=[1])


def test_planner_rejects_setups_over_the_oom_probability_with_the_reason():
    free = plan(model="llama-3.1-8b", task="finetune", seq_len=2048, space=SPACE, top_n=50)
    risky = [r for r in free.ranked if r.p_oom > 0.02]
    assert risky, "the space should hold a setup that fits by the headroom rule but is likely to run out"
    res = plan(model="llama-3.1-8b", task="finetune", seq_len=2048, space=SPACE, top_n=50,
               constraints={"max_oom_probability": 0.02})
    assert res.ranked and all(r.p_oom <= 0.02 for r in res.ranked)
    assert not any(r.scenario == x.scenario for r in res.ranked for x in risky)
    # the one LoRA setup that passes the 5% headroom rule is too likely to run out: its family is ruled out
    why = res.rejected_reasons["lora r=16 all-linear on 1x rtx-4090-24gb"]
    assert why.startswith("P(OOM) ") and "> max_oom_probability 2.0%" in why and "memory/single/train" in why


def test_planner_reason_names_the_probability():
    res = None
    with pytest.raises(Exception) as err:
        res = plan(model="llama-3.1-8b", task="finetune", seq_len=2048, top_n=5,
                   space={**SPACE, "methods": [{"kind": "lora", "r": 16, "targets": "all-linear"}],
                          "checkpointing": ["full"]},
                   constraints={"max_oom_probability": 0.001})
    assert res is None
    reasons = getattr(err.value, "rejected_reasons", {})
    assert any("P(OOM)" in v and "max_oom_probability 0.1%" in v for v in reasons.values()), reasons


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_max_oom_probability_is_a_probability(bad):
    with pytest.raises(ValidationError):
        Constraints(max_oom_probability=bad)


def test_array_search_and_reference_agree_under_the_oom_limit():
    """The vectorized search filters P(OOM) with the same bands and arithmetic as estimate(): same ranking
    and the same ruled-out families as the reference path that estimates every candidate."""
    space = {**SPACE, "gpus": ["rtx4090-24gb", "l4-24gb"], "gpu_counts": [1, 2], "sharding": ["none", "zero3"]}
    kw = dict(model="llama-3.1-8b", task="finetune", seq_len=2048, space=space, top_n=20,
              constraints={"max_oom_probability": 0.02})
    fast, ref = plan(**kw), plan(**kw, bound=False)
    assert [r.scenario for r in fast.ranked] == [r.scenario for r in ref.ranked]
    assert fast.ranked and all(r.p_oom <= 0.02 for r in fast.ranked)
    oom = {k: v for k, v in ref.rejected_reasons.items() if v.startswith("P(OOM)")}
    assert oom and {k: fast.rejected_reasons.get(k) for k in oom} == oom
