"""The published-measurements adapter (validate/published.py) and its scoring (validate/score.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from validate.published import memory_unit, predict_record, predict_records, record_to_scenario
from validate.score import group_of, quantile, score

PUBLIC = Path(__file__).parents[2].parent / "shared/published/public.jsonl"
KEYS = {"id", "predicted", "unit", "status", "reason"}


def _public() -> list[dict]:
    if not PUBLIC.exists():
        pytest.skip(f"{PUBLIC} not present")
    return [json.loads(line) for line in PUBLIC.read_text(encoding="utf-8").splitlines() if line.strip()]


def _record(**scenario_upd) -> dict:
    """A hand-made single-GPU LoRA record on a catalog model (Llama-2-7B, A100 40GB)."""
    sc = {
        "task": "train",
        "model": {"name": "Llama-2-7b", "hf_id": "meta-llama/Llama-2-7b-hf", "family": "llama"},
        "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "weight_quant": "none", "double_quant": None, "precision": "bf16-pure", "optimizer": "adamw",
        "micro_batch": 1, "seq_len": 1024, "grad_accum": 1, "checkpointing": "none", "attention": "sdpa",
        "n_gpus": 1, "n_nodes": 1, "parallel": {}, "inference": None, "gpu": "A100-SXM-40GB",
        "framework": "litgpt", "unstated": [],
    }
    sc.update(scenario_upd)
    return {
        "id": "hand-001",
        "scenario": sc,
        "target": {"metric": "peak_memory_per_gpu_GB", "value": 20.0, "measured_how": "allocated", "per": "gpu",
                   "comparable": True, "unit_note": "GB = 1e9 bytes (stated by source script)"},
    }


def test_public_runs_without_exception_and_lines_have_the_keys():
    recs = _public()
    preds = predict_records(recs)
    assert len(preds) == len(recs)
    for r, p in zip(recs, preds):
        assert KEYS <= p.keys()
        assert p["id"] == r["id"]
        assert p["status"] in ("ok", "unsupported")
        if p["status"] == "ok":
            assert p["predicted"] is not None
        else:
            assert p["reason"]
        json.dumps(p)  # every line is JSON


def test_public_single_gpu_memory_records_mostly_ok():
    recs = [r for r in _public()
            if r["scenario"]["n_gpus"] == 1 and r["target"]["metric"] == "peak_memory_per_gpu_GB"
            and r["target"]["comparable"]]
    preds = predict_records(recs)
    ok = sum(p["status"] == "ok" for p in preds)
    assert ok / len(recs) > 0.8, [(p["id"], p["reason"]) for p in preds if p["status"] != "ok"]


def test_multi_gpu_and_speed_records_are_predicted():
    one = predict_record(_record())
    r = _record(n_gpus=8)
    r["scenario"]["parallel"] = {"zero_stage": 3}
    eight = predict_record(r)
    assert one["status"] == eight["status"] == "ok", (one["reason"], eight["reason"])
    assert eight["predicted"] < one["predicted"]  # ZeRO-3 over 8 ranks: less per GPU
    r = _record()
    r["target"] = {**r["target"], "metric": "step_time_s"}
    p = predict_record(r)
    assert p["status"] == "ok" and p["unit"] == "s" and p["predicted"] > 0
    r["target"] = {**r["target"], "metric": "run_time_s"}
    p = predict_record(r)
    assert p["status"] == "unsupported" and "tokens of the run" in p["reason"]


def test_public_comparable_records_mostly_ok():
    recs = [r for r in _public() if r["target"]["comparable"]]
    preds = predict_records(recs)
    ok = sum(p["status"] == "ok" for p in preds)
    assert ok / len(recs) > 0.8, [(p["id"], p["reason"]) for p in preds if p["status"] != "ok"]


def test_unknown_model_is_unsupported():
    r = _record(model={"name": "NoSuchModel-3B", "hf_id": "nobody/NoSuchModel-3B", "family": "llama",
                       "n_params": 3e9, "n_layers": None, "hidden": None})
    p = predict_record(r)
    assert p["status"] == "unsupported"
    assert "n_params" in p["reason"] or "catalog" in p["reason"]
    assert p["predicted"] is None


def test_unknown_model_with_full_arch_is_built():
    r = _record(model={"name": "tiny-llama-like", "hf_id": None, "family": "llama", "n_layers": 2, "hidden": 256,
                       "n_heads": 4, "n_kv_heads": 4, "intermediate": 512, "vocab": 1000, "head_dim": 64,
                       "tied_embeddings": False, "moe": None})
    notes: list[str] = []
    sc = record_to_scenario(r, notes)
    assert sc.model.n_layers == 2 and sc.model.family == "llama"
    assert predict_record(r)["status"] == "ok"


def test_other_gpu_is_unsupported():
    p = predict_record(_record(gpu="other:not stated"))
    assert p["status"] == "unsupported" and "gpu" in p["reason"]


def test_unit_and_measured_field():
    # 1e9 stated -> GB; GiB stated -> GiB; unclear -> GiB (torch tools print bytes / 2**30 as "GB").
    assert memory_unit({"unit_note": "GB = 1e9 bytes (stated by source script)"})[0] == "GB"
    assert memory_unit({"unit_note": "GiB (2^30 bytes) as published"})[0] == "GiB"
    assert memory_unit({"unit_note": "GB as printed; GB vs GiB not stated by source"})[0] == "GiB"
    r = _record()
    p_alloc = predict_record(r)
    r2 = copy.deepcopy(r)
    r2["target"]["measured_how"] = "nvidia-smi"
    p_smi = predict_record(r2)
    assert p_alloc["unit"] == "GB" and p_alloc["status"] == "ok"
    # nvidia-smi adds the allocator cache and the CUDA context to what torch allocated.
    assert p_smi["predicted"] > p_alloc["predicted"]


def test_unstated_fields_take_framework_defaults():
    r = _record(precision=None, attention=None, checkpointing=None, framework="torchtune",
                unstated=["precision", "attention", "checkpointing"])
    notes: list[str] = []
    sc = record_to_scenario(r, notes)
    assert sc.precision == "bf16" and sc.checkpointing.mode == "full" and sc.attention == "sdpa-flash"
    assert any("unstated" in n for n in notes)


def test_fits_record():
    r = _record()
    r["target"] = {"metric": "fits", "value": True, "measured_how": "n/a", "comparable": True}
    p = predict_record(r)
    assert p["status"] == "ok" and isinstance(p["predicted"], bool)


def test_group_and_quantile():
    assert group_of("qwen1-ft-037") == "qwen1-ft"
    assert group_of("hf-blog-4bit-001") == "hf-blog-4bit"
    # linear interpolation: sorted [1, 2, 3, 4]; q=0.5 -> position 1.5 -> 2.5; q=0.9 -> position 2.7 -> 3.7
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.9) == pytest.approx(3.7)


def test_score_arithmetic_on_hand_made_pair():
    recs = [
        {"id": "src-a-001", "target": {"metric": "peak_memory_per_gpu_GB", "value": 10.0, "comparable": True}},
        {"id": "src-a-002", "target": {"metric": "peak_memory_per_gpu_GB", "value": 20.0, "comparable": True}},
        {"id": "src-a-003", "target": {"metric": "fits", "value": False, "comparable": True}},
        {"id": "src-a-004", "target": {"metric": "step_time_s", "value": 1.0, "comparable": True}},
        {"id": "src-b-001", "target": {"metric": "peak_memory_per_gpu_GB", "value": 8.0, "comparable": False}},
    ]
    preds = [
        {"id": "src-a-001", "predicted": 12.0, "unit": "GB", "status": "ok", "reason": None},   # |12-10|/10 = 0.2
        {"id": "src-a-002", "predicted": 19.0, "unit": "GB", "status": "ok", "reason": None},   # |19-20|/20 = 0.05
        {"id": "src-a-003", "predicted": True, "unit": None, "status": "ok", "reason": None},   # wrong
        {"id": "src-a-004", "predicted": None, "unit": None, "status": "unsupported", "reason": "speed"},
        {"id": "src-b-001", "predicted": 4.0, "unit": "GB", "status": "ok", "reason": None},    # 0.5, not comparable
    ]
    t = score(recs, preds)
    a = t["src-a"]
    assert (a["n"], a["n_comparable"], a["n_ok"]) == (4, 4, 3)
    assert a["coverage"] == pytest.approx(3 / 4)
    errs = sorted([abs(12 - 10) / 10, abs(19 - 20) / 20])  # [0.05, 0.2]
    assert a["median"] == pytest.approx((errs[0] + errs[1]) / 2)  # 0.125
    assert a["p90"] == pytest.approx(errs[0] + 0.9 * (errs[1] - errs[0]))  # 0.185
    assert a["fits_accuracy"] == 0.0
    b = t["src-b"]
    assert b["n_comparable"] == 0 and b["coverage"] is None and b["median"] is None
    assert b["median_all"] == pytest.approx(0.5)
    # "all": comparable numeric errors are still only src-a's two
    assert t["all"]["n_ok"] == 3 and t["all"]["median"] == pytest.approx(0.125)
