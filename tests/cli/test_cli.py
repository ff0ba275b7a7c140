"""The `fitsim` command line: reports, --json, scenario files with flag overrides, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from hwprofiles import list_devices
from simulator import Scenario, estimate, list_models
from simulator.cli import SCENARIO_TEMPLATE, main

REPO = pathlib.Path(__file__).resolve().parents[2]
README_ARGS = ["estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--method", "qlora",
               "--seq-len", "2048", "--micro-batch", "4"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def assert_one_line_error(rc: int, out: str, err: str) -> str:
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fitsim: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------ estimate


def test_readme_command_prints_verdict_and_sizes(capsys):
    rc, out, err = run(capsys, *README_ARGS)
    assert rc == 0 and err == ""
    e = estimate({"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "qlora"},
                  "workload": {"task": "train", "seq_len": 2048, "micro_batch": 4}})
    verdict = "FITS with" if e.fits else "DOES NOT FIT: short by"
    assert verdict in out
    assert "GiB" in out
    for section in ("Peak memory", "Breakdown at the peak", "Allocated peak per phase", "FLOPs",
                    "What fits on this GPU", "Top activation consumers"):
        assert section in out
    assert f"during {e.peak_phase}" in out
    # the QLoRA knobs and the workload are echoed
    assert "qlora (quant=nf4" in out and "micro-batch 4 x seq_len 2048" in out
    assert "optimizer adamw (foreach)," in out  # torch's implementation, which sets its memory and time


def test_the_torch_implementation_is_shown_only_for_torch_optimizers(capsys):
    for optimizer, shown in (("paged-adamw-8bit", "optimizer paged-adamw-8bit,"), ("adafactor", "optimizer adafactor,"),
                             ("sgd-momentum", "optimizer sgd-momentum (foreach),")):
        rc, out, _ = run(capsys, *README_ARGS, "--optimizer", optimizer)
        assert rc == 0 and shown in out, optimizer


def test_json_has_the_estimate_and_the_scenario(capsys):
    d = run_json(capsys, *README_ARGS)
    for key in ("fits", "peak_memory_bytes", "memory_bytes", "flops_per_step", "scenario"):
        assert key in d
    e = estimate(Scenario.model_validate(d["scenario"]))
    assert d["fits"] == e.fits
    assert d["peak_memory_bytes"] == e.peak_memory_bytes
    assert d["flops_per_step"] == e.flops_per_step
    assert d["scenario"]["method"]["kind"] == "qlora"
    assert d["scenario"]["workload"] == {"task": "train", "micro_batch": 4, "seq_len": 2048, "grad_accum": 1,
                                         "total_tokens": None}
    assert d["scenario"]["gpu"] == "h100-sxm-80gb"


def test_yaml_file_and_flags_override_it(capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "model": "gpt2", "gpu": "a100-sxm-80gb",
        "workload": {"task": "train", "micro_batch": 2, "seq_len": 512},
        "method": {"kind": "lora", "r": 4, "targets": ["c_attn"]},
    }))
    d = run_json(capsys, "estimate", str(path))
    sc = d["scenario"]
    assert (sc["gpu"], sc["workload"]["micro_batch"], sc["workload"]["seq_len"]) == ("a100-sxm-80gb", 2, 512)
    assert (sc["method"]["kind"], sc["method"]["r"], sc["method"]["targets"]) == ("lora", 4, ["c_attn"])

    d = run_json(capsys, "estimate", str(path), "--gpu", "l4-24gb", "--seq-len", "256", "--r", "8")
    sc = d["scenario"]
    assert sc["gpu"] == "l4-24gb" and d["gpu"] == "l4-24gb"
    assert sc["workload"]["seq_len"] == 256 and sc["workload"]["micro_batch"] == 2  # file value kept
    assert sc["method"]["r"] == 8 and sc["method"]["targets"] == ["c_attn"]  # file value kept
    # same numbers as the library on the same dict
    e = estimate({"model": "gpt2", "gpu": "l4-24gb", "workload": {"task": "train", "micro_batch": 2, "seq_len": 256},
                  "method": {"kind": "lora", "r": 8, "targets": ["c_attn"]}})
    assert d["peak_memory_bytes"] == e.peak_memory_bytes


def test_switching_method_or_task_drops_the_files_other_knobs(capsys, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: gpt2\nworkload: {task: train, seq_len: 128}\nmethod: {kind: lora, r: 4, targets: [c_attn]}\n")
    sc = run_json(capsys, "estimate", str(path), "--method", "full")["scenario"]
    assert sc["method"] == {"kind": "full"}
    sc = run_json(capsys, "estimate", str(path), "--method", "full", "--task", "infer", "--batch", "3")["scenario"]
    assert sc["workload"] == {"task": "infer", "batch": 3, "prompt_len": 512, "gen_len": 256, "prefill_logits": "last"}
    # --quant turns the file's LoRA into QLoRA and keeps its adapter settings
    sc = run_json(capsys, "estimate", str(path), "--quant", "nf4")["scenario"]
    assert (sc["method"]["kind"], sc["method"]["r"], sc["method"]["targets"]) == ("qlora", 4, ["c_attn"])


def test_inference_flags_imply_the_infer_task(capsys):
    d = run_json(capsys, "estimate", "--model", "gpt2", "--batch", "2", "--prompt-len", "64", "--gen-len", "8",
                 "--kv-dtype", "fp8")
    assert d["task"] == "infer" and set(d["phase_allocated_bytes"]) == {"prefill", "decode"}
    assert d["scenario"]["inference"]["kv_dtype"] == "fp8"
    # tokens of one generation: batch x (prompt + generated)
    assert d["tokens_per_step"] == 2 * (64 + 8)


def test_every_k_implies_the_mode_and_targets_parse(capsys):
    sc = run_json(capsys, "estimate", "--model", "llama-3.2-1b", "--every-k", "4", "--targets", "q_proj, k_proj,v_proj",
                  "--r", "16")["scenario"]
    assert sc["checkpointing"] == {"mode": "every_k", "every_k": 4, "reentrant": False}
    assert sc["method"]["kind"] == "lora" and sc["method"]["targets"] == ["q_proj", "k_proj", "v_proj"]
    sc = run_json(capsys, "estimate", "--model", "llama-3.2-1b", "--method", "lora", "--targets", "all-linear")["scenario"]
    assert sc["method"]["targets"] == "all-linear"


def test_reentrant_flag_reruns_the_whole_block_and_is_refused_with_selective(capsys):
    base = ("estimate", "--model", "llama-3.2-1b", "--checkpointing", "full")
    plain, whole = run_json(capsys, *base), run_json(capsys, *base, "--reentrant")
    assert whole["scenario"]["checkpointing"] == {"mode": "full", "every_k": 1, "reentrant": True}
    assert whole["flops_per_step"] > plain["flops_per_step"]
    line = assert_one_line_error(*run(capsys, "estimate", "--model", "llama-3.2-1b", "--checkpointing", "selective",
                                      "--reentrant"))
    assert "reentrant=True" in line and "'full', 'every_k' or 'offload'" in line


def test_fp32_unquantized_flag_widens_the_stream_and_names_the_allowed_values(capsys):
    base = ("estimate", "--model", "llama-2-7b", "--gpu", "t4-16gb", "--quant", "nf4", "--precision", "fp16",
            "--seq-len", "512")
    plain, prepared = run_json(capsys, *base), run_json(capsys, *base, "--fp32-unquantized", "all")
    assert prepared["scenario"]["method"]["fp32_unquantized"] == "all"
    rc, out, _ = run(capsys, *base, "--fp32-unquantized", "all")
    assert rc == 0 and "qlora (quant=nf4, r=8, alpha=16, targets=PEFT default, fp32_unquantized=all)" in out
    assert 1.4 < prepared["memory_bytes"]["activations"] / plain["memory_bytes"]["activations"] < 2.0
    line = assert_one_line_error(*run(capsys, *base, "--fp32-unquantized", "norms"))
    assert "fp32_unquantized='norms'" in line and "'bf16-amp'" in line
    line = assert_one_line_error(*run(capsys, *base, "--fp32-unquantized", "some"))
    assert "fp32_unquantized" in line and "'all'" in line


def test_not_fitting_is_an_answer_with_suggestions(capsys):
    argv = ["estimate", "--model", "llama-3.1-70b", "--gpu", "l4-24gb", "--method", "full"]
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    assert "DOES NOT FIT: short by" in out and "GiB" in out
    e = estimate({"model": "llama-3.1-70b", "gpu": "l4-24gb", "method": {"kind": "full"}})
    assert not e.fits and e.suggestions
    assert "Suggestions" in out
    for s in e.suggestions:
        assert s.change in out
    rc, _, _ = run(capsys, *argv, "--fail-if-no-fit")
    assert rc == 1
    fits = run_json(capsys, *README_ARGS)["fits"]
    rc, _, _ = run(capsys, *README_ARGS, "--fail-if-no-fit")
    assert rc == (0 if fits else 1)


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, must_contain",
    [
        (["--model", "llama-3.1-7b"], ["model:", "llama-3.1-8b"]),
        (["--model", "llama-3.1-8b", "--r", "0"], ["method.r:", "greater than 0"]),
        (["--model", "llama-3.1-8b", "--gpu", "h10"], ["gpu:", "h100-sxm-80gb"]),
        (["--model", "llama-3.1-8b", "--method", "lorra"], ["method:", "lora"]),
        (["--model", "llama-3.1-8b", "--method", "full", "--r", "8"], ["method.r:", "lora"]),
        (["--model", "llama-3.1-8b", "--seq-len", "0"], ["workload.seq_len:"]),
        (["--model", "llama-3.1-8b", "--precision", "bf17"], ["precision:", "bf16-amp"]),
        (["--model", "llama-3.1-8b", "--task", "infer", "--method", "lora"], ["applies to training"]),
        (["--model", "llama-3.1-8b", "--targets", "foo"], ["method.targets", "q_proj"]),
        (["--model", "llama-3.1-8b", "--r", "x"], ["--r", "invalid int"]),
        (["--model", "llama-3.1-8b", "--no-such-flag"], ["unrecognized arguments"]),
        (["--gpu", "h100-sxm-80gb"], ["model:", "--model"]),
        (["does-not-exist.yaml"], ["does-not-exist.yaml", "no such file"]),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, must_contain):
    line = assert_one_line_error(*run(capsys, "estimate", *argv))
    for text in must_contain:
        assert text in line, line


def test_bad_yaml_files(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: gpt2\nworkload: {task: train\n")
    line = assert_one_line_error(*run(capsys, "estimate", str(broken)))
    assert "broken.yaml" in line and "invalid YAML" in line
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- gpt2\n")
    assert "mapping" in assert_one_line_error(*run(capsys, "estimate", str(a_list)))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: gpt2\nbatchsize: 3\n")
    line = assert_one_line_error(*run(capsys, "estimate", str(unknown)))
    assert "batchsize: unknown field" in line and "workload" in line


def test_unknown_command_and_help(capsys):
    assert_one_line_error(*run(capsys, "bogus"))
    rc, out, _ = run(capsys, "estimate", "--help")
    assert rc == 0 and "--micro-batch" in out and "--fail-if-no-fit" in out
    rc, _, err = run(capsys)
    assert rc == 2 and "estimate" in err


# ------------------------------------------------------------------------------------ catalog listings


def test_models_lists_the_catalog(capsys):
    rc, out, _ = run(capsys, "models")
    assert rc == 0
    names = list_models()
    assert len(names) >= 30
    for n in names:
        assert n in out
    rows = run_json_cmd(capsys, "models")
    assert len(rows) == len(names) >= 30
    gpt2 = next(r for r in rows if r["name"] == "gpt2")
    # GPT-2 small: 124,439,808 parameters (tied embeddings; HF model card / config: 12 x 768, vocab 50257, 1024 positions)
    assert (gpt2["n_layers"], gpt2["hidden"], gpt2["vocab"], gpt2["params"]) == (12, 768, 50257, 124_439_808)


def test_gpus_lists_the_profiles(capsys):
    rc, out, _ = run(capsys, "gpus")
    assert rc == 0
    names = list_devices()
    assert len(names) >= 20
    for n in names:
        assert n in out
    rows = run_json_cmd(capsys, "gpus")
    assert len(rows) == len(names) >= 20
    h100 = next(r for r in rows if r["name"] == "h100-sxm-80gb")
    assert h100["bf16_tflops"] == 989 and h100["memory_total_bytes"] > 80 * 10**9


def run_json_cmd(capsys, cmd: str) -> list[dict]:
    rc, out, _ = run(capsys, cmd, "--json")
    assert rc == 0
    return json.loads(out)


def test_scenario_template_is_a_valid_scenario(capsys, tmp_path):
    rc, out, _ = run(capsys, "scenario-template")
    assert rc == 0 and out == SCENARIO_TEMPLATE
    sc = Scenario.from_yaml(out)
    path = tmp_path / "t.yaml"
    path.write_text(out)
    d = run_json(capsys, "estimate", str(path))
    assert Scenario.model_validate(d["scenario"]) == sc


# ---------------------------------------------------------------------------------- module entry point


def test_python_dash_m_simulator_runs_without_traceback():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "simulator", "estimate", "--model", "gpt2", "--gpu", "t4-16gb"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "FITS" in proc.stdout and "gpt2 on t4-16gb" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "simulator", "estimate", "--model", "llama-3.1-7b"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "llama-3.1-8b" in bad.stderr


def test_use_dora_and_galore_rank_flags(capsys):
    from simulator.cli import main

    assert main(["estimate", "--model", "llama-3.1-8b", "--gpu", "a100-sxm-80gb", "--quant", "nf4", "--use-dora",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_trainable_params"] > 0
    assert main(["estimate", "--model", "llama-7b", "--gpu", "rtx-4090-24gb", "--precision", "bf16",
                 "--optimizer", "galore-adamw-8bit", "--galore-rank", "1024"]) == 0
    assert "galore-adamw-8bit (rank 1024, std, on attn/mlp)" in capsys.readouterr().out
    assert main(["estimate", "--model", "llama-7b", "--gpu", "rtx-4090-24gb", "--use-dora"]) == 2
    assert "method 'full' has no field 'use_dora'" in capsys.readouterr().err


def test_engine_flags_run_the_serving_engines_pool(capsys):
    d = run_json(capsys, "estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--engine", "vllm",
                 "--gpu-memory-utilization", "0.8", "--batch", "300", "--prompt-len", "512", "--gen-len", "256")
    assert d["task"] == "infer" and d["fits"]
    pool = d["engine_pool"]
    assert pool["share_bytes"] == pytest.approx(0.8 * d["device_memory_bytes"])
    assert d["peak_memory_bytes"] == pytest.approx(pool["share_bytes"])
    assert pool["concurrency"] == 256 and pool["waves"] == 2
    rc, out, _ = run(capsys, "estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--engine", "vllm")
    assert rc == 0 and "FITS in the engine's" in out and "CUDA graphs" in out
    rc, _, err = run(capsys, "estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--engine", "tgi")
    assert rc == 2 and "engine" in err and "vllm" in err and "Traceback" not in err


def test_cuda_graphs_flag_takes_the_launch_cost_out_of_decode(capsys):
    args = ("estimate", "--model", "llama-3.1-8b", "--gpu", "h100-sxm-80gb", "--batch", "1", "--prompt-len", "64",
            "--gen-len", "64")
    eager = run_json(capsys, *args)["time"]["decode_per_token_s"]
    graphs = run_json(capsys, *args, "--cuda-graphs")["time"]["decode_per_token_s"]
    assert graphs < eager / 3  # batch-1 decode of an 8B model: launch-bound eagerly, memory-bound from a graph


def test_host_sync_per_block_flag_adds_the_launches_to_each_block(capsys):
    args = ("estimate", "--model", "gpt-j-6b", "--gpu", "titan-rtx-24gb", "--precision", "fp16", "--batch", "1",
            "--prompt-len", "16", "--gen-len", "32")
    overlapped = run_json(capsys, *args)
    synced = run_json(capsys, *args, "--host-sync-per-block")
    assert synced["scenario"]["host_sync_per_block"] is True
    assert synced["time"]["decode_per_token_s"] > 1.5 * overlapped["time"]["decode_per_token_s"]
