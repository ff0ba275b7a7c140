"""The CPU ground truth itself: real torch/transformers/peft tiny models, counted exactly.

Every expected number is derived here from the tiny architecture (arithmetic in the comments);
nothing is a pinned float.  Sizes: b=2 sequences of s=16 tokens, h=64, 4 heads of d=16, 2 KV heads,
i=128, V=128, 2 blocks.
"""

from __future__ import annotations

import math
import warnings

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402

from simulator.config import (  # noqa: E402
    IA3,
    Adapter,
    Checkpointing,
    DoRA,
    Freeze,
    Full,
    LoRA,
    ModelArch,
    MoE,
    Optimizer,
    PromptTuning,
    QLoRA,
    Scenario,
    TrainWorkload,
)
from validate.cpu_truth import Truth, measure  # noqa: E402
from validate.torch_models import build_model, module_paths  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

B, S, H, NH, KV, D, I, V, L = 2, 16, 64, 4, 2, 16, 128, 128, 2
WORKLOAD = TrainWorkload(micro_batch=B, seq_len=S)
FP32 = 4

# --------------------------------------------------------------------------------------------
# Tiny architectures
# --------------------------------------------------------------------------------------------

_DECODER = dict(n_layers=L, hidden=H, n_heads=NH, n_kv_heads=KV, intermediate=I, vocab=V, max_position_embeddings=64)
_LEARNED = dict(
    n_layers=L, hidden=H, n_heads=NH, intermediate=I, vocab=V, max_position_embeddings=64, position="learned",
    norm="layernorm", norm_bias=True, gated_mlp=False, activation="gelu",
    qkv_bias=True, attn_out_bias=True, mlp_bias=True,
)

ARCHS = {
    "llama": ModelArch(name="tiny-llama", family="llama", **_DECODER),
    "qwen2": ModelArch(name="tiny-qwen2", family="llama", qkv_bias=True, **_DECODER),
    "mixtral": ModelArch(name="tiny-mixtral", family="llama", moe=MoE(n_experts=4, top_k=2), **_DECODER),
    "gpt2": ModelArch(name="tiny-gpt2", family="gpt2", **{**_LEARNED, "activation": "gelu_tanh"}),
    # tied as released (untied, transformers 5 leaves cls.predictions.bias unused beside decoder.bias)
    "bert": ModelArch(
        name="tiny-bert", family="bert", arch="encoder", type_vocab_size=2, tied_embeddings=True, **_LEARNED
    ),
    "t5": ModelArch(
        name="tiny-t5", family="t5", arch="encoder_decoder", n_layers=L, hidden=H, n_heads=NH, intermediate=I,
        vocab=V, position="relative", activation="relu", gated_mlp=False,
    ),
}

LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"],
}

ATTENTION = {"t5": "sdpa-math"}  # T5's learned position bias is a float mask: no flash kernel (see torch_models)


def scenario(family: str = "llama", **kw) -> Scenario:
    """A validated Scenario; falls back to ``model_construct`` while the gpu / target validators'
    packages are not importable."""
    kw = {"workload": WORKLOAD, "precision": "fp32", "attention": ATTENTION.get(family, "sdpa-flash"), **kw}
    arch = kw.pop("model", ARCHS[family])
    try:
        return Scenario(model=arch, **kw)
    except (ImportError, AttributeError):
        return Scenario.model_construct(model=arch, **kw)


_CACHE: dict[str, Truth] = {}


def truth(sc: Scenario) -> Truth:
    key = sc.model_dump_json()
    if key not in _CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _CACHE[key] = measure(sc)
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# The harness runs everywhere, and its totals are consistent
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(ARCHS))
@pytest.mark.parametrize("method", ["full", "lora"])
def test_harness_runs_and_is_self_consistent(family, method):
    m = Full() if method == "full" else LoRA(r=4, targets=LORA_TARGETS[family])
    t = truth(scenario(family, method=m))
    assert math.isfinite(t.loss) and t.loss > 0
    assert t.saved_bytes_total == sum(t.saved_bytes_by_module.values()) == sum(t.saved_bytes_by_layer.values())
    assert t.saved_bytes_total == sum(t.saved_bytes_by_dtype.values()) > 0
    # exclusive per-module FLOPs add up to FlopCounterMode's totals
    assert sum(t.forward_flops_by_module.values()) == t.forward_flops > 0
    assert sum(t.backward_flops_by_module.values()) + t.recompute_flops == t.backward_flops > 0
    assert t.recompute_flops == 0 and t.checkpointed_layers == ()
    # fp32: one fp32 gradient per trainable element
    assert t.grad_bytes == t.trainable_param_bytes == FP32 * t.trainable_params
    if method == "full":
        assert t.trainable_params == t.total_params
    assert all("default" not in k.split(".") and not k.startswith("base_model") for k in t.saved_bytes_by_module)


# --------------------------------------------------------------------------------------------
# LoRA: r * (in + out) per adapted module
# --------------------------------------------------------------------------------------------


def _lora_modules(family: str) -> list[tuple[int, int]]:
    """(in, out) of every module LORA_TARGETS adapts."""
    q, kv, inner = NH * D, KV * D, NH * D
    if family in ("llama", "qwen2", "mixtral"):
        return [(H, q), (H, kv)] * L  # q_proj, v_proj (GQA: v has kv heads)
    if family == "gpt2":
        return [(H, 3 * H)] * L  # fused c_attn
    if family == "bert":
        return [(H, H), (H, H)] * L  # query, value
    # T5: q, v of the encoder self-attention; q, v of the decoder self- and cross-attention
    return [(H, inner)] * (2 * L) + [(H, inner)] * (4 * L)


@pytest.mark.parametrize("family", list(ARCHS))
def test_lora_trainable_count_is_r_times_in_plus_out(family):
    r = 4
    t = truth(scenario(family, method=LoRA(r=r, targets=LORA_TARGETS[family])))
    expected = sum(r * (i + o) for i, o in _lora_modules(family))
    assert t.trainable_params == expected
    base = truth(scenario(family, method=Full()))
    assert t.total_params == base.total_params + expected


def test_lora_paths_are_hf_paths_without_the_adapter_name():
    t = truth(scenario("llama", method=LoRA(r=4, targets=["q_proj", "v_proj"])))
    keys = set(t.saved_bytes_by_module)
    # lora_A of q_proj saves the normed block input x: b*s*h fp32 (v_proj's lora_A shares that storage)
    assert t.saved_bytes_by_module["model.layers.0.self_attn.q_proj.lora_A"] == B * S * H * FP32
    # lora_B saves lora_A's output: b*s*r
    assert t.saved_bytes_by_module["model.layers.0.self_attn.q_proj.lora_B"] == B * S * 4 * FP32
    assert "model.layers.0.self_attn.v_proj.lora_A" not in keys


def test_module_paths_strip_peft_wrappers():
    model = build_model(scenario("llama", method=LoRA(r=4, modules_to_save=["lm_head"])))
    paths = set(module_paths(model).values())
    assert {"", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj.lora_A", "lm_head"} <= paths
    assert not any(p.startswith("base_model") or "default" in p.split(".") or "base_layer" in p for p in paths)


# --------------------------------------------------------------------------------------------
# Frozen blocks save nothing
# --------------------------------------------------------------------------------------------


def test_frozen_blocks_save_nothing_when_only_the_head_trains():
    # Untied embeddings, 0 trainable blocks, head + final norm trainable: nothing inside the blocks
    # requires grad (frozen linears save no input, frozen norms on a no-grad input save nothing).
    t = truth(scenario("llama", method=Freeze(n_trainable_layers=0, train_lm_head=True)))
    assert t.trainable_params == V * H + H  # lm_head (untied) + model.norm
    assert sum(v for k, v in t.saved_bytes_by_module.items() if k.startswith("model.layers.")) == 0
    # the final norm's input needs no grad: only its weight does, so it saves the normed x (b*s*h) alone
    assert t.saved_bytes_by_module["model.norm"] == B * S * H * FP32


def test_bitfit_trains_only_biases():
    # Qwen2-style: bias on q (64), k (32), v (32) per block
    from simulator.config import BitFit

    t = truth(scenario("qwen2", method=BitFit()))
    assert t.trainable_params == L * (NH * D + 2 * KV * D)


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


def _trainable_tensors(sc: Scenario) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(sc)
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_adamw_fp32_state_is_8_bytes_per_param_plus_a_step_tensor_each(impl):
    # exp_avg + exp_avg_sq: 2 x 4 B per trainable element; state['step'] is a 0-dim float32 tensor
    # per parameter tensor on CPU (on CUDA it stays on the host unless fused/capturable): 4 B each.
    sc = scenario("llama", optimizer=Optimizer(name="adamw", impl=impl))
    t = truth(sc)
    n_tensors = len(_trainable_tensors(sc))
    assert t.optimizer_state_bytes_by_key == {
        "exp_avg": FP32 * t.trainable_params, "exp_avg_sq": FP32 * t.trainable_params, "step": 4 * n_tensors,
    }
    assert t.optimizer_state_bytes == 8 * t.trainable_params + 4 * n_tensors


def test_pure_bf16_adamw_keeps_bf16_moments():
    t = truth(scenario("llama", precision="bf16"))
    assert t.param_bytes == 2 * t.total_params
    assert t.optimizer_state_bytes_by_key["exp_avg"] == 2 * t.trainable_params


@pytest.mark.parametrize("name, per_param", [("sgd", 0), ("sgd-momentum", FP32)])
def test_sgd_state(name, per_param):
    t = truth(scenario("llama", optimizer=Optimizer(name=name)))
    assert t.optimizer_state_bytes == per_param * t.trainable_params


@pytest.mark.parametrize("beta1", [True, False])
def test_adafactor_state_is_factored(beta1):
    # transformers Adafactor: exp_avg (if beta1) like the param; for >=2-D params a row (shape[:-1]) and
    # a column (shape[:-2] + shape[-1:]) second moment, for 1-D a full one; 'RMS' is a 0-dim fp32 tensor.
    sc = scenario("llama", optimizer=Optimizer(name="adafactor", beta1=beta1))
    t = truth(sc)
    tensors = _trainable_tensors(sc)
    factored = [p for p in tensors if p.dim() >= 2]
    expected = {
        "exp_avg_sq_row": FP32 * sum(p.shape[:-1].numel() for p in factored),
        "exp_avg_sq_col": FP32 * sum((p.shape[:-2] + p.shape[-1:]).numel() for p in factored),
        "exp_avg_sq": FP32 * sum(p.numel() for p in tensors if p.dim() < 2),
        "RMS": FP32 * len(tensors),
    }
    if beta1:
        expected["exp_avg"] = FP32 * t.trainable_params
    assert t.optimizer_state_bytes_by_key == expected


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def _llama_linear_params() -> int:
    per_block = H * NH * D + 2 * H * KV * D + NH * D * H + 3 * H * I  # q, k, v, o, gate, up, down
    return L * per_block + V * H  # + lm_head


def test_llama_flops_match_the_textbook_formula():
    t = truth(scenario("llama"))
    tokens = B * S
    attention = L * 4 * B * NH * S * S * D  # QK^T and PV, 2 flops per MAC, no causal discount (torch's formula)
    assert t.forward_flops == 2 * tokens * _llama_linear_params() + attention
    # backward: 2x per linear (grad input + grad weight); attention 2.5x (torch counts 5 matmuls)
    assert t.backward_flops == 4 * tokens * _llama_linear_params() + attention * 5 // 2
    assert t.forward_flops_by_module["model.layers.0.self_attn.q_proj"] == 2 * tokens * H * NH * D
    assert t.backward_flops_by_module["model.layers.1.mlp.down_proj"] == 4 * tokens * I * H


def test_cpu_flash_attention_is_counted_like_sdpa_math():
    # torch's FlopCounterMode has no formula for the CPU flash kernel; ours makes it equal the math path
    flash = truth(scenario("llama", attention="sdpa-flash"))
    sdpa_math = truth(scenario("llama", attention="sdpa-math"))
    assert flash.forward_flops == sdpa_math.forward_flops
    assert flash.forward_flops_by_module["model.layers.0.self_attn"] == 4 * B * NH * S * S * D


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


def test_full_checkpointing_keeps_only_block_inputs():
    t = truth(scenario("llama", checkpointing=Checkpointing(mode="full")))
    plain = truth(scenario("llama"))
    assert t.checkpointed_layers == ("model.layers.0", "model.layers.1")
    hidden = B * S * H * FP32
    rope = 2 * S * D * FP32 + S * 8  # cos and sin (1, s, d) fp32, position_ids (1, s) int64: shared, charged once
    assert t.saved_bytes_by_layer["model.layers.0"] == hidden + rope
    assert t.saved_bytes_by_layer["model.layers.1"] == hidden
    assert not any(k.startswith("model.layers.0.") for k in t.saved_bytes_by_module)
    # the gradient ops are the same; the recomputation comes on top (early stop: the last matmul of
    # each block, down_proj, is not re-run because nothing saved depends on its output)
    assert t.backward_flops - t.recompute_flops == plain.backward_flops
    block0 = {k: v for k, v in plain.forward_flops_by_module.items() if k.startswith("model.layers.0.")}
    assert t.recompute_flops == L * (sum(block0.values()) - block0["model.layers.0.mlp.down_proj"])


def test_every_k_checkpoints_blocks_0_k_2k():
    t = truth(scenario("llama", checkpointing=Checkpointing(mode="every_k", every_k=2)))
    plain = truth(scenario("llama"))
    assert t.checkpointed_layers == ("model.layers.0",)
    assert t.saved_bytes_by_layer["model.layers.1"] == plain.saved_bytes_by_layer["model.layers.1"]


# --------------------------------------------------------------------------------------------
# Other methods build and count
# --------------------------------------------------------------------------------------------


def test_adapter_and_other_methods_train_what_they_should():
    m = 8
    houlsby = truth(scenario("llama", method=Adapter(bottleneck=m)))
    # two adapters per block, each down (h*m + m) + up (m*h + h)
    assert houlsby.trainable_params == L * 2 * (2 * H * m + m + H)
    pfeiffer = truth(scenario("llama", method=Adapter(bottleneck=m, placement="pfeiffer")))
    assert pfeiffer.trainable_params == L * (2 * H * m + m + H)
    assert "model.layers.0.mlp.down_proj.adapter.down" in pfeiffer.saved_bytes_by_module
    # IA3 with PEFT's Llama default (k_proj, v_proj outputs; down_proj input): kv + kv + i per block
    assert truth(scenario("llama", method=IA3())).trainable_params == L * (2 * KV * D + I)
    # prompt tuning: n_virtual_tokens x h
    assert truth(scenario("llama", method=PromptTuning(n_virtual_tokens=4))).trainable_params == 4 * H
    # DoRA: LoRA + one magnitude per output feature of each adapted module
    dora = truth(scenario("llama", method=DoRA(r=4, targets=["q_proj", "v_proj"])))
    assert dora.trainable_params == sum(4 * (i + o) + o for i, o in _lora_modules("llama"))
    # LoRA-FA: lora_A frozen, only B (out x r) trains
    fa = truth(scenario("llama", method=LoRA(r=4, targets=["q_proj", "v_proj"], lora_fa=True)))
    assert fa.trainable_params == sum(4 * o for _, o in _lora_modules("llama"))


def test_what_cpu_cannot_measure_says_so():
    cases = [
        dict(precision="bf16", method=QLoRA(quant="gptq")),
        dict(attention="flash2"),
        dict(attention="sdpa-mem-efficient"),
        dict(precision="fp8"),
        dict(optimizer=Optimizer(name="lion")),
        dict(optimizer=Optimizer(name="paged-adamw-8bit")),
    ]
    for kw in cases:
        with pytest.raises(NotImplementedError):
            measure(scenario("llama", **kw))
    with pytest.raises(NotImplementedError):  # CPU flash has no dropout
        measure(scenario("llama", attention="sdpa-flash"), dropout=0.1)
    with pytest.raises(NotImplementedError):  # T5's position bias is a float mask
        measure(scenario("t5", attention="sdpa-flash"))


# --------------------------------------------------------------------------------------------
# Behaviours the engine has to model (documented by measurement)
# --------------------------------------------------------------------------------------------


def test_amp_linear_saves_its_own_16bit_input_and_weight_copies():
    # Under autocast every linear casts its input (not a leaf: no cast cache, so q/k/v each make their
    # own copy) and its weight (a leaf that requires grad: cached, one copy per forward) to bf16 and saves
    # both: b*s*in*2 + in*out*2 bytes.  Same rule on CUDA.
    t = truth(scenario("llama", precision="bf16-amp"))
    assert t.saved_bytes_by_module["model.layers.1.self_attn.q_proj"] == B * S * H * 2 + H * NH * D * 2
    assert t.saved_bytes_by_module["model.layers.1.self_attn.k_proj"] == B * S * H * 2 + H * KV * D * 2


def test_cpu_dropout_saves_an_input_dtype_scale_not_a_bool_mask():
    # F.dropout on CPU is x * (bernoulli / (1-p)): MulBackward saves the fp32 scale tensor (4 B/elt).
    # CUDA uses the fused native_dropout, which saves a bool mask (1 B/elt).
    t = truth(scenario("llama", attention="eager", method=LoRA(r=4, targets=["q_proj"], dropout=0.1)))
    assert t.saved_bytes_by_module["model.layers.1.self_attn.q_proj.lora_dropout"] == B * S * H * FP32


def test_pure_bf16_peft_upcasts_adapters_to_fp32():
    # PEFT's autocast_adapter_dtype=True: LoRA weights are fp32 on a bf16 base, and lora_A saves an
    # fp32 copy of its bf16 input (x.to(lora_A.weight.dtype)).
    t = truth(scenario("llama", precision="bf16", method=LoRA(r=4, targets=["q_proj", "v_proj"])))
    assert t.trainable_param_bytes == FP32 * t.trainable_params
    assert t.saved_bytes_by_module["model.layers.1.self_attn.q_proj.lora_A"] == B * S * H * FP32


def test_moe_expert_flops_are_counted():
    # transformers 5 runs the experts with aten._grouped_mm (no FlopCounterMode formula; ours added):
    # b*s*top_k routed rows through gate_up (h -> 2i) and down (i -> h), on top of the dense llama's
    # attention + lm_head and the router (h -> n_experts).
    dense = truth(scenario("llama"))
    moe = truth(scenario("mixtral"))
    mlp = L * 2 * B * S * 3 * H * I  # the dense SwiGLU MLP, replaced
    routed = L * 2 * (B * S * 2) * (H * 2 * I + I * H)
    router = L * 2 * B * S * H * 4
    assert moe.forward_flops == dense.forward_flops - mlp + routed + router
    assert sum(v for k, v in moe.forward_flops_by_module.items() if k.endswith("mlp.experts")) == routed


def test_lora_without_targets_uses_peft_defaults():
    # targets=None -> PEFT's mapping by model_type: q_proj + v_proj for Llama, c_attn for GPT-2
    assert truth(scenario("llama", method=LoRA(r=4, targets=None))).trainable_params == sum(
        4 * (i + o) for i, o in _lora_modules("llama")
    )
    assert truth(scenario("gpt2", method=LoRA(r=4, targets=None))).trainable_params == sum(
        4 * (i + o) for i, o in _lora_modules("gpt2")
    )


# --------------------------------------------------------------------------------------------
# Inference prefill: the logits it keeps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill_logits", ["last", "all"])
def test_prefill_flops_follow_the_logits_kept(prefill_logits):
    """The engine's prefill FLOPs equal FlopCounterMode's over a real forward that keeps the logits the
    workload names (``logits_to_keep=1`` as generate passes it, or every position); the difference between
    the two is the LM head over the other ``s - 1`` positions of each sequence."""
    from torch.utils.flop_counter import FlopCounterMode

    from simulator import estimate
    from simulator.config import InferWorkload
    from validate.cpu_truth import EXTRA_FLOP_FORMULAS
    from validate.e2e import prefill_logits_kwargs

    wl = InferWorkload(batch=B, prompt_len=S, gen_len=0, prefill_logits=prefill_logits)
    sc = Scenario(model=ModelArch(name="tiny", family="llama", **_DECODER), workload=wl, precision="fp32",
                  attention="sdpa-math")
    model = build_model(sc.model_copy(update={"workload": WORKLOAD})).eval()
    ids = torch.randint(0, V, (B, S))
    keep = prefill_logits_kwargs(model, wl)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as fc:
        out = model(input_ids=ids, use_cache=True, **keep)
    assert out.logits.shape == (B, 1 if prefill_logits == "last" else S, V)
    assert estimate(sc).flops.forward == fc.get_total_flops()
    if prefill_logits == "last":
        all_ = estimate(sc.model_copy(update={"workload": wl.model_copy(update={"prefill_logits": "all"})}))
        assert all_.flops.forward - estimate(sc).flops.forward == 2 * B * (S - 1) * H * V
