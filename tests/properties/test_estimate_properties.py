"""Property-based tests of ``simulator.estimate`` and the ``fitsim estimate`` CLI (hypothesis).

A strategy draws scenario *dicts* -- a random catalog model (or a random inline architecture, or a
wrong name), a random GPU, a random method with random knobs (targets drawn from the model's real
module names plus junk), random precision / optimizer / checkpointing / attention / loss and random
workload sizes, including zero, negative and huge values.  The properties:

* robustness: ``estimate(d)`` returns an ``Estimate`` or raises ``ValueError`` (pydantic's
  ``ValidationError`` and ``hwprofiles.UnknownNameError`` are ValueErrors) -- nothing else;
  the CLI returns 0 or 2 (1 only with ``--fail-if-no-fit``) and a 2 is one stderr line;
* invariants of every Estimate (allocated <= reserved <= device total, fits/headroom agree, no
  negative category, positive training FLOPs, the breakdown sums to the peak);
* monotonicity: activations and the allocated peak in seq_len and micro-batch, LoRA trainable
  parameters in r, the KV cache in batch / prompt / generation length, NF4 weights vs bf16.

Settings keep the file under a minute on two cores (about 2,800 examples in all); FITSIM_FUZZ_SCALE=10
multiplies every example count for a deeper run.
``database=None``: nothing is written outside tests/; a failure prints its reproduction blob.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, note, reject, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hwprofiles import UnknownNameError, list_devices
from simulator import Estimate, Scenario, estimate, get_model, list_models
from simulator.cli import CliError, build_parser, build_scenario, main
from simulator.graph.build import target_names
from simulator.results import CATEGORIES

ALL_MODELS = list_models()
# cheap to reason about and representative of every family; the cost of an estimate barely depends on size
SMALL_MODELS = [m for m in (
    "gpt2", "opt-125m", "qwen2.5-0.5b", "qwen1.5-0.5b", "llama-3.2-1b", "bert-base-uncased", "roberta-base",
    "deberta-v3-base", "t5-base", "phi-1.5", "qwen-1.8b", "stablelm-base-alpha-3b", "opt-1.3b", "falcon-7b",
    "bloom-7b1", "llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "flan-t5-xl", "gemma-2-9b", "qwen3-8b", "phi-3-mini",
) if m in ALL_MODELS]
BIG_MODELS = [m for m in ("llama-3.1-405b", "gpt3-175b", "mixtral-8x22b", "falcon-40b", "llama-3.1-70b", "qwen2.5-72b")
              if m in ALL_MODELS]
DEVICES = list_devices()

METHOD_KINDS = ["full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "bitfit", "adapter",
                "llama-adapter", "shira"]
PRECISIONS = ["fp32", "bf16-amp", "fp16-amp", "bf16", "fp16", "fp8"]
OPTIMIZERS = ["adamw", "adam", "sgd", "sgd-momentum", "adafactor", "lion", "adamw-8bit", "paged-adamw-8bit",
              "paged-adamw-32bit"]
ATTENTIONS = ["eager", "sdpa-math", "sdpa-mem-efficient", "sdpa-flash", "flash2", "flash3"]
QLORA_QUANTS = ["nf4", "fp4", "int8", "gptq", "awq"]
INFER_WEIGHTS = ["none", "int8", "nf4", "fp4", "gptq", "awq", "fp8"]
KV_DTYPES = ["auto", "bf16", "fp16", "fp32", "fp8", "int8"]
FAMILIES = ["llama", "qwen", "gpt2", "opt", "bloom", "falcon", "gpt_neox", "phi", "t5", "bert", "roberta", "deberta_v2"]
JUNK_NAMES = ["not_a_module", "q", "proj", "", "Q_PROJ", "model.layers.0.self_attn.q_proj", "lm_head.weight", "*"]
JUNK_VALUES = [None, "", "abc", -1, 0, 1.5, [], {}, True, 10**30, float("nan"), float("inf")]

ALLOWED_ERRORS = (ValidationError, UnknownNameError, ValueError)

# FITSIM_FUZZ_SCALE=10 multiplies every max_examples (a deeper run; the default keeps the file under a minute)
SCALE = float(os.environ.get("FITSIM_FUZZ_SCALE", "1"))


def scaled(examples: int) -> int:
    return max(1, int(examples * SCALE))


FAST = dict(deadline=None, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------- strategies


@functools.cache
def _targets_of(model: str) -> tuple[str, ...]:
    return tuple(sorted(target_names(get_model(model))))


def _arch_targets(spec) -> tuple[str, ...]:
    """Real module names of a model spec (catalog name or inline dict); a generic list when it is invalid."""
    try:
        if isinstance(spec, str):
            return _targets_of(get_model(spec).name)
        if isinstance(spec, dict):
            from simulator.config.model import ModelArch

            return tuple(sorted(target_names(ModelArch.model_validate(spec))))
    except Exception:  # invalid model: the scenario will be rejected anyway
        pass
    return ("q_proj", "v_proj", "c_attn")


def _junk(draw, p: int = 12) -> bool:
    """True about once in ``p`` draws (shrinks towards False)."""
    return draw(st.integers(0, p - 1)) == p - 1


def _int(draw, lo: int, hi: int, junk: bool, bad=(0, -1, -2, 10**9, 2**63)) -> object:
    if junk and _junk(draw):
        return draw(st.one_of(st.sampled_from(list(bad)), st.integers(-10, 0), st.sampled_from(JUNK_VALUES)))
    return draw(st.integers(lo, hi))


def _choice(draw, values, junk: bool, bad=("junk", "", None, 3)) -> object:
    if junk and _junk(draw):
        return draw(st.sampled_from(list(bad)))
    return draw(st.sampled_from(values))


@st.composite
def inline_arch(draw) -> dict:
    """A random (possibly inconsistent) architecture given inline instead of a catalog name."""
    n_heads = draw(st.sampled_from([1, 2, 3, 4, 8, 12]))
    d = {
        "name": "fuzz",
        "family": draw(st.sampled_from(FAMILIES)),
        "arch": draw(st.sampled_from(["decoder", "encoder", "encoder_decoder"])),
        "n_layers": draw(st.integers(1, 6)),
        "hidden": n_heads * draw(st.sampled_from([1, 8, 16, 24])),
        "n_heads": n_heads,
        "intermediate": draw(st.integers(1, 256)),
        "vocab": draw(st.integers(1, 5000)),
    }
    for key, strat in (
        ("n_kv_heads", st.sampled_from([1, 2, 4, n_heads])),
        ("head_dim", st.sampled_from([8, 16, 64])),
        ("n_decoder_layers", st.integers(1, 4)),
        ("max_position_embeddings", st.sampled_from([16, 512, 4096])),
        ("position", st.sampled_from(["rope", "learned", "alibi", "relative"])),
        ("norm", st.sampled_from(["rmsnorm", "layernorm"])),
        ("activation", st.sampled_from(["silu", "gelu", "gelu_tanh", "relu"])),
        ("gated_mlp", st.booleans()),
        ("qkv_bias", st.booleans()),
        ("mlp_bias", st.booleans()),
        ("norm_bias", st.booleans()),
        ("tied_embeddings", st.booleans()),
        ("parallel_block", st.booleans()),
        ("qk_norm", st.booleans()),
        ("sandwich_norm", st.booleans()),
        ("type_vocab_size", st.integers(0, 2)),
        ("moe", st.fixed_dictionaries({"n_experts": st.integers(1, 8), "top_k": st.integers(1, 3)})),
    ):
        if draw(st.integers(0, 3)) == 0:
            d[key] = draw(strat)
    return d


def model_spec(draw, junk: bool) -> object:
    if junk and _junk(draw, 10):
        return draw(st.one_of(
            st.sampled_from(["llama-3.1-7b", "gpt-5", "", "llama", "meta-llama/Llama-3.1-8B-Instruct",
                             "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", "LLAMA_3.1_8B", 42, None, ["gpt2"]]),
            inline_arch(),
        ))
    if _junk(draw, 15):
        return draw(inline_arch())
    return draw(st.one_of(st.sampled_from(SMALL_MODELS), st.sampled_from(SMALL_MODELS), st.sampled_from(ALL_MODELS)))


def method_dict(draw, targets: tuple[str, ...], kind: str | None, junk: bool) -> dict:
    kind = kind or _choice(draw, METHOD_KINDS, junk, bad=("junk", "LoRA", "", None))
    m: dict = {"kind": kind}

    def opt(key, value_fn):
        if draw(st.booleans()):
            m[key] = value_fn()

    def target_list():
        if draw(st.integers(0, 4)) == 0:
            return "all-linear"
        pool = list(targets) + (JUNK_NAMES if junk and _junk(draw, 4) else [])
        return draw(st.lists(st.sampled_from(pool), min_size=0 if junk else 1, max_size=4, unique=True))

    if kind in ("lora", "dora", "qlora"):
        opt("r", lambda: draw(st.integers(-2, 512)) if junk else draw(st.integers(1, 512)))
        opt("alpha", lambda: draw(st.floats(-1.0, 128.0) if junk else st.floats(0.5, 128.0)))
        opt("dropout", lambda: draw(st.floats(-0.1, 1.0) if junk else st.floats(0.0, 0.9)))
        opt("targets", target_list)
        opt("lora_fa", lambda: draw(st.booleans()))
        opt("qkv_parts", lambda: draw(st.lists(st.sampled_from(["q", "k", "v"] + (["x"] if junk else [])),
                                               min_size=0 if junk else 1, max_size=3, unique=not junk)))
        opt("modules_to_save", lambda: draw(st.lists(st.sampled_from(["lm_head", "embed_tokens", "junk"]), max_size=2)))
        if kind == "qlora":
            opt("quant", lambda: _choice(draw, QLORA_QUANTS, junk, bad=("int4", "fp8", "nf3")))
            opt("double_quant", lambda: draw(st.booleans()))
            opt("compute_dtype", lambda: _choice(draw, ["bf16", "fp16", "fp32"], junk))
            opt("group_size", lambda: _int(draw, 1, 1024, junk))
            opt("blocksize", lambda: _int(draw, 1, 4096, junk))
            opt("fp32_unquantized", lambda: _choice(draw, ["none", "norms", "all"], junk, bad=("some", "fp16")))
    elif kind == "shira":
        opt("r", lambda: draw(st.integers(-2, 2048)) if junk else draw(st.integers(1, 64)))
        opt("targets", target_list)
    elif kind == "llama-adapter":
        opt("prompt_length", lambda: _int(draw, 1, 64, junk))
        opt("start_layer", lambda: draw(st.integers(-1, 40)) if junk else draw(st.integers(0, 40)))
        opt("v2", lambda: draw(st.booleans()))
        opt("quant", lambda: _choice(draw, ["none", "nf4", "fp4", "int8"], junk, bad=("gptq",)))
        opt("double_quant", lambda: draw(st.booleans()))
    elif kind == "freeze":
        opt("n_trainable_layers", lambda: draw(st.integers(-1, 130)) if junk else draw(st.integers(0, 130)))
        opt("which", lambda: _choice(draw, ["last", "first"], junk))
        opt("train_embeddings", lambda: draw(st.booleans()))
        opt("train_lm_head", lambda: draw(st.booleans()))
    elif kind == "ia3":
        opt("targets", lambda: None if draw(st.booleans()) else draw(st.lists(st.sampled_from(list(targets)), max_size=3, unique=True)))
        opt("feedforward_modules", lambda: draw(st.lists(st.sampled_from(list(targets) + JUNK_NAMES[:2]), max_size=2, unique=True)))
    elif kind in ("prefix", "prompt"):
        opt("n_virtual_tokens", lambda: _int(draw, 1, 600, junk))
        if kind == "prefix":
            opt("prefix_projection", lambda: draw(st.booleans()))
            opt("encoder_hidden_size", lambda: _int(draw, 1, 4096, junk))
    elif kind == "adapter":
        opt("bottleneck", lambda: _int(draw, 1, 1024, junk))
        opt("placement", lambda: _choice(draw, ["houlsby", "pfeiffer"], junk))
    if junk and _junk(draw, 20):
        m["bogus_knob"] = 1
    return m


def train_workload(draw, junk: bool) -> dict:
    w: dict = {"task": "train"}
    w["micro_batch"] = _int(draw, 1, 64, junk, bad=(0, -1, 10**6, 2**40))
    w["seq_len"] = _int(draw, 1, 8192, junk, bad=(0, -1, 10**6, 10**9))
    if draw(st.booleans()):
        w["grad_accum"] = _int(draw, 1, 16, junk, bad=(0, -3, 10**6))
    if junk and _junk(draw, 20):
        w["batch"] = 4  # an inference field in a training workload
    if junk and _junk(draw, 20):
        del w["task"]  # default-task inference from the fields given
    return w


def infer_workload(draw, junk: bool) -> dict:
    w: dict = {"task": "infer"}
    w["batch"] = _int(draw, 1, 512, junk, bad=(0, -1, 10**6))
    w["prompt_len"] = _int(draw, 1, 32768, junk, bad=(0, -1, 10**7))
    w["gen_len"] = _int(draw, 0, 4096, junk, bad=(-1, 10**5, 10**9))
    if junk and _junk(draw, 20):
        w["seq_len"] = 128  # a training field in an inference workload
    return w


@st.composite
def scenario_dicts(draw, junk: bool = True, task: str | None = None, kind: str | None = None) -> dict:
    """A scenario dict; with ``junk`` about half of them are invalid somewhere."""
    spec = model_spec(draw, junk)
    d: dict = {"model": spec}
    if draw(st.integers(0, 5)) or not junk:
        d["gpu"] = _choice(draw, DEVICES, junk, bad=("h100", "H100_SXM_80GB", "tpu-v5", "", 80))
    task = task or (_choice(draw, ["train", "infer"], junk, bad=("serve", None)) if junk else draw(st.sampled_from(["train", "infer"])))
    if task == "infer":
        d["workload"] = infer_workload(draw, junk)
    elif task == "train":
        d["workload"] = train_workload(draw, junk)
    else:
        d["workload"] = {"task": task}
    if task == "train" or (junk and _junk(draw, 8)):
        d["method"] = method_dict(draw, _arch_targets(spec), kind, junk)
    if draw(st.booleans()):
        d["precision"] = _choice(draw, PRECISIONS, junk, bad=("fp64", "int8", "bfloat16"))
    if draw(st.booleans()):
        o = {"name": _choice(draw, OPTIMIZERS, junk, bad=("adamw-4bit", "SGD"))}
        if draw(st.booleans()):
            o["impl"] = _choice(draw, ["foreach", "foreach-torch2.0", "fused", "for-loop"], junk)
        if draw(st.booleans()):
            o["beta1"] = draw(st.booleans())
        d["optimizer"] = o
    if draw(st.booleans()):
        c = {"mode": _choice(draw, ["none", "full", "every_k", "offload", "selective"], junk, bad=("partial", True))}
        if draw(st.booleans()):
            c["every_k"] = _int(draw, 1, 8, junk)
        if draw(st.booleans()):
            c["reentrant"] = draw(st.booleans()) if not (junk and _junk(draw)) else "yes"
        d["checkpointing"] = c
    if draw(st.booleans()):
        d["attention"] = _choice(draw, ATTENTIONS, junk, bad=("flash4", "sdpa"))
    if draw(st.booleans()):
        d["loss"] = _choice(draw, ["upcast", "upcast-shift", "chunked", "chunked-compiled", "fused"], junk)
    if draw(st.booleans()):
        d["implementation"] = _choice(draw, ["transformers", "litgpt", "torchtune"], junk, bad=("peft", "hf"))
    if task == "infer" or (junk and _junk(draw, 8)):
        inf: dict = {}
        if draw(st.booleans()):
            inf["weights"] = _choice(draw, INFER_WEIGHTS, junk, bad=("int4", "q4_k_m"))
        if draw(st.booleans()):
            inf["kv_dtype"] = _choice(draw, KV_DTYPES, junk, bad=("int4", "int2", "nf4", "fp64"))
        if draw(st.booleans()):
            inf["group_size"] = _int(draw, 1, 256, junk)
        if draw(st.booleans()):
            inf["double_quant"] = draw(st.booleans())
        if draw(st.booleans()):
            inf["engine"] = _choice(draw, ["transformers", "vllm"], junk, bad=("tgi", "sglang"))
            if draw(st.booleans()):
                inf["gpu_memory_utilization"] = (draw(st.floats(0.05, 1.0)) if not (junk and _junk(draw))
                                                 else draw(st.sampled_from([0.0, 1.5, -0.2])))
            if draw(st.booleans()):
                inf["max_num_seqs"] = _int(draw, 1, 512, junk)
        if draw(st.booleans()):
            inf["cuda_graphs"] = draw(st.booleans())
        d["inference"] = inf
    if draw(st.booleans()):
        d["expandable_segments"] = draw(st.booleans()) if not (junk and _junk(draw)) else "maybe"
    if draw(st.booleans()):
        d["compile"] = draw(st.booleans()) if not (junk and _junk(draw)) else "inductor"
    if junk and _junk(draw, 25):
        d["parallel"] = {"tp": 2}  # unknown top-level field
    return d


def valid_scenario(d: dict) -> Scenario:
    """The validated scenario, or reject this example (the property is about valid setups)."""
    try:
        return Scenario.model_validate(d)
    except ALLOWED_ERRORS:
        reject()


def run_estimate(d) -> Estimate | None:
    """estimate(d) with the robustness contract: an Estimate or an allowed error (None)."""
    note(f"scenario: {d!r}")
    try:
        e = estimate(d, what_fits=False)
    except ALLOWED_ERRORS:
        event("invalid input (ValueError)")
        return None
    assert isinstance(e, Estimate)
    event(f"estimate ({e.task}, {'fits' if e.fits else 'does not fit'})")
    return e


def _paged(d) -> bool:
    """The scenario (a dict as drawn, or a Scenario) trains with a paged optimizer."""
    if isinstance(d, Scenario):
        return d.is_training and d.optimizer.name.startswith("paged-")
    opt = d.get("optimizer") if isinstance(d, dict) else None
    return isinstance(opt, dict) and str(opt.get("name", "")).startswith("paged-")


def check_invariants(e: Estimate, training: bool, paged: bool = False) -> None:
    note(f"estimate: peak={e.peak_memory_bytes} reserved={e.peak_reserved_bytes} allocated={e.peak_allocated_bytes} "
         f"phase={e.peak_phase} breakdown={e.memory_bytes!r}")
    values = [e.peak_memory_bytes, e.peak_reserved_bytes, e.peak_allocated_bytes, e.flops_per_step]
    assert all(math.isfinite(v) for v in values), values
    assert e.peak_allocated_bytes <= e.peak_reserved_bytes <= e.peak_memory_bytes
    assert e.fits == (e.headroom_bytes >= 0)
    if e.engine_pool is None and not (training and paged):
        assert e.fits == (e.peak_memory_bytes <= e.device_memory_bytes)
        assert e.headroom_bytes == pytest.approx(e.device_memory_bytes - e.peak_memory_bytes, rel=1e-12, abs=1.0)
    elif e.engine_pool is None:  # paged states fill what is free; only the largest tensor's must fit beside the rest
        assert e.headroom_bytes >= e.device_memory_bytes - e.peak_memory_bytes - 1.0
        if e.paged_host_bytes > 0 and e.fits:  # the states fill the device, the rest waits in host memory
            assert e.peak_memory_bytes == pytest.approx(e.device_memory_bytes, rel=1e-12)
        assert e.required_memory_bytes == pytest.approx(e.device_memory_bytes - e.headroom_bytes, rel=1e-12)
        assert e.paged_host_bytes <= e.host_memory_bytes
    else:  # a serving engine takes its share of the device when it starts, else shows what it lacks
        pool = e.engine_pool
        assert pool.share_bytes <= e.device_memory_bytes
        if e.fits:
            assert e.peak_memory_bytes == pytest.approx(pool.share_bytes, rel=1e-12)
            assert 1 <= pool.concurrency <= max(1, pool.sequences_held)
        else:
            assert e.peak_memory_bytes > pool.share_bytes
    for c in CATEGORIES:
        v = getattr(e.memory_bytes, c)
        assert math.isfinite(v) and v >= 0, (c, v)
    # the breakdown at the peak is the peak (nvidia-smi view: reserved + paged states + CUDA context)
    assert e.memory_bytes.total == pytest.approx(e.peak_memory_bytes, rel=1e-9)
    assert e.phase_allocated_bytes[e.peak_phase] == pytest.approx(e.peak_allocated_bytes, rel=1e-12)
    assert e.peak_allocated_bytes == pytest.approx(max(e.phase_allocated_bytes.values()), rel=1e-12)
    assert all(v >= 0 for v in e.activations_by_layer.values())
    assert 0 <= e.n_trainable_params <= e.n_params
    assert e.flops_per_step >= 0 and e.tokens_per_step > 0
    if training:
        assert e.task == "train"
        assert e.flops_per_step > 0
        assert e.flops.per_step == pytest.approx(e.flops.forward + e.flops.backward + e.flops.recompute, rel=1e-9)
        assert e.flops.per_token * e.tokens_per_step == pytest.approx(e.flops_per_step, rel=1e-9)
    else:
        assert e.task == "infer"
        assert e.memory_bytes.gradients == 0 and e.memory_bytes.optimizer_states == 0


# ------------------------------------------------------------------------------------------------ robustness


@settings(max_examples=scaled(1000), **FAST)
@given(scenario_dicts())
def test_estimate_returns_or_raises_value_error(d):
    e = run_estimate(d)
    if e is not None:
        check_invariants(e, training=e.task == "train", paged=_paged(d))


@settings(max_examples=scaled(150), **FAST)
@given(st.sampled_from(BIG_MODELS), st.data())
def test_big_models_return_or_raise_value_error(model, data):
    d = data.draw(scenario_dicts())
    d["model"] = model
    e = run_estimate(d)
    if e is not None:
        check_invariants(e, training=e.task == "train", paged=_paged(d))


@settings(max_examples=scaled(120), **FAST)
@given(st.sampled_from(SMALL_MODELS), st.sampled_from(["prompt_len", "gen_len", "batch"]))
def test_estimate_input_types_are_checked(model, field):
    """Non-integers where integers go are validation errors, never TypeErrors from deep inside."""
    for bad in ("12x", 1.5, None, [], {"a": 1}):
        w = {"task": "infer", "batch": 1, "prompt_len": 16, "gen_len": 4, field: bad}
        with pytest.raises(ValidationError):
            estimate({"model": model, "workload": w}, what_fits=False)


def _flag_value(draw, kind: str):
    if kind == "int":
        if _junk(draw, 8):
            return draw(st.sampled_from(["abc", "", "1.5", "1e3", "nan", "-0", "99999999999999999999"]))
        return str(draw(st.one_of(st.integers(-2, 64), st.integers(65, 100000))))
    if kind == "float":
        return draw(st.sampled_from(["16", "0.5", "-1", "0", "abc", "1e400"]))
    raise AssertionError(kind)


CLI_CHOICE_FLAGS = {
    "--model": lambda: SMALL_MODELS + ["llama-3.1-7b", "", "meta-llama/Llama-3.2-1B"],
    "--gpu": lambda: DEVICES + ["h100", "tpu", ""],
    "--task": lambda: ["train", "infer", "serve"],
    "--method": lambda: METHOD_KINDS + ["LoRA", "junk"],
    "--targets": lambda: ["q_proj,v_proj", "all-linear", "c_attn", "query,value", "q,v", "junk", ",", "", "lm_head"],
    "--quant": lambda: QLORA_QUANTS + ["int4", "fp8"],
    "--precision": lambda: PRECISIONS + ["fp64"],
    "--optimizer": lambda: OPTIMIZERS + ["adamw-4bit"],
    "--checkpointing": lambda: ["none", "full", "every_k", "selective"],
    "--attention": lambda: ATTENTIONS + ["flash4"],
    "--loss": lambda: ["upcast", "fused", "sparse"],
    "--weights": lambda: INFER_WEIGHTS + ["q4"],
    "--kv-dtype": lambda: KV_DTYPES + ["int4"],
    "--engine": lambda: ["transformers", "vllm", "tgi"],
}
CLI_INT_FLAGS = ["--seq-len", "--micro-batch", "--grad-accum", "--batch", "--prompt-len", "--gen-len", "--r",
                 "--n-virtual-tokens", "--every-k", "--max-num-seqs"]
CLI_BOOL_FLAGS = ["--expandable-segments", "--json", "--fail-if-no-fit", "--cuda-graphs"]


@st.composite
def cli_argvs(draw) -> tuple[list[str], str | None]:
    """argv for `fitsim estimate`, and the text of an optional scenario file (YAML) it reads."""
    argv = ["estimate"]
    file_text = None
    if _junk(draw, 4):
        if _junk(draw, 5):
            file_text = draw(st.sampled_from(["model: [", "- a\n- b\n", "", "model: gpt2\nbogus: 1\n", "\x00\x01"]))
        else:
            d = draw(scenario_dicts())
            file_text = yaml.safe_dump(d, sort_keys=False, allow_unicode=True)
    if file_text is None or _junk(draw, 3):
        argv += ["--model", draw(st.sampled_from(CLI_CHOICE_FLAGS["--model"]()))]
    flags = draw(st.lists(st.sampled_from(sorted(CLI_CHOICE_FLAGS) + CLI_INT_FLAGS + CLI_BOOL_FLAGS + ["--alpha"]),
                          max_size=8, unique=True))
    for f in flags:
        if f == "--model":
            continue
        if f in CLI_BOOL_FLAGS:
            argv.append(f)
        elif f in CLI_INT_FLAGS:
            v = _flag_value(draw, "int")
            argv.append(f"{f}={v}" if v.startswith("-") or v == "" else f)  # '--r=-1': argparse reads it as a value
            if not (v.startswith("-") or v == ""):
                argv.append(v)
        elif f == "--alpha":
            argv.append(f"--alpha={_flag_value(draw, 'float')}")
        else:
            argv.append(f"{f}={draw(st.sampled_from(CLI_CHOICE_FLAGS[f]()))}")
    if _junk(draw, 15):
        argv.append(draw(st.sampled_from(["--bogus", "--seq-len", "extra-positional", "--r=1=2"])))
    return argv, file_text


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@settings(max_examples=scaled(300), **FAST)
@given(cli_argvs())
def test_cli_exit_code_and_one_line_error(case):
    argv, file_text = case
    path = None
    if file_text is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as fh:
            fh.write(file_text)
            path = fh.name
        argv = argv[:1] + [path] + argv[1:]
    note(f"argv: {argv!r}\nfile: {file_text!r}")
    try:
        rc, out, err = run_cli(argv)
        event(f"exit {rc}")
        check_cli_result(argv, rc, out, err)
    finally:
        if path:
            os.unlink(path)


def check_cli_result(argv: list[str], rc: int, out: str, err: str) -> None:
    allowed = {0, 2} | ({1} if "--fail-if-no-fit" in argv else set())
    assert rc in allowed, (rc, err)
    assert "Traceback" not in err
    if rc == 2:
        lines = err.strip("\n").splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith("fitsim: error:"), err
        assert out == ""
        # exit 2 means bad input: the scenario the flags (and file) describe must really be invalid
        try:
            sc = build_scenario(build_parser().parse_args(argv))
        except (CliError, *ALLOWED_ERRORS):
            return
        raise AssertionError(f"exit 2 for a valid scenario {sc.model_dump(mode='json')!r}: {err}")
    assert out.strip(), "a report or JSON on stdout"
    if "--json" in argv:
        data = json.loads(out)
        if "--fail-if-no-fit" in argv:
            assert data["fits"] == (rc == 0)
        # the CLI prints what the library computes for the scenario it echoes
        lib = estimate(data.pop("scenario"), what_fits=True).model_dump(mode="json")
        assert data == lib


# -------------------------------------------------------------------------------------------- invariants (valid)


@settings(max_examples=scaled(300), **FAST)
@given(scenario_dicts(junk=False))
def test_invariants_of_valid_estimates(d):
    sc = valid_scenario(d)
    e = estimate(sc, what_fits=False)
    check_invariants(e, training=sc.is_training, paged=_paged(sc))
    if sc.is_training and sc.method.kind == "full":
        assert e.n_trainable_params == e.n_params
    # every entry point gives the same answer: Scenario, dict, YAML text; the JSON dump round-trips
    assert Scenario.from_yaml(sc.to_yaml()) == sc
    assert estimate(d, what_fits=False) == e
    assert estimate(sc.to_yaml(), what_fits=False) == e
    assert Estimate.model_validate(json.loads(json.dumps(e.model_dump(mode="json")))) == e


@settings(max_examples=scaled(60), **FAST)
@given(scenario_dicts(junk=False))
def test_what_fits_agrees_with_the_verdict(d):
    sc = valid_scenario(d)
    e = estimate(sc, what_fits=True)
    check_invariants(e, training=sc.is_training, paged=_paged(sc))
    cur_b = sc.workload.micro_batch if sc.is_training else sc.workload.batch
    note(f"fits={e.fits} max_batch={e.max_batch_that_fits} cur={cur_b}")
    if e.engine_pool is not None and e.fits:
        # a serving engine queues what it cannot run: its largest batch is the one it runs at once
        assert e.max_batch_that_fits == min(sc.inference.max_num_seqs, e.engine_pool.sequences_held)
        assert e.engine_pool.concurrency == min(cur_b, e.max_batch_that_fits)
        assert e.suggestions == []
    elif e.fits:
        assert e.max_batch_that_fits is not None and e.max_batch_that_fits >= cur_b
        assert e.suggestions == []
    elif e.max_batch_that_fits is not None:
        assert e.max_batch_that_fits < cur_b


# ------------------------------------------------------------------------------------------------ monotonicity


def _with_workload(d: dict, **upd) -> dict:
    return {**d, "workload": {**d["workload"], **upd}}


def _saved(e) -> float:
    """Bytes one micro-batch saves for backward, every layer and the head."""
    return sum(e.activations_by_layer.values())


def _not_less(a: float, b: float) -> bool:
    """b >= a up to float rounding."""
    return b >= a - 1e-12 * abs(a)


@settings(max_examples=scaled(200), **FAST)
@given(scenario_dicts(junk=False, task="train"), st.integers(1, 4096))
def test_activations_and_peak_grow_with_seq_len(d, extra):
    d2 = _with_workload(d, seq_len=d["workload"]["seq_len"] + extra)
    valid_scenario(d), valid_scenario(d2)
    e1, e2 = estimate(d, what_fits=False), estimate(d2, what_fits=False)
    note(f"seq {d['workload']['seq_len']} -> {d2['workload']['seq_len']}: acts {_saved(e1)} -> "
         f"{_saved(e2)}, allocated {e1.peak_allocated_bytes} -> {e2.peak_allocated_bytes}")
    # what one micro-batch saves; the breakdown at the peak may hold less of it when the peak moves from the
    # forward to the blocks' backward, where the head has freed its share
    assert _not_less(_saved(e1), _saved(e2))
    assert _not_less(e1.peak_allocated_bytes, e2.peak_allocated_bytes)
    assert _not_less(e1.flops_per_step, e2.flops_per_step)


@settings(max_examples=scaled(200), **FAST)
@given(scenario_dicts(junk=False, task="train"), st.integers(1, 64))
def test_activations_and_peak_grow_with_micro_batch(d, extra):
    d2 = _with_workload(d, micro_batch=d["workload"]["micro_batch"] + extra)
    valid_scenario(d), valid_scenario(d2)
    e1, e2 = estimate(d, what_fits=False), estimate(d2, what_fits=False)
    note(f"acts {_saved(e1)} -> {_saved(e2)}, allocated {e1.peak_allocated_bytes} -> {e2.peak_allocated_bytes}")
    assert _not_less(_saved(e1), _saved(e2))
    assert _not_less(e1.peak_allocated_bytes, e2.peak_allocated_bytes)
    assert e2.flops_per_step > e1.flops_per_step


@settings(max_examples=scaled(100), **FAST)
@given(scenario_dicts(junk=False))
def test_compiling_changes_time_only(d):
    """torch.compile fuses pointwise kernels: never slower, the same memory and FLOPs."""
    valid_scenario(d)
    eager, fused = estimate({**d, "compile": False}, what_fits=False), estimate({**d, "compile": True}, what_fits=False)
    assert fused.peak_memory_bytes == eager.peak_memory_bytes and fused.flops_per_step == eager.flops_per_step
    if eager.time is not None:
        assert fused.time.step_s <= eager.time.step_s * (1 + 1e-12)


@settings(max_examples=scaled(100), **FAST)
@given(scenario_dicts(junk=False, task="train"), st.sampled_from(["full", "every_k", "offload"]))
def test_a_reentrant_checkpoint_reruns_more_and_keeps_the_same(d, mode):
    """Reentrant checkpointing reruns every op of a checkpointed block, the early-stopping kind only up to its last
    saved tensor: never less recompute or time, the same saved tensors and forward."""
    ck = lambda r: {**d, "checkpointing": {**d.get("checkpointing", {}), "mode": mode, "reentrant": r}}  # noqa: E731
    valid_scenario(ck(False)), valid_scenario(ck(True))
    early, whole = estimate(ck(False), what_fits=False), estimate(ck(True), what_fits=False)
    note(f"recompute {early.flops.recompute} -> {whole.flops.recompute}")
    assert _not_less(early.flops.recompute, whole.flops.recompute)
    assert whole.flops.forward == early.flops.forward
    assert whole.memory_bytes.activations == early.memory_bytes.activations
    if early.time is not None:
        assert _not_less(early.time.step_s, whole.time.step_s)


@settings(max_examples=scaled(100), **FAST)
@given(scenario_dicts(junk=False, task="train"), st.sampled_from(["nf4", "fp4", "int8"]))
def test_kbit_preparation_widens_the_frozen_rest_and_keeps_the_trainables(d, quant):
    """PEFT's kbit preparation casts the unquantized parameters to fp32: more frozen bytes wherever they were 16-bit,
    the same quantized storage and trainable adapters.  (Saved activations have no such order: an fp32 stream
    saves no 16-bit cast copies of its logits or softmax.)"""
    # (a modules_to_save copy is made after the cast: it trains in fp32 too, so it is left out here)
    m = {k: v for k, v in (d.get("method") or {}).items()
         if k not in ("kind", "quant", "fp32_unquantized", "modules_to_save")}
    q = lambda up: {**d, "method": {**m, "kind": "qlora", "quant": quant, "fp32_unquantized": up}}  # noqa: E731
    sc, sc_up = valid_scenario(q("none")), valid_scenario(q("all"))
    plain, prepared = estimate(sc, what_fits=False), estimate(sc_up, what_fits=False)
    note(f"frozen weights {plain.memory_bytes.weights} -> {prepared.memory_bytes.weights}")
    assert prepared.memory_bytes.quant_scales == plain.memory_bytes.quant_scales
    assert prepared.memory_bytes.trainable_weights == plain.memory_bytes.trainable_weights
    assert prepared.memory_bytes.weights >= plain.memory_bytes.weights
    if sc.precision != "fp32" and sc.method.compute_dtype != "fp32":  # else the rest is fp32 already
        assert prepared.memory_bytes.weights > plain.memory_bytes.weights


@settings(max_examples=scaled(100), **FAST)
@given(scenario_dicts(junk=False, task="train"))
def test_selective_checkpoints_keep_at_least_what_full_ones_keep(d):
    """A selective checkpoint keeps the block input, as a full one does, plus the outputs its policy saves."""
    ck = lambda mode: {**d, "checkpointing": {"mode": mode}}  # noqa: E731
    valid_scenario(ck("full"))
    try:
        Scenario.model_validate(ck("selective"))
    except ValidationError as err:
        assert "checkpointing.mode='selective'" in str(err)  # explicit attention, refused with its reason
        return
    full, sel = estimate(ck("full"), what_fits=False), estimate(ck("selective"), what_fits=False)
    note(f"saved full {_saved(full)} selective {_saved(sel)}")
    assert _not_less(_saved(full), _saved(sel))
    assert full.n_trainable_params == sel.n_trainable_params
    assert full.flops.forward == sel.flops.forward


@settings(max_examples=scaled(200), **FAST)
@given(st.sampled_from(["lora", "dora", "qlora", "shira"]).flatmap(
    lambda k: scenario_dicts(junk=False, task="train", kind=k)), st.integers(1, 256))
def test_lora_trainable_params_strictly_grow_with_r(d, extra):
    r1 = d["method"].get("r", 32 if d["method"]["kind"] == "shira" else 8)
    d2 = {**d, "method": {**d["method"], "r": r1 + extra}}
    valid_scenario(d), valid_scenario(d2)
    n1, n2 = estimate(d, what_fits=False).n_trainable_params, estimate(d2, what_fits=False).n_trainable_params
    note(f"r {r1} -> {r1 + extra}: trainable {n1} -> {n2}")
    assert n2 > n1


_TRANSIENT_PAST_10_MIB = (  # the vLLM profile's transient crosses 10 MiB between the two prompts
    {"model": {"name": "fuzz", "family": "llama", "arch": "decoder", "n_layers": 1, "hidden": 1, "n_heads": 1,
               "intermediate": 87, "vocab": 1, "n_kv_heads": 1, "tied_embeddings": False,
               "moe": {"n_experts": 3, "top_k": 3}},
     "gpu": "a10-24gb", "workload": {"task": "infer", "batch": 1, "prompt_len": 6090, "gen_len": 0},
     "inference": {"engine": "vllm"}}, "prompt_len", 572)


@settings(max_examples=scaled(200), **FAST)
@given(scenario_dicts(junk=False, task="infer"), st.sampled_from(["batch", "prompt_len", "gen_len"]),
       st.integers(1, 2048))
@example(*_TRANSIENT_PAST_10_MIB)
def test_kv_cache_grows_with_batch_prompt_and_generation(d, field, extra):
    d2 = _with_workload(d, **{field: d["workload"][field] + extra})
    valid_scenario(d), valid_scenario(d2)
    e1, e2 = estimate(d, what_fits=False), estimate(d2, what_fits=False)
    if e1.engine_pool is not None:
        # a serving engine's pool is its share less the rest, whatever runs in it: the sequences it holds at
        # once never grow with longer sequences, and what it needs to start never shrinks but for the caching
        # allocator's segments: a 1-10 MiB request reserves a 20 MiB segment, a larger one is rounded to 2 MiB,
        # so a transient that grows past 10 MiB reserves less
        assert e2.engine_pool.share_bytes == e1.engine_pool.share_bytes
        if field != "batch":
            assert e2.engine_pool.sequences_held <= e1.engine_pool.sequences_held
        assert _not_less(e1.engine_pool.needed_bytes - e1.memory_bytes.allocator_overhead,
                         e2.engine_pool.needed_bytes - e2.memory_bytes.allocator_overhead)
        return
    note(f"{field} +{extra}: kv {e1.memory_bytes.kv_cache} ({e1.peak_phase}) -> {e2.memory_bytes.kv_cache} "
         f"({e2.peak_phase}); decode {e1.phase_allocated_bytes['decode']} -> {e2.phase_allocated_bytes['decode']}")
    # the whole cache (held at the end of decode) and the allocated peak never shrink
    assert _not_less(e1.phase_allocated_bytes["decode"], e2.phase_allocated_bytes["decode"])
    assert _not_less(e1.peak_allocated_bytes, e2.peak_allocated_bytes)
    # the KV cache in the breakdown is the one live at the peak phase: the prompt's cache when the peak is the
    # prefill, the whole cache when it is the decode -- monotone as long as the peak stays in the same phase
    if e1.peak_phase == e2.peak_phase:
        assert _not_less(e1.memory_bytes.kv_cache, e2.memory_bytes.kv_cache)


@settings(max_examples=scaled(80), **FAST)
@given(st.sampled_from(ALL_MODELS), st.booleans(), st.sampled_from([32, 64, 128, 256, 4096]),
       st.sampled_from(["q_proj,v_proj", "all-linear"]))
def test_nf4_weights_never_exceed_bf16(model, double_quant, blocksize, targets):
    # inference: the same model served from NF4 vs bf16 weights
    gen = 0 if get_model(model).arch == "encoder" else 8  # encoders do not generate
    base = {"model": model, "precision": "bf16", "workload": {"task": "infer", "batch": 1, "prompt_len": 64, "gen_len": gen}}
    dense = estimate(base, what_fits=False)
    nf4 = estimate({**base, "inference": {"weights": "nf4", "double_quant": double_quant}}, what_fits=False)
    note(f"infer: bf16 {dense.memory_bytes.weights} vs nf4 {nf4.memory_bytes.weights}+{nf4.memory_bytes.quant_scales}")
    assert nf4.memory_bytes.weights + nf4.memory_bytes.quant_scales <= dense.memory_bytes.weights
    assert nf4.n_params == dense.n_params
    # training: QLoRA (NF4 base) vs LoRA (bf16 base) with the same adapters
    tg = "all-linear" if targets == "all-linear" else list(_arch_targets(model)[:1])
    tr = {"model": model, "precision": "bf16", "workload": {"task": "train", "micro_batch": 1, "seq_len": 64}}
    lora = estimate({**tr, "method": {"kind": "lora", "r": 8, "targets": tg}}, what_fits=False)
    qlora = estimate({**tr, "method": {"kind": "qlora", "quant": "nf4", "r": 8, "targets": tg,
                                       "double_quant": double_quant, "blocksize": blocksize}}, what_fits=False)
    note(f"train: lora {lora.memory_bytes.weights} vs qlora {qlora.memory_bytes.weights}+{qlora.memory_bytes.quant_scales}")
    assert qlora.memory_bytes.weights + qlora.memory_bytes.quant_scales <= lora.memory_bytes.weights
