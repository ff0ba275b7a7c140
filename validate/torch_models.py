"""Real torch / transformers / peft models for a :class:`~simulator.config.Scenario`, built on CPU.

This is the *ground truth* side of the exact CPU tests: every tiny model here is what a user of
transformers + peft would get for the same settings, randomly initialised from a config (no
downloads).  ``validate.cpu_truth.measure`` runs one training step on it and counts bytes and FLOPs.

What is built, per ``ModelArch``:

=====================  ======================================================================
family / flags         transformers config and model class
=====================  ======================================================================
llama                  ``LlamaConfig`` (attention_bias when qkv_bias *and* attn_out_bias)
llama + qkv_bias       ``Qwen2Config`` (bias on q/k/v only, none on o_proj)
llama + qk_norm        ``Qwen3Config``
llama + moe            ``MixtralConfig`` (fused 3-D expert weights in transformers 5)
llama + sandwich_norm  ``Gemma2Config`` (soft-capping off; eager attention only) or
                       ``Gemma3TextConfig`` when qk_norm is set as well
gpt2                   ``GPT2Config`` (gelu_tanh -> "gelu_new", the Python composite GPT-2 uses)
opt                    ``OPTConfig`` (pre-LN, learned positions with OPT's offset of 2 rows)
gpt_neox               ``GPTNeoXConfig`` (parallel residual as parallel_block; rotary_pct = rotary_fraction)
bloom                  ``BloomConfig`` (ALiBi; eager attention only in transformers 5)
falcon                 ``FalconConfig`` (one kv head: Falcon-7B's multi-query layout; more: the new decoder
                       architecture; eager attention)
gptj                   ``GPTJConfig`` (eager attention only in transformers 5; rotary_dim from rotary_fraction)
phi3                   ``Phi3Config`` (fused qkv_proj and gate_up_proj)
phi                    ``PhiConfig`` (attention and MLP in parallel on one LayerNorm, "gelu_new"; partial rotary)
bert                   ``BertConfig`` -> ``BertForMaskedLM`` (MLM loss over the vocab)
roberta                ``RobertaConfig`` -> ``RobertaForMaskedLM`` (positions numbered from padding_idx + 1)
deberta_v2             ``DebertaV2Config`` -> ``DebertaV2ForMaskedLM`` (v3 layout: relative c2p + p2c, shared keys)
t5                     ``T5Config`` -> ``T5ForConditionalGeneration``
=====================  ======================================================================

Decoders are ``AutoModelForCausalLM``.  Anything the config cannot express raises
``NotImplementedError`` naming the flag, so a test never silently measures a different model.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from simulator.config.methods import BNB_QUANTS
from simulator.graph.transforms import ADDON_METHODS
from simulator.config import (
    IA3,
    Adapter,
    BitFit,
    DoRA,
    Freeze,
    Full,
    LoRA,
    ModelArch,
    PrefixTuning,
    PromptTuning,
    QLoRA,
    Scenario,
    Shira,
)

__all__ = [
    "hf_config",
    "build_model",
    "forward_context",
    "backward_context",
    "unwrap",
    "module_paths",
    "block_paths",
    "BottleneckAdapter",
    "PRECISION_DTYPES",
]

# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

PRECISION_DTYPES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    # precision: (parameter dtype, autocast dtype or None)
    "fp32": (torch.float32, None),
    "bf16-amp": (torch.float32, torch.bfloat16),
    "fp16-amp": (torch.float32, torch.float16),  # CPU autocast supports float16 (same byte sizes as CUDA fp16 AMP)
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}
"""Parameter dtype and autocast dtype per ``Scenario.precision``; fp8 (torchao float8) is CUDA-only."""


def _dtypes(scenario: Scenario) -> tuple[torch.dtype, torch.dtype | None]:
    if scenario.precision not in PRECISION_DTYPES:
        raise NotImplementedError(
            f"precision={scenario.precision!r}: float8 training (torchao) needs CUDA scaled-mm kernels; no CPU truth"
        )
    return PRECISION_DTYPES[scenario.precision]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def _attention(scenario: Scenario, device: str = "cpu") -> tuple[str, object | None]:
    """(HF ``attn_implementation``, SDPA backend to force or None) for ``device`` ('cpu' or 'cuda')."""
    from torch.nn.attention import SDPBackend

    att = scenario.attention
    if device != "cpu":
        return _cuda_attention(scenario, SDPBackend)
    if att == "eager":
        return "eager", None
    if att == "sdpa-math":
        return "sdpa", SDPBackend.MATH
    if att == "sdpa-flash":
        if scenario.model.family == "t5":
            raise NotImplementedError(
                "T5 with attention='sdpa-flash': T5 passes its learned relative-position bias to SDPA as a float "
                "attn_mask; CUDA flash kernels take no mask (torch falls back to mem-efficient/math) and the CPU "
                "flash kernel has no backward for a mask that requires grad; use 'sdpa-math' or 'eager'"
            )
        # torch ships a CPU flash-attention kernel (_scaled_dot_product_flash_attention_for_cpu): it saves the
        # output and a float32 logsumexp (b, h, s) like the CUDA one, and also accepts an additive mask.
        return "sdpa", SDPBackend.FLASH_ATTENTION
    if att == "sdpa-mem-efficient":
        raise NotImplementedError(
            "attention='sdpa-mem-efficient': the memory-efficient (xformers/cutlass) SDPA kernel exists only on CUDA"
        )
    raise NotImplementedError(f"attention={att!r}: flash-attn 2/3 are CUDA-only packages; no CPU truth")


def _cuda_attention(scenario: Scenario, backends) -> tuple[str, object | None]:
    """On a GPU every SDPA backend exists; flash2 / flash3 need the flash-attn package."""
    att = scenario.attention
    if att == "eager":
        return "eager", None
    sdpa = {"sdpa-math": backends.MATH, "sdpa-flash": backends.FLASH_ATTENTION,
            "sdpa-mem-efficient": backends.EFFICIENT_ATTENTION}
    if att in sdpa:
        return "sdpa", sdpa[att]
    import importlib.util

    if att == "flash2" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", None
    if att == "flash3" and importlib.util.find_spec("flash_attn_interface") is not None:
        return "flash_attention_3", None
    if att == "flash1":
        raise NotImplementedError("attention='flash1': transformers has no FlashAttention 1 integration to run")
    raise NotImplementedError(f"attention={att!r}: the flash-attn package for it is not installed")


@contextlib.contextmanager
def backward_context(scenario: Scenario, device: str = "cpu", fallback: bool = False):
    """SDPA backend pin for the forward *and* the backward.

    The backward must see the same pin: a non-reentrant checkpoint recomputes the block inside
    ``loss.backward()`` and would otherwise pick another SDPA kernel, saving a different set of tensors.
    ``fallback``: prefer the scenario's backend but let a call it cannot serve (a CUDA flash kernel given an
    explicit mask during generation) take the memory-efficient or math one rather than fail.
    """
    _, backend = _attention(scenario, device)
    if backend is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if fallback:
        order = [backend] + [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != backend]
        with sdpa_kernel(order, set_priority=True):
            yield
        return
    with sdpa_kernel(backend):
        yield


@contextlib.contextmanager
def forward_context(scenario: Scenario, device: str = "cpu"):
    """Context for the training forward: the SDPA backend pin plus autocast for the -amp precisions."""
    _, amp = _dtypes(scenario)
    with backward_context(scenario, device):
        if amp is None:
            yield
        else:
            with torch.autocast("cpu" if device == "cpu" else "cuda", dtype=amp):
                yield


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
"""ModelArch.activation -> transformers ACT2FN name (Llama-style families)."""

_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
"""GPT-2 uses 'gelu_new' (a Python composite: pow, mul, add, tanh) in its released config."""


def _unsupported(arch: ModelArch, what: str) -> NotImplementedError:
    return NotImplementedError(f"model {arch.name!r} (family {arch.family!r}): {what}")


def _require_plain_heads(arch: ModelArch, family: str) -> None:
    """Families whose configs have one head count and head_dim = hidden / heads."""
    if arch.kv_heads != arch.n_heads or arch.d_head * arch.n_heads != arch.hidden:
        raise _unsupported(arch, f"{family} has neither GQA nor a free head_dim")


def _llama_style_config(arch: ModelArch, dropout: float):
    import transformers as tf

    if arch.parallel_block:
        raise _unsupported(arch, "parallel_block=True has no Llama-style transformers class")
    if arch.norm != "rmsnorm" or arch.norm_bias:
        raise _unsupported(arch, "Llama-style decoders use RMSNorm without bias")
    if arch.lm_head_bias:
        raise _unsupported(arch, "lm_head_bias=True has no Llama-style transformers class")
    common = dict(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.expert_intermediate if arch.moe else arch.intermediate,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.d_head,
        max_position_embeddings=arch.max_position_embeddings,
        attention_dropout=dropout,
        tie_word_embeddings=arch.tied_embeddings,
        use_cache=False,
    )
    if not arch.gated_mlp:
        raise _unsupported(arch, "Llama-style decoders always use a gated MLP")
    if arch.moe is not None:
        if arch.moe.n_shared_experts:
            raise _unsupported(arch, "shared experts (Qwen-MoE/DeepSeek) are not built here; Mixtral has none")
        if arch.qkv_bias or arch.attn_out_bias or arch.mlp_bias or arch.qk_norm or arch.sandwich_norm:
            raise _unsupported(arch, "MixtralConfig has no biases, qk_norm or sandwich norms")
        return tf.MixtralConfig(
            **common,
            hidden_act=_HF_ACT[arch.activation],
            num_local_experts=arch.moe.n_experts,
            num_experts_per_tok=arch.moe.top_k,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    if arch.sandwich_norm and not arch.norm_plus_one:
        raise _unsupported(arch, "Gemma 2/3 (sandwich norms) scale their RMSNorms by 1 + weight: norm_plus_one=True")
    if arch.norm_plus_one and not arch.sandwich_norm:
        if arch.qkv_bias != arch.attn_out_bias or arch.mlp_bias or arch.qk_norm:
            raise _unsupported(arch, "GemmaConfig has one attention_bias flag for q/k/v/o and no MLP bias or qk_norm")
        return tf.GemmaConfig(**common, hidden_activation=_HF_ACT[arch.activation], attention_bias=arch.qkv_bias)
    if arch.sandwich_norm:
        if arch.qkv_bias != arch.attn_out_bias or arch.mlp_bias:
            raise _unsupported(arch, "Gemma configs have one attention_bias flag for q/k/v/o and no MLP bias")
        cls = tf.Gemma3TextConfig if arch.qk_norm else tf.Gemma2Config
        return cls(
            **common,
            hidden_activation=_HF_ACT[arch.activation],
            attention_bias=arch.qkv_bias,
            query_pre_attn_scalar=arch.d_head,
            sliding_window=arch.sliding_window or arch.max_position_embeddings,
            final_logit_softcapping=None,  # ModelArch has no soft-capping field; off so the head is a plain linear
            attn_logit_softcapping=None,
        )
    if arch.qk_norm:
        if arch.qkv_bias != arch.attn_out_bias or arch.mlp_bias:
            raise _unsupported(arch, "Qwen3Config has one attention_bias flag for q/k/v/o and no MLP bias")
        return tf.Qwen3Config(**common, hidden_act=_HF_ACT[arch.activation], attention_bias=arch.qkv_bias)
    if arch.qkv_bias and not arch.attn_out_bias:
        if arch.mlp_bias:
            raise _unsupported(arch, "Qwen2Config has no MLP bias")
        return tf.Qwen2Config(**common, hidden_act=_HF_ACT[arch.activation])
    if arch.qkv_bias != arch.attn_out_bias:
        raise _unsupported(arch, "attn_out_bias without qkv_bias has no transformers class")
    return tf.LlamaConfig(
        **common, hidden_act=_HF_ACT[arch.activation], attention_bias=arch.qkv_bias, mlp_bias=arch.mlp_bias
    )


def _gpt2_style_dims(arch: ModelArch, dropout: float) -> dict:
    """GPT-2's keyword spelling, which GPT-J's config shares; its 50256 special token lies outside a tiny vocab."""
    return dict(vocab_size=arch.vocab, n_positions=arch.max_position_embeddings, n_embd=arch.hidden,
                n_layer=arch.n_layers, n_head=arch.n_heads, n_inner=arch.intermediate,
                activation_function=_GPT2_ACT[arch.activation], resid_pdrop=dropout, embd_pdrop=dropout,
                attn_pdrop=dropout, tie_word_embeddings=arch.tied_embeddings, bos_token_id=arch.vocab - 1,
                eos_token_id=arch.vocab - 1, use_cache=False)


def _gpt2_config(arch: ModelArch, dropout: float):
    from transformers import GPT2Config

    _require_plain_heads(arch, "GPT-2")
    return GPT2Config(**_gpt2_style_dims(arch, dropout))


def _opt_config(arch: ModelArch, dropout: float):
    from transformers import OPTConfig

    _require_plain_heads(arch, "OPT")
    return OPTConfig(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.n_layers,
        ffn_dim=arch.intermediate,
        num_attention_heads=arch.n_heads,
        max_position_embeddings=arch.max_position_embeddings,
        word_embed_proj_dim=arch.hidden,
        do_layer_norm_before=True,
        activation_function=arch.activation if arch.activation != "gelu_tanh" else "gelu_new",
        enable_bias=arch.qkv_bias or arch.mlp_bias,
        dropout=dropout,
        attention_dropout=dropout,
        tie_word_embeddings=arch.tied_embeddings,
        use_cache=False,
    )


def _encoder_kwargs(arch: ModelArch, dropout: float) -> dict:
    """The config fields BERT-style encoders share (sizes, activation, dropouts, token types, tying)."""
    return dict(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        intermediate_size=arch.intermediate,
        hidden_act=_GPT2_ACT[arch.activation],
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=arch.max_position_embeddings,
        type_vocab_size=arch.type_vocab_size,
        tie_word_embeddings=arch.tied_embeddings,
    )


def _bert_config(arch: ModelArch, dropout: float, config_cls=None, **extra):
    from transformers import BertConfig

    if arch.type_vocab_size < 1:
        raise _unsupported(arch, "BERT needs type_vocab_size >= 1 (token_type_ids default to zeros)")
    _require_plain_heads(arch, "BERT")
    return (config_cls or BertConfig)(**_encoder_kwargs(arch, dropout), use_cache=False, **extra)


def _deberta_v2_config(arch: ModelArch, dropout: float):
    from transformers import DebertaV2Config

    _require_plain_heads(arch, "DeBERTa-v2")
    if arch.position not in ("relative", "learned"):
        raise _unsupported(arch, f"DeBERTa-v2 positions are relative or learned, not {arch.position!r}")
    relative = arch.position == "relative"
    # as DeBERTa-v3 is released: content-to-position and position-to-content terms on the shared q/k projections,
    # a LayerNorm on the relative table, no absolute position input when the attention is relative
    return DebertaV2Config(
        **_encoder_kwargs(arch, dropout),
        relative_attention=relative,
        position_biased_input=not relative,
        position_buckets=arch.relative_attention_num_buckets if relative else -1,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"] if relative else [],
        norm_rel_ebd="layer_norm" if relative else "none",
        share_att_key=True,
        pad_token_id=0,
    )


def _roberta_config(arch: ModelArch, dropout: float):
    from transformers import RobertaConfig

    # RoBERTa numbers positions from padding_idx + 1 (pad 1, bos 0, eos 2 as released)
    return _bert_config(arch, dropout, RobertaConfig, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _t5_config(arch: ModelArch, dropout: float):
    from transformers import T5Config

    if arch.kv_heads != arch.n_heads:
        raise _unsupported(arch, "T5 has no GQA")
    if arch.gated_mlp:
        if arch.activation not in ("gelu", "gelu_tanh"):
            raise _unsupported(arch, "T5 gated MLPs are 'gated-gelu' (gelu_new) only")
        ff = "gated-gelu"
    else:
        if arch.activation != "relu":
            raise _unsupported(arch, "T5 ungated MLPs are 'relu' only")
        ff = "relu"
    return T5Config(
        vocab_size=arch.vocab,
        d_model=arch.hidden,
        d_kv=arch.d_head,
        d_ff=arch.intermediate,
        num_layers=arch.n_layers,
        num_decoder_layers=arch.n_decoder_layers or arch.n_layers,
        num_heads=arch.n_heads,
        relative_attention_num_buckets=arch.relative_attention_num_buckets,
        dropout_rate=dropout,
        feed_forward_proj=ff,
        tie_word_embeddings=arch.tied_embeddings,
        pad_token_id=0,  # T5's convention; labels are shifted right behind decoder_start_token_id = pad
        decoder_start_token_id=0,
        use_cache=False,
    )


def _standard_dims(arch: ModelArch, dropout: float, *, intermediate: bool = True) -> dict:
    """The size keywords most transformers configs spell alike, dropouts under their common names off, and a tiny
    vocab's special tokens on its last id (released ids such as 50256 lie outside it)."""
    out = dict(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.n_layers,
               num_attention_heads=arch.n_heads, max_position_embeddings=arch.max_position_embeddings,
               attention_dropout=dropout, tie_word_embeddings=arch.tied_embeddings,
               bos_token_id=arch.vocab - 1, eos_token_id=arch.vocab - 1, use_cache=False)
    if intermediate:
        out["intermediate_size"] = arch.intermediate
    return out


def _gpt_neox_config(arch: ModelArch, dropout: float):
    from transformers import GPTNeoXConfig

    _require_plain_heads(arch, "GPT-NeoX")
    if arch.norm != "layernorm" or not arch.norm_bias or arch.gated_mlp or arch.qk_norm:
        raise _unsupported(arch, "GPT-NeoX uses LayerNorm with bias and a plain MLP")
    if not (arch.qkv_bias and arch.attn_out_bias and arch.mlp_bias) or arch.lm_head_bias:
        raise _unsupported(arch, "GPT-NeoX has biases on every linear but the output head (one attention_bias flag)")
    return GPTNeoXConfig(
        **_standard_dims(arch, dropout),
        hidden_act=_HF_ACT[arch.activation],
        rotary_pct=arch.rotary_fraction,
        use_parallel_residual=arch.parallel_block,
        hidden_dropout=dropout,
    )


def _phi_config(arch: ModelArch, dropout: float):
    from transformers import PhiConfig

    if arch.norm != "layernorm" or not arch.norm_bias or arch.gated_mlp or arch.qk_norm or not arch.parallel_block:
        raise _unsupported(arch, "Phi runs attention and a plain MLP in parallel on one LayerNorm with bias")
    if not (arch.qkv_bias and arch.attn_out_bias and arch.mlp_bias and arch.lm_head_bias):
        raise _unsupported(arch, "Phi has biases on every linear, the output head included")
    if arch.d_head * arch.n_heads != arch.hidden:
        raise _unsupported(arch, "Phi has no free head_dim")
    return PhiConfig(
        **_standard_dims(arch, dropout),
        num_key_value_heads=arch.kv_heads,
        hidden_act=_GPT2_ACT[arch.activation],
        partial_rotary_factor=arch.rotary_fraction,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
    )


def _phi3_config(arch: ModelArch, dropout: float):
    from transformers import Phi3Config

    if arch.norm != "rmsnorm" or arch.norm_bias or not arch.gated_mlp or arch.qk_norm or arch.parallel_block:
        raise _unsupported(arch, "Phi-3 is a pre-norm RMSNorm decoder with a gated MLP")
    if arch.qkv_bias or arch.attn_out_bias or arch.mlp_bias or arch.lm_head_bias or arch.moe is not None:
        raise _unsupported(arch, "Phi-3 has no biases and no experts")
    if arch.d_head * arch.n_heads != arch.hidden:
        raise _unsupported(arch, "Phi-3 has no free head_dim")
    return Phi3Config(
        **_standard_dims(arch, dropout),
        num_key_value_heads=arch.kv_heads,
        hidden_act=_HF_ACT[arch.activation],
        original_max_position_embeddings=arch.max_position_embeddings,
        partial_rotary_factor=arch.rotary_fraction,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        pad_token_id=arch.vocab - 1,  # Phi-3's 32000 is outside a tiny vocab
    )


def _gptj_config(arch: ModelArch, dropout: float):
    from transformers import GPTJConfig

    _require_plain_heads(arch, "GPT-J")
    if arch.norm != "layernorm" or not arch.norm_bias or arch.gated_mlp or arch.qk_norm or not arch.parallel_block:
        raise _unsupported(arch, "GPT-J runs attention and a plain MLP in parallel on one LayerNorm with bias")
    if arch.qkv_bias or arch.attn_out_bias or not (arch.mlp_bias and arch.lm_head_bias):
        raise _unsupported(arch, "GPT-J has no attention biases and biases on the MLP and the output head")
    return GPTJConfig(**_gpt2_style_dims(arch, dropout), rotary_dim=arch.rotary_dim)


def _bloom_config(arch: ModelArch, dropout: float):
    from transformers import BloomConfig

    _require_plain_heads(arch, "BLOOM")
    if arch.position != "alibi" or arch.norm != "layernorm" or not arch.norm_bias or arch.gated_mlp:
        raise _unsupported(arch, "BLOOM has ALiBi, LayerNorms with bias and a plain MLP")
    if not (arch.qkv_bias and arch.attn_out_bias and arch.mlp_bias) or arch.lm_head_bias or arch.parallel_block:
        raise _unsupported(arch, "BLOOM has biases on every linear but the (tied) head, and sequential blocks")
    if arch.intermediate != 4 * arch.hidden:
        raise _unsupported(arch, "BLOOM's MLP is 4 x hidden wide")
    dims = _standard_dims(arch, dropout, intermediate=False)
    del dims["max_position_embeddings"]  # ALiBi: no position table
    return BloomConfig(**dims, hidden_dropout=dropout, pad_token_id=arch.vocab - 1)


def _falcon_config(arch: ModelArch, dropout: float):
    from transformers import FalconConfig

    if arch.norm != "layernorm" or not arch.norm_bias or arch.gated_mlp or arch.lm_head_bias or not arch.parallel_block:
        raise _unsupported(arch, "Falcon runs attention and a plain MLP in parallel on LayerNorms with bias")
    if not arch.qkv_bias == arch.attn_out_bias == arch.mlp_bias:
        raise _unsupported(arch, "Falcon has one bias flag for every linear")
    if arch.position != "rope" or arch.d_head * arch.n_heads != arch.hidden or arch.intermediate != 4 * arch.hidden:
        raise _unsupported(arch, "Falcon here: rotary positions, head_dim = hidden / heads, a 4 x hidden MLP")
    # one key/value head: Falcon-7B's multi-query layout; more: the new decoder architecture (Falcon-40B/180B)
    new_arch = arch.kv_heads > 1
    return FalconConfig(
        **_standard_dims(arch, dropout, intermediate=False),
        num_kv_heads=arch.kv_heads if new_arch else None,
        new_decoder_architecture=new_arch,
        multi_query=not new_arch,
        parallel_attn=True,
        bias=arch.qkv_bias,
        alibi=False,
        hidden_dropout=dropout,
    )


_CONFIG_BUILDERS = {
    "llama": _llama_style_config,
    "gpt2": _gpt2_config,
    "opt": _opt_config,
    "gpt_neox": _gpt_neox_config,
    "phi": _phi_config,
    "gptj": _gptj_config,
    "bloom": _bloom_config,
    "falcon": _falcon_config,
    "phi3": _phi3_config,
    "bert": _bert_config,
    "roberta": _roberta_config,
    "deberta_v2": _deberta_v2_config,
    "t5": _t5_config,
}


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """What ``from_pretrained`` does that ``from_config`` does not: a model's ``_keep_in_fp32_modules`` (T5's
    ``wo``) stay fp32 when it loads in fp16 (transformers 5 ``_get_dtype_plan``; ``_keep_in_fp32_modules_strict``
    for bf16 too)."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype == torch.bfloat16:
        names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    elif dtype != torch.float16:
        return
    for path, module in model.named_modules():
        if names and any(path == n or path.endswith("." + n) for n in names):
            module.to(torch.float32)


def hf_config(arch: ModelArch, dropout: float = 0.0):
    """The transformers config for ``arch``: every dropout probability = ``dropout``, ``use_cache=False``."""
    try:
        builder = _CONFIG_BUILDERS[arch.family]
    except KeyError:
        raise NotImplementedError(
            f"family {arch.family!r}: no CPU truth builder (have {', '.join(sorted(_CONFIG_BUILDERS))})"
        ) from None
    return builder(arch, dropout)


# --------------------------------------------------------------------------------------------
# Where things live in each family's module tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    embeddings: tuple[str, ...]
    """Modules trained by Freeze.train_embeddings."""
    head: tuple[str, ...]
    """Modules trained by Freeze.train_lm_head (head + the final norm in front of it)."""
    attn_out: str
    """Regex on the path inside a block: the attention output projection (Houlsby adapter)."""
    mlp_down: str
    """Regex on the path inside a block: the MLP down projection (both adapter placements)."""


_LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout(("model.embed_tokens",), ("model.norm", "lm_head"), r"self_attn\.o_proj", r"mlp\.down_proj"),
    "llama-moe": _Layout(("model.embed_tokens",), ("model.norm", "lm_head"), r"self_attn\.o_proj", r"mlp"),
    "gpt2": _Layout(
        ("transformer.wte", "transformer.wpe"), ("transformer.ln_f", "lm_head"), r"attn\.c_proj", r"mlp\.c_proj"
    ),
    "opt": _Layout(
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        ("model.decoder.final_layer_norm", "lm_head"),
        r"self_attn\.out_proj",
        r"fc2",
    ),
    "phi3": _Layout(("model.embed_tokens",), ("model.norm", "lm_head"), r"self_attn\.o_proj", r"mlp\.down_proj"),
    "phi": _Layout(("model.embed_tokens",), ("model.final_layernorm", "lm_head"), r"self_attn\.dense", r"mlp\.fc2"),
    "bert": _Layout(("bert.embeddings",), ("cls",), r"attention\.output\.dense", r"output\.dense"),
    "roberta": _Layout(("roberta.embeddings",), ("lm_head",), r"attention\.output\.dense", r"output\.dense"),
    "deberta_v2": _Layout(("deberta.embeddings",), ("cls",), r"attention\.output\.dense", r"output\.dense"),
    # T5: the adapter goes after self-attention only (not cross-attention), and after the FF block's wo.
    "t5": _Layout(
        ("shared",),
        ("decoder.final_layer_norm", "lm_head"),
        r"layer\.0\.SelfAttention\.o",
        r"layer\.\d\.DenseReluDense\.wo",
    ),
}


def _layout(arch: ModelArch) -> _Layout:
    if arch.family == "llama" and arch.moe is not None:
        return _LAYOUTS["llama-moe"]
    return _LAYOUTS[arch.family]


def block_paths(model: nn.Module) -> list[str]:
    """Paths of the repeated blocks (transformers' ``GradientCheckpointingLayer``s) in module order.

    T5: ``encoder.block.*`` then ``decoder.block.*``.  Paths are those of the un-wrapped HF model.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = module_paths(model)
    return [names[id(m)] for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# --------------------------------------------------------------------------------------------
# Module path conventions
# --------------------------------------------------------------------------------------------

_DROPPED_SEGMENTS = frozenset({"default", "base_layer", "modules_to_save", "original_module"})
"""PEFT wrapper segments removed from a path: the adapter name ('default'), LoRA's ``base_layer`` (the
wrapped HF module keeps its own path) and ``ModulesToSaveWrapper``'s two copies (both run as the module
they wrap)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _clean(path: str) -> str:
    return ".".join(p for p in path.split(".") if p and p not in _DROPPED_SEGMENTS)


def module_paths(model: nn.Module) -> dict[int, str]:
    """``id(module) -> path`` in the plain HF naming of the un-wrapped model.

    * modules of the HF model: their ``named_modules`` path with the PEFT segments dropped
      (``model.layers.0.self_attn.q_proj.lora_A.default`` -> ``model.layers.0.self_attn.q_proj.lora_A``,
      ``...q_proj.base_layer`` -> ``...q_proj``); a module reachable twice keeps its first path;
    * LoRA on a *parameter* (PEFT ``ParamWrapper``, used for transformers 5's 3-D MoE expert weights):
      the adapter modules are named after the parameter, ``model.layers.0.mlp.experts.gate_up_proj.lora_A``
      (PEFT nests one wrapper per parameter; the experts module itself stays ``...mlp.experts``);
    * the PEFT wrappers around the HF model (``PeftModel``, ``LoraModel``) and the HF model itself: ``""``;
    * PEFT modules outside the HF model (prompt/prefix encoder): their PEFT path without the adapter
      name, e.g. ``prompt_encoder.embedding``.
    """
    base = unwrap(model)
    names: dict[int, str] = {}
    for name, mod in base.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), _clean(name))
    base_path = next(n for n, m in model.named_modules() if m is base)
    for name, mod in model.named_modules(remove_duplicate=False):
        if id(mod) in names:
            continue
        is_wrapper = name == "" or base_path == name or base_path.startswith(name + ".")
        names[id(mod)] = "" if is_wrapper else _clean(name)
    for mod in model.modules():
        if type(mod).__name__ == "ParamWrapper" and hasattr(mod, "parameter_name"):
            own = names[id(mod)]
            for sub_name, sub in mod.named_modules():
                if sub_name and not sub_name.startswith("base_layer"):
                    names[id(sub)] = f"{own}.{mod.parameter_name}.{_clean(sub_name)}".rstrip(".")
    return names


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


class BottleneckAdapter(nn.Module):
    """Houlsby/Pfeiffer bottleneck adapter: ``x + up(relu(down(x)))``.

    ``down = Linear(h, m, bias=True)``, ``up = Linear(m, h, bias=True)``; attached as the child
    ``adapter`` of the module whose output it transforms (path ``<that module>.adapter``), so its saved
    tensors appear under ``....adapter.down``, ``....adapter.act``, ``....adapter.up`` and the residual add
    under ``....adapter``.
    """

    def __init__(self, hidden: int, bottleneck: int, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, bias=True, dtype=dtype)
        self.act = nn.ReLU()
        self.up = nn.Linear(bottleneck, hidden, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


def _apply_adapter_hook(module: nn.Module, _inputs, output):
    if isinstance(output, tuple):  # MoE blocks may return (hidden, router_logits)
        return (module.adapter(output[0]), *output[1:])
    return module.adapter(output)


def _add_adapters(model: nn.Module, arch: ModelArch, method: Adapter, dtype: torch.dtype) -> None:
    layout = _layout(arch)
    patterns = [layout.mlp_down] if method.placement == "pfeiffer" else [layout.attn_out, layout.mlp_down]
    regex = re.compile("|".join(f"(?:{p})" for p in patterns))
    blocks = set(block_paths(model))
    for name, mod in list(model.named_modules()):
        prefix = next((b for b in blocks if name.startswith(b + ".")), None)
        if prefix is None or not regex.fullmatch(name[len(prefix) + 1 :]):
            continue
        mod.adapter = BottleneckAdapter(arch.hidden, method.bottleneck, dtype)
        mod.register_forward_hook(_apply_adapter_hook)
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, BottleneckAdapter):
            mod.requires_grad_(True)


def _freeze(model: nn.Module, arch: ModelArch, method: Freeze) -> None:
    model.requires_grad_(False)
    blocks = block_paths(model)
    n = method.n_trainable_layers
    chosen = blocks[:n] if method.which == "first" else blocks[len(blocks) - n :] if n else []
    layout = _layout(arch)
    chosen += list(layout.embeddings) * method.train_embeddings + list(layout.head) * method.train_lm_head
    for path in chosen:
        model.get_submodule(path).requires_grad_(True)


def _bitfit(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[-1] == "bias")


def _task_type(arch: ModelArch) -> str | None:
    return {"decoder": "CAUSAL_LM", "encoder_decoder": "SEQ_2_SEQ_LM"}.get(arch.arch)


_PEFT_LAYER_TYPES = ("Linear", "Embedding", "Conv1D", "Conv1d", "Conv2d")
"""Module classes PEFT's LoRA wraps as modules (by class name; GPT-2's is transformers' Conv1D)."""


def _split_lora_targets(model: nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for PEFT.

    A name matching a Linear/Embedding/Conv1D module path suffix is a module target.  A name matching a
    parameter instead (transformers 5 MoE experts are 3-D parameters ``mlp.experts.gate_up_proj`` /
    ``down_proj``), or a module PEFT cannot wrap that has a ``weight`` (the Mixtral router ``mlp.gate``),
    goes to ``target_parameters``, which PEFT 0.21 adapts through ``ParamWrapper``.
    """

    def hits(named, t: str) -> list:
        return [x for n, x in named if n == t or n.endswith("." + t)]

    modules, params = [], []
    for t in targets:
        found = hits(model.named_modules(), t)
        if any(type(m).__name__ in _PEFT_LAYER_TYPES for m in found):
            modules.append(t)
        elif hits(model.named_parameters(), t):
            params.append(t)
        elif hits(model.named_parameters(), t + ".weight"):
            params.append(t + ".weight")
        else:
            modules.append(t)  # let PEFT report the miss
    return modules, params


def _lora(model: nn.Module, arch: ModelArch, method: LoRA | DoRA) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if method.targets is None or method.targets == "all-linear":
        # None: PEFT's per-model_type default (q_proj/v_proj for Llama, Qwen2, Mixtral; c_attn for GPT-2 ...)
        target_modules, target_parameters = method.targets, None
    else:
        target_modules, target_parameters = _split_lora_targets(model, list(method.targets))
    cfg = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=target_modules or None,
        target_parameters=target_parameters or None,
        use_dora=isinstance(method, DoRA) or getattr(method, "use_dora", False),
        modules_to_save=list(method.modules_to_save) or None,
        task_type=_task_type(arch),
        fan_in_fan_out=arch.family == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
    )
    peft_model = get_peft_model(model, cfg)  # autocast_adapter_dtype=True: 16-bit adapters are upcast to fp32
    if method.lora_fa:
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return peft_model


def _shira(model: nn.Module, arch: ModelArch, method: Shira) -> nn.Module:
    from peft import ShiraConfig, get_peft_model

    cfg = ShiraConfig(r=method.r, target_modules=method.targets, random_seed=0,
                      modules_to_save=list(method.modules_to_save) or None, task_type=_task_type(arch),
                      fan_in_fan_out=arch.family == "gpt2")
    return get_peft_model(model, cfg)


def _ia3(model: nn.Module, arch: ModelArch, method: IA3) -> nn.Module:
    from peft import IA3Config, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    targets = method.targets
    ff = method.feedforward_modules
    if targets is not None and ff is None:
        # PEFT's default feed-forward list must be a subset of the targets: keep the defaults that were asked for.
        default_ff = FF.get(model.config.model_type, [])
        ff = [t for t in default_ff if any(t == x or t.endswith("." + x) or x.endswith(t) for x in targets)]
    cfg = IA3Config(target_modules=targets, feedforward_modules=ff, task_type=_task_type(arch))
    return get_peft_model(model, cfg)


def _prompt_learning(model: nn.Module, arch: ModelArch, method: PrefixTuning | PromptTuning) -> nn.Module:
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    task = _task_type(arch)
    if task is None:
        raise NotImplementedError(
            f"method.kind={method.kind!r} on an encoder: PEFT prompt learning has no masked-LM task type"
        )
    if isinstance(method, PrefixTuning):
        cfg = PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=method.n_virtual_tokens,
            prefix_projection=method.prefix_projection,
            encoder_hidden_size=method.encoder_hidden_size or arch.hidden,
        )
    else:
        cfg = PromptTuningConfig(task_type=task, num_virtual_tokens=method.n_virtual_tokens)
    return get_peft_model(model, cfg)


_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _require_bitsandbytes(what: str):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise NotImplementedError(f"{what}: needs the bitsandbytes package (pip install bitsandbytes)") from None
    return bnb


def quantize_linears(model: nn.Module, quant: str, *, double_quant: bool, blocksize: int = 64,
                     compute_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                     skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` except ``skip`` (transformers keeps the output head in 16 bits) by the
    bitsandbytes layer of ``quant`` ('nf4' / 'fp4': ``Linear4bit`` with ``Params4bit``; 'int8':
    ``Linear8bitLt`` with frozen ``Int8Params``), as ``BitsAndBytesConfig`` loading does.  The weights are
    quantized when moved to ``device``.  Returns the number of layers replaced."""
    if quant not in BNB_QUANTS:
        raise NotImplementedError(f"quant={quant!r}: GPTQ / AWQ bases come from pre-quantized checkpoints")
    bnb = _require_bitsandbytes(f"quant={quant!r}")
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in skip:
                continue
            bias = child.bias is not None
            w = child.weight.data
            if quant == "int8":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias, has_fp16_weights=False,
                                          threshold=6.0)
                new.weight = bnb.nn.Int8Params(w.to(torch.float16), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias, compute_dtype=compute_dtype,
                                        compress_statistics=double_quant, quant_type=quant)
                new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                               quant_type=quant, blocksize=blocksize)
                # bitsandbytes repacks 4-bit weights for its CPU kernel on AVX512-BF16 hosts when no gradient
                # flows (a host-dependent path, absent on CUDA, that fails on absmax blocks spanning rows);
                # the CPU runs model the CUDA layout, so they keep it on every host
                new.support_avx512bf16_for_cpu = False
            if bias:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new.to(device))
            n += 1
    return n


def upcast_unquantized(model: nn.Module, which: str) -> None:
    """What PEFT's ``prepare_model_for_kbit_training`` does to a bitsandbytes model ('all': every 16-bit parameter
    but the ``Params4bit`` ones to fp32), or that followed by TRL's ``peft_module_casting_to_bf16`` ('norms': the
    modules named like a norm stay fp32, the embeddings and head go back to 16 bits)."""
    if which == "none":
        return
    if which == "all":
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or "norm" in name:
            module.to(torch.float32)


def _apply_method(model: nn.Module, scenario: Scenario, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    m, arch = scenario.method, scenario.model
    if isinstance(m, Full):
        model.requires_grad_(True)
        return model
    if isinstance(m, Freeze):
        _freeze(model, arch, m)
        return model
    if isinstance(m, BitFit):
        _bitfit(model)
        return model
    if isinstance(m, Adapter):
        # under AMP the trainable adapters are fp32 masters over the 16-bit frozen base (as PEFT does)
        _add_adapters(model, arch, m, torch.float32 if _dtypes(scenario)[1] is not None else dtype)
        return model
    if isinstance(m, QLoRA):
        quantize_linears(model, m.quant, double_quant=m.double_quant, blocksize=m.blocksize,
                         compute_dtype=_COMPUTE_DTYPES[m.compute_dtype], device=device)
        upcast_unquantized(model, m.fp32_unquantized)
        return _lora(model, arch, m)
    if isinstance(m, (LoRA, DoRA)):
        return _lora(model, arch, m)
    if isinstance(m, IA3):
        return _ia3(model, arch, m)
    if isinstance(m, Shira):
        return _shira(model, arch, m)
    if isinstance(m, (PrefixTuning, PromptTuning)):
        return _prompt_learning(model, arch, m)
    raise NotImplementedError(f"method.kind={m.kind!r}: no CPU truth builder")


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


SAC_STORAGES: list[dict] = []
"""The output caches of the selective checkpoints run so far (``torch.utils.checkpoint``'s SAC storage: op ->
{call index -> the kept outputs}), for the measurement harness to charge what they keep."""


def torchtitan_sac_policy():
    """torchtitan's per-op selective-checkpointing policy (``torchtitan/distributed/activation_checkpoint.py``,
    ``SelectiveAC._wrap_block``), one per checkpoint call: MUST_SAVE the outputs of the compute-intensive ops
    (``torch._functorch.partitioners.get_default_op_list().compute_intensive_ops``) and of its extra list
    (attention kernels, ``aten.max`` for float8 scales, ``aten.linear``, ``topk``, reduce-scatter), except
    every second ``mm`` / ``linear``, counted per pass; PREFER_RECOMPUTE for the rest.  On CPU, SDPA runs
    ``_scaled_dot_product_flash_attention_for_cpu``, which stands here for the CUDA flash kernel that
    torchtitan's list names (both return the output and the fp32 logsumexp)."""
    import torch
    from torch._functorch.partitioners import get_default_op_list
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save_ops = {op.default for op in get_default_op_list().compute_intensive_ops}
    save_ops |= {aten._scaled_dot_product_cudnn_attention.default, aten.max.default, aten.linear.default,
                 aten.topk.default, aten._scaled_dot_product_flash_attention_for_cpu.default}
    mm_ops = (aten.mm.default, aten.linear.default)
    meta = {"forward_mm_count": 0, "recompute_mm_count": 0}

    def policy(ctx, func, *args, **kwargs):
        key = "recompute_mm_count" if ctx.is_recompute else "forward_mm_count"
        if func in mm_ops:
            meta[key] += 1
        if func in save_ops:
            if func in mm_ops and meta[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def torchtitan_sac_context():
    """``context_fn`` of one selective checkpoint call (its cache is remembered in :data:`SAC_STORAGES`)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    caching, cached = create_selective_checkpoint_contexts(torchtitan_sac_policy())
    SAC_STORAGES.append(caching.storage)
    return caching, cached


def _enable_checkpointing(model: nn.Module, scenario: Scenario) -> None:
    """HF activation checkpointing, ``use_reentrant=False`` (transformers 5's default, passed explicitly) unless
    the scenario's checkpoint is reentrant (transformers 4's default).  ``selective``: every block under
    torchtitan's per-op policy (:func:`torchtitan_sac_policy`), with its wrapper's ``early_stop=False``.

    every_k: blocks 0, k, 2k, ... are checkpointed (transformers counts ``GradientCheckpointingLayer``s
    in module order, so for T5 the decoder blocks continue the encoder's numbering).  HF also calls
    ``enable_input_require_grads()``: the input-embedding output then requires grad even when the
    embeddings are frozen, which makes frozen norms/activations in the blocks save their inputs.
    """
    ck = scenario.checkpointing
    if ck.mode == "none":
        return
    k = ck.every_k if ck.mode == "every_k" else 1
    kwargs: dict = {"use_reentrant": ck.reentrant}
    if ck.mode == "selective":
        kwargs.update(context_fn=torchtitan_sac_context, early_stop=False)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=k)
        return
    # Older transformers: enable everywhere, then switch off the blocks that are not every k-th.
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % k == 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _model_class(arch: ModelArch):
    import transformers as tf

    if arch.arch == "decoder":
        return tf.AutoModelForCausalLM
    if arch.arch == "encoder":
        return tf.AutoModelForMaskedLM  # -> BertForMaskedLM
    return tf.AutoModelForSeq2SeqLM  # -> T5ForConditionalGeneration



def build_model(scenario: Scenario, *, dropout: float = 0.0, seed: int = 0, device: str = "cpu") -> nn.Module:
    """The trainable model of ``scenario`` on ``device`` ('cpu' or 'cuda'), in ``train()`` mode; built
    directly on the device (random init there, no host copy).

    Order: config -> ``from_config`` (random init under ``torch.manual_seed(seed)``, param dtype from
    the precision) -> activation checkpointing -> method (which parameters train, PEFT wrapping).
    Encoders are ``BertForMaskedLM`` (MLM loss over the whole vocab, no classification head).
    Run the forward under :func:`forward_context` (SDPA pin + autocast) and the backward under
    :func:`backward_context`.
    """
    arch = scenario.model
    if arch.family == "bert" and arch.arch != "encoder" or arch.family == "t5" and arch.arch != "encoder_decoder":
        raise _unsupported(arch, f"arch={arch.arch!r} does not match the family")
    param_dtype, amp = _dtypes(scenario)
    if amp is not None and scenario.method.kind in ADDON_METHODS:
        # PEFT under AMP: the frozen base is loaded in 16 bits (no fp32 master for weights that never
        # update); PEFT upcasts the adapters to fp32 (autocast_adapter_dtype)
        param_dtype = amp
    attn_impl, _ = _attention(scenario, device)
    if dropout > 0 and scenario.attention == "sdpa-flash":
        raise NotImplementedError(
            f"dropout={dropout} with attention='sdpa-flash': the CPU flash kernel has no dropout (CUDA flash "
            "regenerates the mask from a Philox seed and saves no mask); use 'sdpa-math' or 'eager'"
        )
    config = hf_config(arch, dropout)
    torch.manual_seed(seed)
    cls = _model_class(arch)
    try:
        with torch.device(device):
            model = cls.from_config(config, attn_implementation=attn_impl, dtype=param_dtype)
    except ValueError as e:  # e.g. Gemma2 (no SDPA: soft-capping) with attention='sdpa-*'
        raise NotImplementedError(f"{type(config).__name__} with attention={scenario.attention!r}: {e}") from e
    _keep_in_fp32(model, param_dtype)
    _enable_checkpointing(model, scenario)
    model = _apply_method(model, scenario, param_dtype, device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {scenario.method!r} leaves nothing trainable in model {arch.name!r}")
    model.train()
    return model
