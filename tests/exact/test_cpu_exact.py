"""The engine against real torch / transformers / peft modules on CPU: integers equal, no tolerance.

For tiny models built from configs, the engine's parameter counts, bytes saved for backward
(each storage once, per block and in total), gradient and optimizer-state bytes and FLOPs
(torch.utils.flop_counter) must equal what ``validate.cpu_truth.measure`` records.

Where torch's CPU path differs from CUDA the engine models CUDA and the test states the
difference exactly:
- ``native_layer_norm`` on CPU keeps mean/rstd of a 16-bit input in 16 bits (2 B per row);
  CUDA keeps them in fp32 (4 B per row), so a 16-bit LayerNorm model saves 2 x 2 B x rows more
  per norm on CUDA;
- adam's ``state['step']`` is a 0-dim fp32 tensor on the host (not GPU memory) unless fused;
  the CPU truth counts it;
- CPU has no mem-efficient / flash-attn-2 kernels and a different dropout (tested on CUDA only).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from simulator.config import ModelArch, Scenario  # noqa: E402
from simulator.estimate import _dims, cost_table_for  # noqa: E402
from simulator.graph.ir import basis  # noqa: E402
from simulator.memory import optimizer_state_bytes, step_counter_bytes  # noqa: E402
from validate.cpu_truth import measure  # noqa: E402

pytestmark = pytest.mark.torch

BASE = dict(name="tiny", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=160, vocab=128,
            max_position_embeddings=256)
# the post-norm BERT-style encoders: GELU MLP, biases everywhere, tied MLM head
_ENCODER = dict(arch="encoder", n_kv_heads=4, norm="layernorm", norm_bias=True, activation="gelu", gated_mlp=False,
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tied_embeddings=True)
ARCHS = {
    "llama": dict(family="llama"),
    "llama-tied": dict(family="llama", tied_embeddings=True),
    "qwen2": dict(family="llama", qkv_bias=True),
    "qwen3": dict(family="llama", qk_norm=True, head_dim=16),
    "mixtral": dict(family="llama", moe={"n_experts": 4, "top_k": 2}),
    "gpt2": dict(family="gpt2", n_kv_heads=4, position="learned", norm="layernorm", norm_bias=True,
                 activation="gelu_tanh", gated_mlp=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                 tied_embeddings=True),
    "gpt_neox": dict(family="gpt_neox", n_kv_heads=4, norm="layernorm", norm_bias=True, activation="gelu",
                     gated_mlp=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True, parallel_block=True,
                     rotary_fraction=0.25),
    "gptj": dict(family="gptj", n_kv_heads=4, norm="layernorm", norm_bias=True, activation="gelu_tanh",
                 gated_mlp=False, mlp_bias=True, lm_head_bias=True, parallel_block=True, rotary_fraction=0.5),
    "phi": dict(family="phi", norm="layernorm", norm_bias=True, activation="gelu_tanh", gated_mlp=False,
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, lm_head_bias=True, parallel_block=True,
                rotary_fraction=0.5),
    "phi3": dict(family="phi3"),
    "gemma": dict(family="llama", norm_plus_one=True, activation="gelu_tanh", head_dim=16, tied_embeddings=True),
    # Gemma 2/3 alternate sliding-window and global layers (the window here spans the whole context)
    "gemma2": dict(family="llama", norm_plus_one=True, sandwich_norm=True, activation="gelu_tanh", head_dim=16,
                   tied_embeddings=True, sliding_window=256, full_attention_every=2),
    "gemma3": dict(family="llama", norm_plus_one=True, sandwich_norm=True, qk_norm=True, activation="gelu_tanh",
                   head_dim=16, tied_embeddings=True, sliding_window=256, full_attention_every=2),
    "falcon-mqa": dict(family="falcon", n_kv_heads=1, norm="layernorm", norm_bias=True, activation="gelu",
                       gated_mlp=False, parallel_block=True, tied_embeddings=True, intermediate=256),
    "falcon-gqa": dict(family="falcon", n_kv_heads=2, norm="layernorm", norm_bias=True, activation="gelu",
                       gated_mlp=False, parallel_block=True, tied_embeddings=True, intermediate=256),
    "bloom": dict(family="bloom", n_kv_heads=4, position="alibi", norm="layernorm", norm_bias=True,
                  activation="gelu_tanh", gated_mlp=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                  tied_embeddings=True, intermediate=256),
    "opt": dict(family="opt", n_kv_heads=4, position="learned", norm="layernorm", norm_bias=True, activation="relu",
                gated_mlp=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True, tied_embeddings=True),
    "bert": dict(_ENCODER, family="bert", position="learned", type_vocab_size=2),
    "roberta": dict(_ENCODER, family="roberta", position="learned", type_vocab_size=1),
    # DeBERTa-v3's layout: relative attention over 2 x 12 buckets (not a divisor of the test's 16 tokens)
    "deberta": dict(_ENCODER, family="deberta_v2", position="relative", type_vocab_size=0,
                    relative_attention_num_buckets=12),
    # DeBERTa-v2 with absolute positions and token types instead (relative_attention false): its own attention
    # code without the c2p / p2c terms
    "deberta-abs": dict(_ENCODER, family="deberta_v2", position="learned", type_vocab_size=2),
    "t5": dict(family="t5", arch="encoder_decoder", n_kv_heads=4, position="relative", norm="rmsnorm",
               activation="relu", gated_mlp=False, tied_embeddings=True, head_dim=16),
}
# LayerNorms whose statistics are saved (see the module docstring), n_layers=2: GPT-2 ln_1, ln_2 per
# block + ln_f; BERT embeddings.LayerNorm + 2 per block + the MLM head's; GPT-NeoX input_layernorm and
# post_attention_layernorm per block + final_layer_norm; Phi its one input_layernorm per block +
# final_layernorm; BLOOM word_embeddings_layernorm + 2 per block + ln_f; Falcon-7B-style blocks one
# input_layernorm, the new decoder architecture ln_attn and ln_mlp, + ln_f.  With LoRA the first norm sees an input that needs no grad (frozen embeddings) and
# saves nothing.  Under full checkpointing only the norms outside the blocks save (FINAL_LAYERNORMS).
LAYERNORMS = {("gpt2", "full"): 2 * 2 + 1, ("gpt2", "lora"): 2 * 2 + 1 - 1, ("bert", "full"): 1 + 2 * 2 + 1,
              ("gpt_neox", "full"): 2 * 2 + 1, ("phi", "full"): 1 * 2 + 1,
              ("phi", "lora"): 1 * 2 + 1 - 1, ("gptj", "full"): 1 * 2 + 1, ("gptj", "lora"): 1 * 2 + 1 - 1,
              ("opt", "full"): 2 * 2 + 1, ("opt", "lora"): 2 * 2 + 1 - 1,
              ("bloom", "full"): 1 + 2 * 2 + 1, ("bloom", "lora"): 2 * 2 + 1 - 1,
              ("falcon-mqa", "lora"): 1 * 2 + 1 - 1, ("falcon-gqa", "full"): 2 * 2 + 1}
FINAL_LAYERNORMS = {"bert": 2, "bloom": 2}  # BERT: embeddings.LayerNorm and the MLM head's; BLOOM: its embedding norm and ln_f; the others: their final norm

LORA = {"kind": "lora", "r": 4}
CASES = [
    # (arch, precision, attention, method, checkpointing)
    ("llama", "bf16", "eager", {"kind": "full"}, "none"),
    ("llama", "bf16", "sdpa-math", {"kind": "full"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("llama", "fp32", "eager", {"kind": "full"}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "full"}, "none"),
    ("llama", "bf16-amp", "eager", {"kind": "full"}, "none"),
    ("llama", "bf16-amp", "sdpa-math", {"kind": "full"}, "none"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "full"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "full"}, "full"),
    ("llama", "bf16", "sdpa-flash", {"kind": "full"}, "every_k"),
    ("llama", "bf16", "sdpa-flash", LORA, "none"),
    ("llama", "fp32", "sdpa-flash", LORA, "none"),
    ("llama", "bf16-amp", "sdpa-flash", LORA, "none"),
    ("llama", "bf16", "eager", {"kind": "lora", "r": 4, "targets": "all-linear"}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "lora", "r": 8, "targets": "all-linear"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj"], "lora_fa": True}, "none"),
    ("llama", "bf16", "sdpa-flash", LORA, "full"),
    # reentrant (transformers 4's default): the backward reruns each block's whole forward, down_proj included
    ("llama", "bf16", "sdpa-flash", {"kind": "full"}, "full-reentrant"),
    ("llama", "bf16-amp", "sdpa-flash", LORA, "full-reentrant"),
    # torchtitan's per-op selective checkpointing (validate.torch_models.torchtitan_sac_policy): the block input,
    # the attention output and logsumexp, the products of every other mm (LoRA's counted with the base's)
    ("llama", "bf16", "sdpa-flash", {"kind": "full"}, "selective"),
    ("llama", "fp32", "sdpa-flash", {"kind": "full"}, "selective"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "full"}, "selective"),
    ("llama", "bf16", "sdpa-flash", LORA, "selective"),
    ("llama", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": "all-linear"}, "selective"),
    ("llama", "bf16", "sdpa-flash", {"kind": "dora", "r": 4, "targets": ["q_proj", "v_proj"]}, "none"),
    ("llama", "fp32", "eager", {"kind": "dora", "r": 4, "targets": "all-linear"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": ["embed_tokens", "q_proj"]}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "ia3", "targets": ["k_proj", "lm_head"], "feedforward_modules": []}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "ia3"}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "ia3"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "prompt", "n_virtual_tokens": 4}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "prefix", "n_virtual_tokens": 4}, "none"),
    ("llama", "fp32", "eager", {"kind": "prefix", "n_virtual_tokens": 4}, "none"),
    ("llama", "bf16", "eager", {"kind": "prefix", "n_virtual_tokens": 4, "prefix_projection": True}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "prompt", "n_virtual_tokens": 4}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "freeze", "n_trainable_layers": 1}, "none"),
    ("llama", "fp32", "eager", {"kind": "freeze", "n_trainable_layers": 1, "which": "first"}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "shira", "r": 4}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "shira", "r": 4, "targets": "all-linear"}, "none"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "shira", "r": 4, "targets": ["q_proj", "down_proj"]}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "shira", "r": 4}, "full"),
    ("llama", "bf16", "sdpa-flash", {"kind": "shira", "r": 4, "targets": ["q_proj", "lm_head"]}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "adapter", "bottleneck": 8}, "none"),
    ("llama", "fp32", "sdpa-flash", {"kind": "adapter", "bottleneck": 8, "placement": "pfeiffer"}, "none"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "adapter", "bottleneck": 8}, "none"),
    ("llama", "bf16-amp", "eager", {"kind": "ia3"}, "none"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "freeze", "n_trainable_layers": 1}, "none"),
    ("llama", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "modules_to_save": ["lm_head"]}, "none"),
    ("llama", "bf16-amp", "sdpa-flash", {"kind": "lora", "r": 4, "modules_to_save": ["embed_tokens"]}, "none"),
    ("llama-tied", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "modules_to_save": ["lm_head"]}, "none"),
    ("qwen2", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("qwen2", "bf16", "eager", LORA, "none"),
    ("qwen3", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("qwen3", "fp32", "eager", LORA, "none"),
    ("mixtral", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("mixtral", "fp32", "sdpa-flash", {"kind": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}, "none"),
    ("mixtral", "bf16-amp", "sdpa-flash", {"kind": "full"}, "none"),
    ("gpt2", "fp32", "eager", {"kind": "full"}, "none"),
    ("gpt2", "bf16", "eager", {"kind": "full"}, "none"),
    ("gpt2", "bf16", "sdpa-flash", LORA, "none"),
    ("gpt2", "fp32", "sdpa-flash", {"kind": "bitfit"}, "none"),
    ("gpt_neox", "fp32", "sdpa-flash", LORA, "none"),
    ("gpt_neox", "fp32", "eager", {"kind": "full"}, "none"),
    ("gpt_neox", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("gpt_neox", "fp32", "sdpa-flash", {"kind": "full"}, "full"),
    ("phi", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("phi", "fp32", "eager", {"kind": "full"}, "none"),
    ("phi", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": "all-linear"}, "none"),
    ("phi", "fp32", "sdpa-flash", {"kind": "full"}, "full"),
    ("gptj", "fp32", "eager", {"kind": "full"}, "none"),
    ("gptj", "bf16", "eager", {"kind": "lora", "r": 4, "targets": "all-linear"}, "none"),
    ("gptj", "bf16-amp", "eager", {"kind": "full"}, "every_k"),
    ("llama", "bf16", "eager", {"kind": "full"}, "full"),
    ("llama", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": "all-linear"}, "full"),
    ("gpt2", "fp32", "eager", {"kind": "full"}, "full"),
    ("gpt_neox", "fp32", "eager", {"kind": "full"}, "full"),
    ("phi", "fp32", "eager", {"kind": "full"}, "full"),
    ("opt", "fp32", "eager", {"kind": "full"}, "none"),
    ("opt", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("opt", "bf16", "sdpa-flash", {"kind": "lora", "r": 4}, "full"),
    ("opt", "fp32", "eager", {"kind": "full"}, "full"),
    ("bloom", "fp32", "eager", {"kind": "full"}, "none"),
    ("bloom", "bf16", "eager", {"kind": "lora", "r": 4, "targets": "all-linear"}, "none"),
    ("bloom", "bf16-amp", "eager", {"kind": "full"}, "none"),
    ("bloom", "fp32", "eager", {"kind": "full"}, "full"),
    ("falcon-mqa", "fp32", "eager", {"kind": "full"}, "none"),
    ("falcon-mqa", "bf16", "eager", {"kind": "lora", "r": 4, "targets": "all-linear"}, "full"),
    ("falcon-gqa", "bf16", "eager", {"kind": "full"}, "none"),
    ("falcon-gqa", "fp32", "eager", {"kind": "full"}, "none"),
    ("falcon-gqa", "bf16-amp", "eager", {"kind": "full"}, "every_k"),
    # FalconModel materialises its causal mask for SDPA too: the memory-efficient kernel on CUDA, a mask per call
    ("falcon-gqa", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("falcon-gqa", "fp32", "sdpa-flash", LORA, "none"),
    ("falcon-gqa", "bf16", "sdpa-flash", {"kind": "full"}, "full"),
    ("falcon-gqa", "fp32", "sdpa-flash", LORA, "every_k"),
    ("gemma", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("gemma", "bf16-amp", "sdpa-flash", LORA, "none"),
    ("gemma2", "bf16", "eager", {"kind": "full"}, "none"),
    ("gemma2", "fp32", "eager", LORA, "full"),
    ("gemma3", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("gemma3", "bf16", "eager", LORA, "every_k"),
    ("phi3", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("phi3", "fp32", "eager", {"kind": "full"}, "none"),
    ("phi3", "bf16", "sdpa-flash", {"kind": "lora", "r": 4, "targets": ["qkv_proj", "gate_up_proj"]}, "none"),
    ("phi3", "bf16-amp", "sdpa-flash", {"kind": "lora", "r": 4, "targets": "all-linear"}, "every_k"),
    ("bert", "fp32", "eager", {"kind": "full"}, "none"),
    ("bert", "fp32", "sdpa-flash", LORA, "none"),
    ("bert", "bf16", "sdpa-flash", {"kind": "full"}, "none"),
    ("roberta", "fp32", "eager", {"kind": "full"}, "none"),
    ("roberta", "fp32", "sdpa-flash", LORA, "none"),
    ("roberta", "fp32", "sdpa-flash", {"kind": "full"}, "full"),
    ("deberta", "fp32", "eager", {"kind": "full"}, "none"),
    ("deberta", "fp32", "eager", LORA, "none"),
    ("deberta", "fp32", "eager", {"kind": "lora", "r": 4, "targets": "all-linear"}, "none"),
    ("deberta", "fp32", "eager", {"kind": "full"}, "full"),
    ("deberta", "fp32", "eager", LORA, "full"),
    ("deberta-abs", "fp32", "eager", {"kind": "full"}, "none"),
    ("deberta-abs", "fp32", "eager", LORA, "full"),
    ("t5", "fp32", "eager", {"kind": "full"}, "none"),
    ("t5", "bf16", "eager", {"kind": "full"}, "none"),
    ("t5", "bf16", "eager", LORA, "none"),
    ("t5", "fp32", "eager", {"kind": "full"}, "full"),
    ("t5", "bf16", "eager", LORA, "full"),
    ("t5", "bf16-amp", "eager", {"kind": "full"}, "full"),
    # from_pretrained in fp16 keeps T5's wo in fp32: an fp32 residual stream from the first feed-forward on, and
    # fp16 clamps until then
    ("t5", "fp16", "eager", {"kind": "full"}, "none"),
    ("t5", "fp16", "eager", LORA, "none"),
    ("t5", "fp16", "eager", {"kind": "full"}, "full"),
    ("gpt2", "bf16-amp", "eager", {"kind": "full"}, "none"),
]


def _scenario(arch: str, precision: str, attention: str, method: dict, ckpt: str, **wl) -> Scenario:
    ck = ({"mode": ckpt, "every_k": 2} if ckpt == "every_k" else {"mode": "full", "reentrant": True}
          if ckpt == "full-reentrant" else {"mode": ckpt})
    workload = {"task": "train", "micro_batch": 2, "seq_len": 16, **wl}
    return Scenario(model=ModelArch(**{**BASE, **ARCHS[arch]}), precision=precision, attention=attention,
                    method=method, checkpointing=ck, workload=workload)


def _cuda_minus_cpu_bytes(sc: Scenario, arch: str) -> int:
    """Bytes the CUDA path saves beyond the CPU path (LayerNorm statistics of 16-bit inputs)."""
    key = (arch, sc.method.kind)
    if key in LAYERNORMS and sc.precision in ("bf16", "fp16"):
        rows = sc.workload.micro_batch * sc.workload.seq_len
        if sc.checkpointing.mode == "every_k":
            raise NotImplementedError("LayerNorm statistics under every-k checkpointing: not counted here")
        norms = FINAL_LAYERNORMS.get(arch, 1) if sc.checkpointing.mode == "full" else LAYERNORMS[key]
        return norms * 2 * rows * 2  # mean and rstd, 4 B instead of 2 B per row
    return 0


def _engine(sc: Scenario):
    ct = cost_table_for(sc)
    b, s, skv = _dims(sc, ct)
    return ct, basis(b, s, skv)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]['kind']}-{c[4]}")
def test_engine_equals_torch(case):
    arch = case[0]
    sc = _scenario(*case)
    truth = measure(sc)
    ct, B = _engine(sc)
    assert ct.n_params == truth.total_params
    assert ct.n_trainable == truth.trainable_params
    assert ct.trainable_bytes == truth.grad_bytes  # one .grad per trainable parameter, same dtype
    # every parameter's bytes in its own dtype (T5's wo in fp32 when the model loads in fp16); SHiRA's index
    # buffers are device memory the engine counts with the weights, not parameters
    if sc.method.kind != "shira":
        assert ct.frozen_dense_bytes + ct.trainable_bytes == truth.param_bytes
    saved = ct.at(ct.saved, B) - _cuda_minus_cpu_bytes(sc, arch)
    assert saved == truth.saved_bytes_total
    # every transformer block on its own (the truth names blocks by their HF path); LayerNorm models
    # in 16-bit are checked in total above (their per-block CPU/CUDA difference depends on the block)
    if not _cuda_minus_cpu_bytes(sc, arch):
        for name, value in ct.saved_by_layer.items():
            if name in truth.saved_bytes_by_layer and (".layers." in name or ".h." in name or ".block." in name
                                                       or ".layer." in name):
                assert ct.at(value, B) == truth.saved_bytes_by_layer[name], name
    assert ct.at(ct.fwd_flops, B) == truth.forward_flops
    assert ct.at(ct.bwd_flops, B) + ct.at(ct.recompute_flops, B) == truth.backward_flops
    assert ct.at(ct.recompute_flops, B) == truth.recompute_flops


def test_autocast_softmax_runs_in_fp32_on_cuda_only():
    """On CUDA, softmax is on autocast's fp32 list: a bf16 score tensor gives an fp32 softmax output (kept for its
    backward) and a bf16 copy for ``probs @ v``.  CPU's autocast lists no softmax, so a bf16 score tensor stays
    bf16 there.  T5's cross-attention adds a zero bias in the query's dtype (bf16 scores; its self-attention adds
    the fp32 bias table and its scores are fp32 on both), so the engine -- modelling CUDA -- counts 4 B more per
    cross-attention score than this CPU run, and nothing else differs."""
    sc = _scenario("t5", "bf16-amp", "eager", {"kind": "full"}, "none")
    truth = measure(sc)
    ct, B = _engine(sc)
    w, arch = sc.workload, sc.model
    scores = w.micro_batch * arch.n_heads * w.seq_len * w.seq_len
    assert ct.at(ct.saved, B) - truth.saved_bytes_total == arch.n_decoder_layers * scores * 4
    for i in range(arch.n_layers):
        name = f"encoder.block.{i}"
        assert ct.at(ct.saved_by_layer[name], B) == truth.saved_bytes_by_layer[name]


def test_deberta_autocast_softmax_difference_is_the_cuda_fp32_probabilities():
    """DeBERTa-v2 under autocast: its bf16 scores (bmm, gathers, the scaled sums) are the same on CPU and CUDA;
    CUDA's softmax returns fp32 (4 B kept for its backward) and ``bmm(probs, v)`` keeps a bf16 copy (2 B), where
    CPU keeps the one bf16 softmax output (2 B): the engine counts 4 B more per score element per layer.  The MLM
    head's LayerNorm takes the bf16 GELU output: CUDA's autocast runs layer_norm in fp32 and keeps an fp32 copy of
    its input (4 B per element), CPU's runs it on the bf16 input (2 B)."""
    sc = _scenario("deberta", "bf16-amp", "eager", {"kind": "full"}, "none")
    truth = measure(sc)
    ct, B = _engine(sc)
    w, arch = sc.workload, sc.model
    scores = w.micro_batch * arch.n_heads * w.seq_len * w.seq_len
    head_norm_input = w.micro_batch * w.seq_len * arch.hidden * 2
    assert ct.at(ct.saved, B) - truth.saved_bytes_total == arch.n_layers * scores * 4 + head_norm_input
    for i in range(arch.n_layers):
        name = f"deberta.encoder.layer.{i}"
        assert ct.at(ct.saved_by_layer[name], B) - truth.saved_bytes_by_layer[name] == scores * 4
    assert ct.at(ct.fwd_flops, B) == truth.forward_flops
    assert ct.n_params == truth.total_params


def test_gpt_neox_fp32_sdpa_output_copy_is_cpu_only():
    """GPT-NeoX's roped q is a contiguous (b, heads, s, d) tensor (rotary sliced and concatenated back after the
    transpose).  CPU's flash kernel takes fp32 and lays its output out like q, so the reshape before ``dense``
    copies and ``dense`` saves that copy; on CUDA, fp32 SDPA runs the memory-efficient kernel, whose output is
    (b, s, heads, d), and the reshape is a view.  The engine models CUDA: one b*s*hidden fp32 tensor per block
    fewer than this CPU run, and nothing else differs."""
    sc = _scenario("gpt_neox", "fp32", "sdpa-flash", {"kind": "full"}, "none")
    truth = measure(sc)
    ct, B = _engine(sc)
    w = sc.workload
    copy_bytes = w.micro_batch * w.seq_len * sc.model.hidden * 4
    assert truth.saved_bytes_total - ct.at(ct.saved, B) == sc.model.n_layers * copy_bytes
    for i in range(sc.model.n_layers):
        name = f"gpt_neox.layers.{i}"
        assert truth.saved_bytes_by_layer[name] - ct.at(ct.saved_by_layer[name], B) == copy_bytes


OPTIMIZERS = [
    {"name": "adamw"}, {"name": "adam"}, {"name": "adamw", "impl": "fused"}, {"name": "sgd"},
    {"name": "sgd-momentum"}, {"name": "adafactor"}, {"name": "adafactor", "beta1": False},
    {"name": "adamw-8bit"},
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("precision,method", [("fp32", {"kind": "full"}), ("bf16", LORA), ("bf16", {"kind": "full"})])
def test_optimizer_state_bytes_equal_torch(opt, precision, method):
    sc = _scenario("llama", precision, "sdpa-flash", method, "none").model_copy(update={})
    sc = Scenario.model_validate({**sc.model_dump(), "optimizer": opt})
    truth = measure(sc)
    ct, _ = _engine(sc)
    n_tensors = ct.n_trainable_tensors
    predicted = optimizer_state_bytes(ct.trainable_groups, sc.optimizer.name, sc.optimizer.beta1)
    # adam keeps a 0-dim fp32 'step' per parameter (host memory unless fused; the CPU truth counts it)
    predicted += step_counter_bytes(n_tensors, sc.optimizer.name, on_device_only=False)
    assert predicted == truth.optimizer_state_bytes


@pytest.mark.parametrize("double_quant,use_dora", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_qlora_equals_bitsandbytes(double_quant, use_dora, checkpointing):
    """QLoRA on bitsandbytes 4-bit layers (its CPU backend runs the same quantization): the frozen storage
    (4-bit weights, absmax, nested state, code tables and the 16-bit rest), trainable adapters, gradients,
    saved activations and backward FLOPs are exact.  Forward (and recomputed forward) FLOPs are not compared:
    the 4-bit matmul runs inside a bitsandbytes custom op the FLOP counter cannot see into.  QDoRA (PEFT's
    ``use_dora=True`` on the same layers) adds the magnitude vectors and DoRA's saved tensors."""
    pytest.importorskip("bitsandbytes")
    from simulator import estimate

    method = {"kind": "qlora", "r": 4, "targets": "all-linear", "double_quant": double_quant, "use_dora": use_dora}
    sc = _scenario("llama", "bf16", "sdpa-math", method, checkpointing)
    truth = measure(sc)
    ct, B = _engine(sc)
    mb = estimate(sc).memory_bytes
    assert mb.weights + mb.quant_scales == truth.param_bytes + truth.quant_state_bytes - truth.trainable_param_bytes
    assert mb.trainable_weights == truth.trainable_param_bytes
    assert ct.n_trainable == truth.trainable_params
    assert ct.trainable_bytes == truth.grad_bytes
    assert ct.at(ct.saved, B) == truth.saved_bytes_total
    assert ct.at(ct.bwd_flops, B) == truth.backward_flops - truth.recompute_flops  # recompute: forward again


@pytest.mark.parametrize("quant,precision,upcast,checkpointing", [
    ("nf4", "bf16", "all", "none"), ("nf4", "bf16-amp", "all", "none"), ("nf4", "bf16-amp", "norms", "none"),
    ("nf4", "bf16-amp", "all", "full"), ("fp4", "fp16", "all", "none"), ("nf4", "bf16", "all", "full-reentrant"),
    ("int8", "bf16", "all", "none"),
])
def test_kbit_prepared_qlora_equals_bitsandbytes(quant, precision, upcast, checkpointing):
    """PEFT's ``prepare_model_for_kbit_training`` leaves every unquantized parameter fp32 ('all'), TRL's bf16
    casting after it the norms only ('norms').  The residual stream turns fp32 and each 4-bit layer casts its
    input to the compute dtype and its output back (an int8 layer returns its input's dtype): the frozen storage,
    the saved activations and the backward FLOPs are exact against bitsandbytes' own layers, and the fp32 stream
    saves more than the 16-bit one.  (int8 under autocast is left out: on CPU bitsandbytes trains int8 layers
    through a dequantizing F.linear that autocast narrows, where CUDA's MatMul8bitLt returns the input's dtype.)"""
    pytest.importorskip("bitsandbytes")
    from simulator import estimate

    method = {"kind": "qlora", "quant": quant, "r": 4, "targets": "all-linear", "fp32_unquantized": upcast}
    sc = _scenario("llama", precision, "sdpa-math", method, checkpointing)
    truth = measure(sc)
    ct, B = _engine(sc)
    mb = estimate(sc).memory_bytes
    assert mb.weights + mb.quant_scales == truth.param_bytes + truth.quant_state_bytes - truth.trainable_param_bytes
    assert mb.trainable_weights == truth.trainable_param_bytes
    assert ct.at(ct.saved, B) == truth.saved_bytes_total
    assert ct.at(ct.bwd_flops, B) == truth.backward_flops - truth.recompute_flops
    plain, _ = _engine(_scenario("llama", precision, "sdpa-math", {**method, "fp32_unquantized": "none"},
                                 checkpointing))
    assert ct.at(ct.saved, B) > plain.at(plain.saved, B)


def test_lora_trainable_count_formula():
    """r * (in + out) per adapted module: q (64 -> 64) and v (64 -> 32) in 2 layers, r = 4."""
    ct, _ = _engine(_scenario("llama", "bf16", "sdpa-flash", LORA, "none"))
    assert ct.n_trainable == 2 * 4 * ((64 + 64) + (64 + 32))
