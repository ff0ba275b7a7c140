"""Every page of the dashboard through streamlit's AppTest: renders, reacts to widgets, restores from the
URL, and shows invalid input as one line (never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("plotly")

from streamlit.testing.v1 import AppTest  # noqa: E402

from app import knobs  # noqa: E402
from hwprofiles import get_device, list_devices  # noqa: E402
from hwprofiles import get_system, list_systems, systems_of  # noqa: E402
from simulator import Scenario, estimate, from_hf_config  # noqa: E402
from simulator.config.parallel import ZeroStage  # noqa: E402
from simulator.report import fmt_seconds  # noqa: E402
from simulator.units import to_gib  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
TIMEOUT = 120  # seconds: a first run imports plotly and pandas and compiles cost tables on a 2-core machine
E = "e."  # widget-key prefix of the Estimate page

TINY_LLAMA = {  # a small Llama-style config.json, as a user would upload it
    "model_type": "llama", "_name_or_path": "acme/tiny-llama", "hidden_size": 256, "intermediate_size": 688,
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def run_app(page: str | None = None, **query: object) -> AppTest:
    """A fresh session, run once; ``page``: a file under app/app_pages/; ``query``: URL parameters
    (anything but a string is sent as JSON)."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v if isinstance(v, str) else json.dumps(v)
    at.run()
    if page is not None:
        at.switch_page(f"app_pages/{page}").run()
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; metrics: {[m.label for m in at.metric]}"
    return found[0]


def gib(n_bytes: float) -> str:
    return f"{to_gib(n_bytes):.2f} GiB"


def ok(at: AppTest) -> None:
    assert not at.exception, texts(at.exception)


def url_scenario(at: AppTest, param: str = "s"):
    return json.loads(at.query_params[param][0])


# ------------------------------------------------------------------------------------------ Estimate


def test_estimate_default_render():
    at = run_app()
    ok(at)
    assert not at.error, texts(at.error)
    e = estimate({"model": knobs.DEFAULT_MODEL})
    assert metric(at, "Peak memory") == gib(e.peak_memory_bytes)
    assert metric(at, "Peak phase") == e.peak_phase
    assert metric(at, "Largest micro-batch") == str(e.max_batch_that_fits)
    charts = at.get("plotly_chart")
    assert [c.key for c in charts] == ["fig.breakdown", "fig.timeline", "fig.activations", "fig.time"]
    assert metric(at, "GPUs") == "1" and metric(at, "System") == e.system
    assert metric(at, "Step time") == fmt_seconds(e.time.step_s)
    assert metric(at, "Tokens/s") == f"{e.time.tokens_per_s:,.0f}"
    assert metric(at, "Tokens/s per GPU") == f"{e.time.tokens_per_s_per_gpu:,.0f}"
    assert metric(at, "MFU") == f"{100 * e.time.mfu:.1f}%"
    assert metric(at, "$ per million tokens") == f"${e.cost.usd_per_million_tokens:,.4g}"
    assert metric(at, "kWh per million tokens") == f"{e.cost.kwh_per_million_tokens:,.4g} kWh"
    assert not [m for m in at.metric if m.label.startswith("Run ")]  # no total_tokens: per million tokens only
    assert any(e.cost.price_source in c for c in texts(at.caption))
    assert len(at.get("download_button")) == 3  # scenario YAML, result JSON, result CSV
    assert any("Fits" in s for s in texts(at.success))
    assert url_scenario(at) == {"model": knobs.DEFAULT_MODEL, "gpu": Scenario.model_fields["gpu"].default}


def test_help_text_is_the_field_docstring():
    at = run_app()
    from simulator.config import TrainWorkload

    assert at.number_input(key=E + "workload.micro_batch").help == TrainWorkload.model_fields["micro_batch"].description
    assert at.selectbox(key=E + "precision").help == Scenario.model_fields["precision"].description


def test_micro_batch_changes_the_peak_and_the_url():
    at = run_app()
    before = metric(at, "Peak memory")
    at.number_input(key=E + "workload.micro_batch").set_value(2).run()
    ok(at)
    after = metric(at, "Peak memory")
    assert after != before
    assert after == gib(estimate({"model": knobs.DEFAULT_MODEL, "workload": {"micro_batch": 2}}).peak_memory_bytes)
    assert url_scenario(at)["workload"] == {"task": "train", "micro_batch": 2}


def test_model_change_changes_the_peak():
    at = run_app()
    before = metric(at, "Peak memory")
    at.selectbox(key=E + "model").set_value("llama-3.2-1b").run()
    ok(at)
    assert metric(at, "Peak memory") != before
    assert metric(at, "Peak memory") == gib(estimate({"model": "llama-3.2-1b"}).peak_memory_bytes)


def test_short_context_model_gets_its_default_length():
    at = run_app()
    at.selectbox(key=E + "model").set_value("gpt2").run()  # learned 1024-position table
    ok(at)
    assert not at.error, texts(at.error)
    assert at.number_input(key=E + "workload.seq_len").value == 1024
    assert metric(at, "Peak memory") == gib(estimate({"model": "gpt2"}).peak_memory_bytes)
    at.number_input(key=E + "workload.seq_len").set_value(4096).run()
    assert any("exceeds model 'gpt2' max_position_embeddings=1024" in x for x in texts(at.error))


def test_qlora_in_fp32_shows_the_validation_message():
    at = run_app()
    at.selectbox(key=E + "method.kind").set_value("qlora").run()
    ok(at)
    assert not at.error
    at.selectbox(key=E + "precision").set_value("fp32").run()
    ok(at)
    errors = texts(at.error)
    assert len(errors) == 1 and errors[0].startswith("Invalid scenario: ")
    assert "QLoRA computes in 16-bit" in errors[0] and "\n" not in errors[0]
    assert not at.metric  # no numbers for an invalid scenario


def test_does_not_fit_shows_shortfall_and_suggestions():
    at = run_app()
    at.selectbox(key=E + "model").set_value("llama-3.1-70b").run()
    at.selectbox(key=E + "gpu").set_value("rtx-4090-24gb").run()
    ok(at)
    e = estimate({"model": "llama-3.1-70b", "gpu": "rtx-4090-24gb"})
    assert not e.fits and e.suggestions
    banner = " ".join(texts(at.error))
    assert "Does not fit" in banner and f"short by {gib(-e.headroom_bytes)}" in banner
    shown = " ".join(texts(at.markdown))
    for s in e.suggestions:
        assert s.change in shown and gib(s.peak_memory_bytes) in shown


def test_url_restores_the_widgets():
    sc = {"model": "meta-llama/Llama-3.1-8B", "gpu": "RTX 4090",
          "workload": {"micro_batch": 2, "seq_len": 1024},
          "method": {"kind": "qlora", "r": 16, "alpha": 32, "targets": "all-linear"},
          "checkpointing": {"mode": "full"}, "optimizer": {"name": "paged-adamw-8bit"}}
    at = run_app(s=sc)
    ok(at)
    assert not at.error, texts(at.error)
    assert at.selectbox(key=E + "model").value == "llama-3.1-8b"
    assert at.selectbox(key=E + "gpu").value == "rtx-4090-24gb"
    assert at.selectbox(key=E + "method.kind").value == "qlora"
    assert at.number_input(key=E + "method.r").value == 16
    assert at.number_input(key=E + "method.alpha").value == 32.0
    assert at.selectbox(key=E + "method.targets#mode").value == "all-linear"
    assert at.number_input(key=E + "workload.seq_len").value == 1024
    assert at.selectbox(key=E + "checkpointing.mode").value == "full"
    assert metric(at, "Peak memory") == gib(estimate(sc).peak_memory_bytes)


def test_shared_link_round_trip():
    at = run_app()
    at.selectbox(key=E + "method.kind").set_value("lora").run()
    at.number_input(key=E + "method.r").set_value(64).run()
    at.selectbox(key=E + "method.targets#mode").set_value("modules").run()
    at.multiselect(key=E + "method.targets#list").set_value(["q_proj", "k_proj", "v_proj"]).run()
    ok(at)
    link = at.query_params["s"][0]
    assert json.loads(link)["method"] == {"kind": "lora", "r": 64, "targets": ["q_proj", "k_proj", "v_proj"]}
    again = run_app(s=link)
    ok(again)
    assert metric(again, "Peak memory") == metric(at, "Peak memory")
    assert again.multiselect(key=E + "method.targets#list").value == ["q_proj", "k_proj", "v_proj"]


def test_hidden_knobs_keep_their_values():
    at = run_app()
    at.selectbox(key=E + "method.kind").set_value("lora").run()
    at.number_input(key=E + "method.r").set_value(32).run()
    at.selectbox(key=E + "method.kind").set_value("full").run()
    at.selectbox(key=E + "method.kind").set_value("dora").run()  # DoRA shares LoRA's rank
    ok(at)
    assert at.number_input(key=E + "method.r").value == 32


@pytest.mark.parametrize("param, expected", [
    ("{not json", "not JSON"),
    ({"model": "llama-3.1-7b"}, "closest: llama-3.1-70b, llama-3.1-8b"),
    ({"model": "llama-3.1-8b", "method": {"kind": "lora", "r": 0}}, "method.r: Input should be greater than 0"),
    ({"model": "llama-3.1-8b", "colour": "red"}, "colour: unknown field"),
    ([1, 2], "must be a mapping"),
])
def test_invalid_url_parameter_is_an_error_line(param, expected):
    at = run_app(s=param)
    ok(at)
    errors = texts(at.error)
    assert any(expected in x and x.startswith("The link's scenario has problems") for x in errors), errors
    assert metric(at, "Peak memory")  # the valid rest (or the defaults) is still estimated


def test_invalid_combination_in_the_url_shows_the_scenario_message():
    at = run_app(s={"model": "llama-3.1-8b", "method": {"kind": "qlora"}, "precision": "fp32"})
    ok(at)
    assert at.selectbox(key=E + "precision").value == "fp32"
    assert any("QLoRA computes in 16-bit" in x for x in texts(at.error))


def test_every_method_renders():
    at = run_app()
    for kind in knobs.method_classes():
        at.selectbox(key=E + "method.kind").set_value(kind).run()
        ok(at)
        if not at.error:  # BitFit on a model without biases is fine (a warning), the rest estimates
            assert metric(at, "Peak memory")
        assert at.selectbox(key=E + "method.kind").value == kind
        for knob in knobs.method_knobs(kind):
            if knob.shown(knobs.default_state() | {"method.kind": kind}) and knob.widget is knobs.Widget.INT:
                assert at.number_input(key=E + knob.key).value == knob.default


def test_inference_task():
    at = run_app()
    at.radio(key=E + "task").set_value("infer").run()
    at.number_input(key=E + "workload.batch").set_value(8).run()
    at.selectbox(key=E + "inference.kv_dtype").set_value("fp8").run()
    ok(at)
    sc = {"model": knobs.DEFAULT_MODEL, "workload": {"task": "infer", "batch": 8}, "inference": {"kv_dtype": "fp8"}}
    e = estimate(sc)
    assert metric(at, "Peak memory") == gib(e.peak_memory_bytes)
    assert metric(at, "Largest batch") == str(e.max_batch_that_fits)
    assert url_scenario(at)["workload"] == {"task": "infer", "batch": 8}
    timeline = at.get("plotly_chart")[1]
    assert json.loads(timeline.proto.spec)["data"][0]["x"] == ["prefill", "decode"]


def test_upload_config_json():
    at = run_app()
    at.file_uploader(key=E + "__upload").set_value(("config.json", json.dumps(TINY_LLAMA).encode(), "application/json")).run()
    ok(at)
    assert not at.error, texts(at.error)
    assert at.selectbox(key=E + "model").value == knobs.CUSTOM_MODEL
    arch = from_hf_config(TINY_LLAMA)
    assert metric(at, "Peak memory") == gib(estimate({"model": arch.model_dump()}).peak_memory_bytes)
    assert url_scenario(at)["model"]["name"] == "acme/tiny-llama"


def test_upload_of_an_unsupported_config_is_one_line():
    at = run_app()
    bad = {**TINY_LLAMA, "model_type": "mamba"}
    at.file_uploader(key=E + "__upload").set_value(("config.json", json.dumps(bad).encode(), "application/json")).run()
    ok(at)
    assert any(x.startswith("config.json: unsupported model_type 'mamba'") for x in texts(at.error)), texts(at.error)
    assert at.selectbox(key=E + "model").value == knobs.DEFAULT_MODEL


# ------------------------------------------------------------------------------- parallel, time, cost


def chart_spec(at: AppTest, key: str) -> dict:
    found = [c for c in at.get("plotly_chart") if c.key == key]
    assert found, f"no chart {key!r}: {[c.key for c in at.get('plotly_chart')]}"
    return json.loads(found[0].proto.spec)


def test_gpu_count_and_zero_stage_change_the_peak_and_the_step_time():
    at = run_app()
    one = estimate({"model": knobs.DEFAULT_MODEL})
    assert metric(at, "Step time") == fmt_seconds(one.time.step_s)
    at.number_input(key=E + "parallel.dp").set_value(4).run()
    ok(at)
    assert not [x for x in texts(at.error) if not x.startswith("**Does not fit**")], texts(at.error)
    dp4 = estimate({"model": knobs.DEFAULT_MODEL, "parallel": {"dp": 4}})
    assert metric(at, "GPUs") == "4"
    assert metric(at, "Peak memory") == gib(dp4.peak_memory_bytes)
    assert metric(at, "Step time") == fmt_seconds(dp4.time.step_s) != fmt_seconds(one.time.step_s)
    assert metric(at, "Tokens/s") == f"{dp4.time.tokens_per_s:,.0f}"
    at.selectbox(key=E + "parallel.zero").set_value(ZeroStage.PARAMETERS).run()
    ok(at)
    z3 = estimate({"model": knobs.DEFAULT_MODEL, "parallel": {"dp": 4, "zero": 3}})
    assert metric(at, "Peak memory") == gib(z3.peak_memory_bytes) != gib(dp4.peak_memory_bytes)
    assert metric(at, "Step time") == fmt_seconds(z3.time.step_s) != fmt_seconds(dp4.time.step_s)
    assert metric(at, "Model state per GPU") == gib(z3.model_state_bytes)
    assert url_scenario(at)["parallel"] == {"dp": 4, "zero": 3}
    assert at.number_input(key=E + "parallel.stage3_max_live_parameters")  # ZeRO-3's own knobs appear


def test_offload_shows_host_memory_per_rank():
    sc = {"model": knobs.DEFAULT_MODEL, "parallel": {"dp": 4, "zero": 3, "offload_optimizer": "cpu"}}
    at = run_app(s=sc)
    ok(at)
    assert not at.error, texts(at.error)
    e = estimate(sc)
    assert e.host_memory_bytes > 0
    assert metric(at, "Host RAM per rank") == gib(e.host_memory_bytes)
    assert at.selectbox(key=E + "parallel.offload_optimizer").value == "cpu"


@pytest.mark.parametrize("key, value, message", [
    ("parallel.tp", 3, "parallel.tp=3 does not divide the model's n_heads=32"),
    ("parallel.fsdp", "full_shard", "choose DeepSpeed ZeRO or FSDP, not both"),
])
def test_invalid_layout_shows_the_validation_message(key, value, message):
    at = run_app()
    if key == "parallel.fsdp":
        at.selectbox(key=E + "parallel.zero").set_value(ZeroStage.OPTIMIZER).run()
    widget = at.number_input(key=E + key) if isinstance(value, int) else at.selectbox(key=E + key)
    widget.set_value(value).run()
    ok(at)
    errors = texts(at.error)
    assert len(errors) == 1 and errors[0].startswith("Invalid scenario: ") and message in errors[0], errors
    assert "\n" not in errors[0]
    assert not at.metric


def test_pipeline_parallel_shows_the_stage_figure():
    at = run_app()
    assert not [c for c in at.get("plotly_chart") if c.key == "fig.stages"]  # one stage: no figure
    at.number_input(key=E + "parallel.pp").set_value(2).run()
    at.number_input(key=E + "workload.grad_accum").set_value(4).run()
    ok(at)
    assert not at.error, texts(at.error)
    e = estimate({"model": knobs.DEFAULT_MODEL, "parallel": {"pp": 2}, "workload": {"grad_accum": 4}})
    bars, capacity = chart_spec(at, "fig.stages")["data"]
    assert bars["x"] == ["stage 0", "stage 1"]
    assert bars["customdata"] == [e.stage_peak_bytes[0], e.stage_peak_bytes[1]]
    assert capacity["customdata"][0] == e.device_memory_bytes
    time = chart_spec(at, "fig.time")["data"]
    assert "pipeline bubble" in [t["name"] for t in time]
    assert metric(at, "Step time") == fmt_seconds(e.time.step_s)


def test_system_picker_and_total_tokens():
    at = run_app()
    picker = at.selectbox(key=E + "system")
    gpu = Scenario.model_fields["gpu"].default
    # a system holds one GPU kind: the picker offers the chosen GPU's
    assert picker.value is None and list(picker.options)[1:] == systems_of(gpu) == ["dgx-h100"]
    picker.set_value("dgx-h100").run()
    at.number_input(key=E + "workload.total_tokens").set_value(1e9).run()
    ok(at)
    assert not at.error, texts(at.error)
    sc = {"model": knobs.DEFAULT_MODEL, "system": "dgx-h100", "workload": {"total_tokens": 1e9}}
    e = estimate(sc)
    assert metric(at, "System") == "dgx-h100"
    assert metric(at, "Run time") == fmt_seconds(e.cost.run_time_s)
    assert metric(at, "Run cost") == f"${e.cost.run_usd:,.4g}"
    assert metric(at, "Run energy") == f"{e.cost.run_kwh:,.4g} kWh"
    assert url_scenario(at)["system"] == "dgx-h100"
    assert url_scenario(at)["workload"] == {"task": "train", "total_tokens": 1e9}
    # a link naming another kind's system keeps it selectable and says why it does not apply
    other = run_app(s={"model": knobs.DEFAULT_MODEL, "system": "grand-teton-h100"})
    assert "system: 'grand-teton-h100' holds h100-sxm-96gb GPUs, not gpu 'h100-sxm-80gb'" in " ".join(texts(other.error))


def test_parallel_link_restores_the_widgets():
    sc = {"model": "llama-3.1-8b", "parallel": {"dp": 2, "tp": 2, "sp": True, "pp": 2, "pp_schedule": "interleaved",
                                                "pp_virtual": 2, "zero": 1}, "workload": {"grad_accum": 4}}
    at = run_app(s=sc)
    ok(at)
    assert not at.error, texts(at.error)
    assert at.number_input(key=E + "parallel.tp").value == 2
    assert at.checkbox(key=E + "parallel.sp").value is True
    assert at.selectbox(key=E + "parallel.pp_schedule").value == "interleaved"
    assert at.number_input(key=E + "parallel.pp_virtual").value == 2
    e = estimate(sc)
    assert metric(at, "GPUs") == str(e.n_gpus) == "8"
    assert metric(at, "Peak memory") == gib(e.peak_memory_bytes)


def test_inference_time_is_prefill_and_decode():
    sc = {"model": knobs.DEFAULT_MODEL, "workload": {"task": "infer", "batch": 4}}
    at = run_app(s=sc)
    ok(at)
    e = estimate(sc)
    assert metric(at, "Step time") == fmt_seconds(e.time.step_s)
    assert [t["meta"] for t in chart_spec(at, "fig.time")["data"]] == ["prefill_s", "decode"]


# ------------------------------------------------------------------------------------------- Compare


def compare_table(at: AppTest):
    return at.dataframe[0].value


def test_compare_default_render():
    at = run_app("compare.py")
    ok(at)
    df = compare_table(at)
    assert list(df["#"]) == [1, 2, 3]
    methods = ({"kind": "full"}, {"kind": "lora", "targets": "all-linear"}, {"kind": "qlora", "targets": "all-linear"})
    full, lora, qlora = (estimate({"model": knobs.DEFAULT_MODEL, "method": m}) for m in methods)
    assert list(df["peak (GiB)"]) == [round(to_gib(x.peak_memory_bytes), 2) for x in (full, lora, qlora)]
    assert df["Δ peak vs #1"][0] == "+0.00 GiB (+0.0%)"
    assert df["Δ peak vs #1"][1].startswith(f"{to_gib(lora.peak_memory_bytes) - to_gib(full.peak_memory_bytes):+.2f} GiB")
    assert len(at.get("plotly_chart")) == 1
    assert len(json.loads(at.query_params["c"][0])) == 3
    assert list(df["step time (s)"]) == [x.time.step_s for x in (full, lora, qlora)]
    assert list(df["tokens/s"]) == [round(x.time.tokens_per_s) for x in (full, lora, qlora)]
    assert list(df["$ / M tokens"]) == [x.cost.usd_per_million_tokens for x in (full, lora, qlora)]


def test_compare_size_and_invalid_column():
    at = run_app("compare.py")
    at.radio(key="c.n").set_value(2).run()
    ok(at)
    assert list(compare_table(at)["#"]) == [1, 2]
    at.selectbox(key="c1.method.kind").set_value("qlora").run()
    at.selectbox(key="c1.precision").set_value("fp32").run()
    ok(at)
    assert any("QLoRA computes in 16-bit" in x for x in texts(at.error))
    assert list(compare_table(at)["fits"])[1] == "invalid"


def test_compare_starts_from_the_estimate_page():
    at = run_app()
    at.radio(key=E + "task").set_value("infer").run()
    at.selectbox(key=E + "gpu").set_value("l4-24gb").run()
    at.switch_page("app_pages/compare.py").run()
    ok(at)
    df = compare_table(at)
    assert list(df["scenario"]) == [f"{knobs.DEFAULT_MODEL} infer on l4-24gb"] * 3
    weights = [at.selectbox(key=f"c{i}.inference.weights").value for i in range(3)]
    assert weights == ["none", "int8", "awq"]
    expected = [estimate({"model": knobs.DEFAULT_MODEL, "gpu": "l4-24gb", "workload": {"task": "infer"},
                          "inference": {"weights": w}}) for w in weights]
    assert list(df["peak (GiB)"]) == [round(to_gib(x.peak_memory_bytes), 2) for x in expected]


def test_compare_restores_from_the_url():
    scenarios = [{"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "lora"}},
                 {"model": "llama-3.1-8b", "gpu": "rtx-4090-24gb", "method": {"kind": "lora"}}]
    at = run_app()
    at.query_params["c"] = json.dumps(scenarios)
    at.switch_page("app_pages/compare.py").run()
    ok(at)
    df = compare_table(at)
    assert list(df["peak (GiB)"]) == [round(to_gib(estimate(s).peak_memory_bytes), 2) for s in scenarios]
    assert at.selectbox(key="c1.gpu").value == "rtx-4090-24gb"


# ------------------------------------------------------------------------------------------ Hardware


def test_hardware_page():
    at = run_app("hardware.py")
    ok(at)
    assert at.selectbox(key="hw.device").value == Scenario.model_fields["gpu"].default  # the Estimate page's GPU
    table = at.dataframe[0].value
    assert list(table["device"]) == list_devices()
    assert len(at.get("plotly_chart")) == 1
    at.selectbox(key="hw.device").set_value("rtx-4090-24gb").run()
    ok(at)
    d = get_device("rtx-4090-24gb")
    eff = at.dataframe[1].value.set_index("figure")
    assert eff.loc["matmul_curve", "source"] == d.sources["efficiency.matmul_curve"]
    assert eff.loc["memory_bandwidth_fraction", "value"] == str(d.efficiency.memory_bandwidth_fraction)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "RTX 4090" in spec["layout"]["title"]["text"]
    systems = at.dataframe[2].value.set_index("system")
    assert list(systems.index) == list_systems()
    dgx = get_system("dgx-h100")
    assert systems.loc["dgx-h100", "GPUs / node"] == dgx.gpus_per_node
    assert systems.loc["dgx-h100", "peak busbw (GB/s)"] == dgx.intra_node.peak_busbw_GBps


# ---------------------------------------------------------------------------------------------- Plan

PLAN_GPUS = ["rtx-4090-24gb", "a100-sxm-80gb"]


def small_plan(at: AppTest, **extra: object) -> AppTest:
    """The Plan page set to llama-3.2-1b on two GPU types, at most 4 GPUs, 50M tokens; ``extra``: more
    widget values by key suffix (number inputs)."""
    at.selectbox(key="p.model").set_value("llama-3.2-1b")
    at.multiselect(key="p.gpus").set_value(PLAN_GPUS)
    at.selectbox(key="p.max_gpus").set_value(4)
    at.text_input(key="p.tokens").set_value("50M")
    for k, v in extra.items():
        at.number_input(key="p." + k).set_value(v)
    return at.button(key="p.run").click().run()


def test_plan_page_best_row_is_the_planners():
    from simulator.planner import plan

    at = run_app("plan.py")
    ok(at)
    assert not at.error and any("press **Plan**" in x for x in texts(at.info))
    small_plan(at)
    ok(at)
    assert not at.error, texts(at.error)
    res = plan("llama-3.2-1b", "finetune", {"max_gpus": 4}, "cost", {"gpus": PLAN_GPUS, "gpu_counts": [1, 2, 4]},
               pareto=False, total_tokens=50e6, seq_len=2048)
    b = res.best
    assert metric(at, "Setup") == f"{b.n_gpus}x {b.gpu}"
    assert metric(at, "Peak memory") == gib(b.peak_memory_bytes)
    assert metric(at, "Step time") == fmt_seconds(b.step_time_s)
    assert metric(at, "Run time") == fmt_seconds(b.run_time_s)
    assert metric(at, "Run cost") == f"${b.run_usd:,.4g}"
    ranked = at.dataframe[0].value
    assert len(ranked) == len(res.ranked)
    first = ranked.iloc[0]
    assert first["GPUs"] == f"{b.n_gpus}x {b.gpu}" and first["method"] == b.method and first["parallel"] == b.parallel
    assert first["run cost ($)"] == pytest.approx(b.run_usd)
    assert [c.key for c in at.get("plotly_chart")] == ["fig.plan"]
    assert len(at.dataframe[1].value) == len(res.pareto)
    assert len(at.dataframe) == 2 + bool(res.rejected_reasons)  # ranked, Pareto front, ruled out
    if res.rejected_reasons:
        assert list(at.dataframe[2].value["ruled out because"]) == list(res.rejected_reasons.values())

    # the best row opens on the Estimate page with its scenario
    at.button(key="p.open").click().run()
    ok(at)
    assert at.selectbox(key=E + "model").value == "llama-3.2-1b"
    assert at.selectbox(key=E + "gpu").value == b.gpu
    assert metric(at, "Peak memory") == gib(estimate(b.scenario).peak_memory_bytes)
    assert metric(at, "Step time") == fmt_seconds(b.step_time_s)


def test_plan_page_searches_the_checkpointing_modes_chosen():
    at = run_app("plan.py")
    assert at.multiselect(key="p.checkpointing").value == ["none", "full"]
    assert "selective" in at.multiselect(key="p.checkpointing").options
    at.multiselect(key="p.checkpointing").set_value(["selective"])
    small_plan(at)
    ok(at)
    assert not at.error, texts(at.error)
    assert set(at.dataframe[0].value["checkpointing"]) == {"selective"}


def test_plan_page_too_small_budget_names_the_binding_constraint():
    at = small_plan(run_app("plan.py"), budget=0.01)
    ok(at)
    errors = texts(at.error)
    assert len(errors) == 1 and "budget_usd=$0.01 is binding" in errors[0] and "\n" not in errors[0]
    assert not at.metric


def test_plan_page_budget_without_tokens_is_one_line():
    at = run_app("plan.py")
    at.text_input(key="p.tokens").set_value("")
    at.number_input(key="p.budget").set_value(100.0)
    at.button(key="p.run").click().run()
    ok(at)
    errors = texts(at.error)
    assert len(errors) == 1 and "total_tokens" in errors[0]
    at.text_input(key="p.tokens").set_value("lots").run()
    ok(at)
    assert any("not a token count" in x for x in texts(at.error))


# ---------------------------------------------------------------------------------------- Validation


def test_validation_page_without_records(tmp_path, monkeypatch):
    monkeypatch.setenv("FITSIM_PUBLISHED", str(tmp_path / "absent.jsonl"))
    at = run_app("validation.py")
    ok(at)
    infos = texts(at.info)
    assert any("No published records" in x for x in infos)
    assert any("No GPU measurement results" in x or "validate/results" in x for x in infos) or at.dataframe


def test_validation_page_scores_the_published_records(tmp_path, monkeypatch):
    """The published part alone: the committed GPU results (validate/results/) add a chart of their own, so the
    page reads an empty results folder here (test_validation_page_compares_gpu_results covers that part)."""
    from app.loaders import published_path

    monkeypatch.setenv("FITSIM_RESULTS", str(tmp_path))
    from validate.published import load_jsonl, predict_records
    from validate.score import score

    path = published_path()
    if not path.is_file():
        pytest.skip(f"{path} not present")
    at = run_app("validation.py")
    ok(at)
    records = load_jsonl(path)
    scores = score(records, predict_records(records))
    table = at.dataframe[0].value
    assert list(table["group"]) == list(scores)
    assert list(table["predicted"]) == [r["n_ok"] for r in scores.values()]
    assert len(at.get("plotly_chart")) == 1


def test_validation_page_compares_gpu_results(tmp_path, monkeypatch):
    """A results file of our own GPU runs is read with the results schema, compared with the engine and
    summarised; a truncated one is named in a warning, not a traceback."""
    from simulator import estimate
    from validate.e2e import gpu_grid
    from validate.schema import SCHEMA_VERSION, CaseResult, Fingerprint, Measurement, ResultsFile, write_results

    case = next(c for c in gpu_grid() if c.case_id == "e2e/train/llama-3.2-1b/lora-r16/bf16/s2048-b4")
    e = estimate(case.scenario)
    fp = Fingerprint(platform="cuda", device_name="NVIDIA H100 80GB HBM3", device_count=1,
                     device_profile="h100-sxm-80gb", python="3.12", packages={"torch": "2.11.0"})
    res = ResultsFile(schema_version=SCHEMA_VERSION, suite="e2e", created_utc="2026-11-23T10:00:00+00:00",
                      command="python -m validate run --suite e2e --shard 1/3", fingerprint=fp, duration_s=1.0,
                      cases=(CaseResult(case_id=case.case_id, suite="e2e", kind="train", spec=case.spec(), status="ok",
                                        measured=Measurement(allocated_peak_bytes=round(e.peak_allocated_bytes / 1.2),
                                                             reserved_peak_bytes=round(e.peak_reserved_bytes),
                                                             time_s=e.time.step_s * 2)),))
    path = write_results(res, tmp_path)
    (tmp_path / "broken.json").write_text(path.read_text()[:100])
    monkeypatch.setenv("FITSIM_RESULTS", str(tmp_path))
    monkeypatch.setenv("FITSIM_PUBLISHED", str(tmp_path / "absent.jsonl"))
    at = run_app("validation.py")
    ok(at)
    assert any("truncated" in w for w in texts(at.warning))
    files, summary = at.dataframe[0].value, at.dataframe[1].value
    assert list(files["cases"]) == [1] and list(files["profile"]) == ["h100-sxm-80gb"]
    by_metric = dict(zip(summary["metric"], summary["median |error|"]))
    assert by_metric["allocated"] == "20.0%" and by_metric["reserved"] == "0.0%" and by_metric["time"] == "50.0%"
    assert len(at.get("plotly_chart")) >= 1


def test_plan_page_sizes_a_serving_fleet_like_the_library():
    """Task infer with a request rate: the page shows the planner's best fleet and its ranked fleets."""
    from simulator.planner import plan

    at = run_app("plan.py")
    at.selectbox(key="p.model").set_value("llama-3.2-1b")
    at.radio(key="p.task").set_value("infer").run()
    at.multiselect(key="p.gpus").set_value(["l4-24gb", "a100-sxm-80gb"])
    at.selectbox(key="p.max_gpus").set_value(8)
    at.number_input(key="p.rate").set_value(5.0)
    at.number_input(key="p.tpot").set_value(50.0)
    at.button(key="p.run").click().run()
    ok(at)
    assert not at.error, texts(at.error)
    res = plan("llama-3.2-1b", "infer", {"max_gpus": 8, "max_tpot_s": 0.05}, "cost",
               {"gpus": ["l4-24gb", "a100-sxm-80gb"], "gpu_counts": [1, 2, 4, 8]}, pareto=False,
               request_rate_per_s=5.0, prompt_len=512, gen_len=256)
    s = res.best.serving
    assert metric(at, "TTFT p99") == fmt_seconds(s.ttft_p99_s)
    assert metric(at, "Utilization") == f"{100 * s.utilization:.0f}%"
    fleets = at.dataframe[0].value
    assert len(fleets) == len(res.ranked)
    assert fleets.iloc[0]["replicas x GPUs"] == f"{s.replicas} x {s.gpus_per_replica}"
    at.number_input(key="p.rate").set_value(None)
    at.button(key="p.run").click().run()
    ok(at)
    assert any("give a request rate" in x for x in texts(at.error))
