"""Engine bugs found by the property tests (tests/properties) and by probing, one minimal input each.

A test with a "Was a bug" docstring failed on the engine when it was written and passes since the fix; an open
bug is ``@pytest.mark.xfail(strict=True, reason=...)``: the suite stays green, and the day the engine is fixed the
test XPASSes, fails as strict, and the marker must go.  Expected values are derived in the test (PEFT's own counts
where PEFT is the reference).
"""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from simulator import Scenario, estimate, get_model


def trainable(d: dict) -> int:
    return estimate(d, what_fits=False).n_trainable_params


# --------------------------------------------------------------------------------------------------- performance


def test_huge_generation_length_is_fast():
    """Was a bug: decode FLOPs summed the context over every generated token in a Python loop (O(gen_len);
    gen_len=10**9 took ~90 s); now the closed form gen_len*prompt_len + gen_len*(gen_len-1)/2."""
    t = time.perf_counter()
    estimate({"model": "llama-3.1-8b", "workload": {"task": "infer", "batch": 1, "prompt_len": 16, "gen_len": 10**7}},
             what_fits=False)
    estimate({"model": "llama-3.2-1b", "workload": {"task": "infer", "batch": 1, "prompt_len": 16, "gen_len": 10**30}},
             what_fits=False)
    assert time.perf_counter() - t < 1.0  # cold loads included; the loop took ~1 s for 10**7 alone


def test_decode_flops_closed_form_matches():
    """Whatever the implementation, decode FLOPs are linear in the sum of context lengths."""
    base = {"model": "gpt2", "workload": {"task": "infer", "batch": 2, "prompt_len": 10, "gen_len": 0}}
    f0 = estimate(base, what_fits=False).flops_per_step
    f1 = estimate({**base, "workload": {**base["workload"], "gen_len": 1}}, what_fits=False).flops_per_step
    f2 = estimate({**base, "workload": {**base["workload"], "gen_len": 2}}, what_fits=False).flops_per_step
    f3 = estimate({**base, "workload": {**base["workload"], "gen_len": 3}}, what_fits=False).flops_per_step
    # per generated token: lin + att * context; contexts 10, 11, 12 -> second differences constant
    assert (f3 - f2) - (f2 - f1) == pytest.approx((f2 - f1) - (f1 - f0), rel=1e-9)


# ------------------------------------------------------------------------------------------------------- targets


def test_deberta_lora_default_targets_train_something():
    """Was a bug: deberta-v2 module names are BERT's (attention.self.query/key/value) while HF DebertaV2 uses
    query_proj/key_proj/value_proj; the engine's own LoRA default for deberta_v2 (query_proj, value_proj) then
    matches no module: LoRA with default targets trains 0 parameters"""
    d = {"model": "deberta-v3-base", "workload": {"task": "train", "seq_len": 128}, "method": {"kind": "lora"}}
    a = get_model("deberta-v3-base")
    # PEFT default for deberta-v2: query_proj, value_proj; r=8: (h*r + r*h) per module, 2 modules per layer
    assert trainable(d) == a.n_layers * 2 * (2 * a.hidden * 8)


def test_deberta_accepts_hf_module_names():
    """Was a bug: HF DebertaV2 names its projections query_proj/key_proj/value_proj; they are rejected as unknown
    targets"""
    Scenario.model_validate({"model": "deberta-v3-base", "workload": {"task": "train", "seq_len": 128},
                             "method": {"kind": "lora", "targets": ["query_proj", "value_proj"]}})


@pytest.mark.parametrize("model,target", [("llama-3.2-1b", "embed_tokens"), ("opt-125m", "embed_tokens"), ("gpt2", "wte")])
def test_lora_on_input_embedding_trains_adapters(model, target):
    """Was a bug: LoRA on the input embedding (listed as an allowed target: embed_tokens / wte) adapts nothing: 0
    trainable parameters; PEFT adds lora_embedding_A (r x V) and lora_embedding_B (h x r)"""
    a = get_model(model)
    d = {"model": model, "workload": {"task": "train", "seq_len": 128}, "method": {"kind": "lora", "r": 8, "targets": [target]}}
    assert trainable(d) == 8 * a.vocab + a.hidden * 8


@pytest.mark.parametrize("target", ["gate_up_proj", "down_proj"])
def test_mixtral_expert_targets_are_rejected_or_trained(target):
    """Was a bug: Mixtral: 'gate_up_proj' and 'down_proj' (fused 3-D expert parameters) are listed as allowed LoRA
    targets but adapt nothing (0 trainable): either reject them (they are not nn.Linear) or model PEFT's
    target_parameters"""
    d = {"model": "mixtral-8x7b", "workload": {"task": "train", "seq_len": 128},
         "method": {"kind": "lora", "targets": [target]}}
    try:
        n = trainable(d)
    except ValidationError:
        return
    assert n > 0


# one model per family (and the MoE one): every name the validator accepts as a target
REPRESENTATIVES = ["llama-3.2-1b", "qwen-1.8b", "gpt2", "opt-125m", "bloom-7b1", "falcon-7b", "stablelm-base-alpha-3b",
                   "phi-1.5", "t5-base", "flan-t5-xl", "bert-base-uncased", "roberta-base", "deberta-v3-base", "mixtral-8x7b"]


def _targets_adapting_nothing(kind: str) -> list[str]:
    from simulator.graph.build import target_names

    out = []
    for m in REPRESENTATIVES:
        for t in sorted(target_names(get_model(m))):
            d = {"model": m, "workload": {"task": "train", "seq_len": 128}, "method": {"kind": kind, "targets": [t]}}
            try:
                n = trainable(d)
            except ValidationError:
                continue  # rejecting a target is fine; accepting it and adapting nothing is not
            if n == 0:
                out.append(f"{m}:{t}")
    return out


def test_every_accepted_lora_target_adapts_something():
    """Was a bug: targets the validator accepts (target_names) but that adapt no module (0 trainable parameters): names
    with three or more dotted parts never match because Plan.lora_on compares only the leaf and the last two parts
    (bert 'attention.self.query', 'attention.output.dense'; t5 'layer.0.SelfAttention.q',
    'layer.1.DenseReluDense.wo'; mixtral 'mlp.experts.down_proj'), plus the input embeddings (embed_tokens, wte,
    word_embeddings, embed_in) and mixtral's fused experts (gate_up_proj, down_proj). PEFT matches a target when the
    module name equals it or ends with '.' + target"""
    assert _targets_adapting_nothing("lora") == []


def test_every_accepted_ia3_target_adapts_something():
    """Was a bug: IA3 targets accepted but adapting nothing: lm_head on every model (PEFT IA3 scales any nn.Linear),
    the input embeddings (PEFT IA3 raises for nn.Embedding: should be rejected) and the 3+-part dotted names as for
    LoRA"""
    assert _targets_adapting_nothing("ia3") == []


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_t5_without_cross_attention_lists_no_cross_attention_targets(arch):
    spec = {"name": "t5-enc", "family": "t5", "arch": arch, "n_layers": 2, "hidden": 64, "n_heads": 4,
            "intermediate": 128, "vocab": 100}
    bad = []
    for kind in ("lora", "ia3"):
        for t in ("layer.1.EncDecAttention.k", "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wo"):
            d = {"model": spec, "workload": {"task": "train", "seq_len": 16}, "method": {"kind": kind, "targets": [t]}}
            try:
                if trainable(d) == 0:
                    bad.append(f"{kind}:{t}")
            except ValidationError:
                pass  # rejected: fine
    assert bad == []


def test_modules_to_save_tied_head_counted_once():
    """Was a bug: modules_to_save=['lm_head'] on a tied-embedding model counts the head twice: the frozen
    original_module is counted as an untied copy (build.py weight(saved=True) drops tied_to). PEFT keeps the
    original tied and adds one trainable copy: n_params grows by V*h, not 2*V*h (peft 0.21 on a tiny tied Llama:
    138048 -> 203840)"""
    arch = {"name": "tiny", "family": "llama", "n_layers": 2, "hidden": 64, "n_heads": 4, "n_kv_heads": 2,
            "intermediate": 128, "vocab": 1000, "tied_embeddings": True}
    base = {"model": arch, "workload": {"task": "train", "seq_len": 16},
            "method": {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}}
    plain = estimate(base, what_fits=False)
    saved = estimate({**base, "method": {**base["method"], "modules_to_save": ["lm_head"]}}, what_fits=False)
    assert saved.n_params - plain.n_params == 1000 * 64  # one trainable copy of the V x h head
    assert saved.memory_bytes.weights == plain.memory_bytes.weights  # the frozen original stays tied


# -------------------------------------------------------------------------------------------------- validation


def test_models_listing_counts_every_model():
    """Was a bug: cli.model_rows built Scenario(model=a) with the default seq_len=2048, past the learned position
    table of gpt2*/bert*/roberta-base, and its bare except printed no parameter count for them."""
    from simulator.cli import model_rows

    assert [r["name"] for r in model_rows() if r["params"] is None] == []


def test_inference_past_learned_positions_is_rejected():
    """Was a bug: inference past a learned position table is accepted silently (gpt2: prompt 4096 + gen 4096 > 1024),
    while training past it is rejected"""
    with pytest.raises(ValidationError, match="max_position_embeddings"):
        Scenario.model_validate({"model": "gpt2", "workload": {"task": "infer", "prompt_len": 4096, "gen_len": 4096}})


@pytest.mark.parametrize("ff", [["fc2"], ["junk"]])
def test_ia3_feedforward_must_be_subset_of_targets(ff):
    """Was a bug: IA3 feedforward_modules that are not among targets (or do not exist) are accepted and ignored; PEFT
    raises 'feedforward_modules should be a subset of target_modules'"""
    with pytest.raises(ValidationError, match="feedforward"):
        Scenario.model_validate({"model": "opt-125m", "method": {"kind": "ia3", "targets": ["k_proj"], "feedforward_modules": ff}})


def test_what_fits_on_prompt_tuning_with_learned_positions():
    """Was a bug: estimate(what_fits=True) -- the default, and every `fitsim estimate` -- raises a ValidationError for
    a valid prompt-tuning scenario on a learned-position model: _largest searches seq_len up to
    max_position_embeddings, but the validator counts seq_len + n_virtual_tokens against that table (gpt2: 1024 + 20
    > 1024). The CLI then reports the valid input as bad input: 'fitsim: error: workload.seq_len=1024 exceeds ...',
    exit 2"""
    e = estimate({"model": "gpt2", "workload": {"task": "train", "micro_batch": 1, "seq_len": 21}, "method": {"kind": "prompt"}})
    assert e.max_seq_len_that_fits is not None and e.max_seq_len_that_fits + 20 <= 1024


def test_encoder_training_says_it_models_the_masked_lm_head():
    from simulator import estimate

    train = estimate({"model": "bert-base-uncased", "workload": {"task": "train", "micro_batch": 8, "seq_len": 512}},
                     what_fits=False)
    assert any("masked-LM head" in n and "30,522 logits" in n for n in train.notes)
    decoder = estimate({"model": "llama-3.2-1b", "workload": {"task": "train", "micro_batch": 1, "seq_len": 512}},
                       what_fits=False)
    assert not any("masked-LM head" in n for n in decoder.notes)
