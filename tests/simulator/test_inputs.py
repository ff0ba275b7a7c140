"""The bad-input contract: every invalid scenario is a ``ValueError`` whose message names the field and
what is allowed -- through the library (``estimate``) and through ``fitsim estimate`` (exit 2, one line).
Plus the YAML round trip, and "does not fit" as an answer (not an exception)."""

from __future__ import annotations

import contextlib
import io

import pytest
import yaml
from pydantic import ValidationError

from simulator import Scenario, estimate
from simulator.cli import main

# (id, scenario dict, substrings the message must contain: the field, the offending value, what is allowed)
BAD = [
    ("unknown-model", {"model": "llama-3.1-7b"},
     ["model", "unknown model 'llama-3.1-7b'", "closest:", "llama-3.1-8b", "llama-3.1-70b"]),
    ("unknown-gpu", {"model": "gpt2", "gpu": "h100-sxm-81gb"},
     ["gpu", "unknown device 'h100-sxm-81gb'", "closest:", "h100-sxm-80gb"]),
    ("qlora-fp32", {"model": "llama-3.2-1b", "method": {"kind": "qlora"}, "precision": "fp32"},
     ["qlora", "precision='fp32'", "'bf16'", "'fp16'", "fp32_unquantized='all'"]),
    ("kbit-norms-without-autocast", {"model": "llama-3.2-1b", "method": {"kind": "qlora", "fp32_unquantized": "norms"},
                                     "precision": "bf16"},
     ["fp32_unquantized='norms'", "precision='bf16'", "'bf16-amp'", "'fp16-amp'", "'all'"]),
    ("kbit-on-gptq", {"model": "llama-3.2-1b", "method": {"kind": "qlora", "quant": "gptq", "fp32_unquantized": "all"}},
     ["fp32_unquantized='all'", "quant='gptq'", "nf4, fp4, int8"]),
    ("lora-r-zero", {"model": "llama-3.2-1b", "method": {"kind": "lora", "r": 0}},
     ["method", "r", "greater than 0"]),
    ("lora-r-negative", {"model": "llama-3.2-1b", "method": {"kind": "dora", "r": -2}},
     ["method", "r", "greater than 0"]),
    ("unknown-target", {"model": "llama-3.2-1b", "method": {"kind": "lora", "targets": ["q_proj", "c_attn"]}},
     ["method.targets", "['c_attn']", "llama-3.2-1b", "allowed:", "q_proj", "v_proj", "down_proj", "all-linear"]),
    ("phi3-no-peft-default", {"model": "phi-3-mini", "method": {"kind": "lora"}},
     ["method.targets", "no default target modules", "'phi3'", "allowed:", "qkv_proj", "gate_up_proj", "all-linear"]),
    ("phi3-unfused-target", {"model": "phi-3-mini", "method": {"kind": "lora", "targets": ["q_proj", "v_proj"]}},
     ["method.targets", "['q_proj', 'v_proj']", "allowed:", "qkv_proj", "o_proj"]),
    ("prefix-too-long", {"model": "llama-3.2-1b", "method": {"kind": "prefix", "n_virtual_tokens": 128},
                         "workload": {"task": "train", "seq_len": 128}},
     ["method.n_virtual_tokens=128", "smaller than", "workload.seq_len=128"]),
    ("kv-int4", {"model": "llama-3.2-1b", "workload": {"task": "infer"}, "inference": {"kv_dtype": "int4"}},
     ["kv_dtype='int4'", "not supported", "allowed: auto, bf16, fp16, fp32, fp8, int8"]),
    ("weights-when-training", {"model": "llama-3.2-1b", "workload": {"task": "train"}, "inference": {"weights": "nf4"}},
     ["inference.weights='nf4'", "task 'infer'", "qlora"]),
    ("freeze-too-many-layers", {"model": "llama-3.2-1b", "method": {"kind": "freeze", "n_trainable_layers": 17}},
     ["method.n_trainable_layers=17", "n_layers=16"]),
    ("qkv-parts-without-litgpt", {"model": "gpt-neox-20b", "method": {"kind": "lora", "targets": ["query_key_value"],
                                                                   "qkv_parts": ["q", "v"]}},
     ["method.qkv_parts=['q', 'v']", "implementation 'litgpt'", "implementation='transformers'"]),
    ("llama-adapter-without-litgpt", {"model": "llama-3.2-1b", "method": {"kind": "llama-adapter"}},
     ["method.kind='llama-adapter'", "litgpt", "implementation='transformers'"]),
    ("llama-adapter-start-beyond", {"model": "llama-3.2-1b", "implementation": "litgpt",
                                    "method": {"kind": "llama-adapter", "start_layer": 16}},
     ["method.start_layer=16", "n_layers=16", "allowed: 0 to 15"]),
    ("qkv-parts-repeated", {"model": "gpt-neox-20b", "implementation": "litgpt",
                            "method": {"kind": "lora", "targets": ["query_key_value"], "qkv_parts": ["q", "q"]}},
     ["qkv_parts=['q', 'q']", "at most once"]),
]


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("scenario,expected", [(d, e) for _, d, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_library_message_names_field_and_allowed_values(scenario, expected):
    with pytest.raises(ValidationError) as info:
        estimate(scenario, what_fits=False)
    assert all(s in str(info.value) for s in expected), (expected, str(info.value))


@pytest.mark.parametrize("scenario,expected", [(d, e) for _, d, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_input_cli_exit_2_one_line(scenario, expected, tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario), encoding="utf-8")
    rc, out, err = cli(["estimate", str(path)])
    lines = err.strip().splitlines()
    assert (rc, out, len(lines)) == (2, "", 1) and lines[0].startswith("fitsim: error: ") and all(s in lines[0] for s in expected), err


def test_unknown_model_flag_lists_close_names():
    rc, out, err = cli(["estimate", "--model", "llama-3.1-7b"])
    assert rc == 2 and err.startswith("fitsim: error: model: unknown model 'llama-3.1-7b'; closest: llama-3.1-70b, llama-3.1-8b"), err


def test_lora_r_zero_flag_names_the_field():
    rc, out, err = cli(["estimate", "--model", "llama-3.2-1b", "--method", "lora", "--r", "0"])
    assert (rc, err.strip()) == (2, "fitsim: error: method.r: Input should be greater than 0"), err


# ------------------------------------------------------------------------------------------------- YAML round trip

ROUND_TRIP = [
    {"model": "llama-3.1-8b", "gpu": "rtx-4090-24gb", "workload": {"task": "train", "micro_batch": 1, "seq_len": 4096, "grad_accum": 8},
     "method": {"kind": "qlora", "quant": "nf4", "r": 16, "alpha": 32, "targets": "all-linear"},
     "precision": "bf16", "optimizer": {"name": "paged-adamw-8bit"}, "checkpointing": {"mode": "full"}},
    {"model": "mixtral-8x7b", "gpu": "h100-sxm-80gb", "workload": {"task": "infer", "batch": 32, "prompt_len": 1024, "gen_len": 256},
     "inference": {"weights": "awq", "kv_dtype": "fp8"}, "attention": "flash2"},
    {"model": "t5-base", "method": {"kind": "lora", "r": 4, "targets": ["q", "v"], "dropout": 0.1, "modules_to_save": ["lm_head"]},
     "loss": "fused", "expandable_segments": True, "checkpointing": {"mode": "every_k", "every_k": 3}},
    {"model": "gpt2", "method": {"kind": "prefix", "n_virtual_tokens": 30, "prefix_projection": True},
     "workload": {"task": "train", "seq_len": 512}, "precision": "fp16-amp", "optimizer": {"name": "adafactor", "beta1": False}},
    {"model": "qwen2.5-0.5b", "method": {"kind": "freeze", "n_trainable_layers": 2, "which": "first", "train_lm_head": True}},
    {"model": "opt-125m", "method": {"kind": "ia3"}},
    {"model": {"name": "tiny", "family": "llama", "n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2,
               "intermediate": 128, "vocab": 1000}, "gpu": "t4-16gb", "precision": "fp32"},
]


@pytest.mark.parametrize("data", ROUND_TRIP, ids=lambda d: d["model"] if isinstance(d["model"], str) else "inline")
def test_yaml_round_trip(data):
    sc = Scenario.model_validate(data)
    again = Scenario.from_yaml(sc.to_yaml())
    assert again == sc and again.to_yaml() == sc.to_yaml()
    assert estimate(again, what_fits=False) == estimate(sc, what_fits=False)


# ------------------------------------------------------------------------------------------------------ no fit


def test_not_fitting_is_an_answer_with_suggestions():
    e = estimate({"model": "llama-3.1-70b", "gpu": "l4-24gb", "method": {"kind": "full"}})
    assert e.fits is False and e.headroom_bytes < 0 and e.headroom_bytes == e.device_memory_bytes - e.peak_memory_bytes
    assert len(e.suggestions) >= 2 and all(s.change and s.peak_memory_bytes > 0 for s in e.suggestions)
    assert [s.peak_memory_bytes for s in e.suggestions if not s.fits] == sorted(s.peak_memory_bytes for s in e.suggestions if not s.fits)
    assert all(s.peak_memory_bytes < e.peak_memory_bytes for s in e.suggestions)  # each suggestion helps
    assert e.max_batch_that_fits is None


def test_suggestions_that_fit_come_least_disruptive_first():
    """Among the changes that fit, the same job on the same GPUs comes first, then more GPUs, and a different
    fine-tuning method last -- however much more the latter saves."""
    e = estimate({"model": "llama-3.1-8b", "gpu": "a100-sxm-80gb", "method": {"kind": "full"},
                  "workload": {"task": "train", "micro_batch": 4, "seq_len": 4096}})
    assert not e.fits and e.suggestions[0].change == "activation checkpointing on every block" and e.suggestions[0].fits
    assert e.suggestions[0].peak_memory_bytes > e.suggestions[1].peak_memory_bytes  # the QLoRA recipe saves more
    e = estimate({"model": "llama-3.1-405b", "gpu": "h100-sxm-80gb", "method": {"kind": "full"},
                  "checkpointing": {"mode": "full"}, "parallel": {"tp": 8, "pp": 8},
                  "workload": {"task": "train", "micro_batch": 1, "seq_len": 8192, "grad_accum": 16}})
    assert not e.fits and e.suggestions[0].change.startswith("sequence parallelism") and e.suggestions[0].fits
    e = estimate({"model": "llama-3.1-8b", "gpu": "rtx-4090-24gb", "method": {"kind": "full"},
                  "checkpointing": {"mode": "full"}, "workload": {"task": "train", "micro_batch": 1, "seq_len": 2048}})
    changes = [s.change for s in e.suggestions]
    assert all(s.fits for s in e.suggestions) and changes[0] == "8 GPUs with FSDP full_shard"
    assert changes.index("8 GPUs with FSDP full_shard") < changes.index("LoRA r=16 on all linear layers")
    assert not any("the fewest" in c for c in changes)  # the same 8-GPU setup is listed once


def test_a_full_fine_tune_is_told_how_many_gpus_would_hold_it():
    """Where no single change keeps the method, the fewest GPUs of the kind that hold the job sharded and
    checkpointed come before a change of method; 70B at 2 x 8k tokens with fp32 FSDP shards needs 64 H100s:
    16 B of states per parameter over 64 ranks (17.6 GB) beside 80 checkpointed block inputs (21.5 GB) and the
    recompute and head transients -- on 32 the states alone take 35 GB."""
    e = estimate({"model": "llama-3.1-70b", "gpu": "h100-sxm-80gb", "method": {"kind": "full"}, "precision": "bf16",
                  "checkpointing": {"mode": "selective"}, "parallel": {"dp": 8, "fsdp": "full_shard"},
                  "workload": {"task": "train", "micro_batch": 2, "seq_len": 8192}})
    assert not e.fits
    first = e.suggestions[0]
    assert first.fits and first.change.startswith("64 GPUs, the fewest that hold this job")
    assert "checkpointing every block" in first.change
    half = estimate({"model": "llama-3.1-70b", "gpu": "h100-sxm-80gb", "method": {"kind": "full"}, "precision": "bf16",
                     "checkpointing": {"mode": "full"}, "parallel": {"dp": 32, "fsdp": "full_shard"},
                     "workload": {"task": "train", "micro_batch": 2, "seq_len": 8192}}, what_fits=False)
    assert not half.fits
    # ZeRO-1/2 become ZeRO-3 in the search, and the count is the first doubling that fits
    d = {"model": "llama-3.1-8b", "gpu": "a10g-24gb", "method": {"kind": "full"}, "precision": "bf16-amp",
         "checkpointing": {"mode": "full"}, "workload": {"task": "train", "micro_batch": 1, "seq_len": 2048}}
    e = estimate({**d, "parallel": {"dp": 2, "zero": 2}})
    first = e.suggestions[0]
    assert first.fits and first.change == "16 GPUs, the fewest that hold this job (data parallel 16, ZeRO-3)"
    assert not estimate({**d, "parallel": {"dp": 8, "zero": 3}}, what_fits=False).fits
    # activations that overflow on their own leave nothing for more GPUs to shard: no such suggestion
    e = estimate({"model": "llama-3.1-8b", "gpu": "l4-24gb", "method": {"kind": "full"}, "parallel": {"dp": 2, "fsdp": "full_shard"},
                  "checkpointing": {"mode": "full"}, "workload": {"task": "train", "micro_batch": 64, "seq_len": 8192}})
    assert not e.fits and not any("the fewest" in s.change for s in e.suggestions)


def test_not_fitting_cli_exit_codes():
    argv = ["estimate", "--model", "llama-3.1-70b", "--gpu", "l4-24gb", "--method", "full"]
    assert cli(argv)[0] == 0
    assert cli(argv + ["--fail-if-no-fit"])[0] == 1


def test_shira_rank_beyond_a_matrix_is_a_clear_error():
    """PEFT refuses a SHiRA rank whose r x (in + out) entries outnumber a targeted matrix: so does the scenario,
    naming the field, the module and the largest rank it takes (2048 -> 512 k_proj: 409)."""
    with pytest.raises(ValidationError) as info:
        Scenario.model_validate({"model": "llama-3.2-1b", "method": {"kind": "shira", "r": 600, "targets": ["k_proj"]}})
    msg = str(info.value)
    assert "method.r=600" in msg and "k_proj" in msg and "r <= 409" in msg
    code, out, err = cli(["estimate", "--model", "llama-3.2-1b", "--method", "shira", "--r", "600", "--targets", "k_proj"])
    assert code == 2 and "method.r=600" in err and "Traceback" not in err
    # the same rank on the larger q_proj alone is fine (2048 x 2048: up to 1024)
    assert Scenario.model_validate({"model": "llama-3.2-1b", "method": {"kind": "shira", "r": 600, "targets": ["q_proj"]}})
