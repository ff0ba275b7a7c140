"""The dashboard's knobs are read from the Scenario's fields; the state, the scenario dict and the URL
text are three forms of one scenario."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from app import exports, knobs
from app.knobs import Widget
from simulator import Scenario, estimate
from simulator.results import CATEGORIES


def test_every_laid_out_field_exists_and_has_a_widget():
    for field in knobs.laid_out_fields():
        assert field in Scenario.model_fields
    for knob in knobs.all_knobs():
        assert knob.widget is not Widget.NONE, f"{knob.key}: no widget for {knob.info.annotation}"
        assert knob.help == (knob.owner.model_fields[knob.name].description or "")


def test_shown_when_names_real_knobs():
    keys = {k.key for k in knobs.all_knobs()}
    for key, (other, values) in knobs.SHOWN_WHEN.items():
        assert key in keys and other in keys, key
        choices = next(k for k in knobs.all_knobs() if k.key == other).choices
        assert not choices or set(values) <= set(choices), (other, values)


def test_methods_share_knobs_they_type_alike():
    lora = {k.name: k.key for k in knobs.method_knobs("lora")}
    qlora = {k.name: k.key for k in knobs.method_knobs("qlora")}
    ia3 = {k.name: k.key for k in knobs.method_knobs("ia3")}
    assert lora["r"] == qlora["r"] == "method.r"
    assert lora["targets"] == qlora["targets"] == "method.targets"
    assert ia3["targets"] == "method.ia3.targets"  # IA3's targets cannot be 'all-linear'
    assert knobs.method_knobs("qlora")[0].name == "quant"  # the knobs most people change come first


def test_bounds_follow_the_field_constraints():
    r = next(k for k in knobs.method_knobs("lora") if k.name == "r")
    assert r.bounds() == (1, None)  # gt=0 on an int
    gen = next(k for k in knobs.workload_knobs("infer") if k.name == "gen_len")
    assert gen.bounds() == (0, None)
    dropout = next(k for k in knobs.method_knobs("lora") if k.name == "dropout")
    assert dropout.bounds() == (0.0, None)  # lt=1 on a float is left to the scenario's message


def test_default_state_is_a_valid_scenario():
    data = knobs.data_from_state(knobs.default_state())
    sc = Scenario.model_validate(data)
    assert sc.model.name == knobs.DEFAULT_MODEL and sc.method.kind == "full"
    assert knobs.compact(data) == {"model": knobs.DEFAULT_MODEL, "gpu": Scenario.model_fields["gpu"].default}


ROUND_TRIPS = [
    {"model": "llama-3.1-8b", "gpu": "rtx-4090-24gb", "workload": {"task": "train", "micro_batch": 4},
     "method": {"kind": "qlora", "quant": "gptq", "r": 16, "alpha": 32.0, "targets": "all-linear", "group_size": 64}},
    {"model": "gpt2", "gpu": "a10-24gb", "method": {"kind": "ia3", "targets": ["c_attn", "c_proj"]}, "precision": "fp32",
     "attention": "eager", "optimizer": {"name": "adafactor", "beta1": False}},
    {"model": "llama-3.2-1b", "gpu": "h100-sxm-80gb", "workload": {"task": "infer", "batch": 16, "gen_len": 0},
     "inference": {"weights": "nf4", "double_quant": True, "kv_dtype": "fp8"}},
    {"model": "qwen2.5-0.5b", "gpu": "l4-24gb", "method": {"kind": "prefix", "n_virtual_tokens": 8, "prefix_projection": True,
                                                          "encoder_hidden_size": 64},
     "checkpointing": {"mode": "every_k", "every_k": 2}, "loss": "chunked", "expandable_segments": True},
]


@pytest.mark.parametrize("data", ROUND_TRIPS)
def test_url_round_trip(data):
    state, problems = knobs.from_param(json.dumps(data))
    assert problems == []
    again = knobs.data_from_state(state)
    assert Scenario.model_validate(again) == Scenario.model_validate(data)
    text = knobs.to_param(again)
    assert json.loads(text) == knobs.compact(again)
    state2, problems2 = knobs.from_param(text)
    assert problems2 == [] and knobs.data_from_state(state2) == again


def test_state_keeps_other_methods_knobs():
    state, _ = knobs.state_from_data({"model": "llama-3.1-8b", "method": {"kind": "lora", "r": 64}})
    state["method.kind"] = "dora"
    assert knobs.data_from_state(state)["method"]["r"] == 64


def test_problems_name_the_field_and_the_rest_loads():
    state, problems = knobs.state_from_data({
        "model": "llama-3.1-8b", "gpu": "no-such-gpu",
        "workload": {"micro_batch": 0, "seq_len": 512},
        "method": {"kind": "lora", "r": 4, "alpha": -1, "rank": 3},
    })
    assert any(p.startswith("gpu: unknown device 'no-such-gpu'") for p in problems), problems
    assert "workload.micro_batch: Input should be greater than or equal to 1" in problems
    assert "method.alpha: Input should be greater than 0" in problems
    assert any(p.startswith("method.rank: unknown field") for p in problems)
    assert state["workload.seq_len"] == 512 and state["method.r"] == 4 and state["method.kind"] == "lora"
    assert state["gpu"] == knobs.default_state()["gpu"]


def test_unlaid_out_fields_pass_through():
    extra = next((f for f in Scenario.model_fields if f not in {"model", "gpu", "workload", *knobs.laid_out_fields()}), None)
    if extra is None:
        pytest.skip("every Scenario field is laid out")
    default = Scenario.model_fields[extra].get_default(call_default_factory=True)
    value = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
    state, problems = knobs.state_from_data({"model": "gpt2", extra: value})
    assert problems == [] and knobs.data_from_state(state)[extra] == value


def test_compare_list_param():
    datas = [knobs.data_from_state(knobs.default_state()), ROUND_TRIPS[0]]
    states, problems = knobs.list_from_param(knobs.list_to_param(datas))
    assert problems == [] and len(states) == 2 and states[1]["gpu"] == "rtx-4090-24gb"
    assert knobs.list_from_param("{}")[1] == ["expected a JSON list of scenarios, got dict"]
    assert knobs.list_from_param('[{"model": 3}]')[1][0].startswith("scenario 1: model:")


# -------------------------------------------------------------------------------------------- exports


def test_exports():
    sc = Scenario.model_validate({"model": "llama-3.1-70b", "gpu": "rtx-4090-24gb"})
    e = estimate(sc)
    assert Scenario.from_yaml(exports.scenario_yaml(sc)) == sc
    assert yaml.safe_load(exports.scenario_yaml(sc))["gpu"] == "rtx-4090-24gb"
    js = json.loads(exports.estimate_json(e, sc))
    assert js["peak_memory_bytes"] == e.peak_memory_bytes and js["scenario"]["gpu"] == "rtx-4090-24gb"
    rows = list(csv.DictReader(io.StringIO(exports.estimate_csv(e))))
    by = {(r["section"], r["quantity"]): r for r in rows}
    assert float(by[("summary", "peak_memory")]["value"]) == e.peak_memory_bytes
    assert by[("summary", "fits")]["value"] == "False"
    for c in CATEGORIES:
        assert float(by[("memory_at_peak", c)]["value"]) == getattr(e.memory_bytes, c)
    assert [r["quantity"] for r in rows if r["section"] == "suggestion"] == [s.change for s in e.suggestions]
    assert sum(r["section"] == "activations_by_layer" for r in rows) == len(e.activations_by_layer)


def test_cli_command():
    from app import cli

    cmd = cli.command(["--server.port", "8600"])
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app/streamlit_app.py")
    assert cmd[-2:] == ["--server.port", "8600"]


def test_workload_defaults_follow_the_model():
    # gpt2 has a learned 1024-position table: the Scenario shortens its default 2048-token sequence
    state, problems = knobs.state_from_data({"model": "gpt2"})
    assert problems == [] and state["workload.seq_len"] == 1024
    assert Scenario.model_validate(knobs.data_from_state(state)).workload.seq_len == 1024
    # switching back to a long-context model restores the default; a typed length stays
    assert knobs.rebase_workload(state, "llama-3.1-8b") == ["workload.seq_len"]
    assert state["workload.seq_len"] == 2048
    state["workload.seq_len"] = 4096
    assert knobs.rebase_workload(state, "gpt2") == [] and state["workload.seq_len"] == 4096
