"""validate.bands: residual pairs from published records and GPU runs -> the band file's cells."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from simulator import estimate
from simulator.uncertainty import ErrorBands, parse_bands
from validate.__main__ import main
from validate.bands import (
    Pair,
    build_bands,
    cells_from_pairs,
    pairs_from_published,
    pairs_from_results,
    records_source,
    residual,
    sha256_of,
)
from validate.schema import CaseResult, Fingerprint, Measurement, ResultsFile

PUBLIC = Path(__file__).parents[2].parent / "shared/published/public.jsonl"


def _pairs(rs, metric="memory", n_gpus=1, task="train", method="lora", groups=("a", "b")):
    """One pair per residual r (measured = e^r x predicted), alternating between the source groups."""
    return [Pair(id=f"{metric}-{n_gpus}-{task}-{method}-{i}", group=groups[i % len(groups)], metric=metric,
                 measured=2.0 * math.exp(r), predicted=2.0, n_gpus=n_gpus, task=task, method=method, source="x")
            for i, r in enumerate(rs)]


# r = -1.00, -0.98, ..., 1.00 (101 values): the linear quantile at level q is -1 + 2q exactly
GRID = [-1.0 + 0.02 * i for i in range(101)]


def test_known_quantiles_come_back():
    cells = cells_from_pairs(_pairs(GRID))
    c = cells["memory/single/train/lora"]
    q = c.quantiles
    for name, level in dict(p5=0.05, p10=0.10, p25=0.25, p50=0.5, p75=0.75, p90=0.90, p95=0.95).items():
        assert getattr(q, name) == pytest.approx(-1.0 + 2.0 * level)
    assert c.n == 101 and c.n_groups == 2 and c.groups == {"a": 51, "b": 50}
    assert c.bias == pytest.approx(0.0)
    # |r - 0| over the grid: 0, 0.02 (x2), ..., 1.0 (x2); its median is 0.5 -> 1.4826 x 0.5
    assert c.robust_scale == pytest.approx(1.4826 * 0.5)
    # the same residuals fill every level of the chain
    assert {"memory", "memory/single", "memory/single/train"} <= cells.keys()


def test_residual_is_the_log_ratio():
    p = Pair(id="x", group="g", metric="time", measured=3.0, predicted=1.5, n_gpus=1, task="train",
             method="full", source="s")
    assert residual(p) == pytest.approx(math.log(2.0))


def test_small_cells_fall_back_to_the_pooled_one():
    pairs = _pairs(GRID[:30]) + _pairs(GRID[:10], method="qlora") + _pairs(GRID[:25], n_gpus=8, method="full")
    cells = cells_from_pairs(pairs, min_n=20)
    assert "memory/single/train/qlora" not in cells  # 10 < 20: the setup uses memory/single/train
    assert cells["memory/single/train"].n == 40
    assert cells["memory/single/train/lora"].n == 30
    assert cells["memory/multi/train/full"].n == 25
    assert cells["memory"].n == 65


def test_one_source_group_is_not_a_regime():
    cells = cells_from_pairs(_pairs(GRID, groups=("only",)) + _pairs(GRID[:5], method="full", groups=("other",)),
                             min_n=20, min_groups=2)
    assert "memory/single/train/lora" not in cells
    assert cells["memory/single/train"].n_groups == 2


def test_build_bands_from_any_pairs_is_a_valid_band_file():
    bands = build_bands(_pairs(GRID) + _pairs(GRID, metric="time"))
    assert isinstance(bands, ErrorBands) and bands.provenance.sources == ()
    again = parse_bands(bands.model_dump_json(), "roundtrip")
    assert again.cells == bands.cells


# ------------------------------------------------------------------------------------- published


def _record(**target) -> dict:
    sc = {
        "task": "train",
        "model": {"name": "Llama-2-7b", "hf_id": "meta-llama/Llama-2-7b-hf", "family": "llama"},
        "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "weight_quant": "nf4", "double_quant": None, "precision": "bf16-pure", "optimizer": "adamw",
        "micro_batch": 1, "seq_len": 1024, "grad_accum": 1, "checkpointing": "none", "attention": "sdpa",
        "n_gpus": 1, "n_nodes": 1, "parallel": {}, "inference": None, "gpu": "A100-SXM-40GB",
        "framework": "litgpt", "unstated": [],
    }
    t = {"metric": "peak_memory_per_gpu_GB", "value": 20.0, "measured_how": "allocated", "per": "gpu",
         "comparable": True}
    t.update(target)
    return {"id": "hand-001", "scenario": sc, "target": t}


def test_published_pairs_turn_throughput_into_time_and_take_the_engine_tags():
    recs = [_record(), _record(metric="tokens_per_s_total", value=100.0), _record(comparable=False),
            _record(metric="fits", value=True)]
    for i, r in enumerate(recs):
        r["id"] = f"hand-{i:03d}"
    preds = [{"id": "hand-000", "status": "ok", "predicted": 16.0}, {"id": "hand-001", "status": "ok", "predicted": 200.0},
             {"id": "hand-002", "status": "ok", "predicted": 16.0}, {"id": "hand-003", "status": "ok", "predicted": True}]
    mem, tps = pairs_from_published(recs, preds, "recs.jsonl")  # not comparable / fits: no pair
    assert residual(mem) == pytest.approx(math.log(20.0 / 16.0))
    # the engine predicts 200 tokens/s where 100 were measured: it takes half the time, r = ln 2
    assert tps.metric == "time" and residual(tps) == pytest.approx(math.log(2.0))
    # a LoRA record on an NF4 base is QLoRA in the engine: the tag is the engine's method kind
    assert mem.method == "qlora" and mem.n_gpus == 1 and mem.task == "train" and mem.group == "hand"


def test_unsupported_predictions_give_no_pair():
    assert pairs_from_published([_record()], [{"id": "hand-001", "status": "unsupported", "predicted": None}], "r") == []


def test_public_records_give_both_metric_classes_and_both_regimes():
    if not PUBLIC.exists():
        pytest.skip(f"{PUBLIC} not present")
    from validate.published import load_jsonl, predict_records

    recs = load_jsonl(PUBLIC)
    pairs = pairs_from_published(recs, predict_records(recs), str(PUBLIC))
    bands = build_bands(pairs, sources=[records_source(PUBLIC, "published", pairs)])
    assert {"memory/single", "memory/multi", "time/single", "time/multi"} <= bands.cells.keys()
    assert bands.provenance.sources[0].n_pairs == len(pairs)
    assert bands.cells["memory"].n + bands.cells["time"].n == len(pairs)


# -------------------------------------------------------------------------------------- GPU runs

SCEN = {"model": "llama-3.2-1b", "gpu": "a100-sxm-80gb", "method": {"kind": "lora", "r": 8},
        "workload": {"task": "train", "micro_batch": 2, "seq_len": 512}}


def _results(measured: Measurement, status="ok") -> ResultsFile:
    fp = Fingerprint(platform="cuda", device_name="NVIDIA A100-SXM4-80GB", device_count=1,
                     device_profile="a100-sxm-80gb", python="3.12", packages={"torch": "2.13.0"})
    case = CaseResult(case_id="e2e/llama-1b/lora", suite="e2e", kind="train", spec={"scenario": SCEN},
                      status=status, measured=measured if status == "ok" else None)
    return ResultsFile(schema_version=1, suite="e2e", created_utc="2026-01-01T00:00:00Z", command="x",
                       fingerprint=fp, cases=(case,), duration_s=1.0)


def test_gpu_run_pairs_against_a_fresh_estimate():
    e = estimate(SCEN, what_fits=False)
    m = Measurement(allocated_peak_bytes=int(e.peak_allocated_bytes), reserved_peak_bytes=int(1.2 * e.peak_reserved_bytes),
                    time_s=0.5 * e.time.step_s)
    mem, t = pairs_from_results([_results(m)], "run.json")
    assert mem.group == "e2e-a100-sxm-80gb" and mem.method == "lora" and mem.source == "run.json"
    assert residual(mem) == pytest.approx(math.log(1.2), abs=1e-6)  # reserved preferred over allocated
    assert residual(t) == pytest.approx(math.log(0.5))
    only_alloc = pairs_from_results([_results(Measurement(allocated_peak_bytes=int(e.peak_allocated_bytes)))], "r")
    assert len(only_alloc) == 1 and residual(only_alloc[0]) == pytest.approx(0.0, abs=1e-6)
    assert pairs_from_results([_results(m, status="oom")], "r") == []


# ------------------------------------------------------------------------------------------- CLI


def test_bands_command_writes_a_band_file_with_provenance(tmp_path, capsys):
    if not PUBLIC.exists():
        pytest.skip(f"{PUBLIC} not present")
    recs = [json.loads(line) for line in PUBLIC.read_text().splitlines() if line.strip()]
    small = tmp_path / "recs.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in recs[:200]))
    res = tmp_path / "results"
    res.mkdir()
    e = estimate(SCEN, what_fits=False)
    run = _results(Measurement(reserved_peak_bytes=int(1.1 * e.peak_reserved_bytes), time_s=e.time.step_s))
    (res / "e2e-a100-sxm-80gb-20260101T000000.json").write_text(run.model_dump_json())
    out = tmp_path / "bands.json"
    assert main(["bands", "--records", str(small), "--results", str(res), "--out", str(out), "--min-n", "10"]) == 0
    bands = parse_bands(out.read_text(), str(out))
    kinds = [s.kind for s in bands.provenance.sources]
    assert kinds == ["published", "gpu-run"]
    assert bands.provenance.sources[0].sha256 == sha256_of(small)
    assert bands.provenance.sources[1].n_pairs == 2
    assert bands.min_n == 10 and all(c.n >= 10 for c in bands.cells.values())
    assert bands.provenance.command == (f"python -m validate bands --records {small} --results {res} --out {out} "
                                        "--min-n 10")
    assert "memory" in capsys.readouterr().out


def test_band_file_must_name_its_cells_consistently():
    bands = build_bands(_pairs(GRID))
    d = json.loads(bands.model_dump_json())
    bad = copy.deepcopy(d)
    bad["cells"]["memory"]["groups"] = {"a": 1}
    with pytest.raises(ValueError, match="add up"):
        parse_bands(json.dumps(bad), "bad")


def test_bands_command_refuses_a_bad_results_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "e2e-x.json"
    bad.write_text('{"schema_version": 1, "cases": [')
    if not PUBLIC.exists():
        pytest.skip(f"{PUBLIC} not present")
    assert main(["bands", "--records", str(PUBLIC), "--results", str(bad), "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and not (tmp_path / "b.json").exists()
