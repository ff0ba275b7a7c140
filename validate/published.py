"""Published measurements -> fitsim predictions (``/work/shared/published/README.md`` is the record format).

One record = one setup that someone ran and measured (``scenario``) plus what they measured (``target``).
``record_to_scenario`` turns the machine-readable ``scenario`` into a :class:`simulator.Scenario`,
``predict_record`` predicts the ``target`` in its own metric and unit, and ``predict_records`` does that for
a list, turning every failure into ``status: "unsupported"`` with the reason (never a crash).

Scope today: single-GPU records (``scenario.n_gpus == 1``) of the memory metrics
(``peak_memory_per_gpu_GB``, ``peak_memory_total_GB``), ``fits`` and ``max_seq_len_fit``.  Multi-GPU
records wait for the distributed model, speed metrics for the time model.

Fields the source did not state (``scenario.unstated``, value null) take what that framework does when the
user leaves them out: the table ``FRAMEWORK_DEFAULTS`` below.  Every default or mapping that was applied is
written into the prediction's ``notes``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hwprofiles import all_devices, get_device
from simulator import Scenario, estimate, get_model
from simulator.config import (
    IA3,
    DoRA,
    Freeze,
    Full,
    InferenceQuant,
    InferWorkload,
    LlamaAdapter,
    LoRA,
    ModelArch,
    MoE,
    Optimizer,
    PrefixTuning,
    PromptTuning,
    QLoRA,
    TrainWorkload,
)
from simulator.config.methods import BNB_QUANTS
from simulator.estimate import count_params
from simulator.graph.build import names_of, target_names
from simulator.models.catalog import list_models

# ------------------------------------------------------------------------------------------------------------
# Defaults for unstated fields, per framework
# ------------------------------------------------------------------------------------------------------------
# "model-dtype": the dtype the checkpoint is released in when it is 16-bit (bf16/fp16 loaded as such, no fp32
# master copy = pure 16-bit), fp32 otherwise -- the rule for transformers-based trainers (load with
# torch_dtype="auto"/the config dtype, Trainer without --bf16).
# A 4-bit/8-bit base (QLoRA, quantized inference) computes in 16-bit whatever the table says: bf16 where the
# device has it, fp16 otherwise (T4, V100).
#
# Sources for the non-obvious entries:
#   transformers TrainingArguments: per_device_train_batch_size=8, gradient_accumulation_steps=1,
#     gradient_checkpointing=False, optim="adamw_torch" (torch.optim.AdamW, foreach on CUDA);
#     attn_implementation defaults to "sdpa" where the model class supports it (T5, Bloom: eager only);
#     Qwen (v1) remote code uses flash-attn when installed, else its own eager attention.
#   peft LoraConfig: r=8, lora_alpha=8, lora_dropout=0.0, target_modules from
#     TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (PEFT_DEFAULT_TARGETS below).
#   litgpt finetune/*: micro_batch_size=1, precision "bf16-true" where bf16 is supported, torch SDPA attention,
#     AdamW, no activation checkpointing on a single device.
#   torchtune *_single_device recipes: dtype bf16, batch_size 2, enable_activation_checkpointing True,
#     AdamW(fused=True) (or bnb PagedAdamW8bit for full single-device), torch SDPA.
#   sequence length: no framework fixes one; 512 is the common padded max_length of the HF example scripts
#     and 2048 of litgpt/torchtune configs -- only records marked not comparable leave it out.
_HF = dict(
    precision="model-dtype",
    optimizer="adamw",
    optimizer_impl="foreach",
    micro_batch=8,
    seq_len=512,
    grad_accum=1,
    checkpointing="none",
    attention="sdpa",
    double_quant=False,
    loss="upcast",
)
FRAMEWORK_DEFAULTS: dict[str, dict[str, Any]] = {
    "transformers": _HF,
    "peft": _HF,
    "trl": _HF,
    "accelerate": _HF,
    "axolotl": {**_HF, "micro_batch": 1, "seq_len": 2048, "precision": "bf16-amp"},
    "llama-recipes": {**_HF, "micro_batch": 4, "seq_len": 4096, "precision": "bf16"},
    # unsloth: use_gradient_checkpointing="unsloth" offloads the checkpointed inputs to host memory, and its
    # fused cross-entropy never materialises the fp32 logits
    "unsloth": {**_HF, "micro_batch": 2, "seq_len": 2048, "precision": "bf16-amp", "checkpointing": "offload",
                "double_quant": True, "loss": "fused"},
    "fsdp-qlora": {**_HF, "micro_batch": 1, "seq_len": 2048, "precision": "bf16", "double_quant": True},
    # litgpt: lm_head in 128-token chunks, chunked_cross_entropy upcasts per chunk -> loss "chunked"; its own
    # LoRA layers stay in the model dtype (no fp32 adapter copies) -> adapter_dtype "model".
    "litgpt": dict(precision="bf16", optimizer="adamw", optimizer_impl="foreach", micro_batch=1, seq_len=2048,
                   grad_accum=1, checkpointing="none", attention="sdpa", double_quant=False, loss="chunked",
                   adapter_dtype="model"),
    # torchtune recipes: CEWithChunkedOutputLoss (output projection in 8 chunks, fp32 upcast per chunk) -> "chunked";
    # LoRA modules in the model dtype; the full single-device recipe steps the optimizer in backward
    # (optimizer_in_bwd: True in llama3_1/8B_full_single_device.yaml).  QLoRA bases are torchao NF4Tensors
    # (``to_nf4``: block_size 64, scaler_block_size 256): the per-block scalers are themselves quantized to int8
    # with one factor per 256 -- bitsandbytes' double quantization in all but name -> double_quant True.
    "torchtune": dict(precision="bf16", optimizer="adamw", optimizer_impl="fused", micro_batch=2, seq_len=2048,
                      grad_accum=1, checkpointing="full", attention="sdpa", double_quant=True, loss="chunked",
                      adapter_dtype="model", full_optimizer_in_bwd=True),
    "torchtitan": dict(precision="bf16-amp", optimizer="adamw", optimizer_impl="foreach", micro_batch=8,
                       seq_len=8192, grad_accum=1, checkpointing="selective", attention="sdpa", double_quant=False,
                       loss="upcast"),
    "deepspeed": dict(precision="fp16-amp", optimizer="adamw", optimizer_impl="fused", micro_batch=1, seq_len=2048,
                      grad_accum=1, checkpointing="none", attention="sdpa", double_quant=False, loss="upcast"),
    "megatron": dict(precision="bf16-amp", optimizer="adam", optimizer_impl="fused", micro_batch=1, seq_len=2048,
                     grad_accum=1, checkpointing="none", attention="flash2", double_quant=False, loss="upcast"),
    "nemo": dict(precision="bf16-amp", optimizer="adam", optimizer_impl="fused", micro_batch=1, seq_len=4096,
                 grad_accum=1, checkpointing="none", attention="flash2", double_quant=False, loss="upcast"),
}
FRAMEWORK_DEFAULTS["other"] = _HF
# FSDP as each framework drives it.  FSDP1 (FlatParameter) for HF Accelerate / Trainer and Lightning Fabric
# (litgpt); both accumulate gradients inside ``no_sync()`` (accelerate ``Accelerator.accumulate`` -> ``no_sync``
# unless GradientAccumulationPlugin(sync_each_batch=True); Lightning ``fabric.no_backward_sync``).  Lightning's
# FSDPStrategy wraps each transformer Block whole (auto_wrap_policy={Block}) with use_orig_params=True, so a
# LoRA block's unit mixes frozen and trainable parameters; the HF Trainer wraps PEFT adapters apart
# (peft.utils.other.fsdp_auto_wrap_policy).  torchtitan / torchtune use FSDP2 and sync every micro-batch.
FSDP1_FRAMEWORKS = frozenset({"transformers", "peft", "trl", "accelerate", "axolotl", "litgpt"})
FSDP_BLOCK_UNIT_FRAMEWORKS = frozenset({"litgpt"})
# DeepSpeed launched by the HF Trainer with a DeepSpeed JSON: the configs these frameworks document.  Stage 3 is the
# transformers docs' ds_config_zero3.json, whose "auto" values transformers fills from the model
# (integrations/deepspeed.py trainer_config_finalize: reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size
# = 0.9 hidden^2, stage3_param_persistence_threshold = 10 hidden); stages 1-2 the docs' ds_config_zero2.json
# (reduce_bucket_size 2e8, overlap_comm true, contiguous_gradients true) -- the file the Qwen, FastChat and
# LLaMA-Factory scripts copy.  Plain DeepSpeed scripts keep DeepSpeed's code defaults.
HF_DEEPSPEED_FRAMEWORKS = frozenset({"transformers", "axolotl"})
# Launched through accelerate's DeepSpeed plugin (an ``accelerate config`` YAML with ``deepspeed_config:`` fields, no
# DeepSpeed JSON): PEFT's and TRL's examples.  The plugin writes only the stage, the offload devices and
# gather-on-save (accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__``), and ``_prepare_deepspeed``
# fills the hidden-size buckets only into keys set to "auto" (``fill_match``), so DeepSpeed's code defaults hold.
ACCELERATE_PLUGIN_FRAMEWORKS = frozenset({"peft", "trl", "accelerate"})


def _hf_deepspeed_config(zero: int, hidden: int) -> dict[str, Any]:
    if zero >= 3:
        return {"reduce_bucket_elems": hidden * hidden, "stage3_prefetch_bucket_elems": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden}
    return {"reduce_bucket_elems": 200_000_000, "allgather_bucket_elems": 200_000_000, "overlap_comm": True}


def _fsdp_framework(sc: dict, par: dict[str, Any], method: str, ga: int, notes: list[str]) -> dict[str, Any]:
    """The FSDP version, no-sync accumulation and unit wrapping of the record's framework (see above)."""
    fw = sc.get("framework")
    if par.get("fsdp") in (None, "none", "no_shard") or fw not in FSDP1_FRAMEWORKS:
        return par
    out = {**par, "fsdp_version": 1}
    if ga > 1:
        out["fsdp_no_sync"] = True
        notes.append(f"{fw} accumulates gradients under FSDP no_sync(): unsharded gradients between micro-batches")
    if fw in FSDP_BLOCK_UNIT_FRAMEWORKS and method not in ("full", "freeze"):
        out["fsdp1_mixed_units"] = True
        notes.append(f"{fw} wraps whole blocks (frozen + adapter weights) as FSDP1 units with use_orig_params: "
                     "the flat gradient covers the frozen weights too")
    return out


UNPADDED_FRAMEWORKS = frozenset({"torchtune", "torchtitan", "megatron", "nemo", "deepspeed"})

# Families whose transformers implementation has no SDPA path (attention scores are materialised).
EAGER_ONLY_FAMILIES = frozenset({"t5", "bloom", "qwen", "gptj"})

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the families in the catalog.
PEFT_DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen": ["c_attn"],
    "gpt2": ["c_attn"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta_v2": ["query_proj", "value_proj"],
}
PEFT_LORA_DEFAULTS = dict(r=8, alpha=8.0, dropout=0.0)

# Soft-prompt/prefix length when the record does not give one (PEFT requires it; 20 is the docs' example).
DEFAULT_VIRTUAL_TOKENS = 20
# Inference with the prompt length unstated: a 1-token prompt, i.e. all the memory is weights + the cache of
# the generated tokens (what "generate N tokens" benchmarks such as Qwen's profile script measure).
DEFAULT_PROMPT_LEN = 1
DEFAULT_GEN_LEN = 256

# ------------------------------------------------------------------------------------------------------------
# Value tables
# ------------------------------------------------------------------------------------------------------------
PRECISIONS = {"fp32": "fp32", "fp16-amp": "fp16-amp", "bf16-amp": "bf16-amp", "bf16-pure": "bf16",
              "fp16-pure": "fp16", "fp8": "fp8"}
OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "adamw-8bit": "adamw-8bit", "paged-adamw-8bit": "paged-adamw-8bit",
              "paged-adamw-32bit": "paged-adamw-32bit", "sgd": "sgd", "adafactor": "adafactor", "lion": "lion"}
QUANTS = {"nf4": "nf4", "fp4": "fp4", "int8": "int8", "int4-gptq": "gptq", "int4-awq": "awq", "fp8": "fp8"}
FAMILIES = {"llama": "llama", "qwen": "qwen", "gpt": "gpt2", "gpt2": "gpt2", "gpt-neox": "gpt_neox",
            "gpt_neox": "gpt_neox", "gptj": "gptj", "gpt-j": "gptj", "t5": "t5", "phi": "phi", "bloom": "bloom", "falcon": "falcon", "opt": "opt",
            "phi3": "phi3", "phi-3": "phi3", "bert": "bert", "roberta": "roberta", "deberta": "deberta_v2",
            "deberta-v2": "deberta_v2", "deberta_v2": "deberta_v2"}
# Families without a block template of their own whose blocks are another family's layout with other switches: the
# template and the switches (HF config.json / modeling code of each).  Mistral, Mixtral (MoE from the record), Yi,
# DeepSeek (dense), InternLM, Code Llama, TinyLlama, Baichuan-2-7B: the Llama block.  Qwen2 / Qwen2.5: Llama with
# q/k/v biases; Qwen3: Llama with per-head q/k RMSNorm.  Gemma: Llama with (1 + weight) RMSNorm, tanh-GELU gating and
# tied embeddings.  MPT (mosaicml/mpt-*, llm-foundry): GPT-2's 4h GELU MLP and fused q/k/v under ALiBi, no biases
# (``no_bias: true``), LayerNorm without bias, tied embeddings.  StarCoder / SantaCoder (GPTBigCode): GPT-2's block
# with one key/value head (MQA, the record's n_kv_heads).
FAMILY_STAND_INS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f: ("llama", {}) for f in ("mistral", "mixtral", "yi", "deepseek", "internlm", "internlm2", "codellama",
                                  "code-llama", "tinyllama", "baichuan", "baichuan2", "vicuna")},
    **{f: ("llama", dict(qkv_bias=True)) for f in ("qwen2", "qwen2.5", "qwen1.5", "qwen2_moe")},
    "qwen3": ("llama", dict(qk_norm=True)),
    "gemma": ("llama", dict(norm_plus_one=True, activation="gelu_tanh", tied_embeddings=True)),
    "mpt": ("gpt2", dict(position="alibi", activation="gelu", qkv_bias=False, attn_out_bias=False, mlp_bias=False,
                         norm_bias=False, tied_embeddings=True)),
    **{f: ("gpt2", {}) for f in ("starcoder", "gpt_bigcode", "gpt-bigcode", "santacoder")},
}
# A family named only in the model's name or hub id (family "other" or unset): unambiguous tokens -> stand-in family.
STAND_IN_NAME_TOKENS: tuple[tuple[str, str], ...] = (
    ("mosaicml/mpt", "mpt"), ("mpt-", "mpt"), ("mixtral", "mixtral"), ("mistral", "mistral"), ("gemma", "gemma"),
    ("qwen3", "qwen3"), ("qwen2", "qwen2"), ("qwen1.5", "qwen1.5"), ("starcoder", "starcoder"),
    ("santacoder", "santacoder"), ("baichuan", "baichuan"), ("internlm", "internlm"), ("deepseek", "deepseek"),
    ("tinyllama", "tinyllama"), ("codellama", "codellama"), ("code-llama", "code-llama"),
)
# Sizes the stand-in family fixes when the record leaves them out: MPT's MLP is expansion_ratio 4 x d_model and its
# vocabulary 50,432 (mosaicml/mpt-7b and mpt-30b config.json).
STAND_IN_DIMS: dict[str, dict[str, Any]] = {"mpt": {"intermediate_ratio": 4, "vocab": 50432}}
# Architecture details a record never carries, per family (the HF implementation's choices).
FAMILY_ARCH: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen": dict(qkv_bias=True),
    "gpt2": dict(position="learned", norm="layernorm", activation="gelu_tanh", gated_mlp=False, qkv_bias=True,
                 attn_out_bias=True, mlp_bias=True, norm_bias=True),
    "opt": dict(position="learned", norm="layernorm", activation="relu", gated_mlp=False, qkv_bias=True,
                attn_out_bias=True, mlp_bias=True, norm_bias=True),
    "gpt_neox": dict(norm="layernorm", activation="gelu", gated_mlp=False, qkv_bias=True, attn_out_bias=True,
                     mlp_bias=True, norm_bias=True, parallel_block=True),
    "falcon": dict(norm="layernorm", activation="gelu", gated_mlp=False, norm_bias=True, parallel_block=True),
    "bloom": dict(position="alibi", norm="layernorm", activation="gelu_tanh", gated_mlp=False, qkv_bias=True,
                  attn_out_bias=True, mlp_bias=True, norm_bias=True),
    "gptj": dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, mlp_bias=True, norm_bias=True,
                 parallel_block=True, lm_head_bias=True),
    "phi": dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, qkv_bias=True, attn_out_bias=True,
                mlp_bias=True, norm_bias=True, parallel_block=True, lm_head_bias=True),
    "t5": dict(arch="encoder_decoder", position="relative", activation="gelu_tanh"),
    "torch": dict(position="learned", norm="layernorm", activation="gelu", gated_mlp=False, qkv_bias=True,
                  attn_out_bias=True, mlp_bias=True, norm_bias=True, lm_head_bias=True),
}
# The encoders (bert-base-uncased, roberta-base, deberta-v3-base config.json): post-LN blocks with biases, a GELU MLP
# and an MLM head tied to the embeddings; BERT learns 512 positions and 2 token types, RoBERTa 514 positions (2 held by
# its padding offset) and 1 type, DeBERTa-v3 none of either but 256 relative buckets.
_ENCODER_ARCH = dict(arch="encoder", norm="layernorm", activation="gelu", gated_mlp=False, qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True, norm_bias=True, tied_embeddings=True)
FAMILY_ARCH |= {
    "bert": dict(_ENCODER_ARCH, position="learned", max_position_embeddings=512, type_vocab_size=2),
    "roberta": dict(_ENCODER_ARCH, position="learned", max_position_embeddings=514, type_vocab_size=1),
    "deberta_v2": dict(_ENCODER_ARCH, position="relative", max_position_embeddings=512, type_vocab_size=0,
                       relative_attention_num_buckets=256),
}

MEMORY_METRICS = ("peak_memory_per_gpu_GB", "peak_memory_total_GB")
TIME_METRICS = ("step_time_s", "tokens_per_s_per_gpu", "tokens_per_s_total", "samples_per_s_total", "tflops_per_gpu",
                "mfu", "decode_time_per_token_s", "other:time_per_1000_microbatch_iterations")
DEVICE_MAP_METRICS = ("other:gpu_memory_inference_gpu0",)
HOST_METRICS = ("other:peak_cpu_memory",)
SUPPORTED_METRICS = (*MEMORY_METRICS, "fits", "max_seq_len_fit", "model_states_per_gpu_GB", *TIME_METRICS,
                     *DEVICE_MAP_METRICS, *HOST_METRICS)

GB = 1e9
GiB = float(2**30)


class Unsupported(Exception):
    """The record cannot be expressed with today's engine; the message says why."""


# ------------------------------------------------------------------------------------------------------------
# scenario -> Scenario
# ------------------------------------------------------------------------------------------------------------


def _defaults(sc: dict) -> dict[str, Any]:
    return FRAMEWORK_DEFAULTS.get(sc.get("framework") or "other", FRAMEWORK_DEFAULTS["other"])


# Megatron-LM / Megatron-DeepSpeed GPT: the GPT-2 BPE vocabulary (50,257 tokens) padded by
# ``_vocab_size_with_padding`` to a multiple of ``make_vocab_size_divisible_by`` (default 128) x tensor-parallel size.
GPT2_BPE_VOCAB = 50257
MEGATRON_VOCAB_DIVISIBLE_BY = 128


def megatron_padded_vocab(orig_vocab: int, tp: int, divisible_by: int = MEGATRON_VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's ``_vocab_size_with_padding``: the next multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-orig_vocab // multiple) * multiple


# Block structures a record may name for a model outside the catalog (family "other"): the words in its
# name / notes that identify a template, in the order they are tried.
OTHER_FAMILY_HINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gptj", ("gpt-j", "gptj")),
    ("torch", ("nn.multiheadattention", "post-ln", "post-norm", "nn.transformerencoderlayer")),
    ("gpt_neox", ("neox",)),
    ("falcon", ("falcon",)),
    ("bloom", ("bloom",)),
    ("opt", ("opt-",)),
    ("llama", ("llama", "rmsnorm", "swiglu", "mistral")),
    ("gpt2", ("gpt-2", "gpt2", "learned position")),
)


def _other_family(m: dict, text: str, notes: list[str]) -> str:
    """Template for a ``family: "other"`` model from what its record says, else a generic decoder."""
    hay = " ".join(str(m.get(k) or "") for k in ("name", "hf_id")).lower() + " " + text
    for fam, words in OTHER_FAMILY_HINTS:
        hit = next((w for w in words if w in hay), None)
        if hit:
            notes.append(f"family 'other': the record names {hit!r} -> {fam} block template")
            return fam
    h, i = m.get("hidden"), m.get("intermediate")
    fam = "gpt2" if h and i and i == 4 * h else "llama"
    notes.append(f"family 'other' with no named block structure: generic decoder template {fam} "
                 f"({'4h MLP -> LayerNorm, GELU, learned positions, biases' if fam == 'gpt2' else 'gated MLP -> RMSNorm, SwiGLU, RoPE'})")
    return fam


@functools.cache
def _catalog_counts(family: str) -> tuple[tuple[str, int], ...]:
    """(name, parameters) of the catalog's decoder-only models of ``family``, smallest first."""
    out = []
    for name in list_models():
        arch = get_model(name)
        if arch.family == family and arch.arch == "decoder" and arch.moe is None:
            out.append((name, count_params(arch)))
    return tuple(sorted(out, key=lambda x: x[1]))


def _shape_from_n_params(label: str, n_params: float, fam: str | None, m: dict, notes: list[str]) -> ModelArch:
    """A record that gives only the parameter count (the schema allows it): the catalog model of its family
    (Llama's when unnamed, or when the family has none within 2x) nearest in size, its depth scaled so the
    blocks hold the parameters the embeddings do not.  Weights, gradients and optimizer states follow the
    count; activations and FLOPs are that family's at the nearest width -- an approximation the note states."""
    family = fam or "llama"
    near = [c for c in _catalog_counts(family) if abs(math.log(c[1] / n_params)) <= math.log(2.0)]
    if not near:  # no model of the family within 2x: Llama's widths span 1B to 405B
        family, near = "llama", list(_catalog_counts("llama"))
    ref_name, ref_n = min(near, key=lambda x: abs(math.log(x[1] / n_params)))
    ref = get_model(ref_name)
    one, two = (count_params(ModelArch.model_validate({**ref.model_dump(), "n_layers": k})) for k in (1, 2))
    per_block, outside = two - one, 2 * one - two  # a block's parameters; the embeddings, head and final norm
    layers = max(1, round((n_params - outside) / per_block))
    upd: dict[str, Any] = {"name": label, "hf_id": m.get("hf_id"), "n_layers": layers, "source": "published record"}
    if m.get("vocab"):
        upd["vocab"] = int(m["vocab"])
    if m.get("tied_embeddings") is not None:
        upd["tied_embeddings"] = bool(m["tied_embeddings"])
    arch = ModelArch.model_validate({**ref.model_dump(), **upd})
    notes.append(f"model {label!r}: only n_params={n_params:.3g} given -> {ref_name}'s shape ({family}) with "
                 f"{layers} blocks instead of {ref.n_layers} ({count_params(arch):.3g} parameters)")
    return arch


def _model(m: dict, notes: list[str], text: str = "", sc: dict | None = None) -> ModelArch:
    errors = []
    for key in ("hf_id", "name"):
        name = m.get(key)
        if not name:
            continue
        try:
            return get_model(name)
        except Exception as err:  # UnknownNameError, or a catalog error
            errors.append(str(err).split(";")[0])
    sc = sc or {}
    raw_family = (m.get("family") or "").lower()
    fam = FAMILIES.get(raw_family)
    stand_in: dict[str, Any] = {}
    if fam is None and raw_family in ("", "other"):
        hay = " ".join(str(m.get(k) or "") for k in ("name", "hf_id")).lower()
        named = next((f for token, f in STAND_IN_NAME_TOKENS if token in hay), None)
        if named is not None:
            notes.append(f"family {raw_family or 'unstated'}: the name says {named}")
            raw_family = named
    if fam is None and raw_family in FAMILY_STAND_INS:
        fam, stand_in = FAMILY_STAND_INS[raw_family]
        switches = ", ".join(f"{k}={v}" for k, v in stand_in.items())
        notes.append(f"family {raw_family!r}: the {fam} block template" + (f" with {switches}" if switches else " as is"))
    label = m.get("hf_id") or m.get("name") or "?"
    if fam is None and raw_family == "other" and all(m.get(k) for k in ("n_layers", "hidden", "n_heads")):
        fam = _other_family(m, text, notes)
    vocab = m.get("vocab")
    if not vocab and fam == "gpt2" and (sc.get("framework") == "megatron" or "megatron" in text):
        tp = int((sc.get("parallel") or {}).get("tp") or 1)
        vocab = megatron_padded_vocab(GPT2_BPE_VOCAB, tp)
        notes.append(f"vocab unstated: Megatron GPT's GPT-2 BPE ({GPT2_BPE_VOCAB}) padded to a multiple of "
                     f"{MEGATRON_VOCAB_DIVISIBLE_BY} x tp={tp} -> {vocab}")
    intermediate = m.get("intermediate")
    dims = STAND_IN_DIMS.get(raw_family, {})
    if not intermediate and m.get("hidden") and "intermediate_ratio" in dims:
        intermediate = dims["intermediate_ratio"] * int(m["hidden"])
        notes.append(f"intermediate unstated: {raw_family} MLP {dims['intermediate_ratio']} x hidden = {intermediate}")
    if not vocab and "vocab" in dims:
        vocab = dims["vocab"]
        notes.append(f"vocab unstated: {raw_family} default {vocab}")
    needed = {"n_layers": m.get("n_layers"), "hidden": m.get("hidden"), "n_heads": m.get("n_heads"),
              "intermediate": intermediate, "vocab": vocab}
    missing = [k for k, v in needed.items() if not v]
    shape_given = any(m.get(k) for k in ("n_layers", "hidden", "n_heads", "intermediate"))
    if m.get("n_params") and not shape_given and (fam is not None or not raw_family or raw_family == "other"):
        return _shape_from_n_params(str(label), float(m["n_params"]), fam, m, notes)
    if fam is None:
        raise Unsupported(f"model {label!r} not in the catalog and family {m.get('family')!r} has no operator template")
    if missing:
        raise Unsupported(f"model {label!r} not in the catalog and the record lacks {', '.join(missing)} "
                          f"(only n_params={m.get('n_params')}); add it to simulator/models/")
    moe = m.get("moe")
    extra: dict[str, Any] = {**FAMILY_ARCH.get(fam, {}), **stand_in}
    tied, family_tied = m.get("tied_embeddings"), extra.pop("tied_embeddings", fam == "gpt2")
    if tied is None:
        tied = family_tied
        notes.append(f"tied_embeddings unstated: {'tied' if tied else 'untied'} ({raw_family or fam} default)")
    seq = int(sc.get("seq_len") or 0)
    if extra.get("position") == "learned" and seq > 2048:
        extra["max_position_embeddings"] = seq
        notes.append(f"learned position table sized to the run's seq_len {seq}")
    if fam == "torch" and seq:
        extra["max_position_embeddings"] = seq
        notes.append(f"torch template: learned position table of seq_len {seq} rows (max_seq_len = seq_length)")
    arch = ModelArch(
        name=str(label), family=fam, hf_id=m.get("hf_id"), n_layers=int(m["n_layers"]), hidden=int(m["hidden"]),
        n_heads=int(m["n_heads"]), n_kv_heads=m.get("n_kv_heads"), head_dim=m.get("head_dim"),
        intermediate=int(intermediate), vocab=int(vocab), tied_embeddings=bool(tied),
        moe=MoE(n_experts=moe["n_experts"], top_k=moe["top_k"]) if moe else None,
        source="published record", **extra,
    )
    notes.append(f"model {label!r} built from the record's arch fields (family {fam})")
    return arch


def _precision(sc: dict, arch: ModelArch, dev, quantized: bool, notes: list[str]) -> str:
    raw = sc.get("precision")
    if raw is not None:
        if raw not in PRECISIONS:
            raise Unsupported(f"precision {raw!r} not modelled")
        prec = PRECISIONS[raw]
    else:
        d = _defaults(sc)["precision"]
        if d == "model-dtype":
            prec = arch.torch_dtype if arch.torch_dtype in ("bf16", "fp16") else "fp32"
            notes.append(f"precision unstated: {sc.get('framework')} loads the checkpoint dtype ({arch.torch_dtype}) -> {prec}")
        else:
            prec = d
            notes.append(f"precision unstated: {sc.get('framework')} default {prec}")
    if quantized and prec == "fp32":
        prec = "bf16" if dev.supports_bf16 else "fp16"
        notes.append(f"quantized base computes in 16-bit: precision {prec}")
    if prec in ("bf16", "bf16-amp") and not dev.supports_bf16 and raw is None:
        prec = prec.replace("bf16", "fp16")
        notes.append(f"{dev.name} has no bf16: precision {prec}")
    return prec


ALIBI_FLASH2_YEAR = 2024  # flash-attn 2.4.0 (December 2023) added ALiBi to FlashAttention-2


def _attention(sc: dict, arch: ModelArch, precision: str, notes: list[str], year: int | None = None) -> str:
    raw = sc.get("attention")
    if arch.family == "torch":
        notes.append("nn.MultiheadAttention(need_weights=True) materialises the scores: eager attention")
        return "eager"
    if raw == "other" and arch.position == "alibi" and (sc.get("framework") or "other") == "other":
        # an ALiBi model's own fused kernel outside transformers: llm-foundry's Triton FlashAttention (MPT)
        notes.append("attention other on an ALiBi model: llm-foundry's Triton FlashAttention, FlashAttention-1 class")
        return "flash1"
    if raw in (None, "other"):
        fw = sc.get("framework") or "other"
        d = _defaults(sc)["attention"]
        if d == "sdpa" and _defaults(sc) is _HF and arch.family in EAGER_ONLY_FAMILIES:
            d = "eager"
        if d == "sdpa" and _defaults(sc) is _HF and year is not None and year <= 2023:
            # transformers made SDPA the default attention in v4.36 (December 2023); before, eager
            d = "eager"
        if d == "flash2" and fw == "megatron" and year is not None and year <= 2022:
            # Megatron-LM ran QK^T and PV as batched GEMMs around its fused scale-mask-softmax kernel (the scores
            # materialised) until FlashAttention support (--use-flash-attn) arrived in 2023
            d = "eager"
        notes.append(f"attention {raw or 'unstated'}: {fw} default for {arch.family} -> {d}")
        raw = d
    if raw == "sdpa":
        # torch SDPA dispatch: the flash kernel needs 16-bit inputs; fp32 runs the memory-efficient kernel.
        return "sdpa-mem-efficient" if precision == "fp32" else "sdpa-flash"
    if raw == "xformers":
        notes.append("xformers memory-efficient attention modelled as sdpa-mem-efficient")
        return "sdpa-mem-efficient"
    if arch.position == "alibi" and raw == "flash2" and (year or 0) < ALIBI_FLASH2_YEAR:
        # FlashAttention-2 took an ALiBi bias from v2.4 (December 2023); before, ALiBi models ran llm-foundry's
        # Triton FlashAttention (attn_impl: triton, FlashAttention-1's algorithm)
        notes.append("ALiBi before flash-attn 2.4: a Triton FlashAttention-1-class kernel (flash1)")
        return "flash1"
    if raw in ("eager", "flash1", "flash2", "flash3"):
        return raw
    raise Unsupported(f"attention {raw!r} not modelled")


# Frameworks whose checkpoint reruns a block's whole forward: transformers' ``gradient_checkpointing_enable``
# passes ``use_reentrant=True`` when called without kwargs until v5 (modeling_utils.py 4.35-4.57; before 4.35 the
# models called ``torch.utils.checkpoint.checkpoint`` without it, whose default was reentrant), and with it every
# Trainer-based stack (TRL, PEFT's examples, HF + DeepSpeed); Megatron's ``tensor_parallel.checkpoint`` and
# DeepSpeed's ``deepspeed.checkpointing.checkpoint`` are reentrant autograd functions, as are NeMo's (Megatron
# core's) and Unsloth's offloaded checkpointer (it reruns the decoder layer's forward in its backward); axolotl passes
# ``use_reentrant=True`` itself.  litgpt, torchtune, torchtitan, llama-recipes and fsdp-qlora wrap blocks with
# torch's ``checkpoint_wrapper`` (non-reentrant, early stop).
REENTRANT_FRAMEWORKS = frozenset({"transformers", "trl", "peft", "deepspeed", "megatron", "accelerate", "axolotl",
                                  "nemo", "unsloth"})
TRANSFORMERS_V5_YEAR = 2026  # sources from this year on may run transformers 5 (non-reentrant by default)


def _checkpointing(sc: dict, notes: list[str], year: int | None = None) -> dict:
    raw = sc.get("checkpointing")
    if raw is None:
        raw = _defaults(sc)["checkpointing"]
        notes.append(f"checkpointing unstated: {sc.get('framework')} default {raw}")
    if raw == "selective" and sc.get("framework") != "torchtitan":
        notes.append("selective checkpointing outside torchtitan modelled as full (its per-op policy is torchtitan's)")
        raw = "full"
    if raw not in ("none", "full", "offload", "selective"):
        raise Unsupported(f"checkpointing {raw!r} not modelled")
    out: dict[str, Any] = {"mode": raw}
    if raw != "selective" and sc.get("framework") in REENTRANT_FRAMEWORKS and (year or 0) < TRANSFORMERS_V5_YEAR:
        out["reentrant"] = True
        if raw != "none":
            notes.append(f"{sc.get('framework')}: a reentrant checkpoint reruns each block's whole forward")
    return out


def _optimizer(sc: dict, notes: list[str], ds_engine: bool = False, torch_v: tuple[int, int] | None = None) -> dict:
    """The record's optimizer and the implementation that steps it: DeepSpeed's engine builds its own from the
    config's optimizer block; otherwise the framework's torch.optim form, in the PyTorch release the record names."""
    raw = sc.get("optimizer")
    d = _defaults(sc)
    if raw is None:
        raw = d["optimizer"]
        notes.append(f"optimizer unstated: {sc.get('framework')} default {raw}")
    if raw == "other":
        notes.append("optimizer 'other' modelled as AdamW (two fp32 moments)")
        raw = "adamw"
    if raw == "galore-adamw":
        raw = "adamw"  # the base; _galore_optimizer projects it
    if raw not in OPTIMIZERS:
        raise Unsupported(f"optimizer {raw!r} not modelled")
    name, impl = OPTIMIZERS[raw], d.get("optimizer_impl", "foreach")
    if ds_engine and name in ("adamw", "adam") and impl != "fused":
        # the DeepSpeed configs these runs pass (transformers docs, repo scripts) carry an "optimizer" block:
        # DeepSpeed builds its FusedAdam (multi_tensor_apply, in place) or, with optimizer offload, its CPU Adam
        impl = "fused"
        notes.append("DeepSpeed config's optimizer block: DeepSpeed's FusedAdam steps in place (impl='fused')")
    elif impl == "foreach" and name in ("adamw", "adam") and torch_v is not None and torch_v < (2, 1):
        impl = "foreach-torch2.0"
        notes.append(f"PyTorch {torch_v[0]}.{torch_v[1]}: foreach Adam(W) holds two param-sized temporaries "
                     "(impl='foreach-torch2.0')")
    return {"name": name, "impl": impl}


GALORE_OF = {"adamw": "galore-adamw", "adam": "galore-adamw", "adamw-8bit": "galore-adamw-8bit",
             "paged-adamw-8bit": "galore-adamw-8bit", "adafactor": "galore-adafactor"}
"""The GaLore optimizer a record means by method 'galore' with its optimizer (or by optimizer 'galore-adamw')."""
GALORE_LAYERWISE_WORDS = ("layer-wise", "layerwise", "per-layer", "per layer")


def _galore_optimizer(sc: dict, optimizer: dict, text: str, notes: list[str]) -> dict:
    """Method 'galore' or optimizer 'galore-adamw': galore-torch's optimizer over the stated one, with the projection
    rank from the record's rank field when it has one (else the GaLore repo's and transformers' 128), stepped in
    backward when the record says the weights were updated layer by layer."""
    raw = sc.get("optimizer")
    if sc.get("method") != "galore" and raw != "galore-adamw":
        return optimizer
    base = "adamw" if raw in (None, "galore-adamw", "other") else raw
    if base not in GALORE_OF:
        raise Unsupported(f"GaLore over optimizer {raw!r} not modelled (galore-torch has AdamW, 8-bit AdamW, Adafactor)")
    stated = (sc.get("lora") or {}).get("r")
    rank = int(stated or Optimizer.model_fields["galore_rank"].default)
    notes.append(f"GaLore: {GALORE_OF[base]} rank {rank} on the attention and MLP linears"
                 + ("" if stated else f" (rank unstated: the GaLore repo's and transformers' {rank})"))
    out = {"name": GALORE_OF[base], "galore_rank": rank}
    if any(w in text for w in GALORE_LAYERWISE_WORDS):
        out["in_backward"] = True
        notes.append("GaLore per-layer weight updates: each weight is stepped in backward")
    return out


def _targets(raw: list[str] | None, arch: ModelArch, notes: list[str]) -> list[str] | str:
    if raw is None:
        t = PEFT_DEFAULT_TARGETS.get(arch.family)
        if t is None:
            raise Unsupported(f"LoRA targets unstated and no PEFT default for family {arch.family}")
        notes.append(f"LoRA targets unstated: PEFT default for {arch.family} {t}")
        return list(t)
    if "all-linear" in raw:
        return "all-linear"
    known = target_names(arch)
    n = names_of(arch)
    leaf = lambda p: p.rsplit(".", 1)[-1] if p else None  # noqa: E731
    # Role aliases for names from another implementation (litgpt's records use HF Llama names for every model).
    roles = {
        **{a: n.qkv or n.q for a in ("q_proj", "q", "query", "query_proj")},
        **{a: n.qkv or n.k for a in ("k_proj", "k", "key", "key_proj")},
        **{a: n.qkv or n.v for a in ("v_proj", "v", "value", "value_proj")},
        **{a: n.o for a in ("o_proj", "out_proj", "o")},
        **{a: n.gate for a in ("gate_proj",)},
        **{a: n.up for a in ("up_proj",)},
        **{a: n.down for a in ("down_proj",)},
    }
    out: list[str] = []
    for t in raw:
        if t in known:
            name = t
        elif roles.get(t) and leaf(roles[t]) in known:
            name = leaf(roles[t])
            notes.append(f"LoRA target {t!r} -> {name!r} in {arch.family}")
        else:
            raise Unsupported(f"LoRA target {t!r} has no module in {arch.name} ({', '.join(sorted(known))})")
        if name not in out:
            out.append(name)
    return out


def _compiled(text: str) -> bool:
    """The record says the run used torch.compile ("torch.compile on", "torch compile enabled")."""
    return bool(re.search(r"torch[ .]compile (?:on|enabled)|compile[d]?[:=] ?true", text))


LITGPT_ADAPTER_KINDS = frozenset({"adapter", "adapter_v2", "adapter-v2", "adapter v2", "llama-adapter",
                                  "llama-adapter-v2"})
QKV_ROLES = {"q": ("q_proj", "q", "query", "query_proj"), "k": ("k_proj", "k", "key", "key_proj"),
             "v": ("v_proj", "v", "value", "value_proj")}


def _fused_qkv_parts(raw: list[str] | None, arch: ModelArch) -> list[str] | None:
    """The q/k/v parts a record's per-projection targets name on a model whose q/k/v is one fused projection
    (litgpt's ``lora_query`` / ``lora_key`` / ``lora_value``); None where the model has separate projections or
    no part is named by role."""
    if not raw or not names_of(arch).qkv:
        return None
    parts = [p for p, aliases in QKV_ROLES.items() if any(t in aliases for t in raw)]
    return parts or None


def _legacy_bnb(quant: str, source: dict | None, notes: list[str]) -> bool:
    """A 4-bit base measured with bitsandbytes < 0.43.2 (a source up to 2023), whose 4-bit matmuls kept their input
    until backward (fixed by PR #1270, 2024-07)."""
    year = _source_year(source)
    legacy = quant in ("nf4", "fp4") and year is not None and year <= 2023
    if legacy:
        notes.append(f"source from {year}: bitsandbytes of that time kept each 4-bit matmul's input")
    return legacy


# Stacks that hand a bitsandbytes model to PEFT's ``prepare_model_for_kbit_training`` (every 16-bit parameter
# but the 4-bit ones cast to fp32; peft >= 0.3, 2023-05): TRL's SFTTrainer (trl/trainer/sft_trainer.py from
# v0.4, until PR #4577, 2025-12, dropped the call), PEFT's own examples and the transformers + PEFT QLoRA recipe
# (the QLoRA repository's qlora.py, the HF blog notebooks).  TRL with ``bf16=True`` then runs
# ``peft_module_casting_to_bf16`` (PR #1110, 2023-12-19): embeddings and head back to bf16, norms fp32.
KBIT_PREP_FRAMEWORKS = frozenset({"trl", "peft", "transformers"})
TRL_BF16_CASTING_YEAR = 2024
TRL_NO_KBIT_PREP_YEAR = 2026


def _fp32_unquantized(sc: dict, quant: str, precision: str, year: int | None, notes: list[str]) -> str:
    """What a record's stack leaves in fp32 around a bitsandbytes base: 'all', 'norms' or 'none'."""
    fw = sc.get("framework")
    if quant not in BNB_QUANTS or fw not in KBIT_PREP_FRAMEWORKS:
        return "none"
    if fw == "trl" and year is not None and year >= TRL_NO_KBIT_PREP_YEAR:
        return "none"
    if (fw == "trl" and (year is None or year >= TRL_BF16_CASTING_YEAR) and precision == "bf16-amp"
            and quant in ("nf4", "fp4")):  # TRL casts back 4-bit models only (``is_loaded_in_4bit``)
        notes.append("TRL with bf16: prepare_model_for_kbit_training, then embeddings and head back to bf16 -> "
                     "fp32 norms (fp32_unquantized 'norms')")
        return "norms"
    notes.append(f"{fw} on a bitsandbytes base: prepare_model_for_kbit_training leaves the unquantized parameters "
                 "fp32 (fp32_unquantized 'all')")
    return "all"


# The year of sources whose records name none, from the history of the file they cite.
SOURCE_YEARS: dict[str, int] = {
    # the post is dated 2023-05-24 (huggingface/blog 4bit-transformers-bitsandbytes.md and its translations)
    "4bit-transformers-bitsandbytes": 2023,
    # the table came with accelerate's ea0d5368 "Add benchmarks (#506)", 2022-07-12, and was only moved since
    "huggingface/accelerate benchmarks/big_model_inference": 2022,
}


def _source_year(source: dict | None) -> int | None:
    """The latest 20xx year named in the record's source text (its name / where), else the year of a known
    source (:data:`SOURCE_YEARS`), if any."""
    text = " ".join(str(v) for v in (source or {}).values())
    years = [int(y) for y in re.findall(r"\b(20[12]\d)\b", text)]
    if years:
        return max(years)
    return next((y for name, y in SOURCE_YEARS.items() if name in text), None)


# The settings a source's own training scripts fix where its record leaves them unstated.  Keyed by the
# repository its source names; each entry cites the script.
#   QwenLM/Qwen (README 'Profiling of Memory and Speed', Oct-Nov 2023, finetune.py + finetune/*.sh at e8e1596):
#   finetune.py ``LoraArguments`` defaults r=64, alpha=16, dropout 0.05 on c_attn, c_proj, w1, w2; the DeepSpeed
#   runs take the config their script passes -- finetune_ds.sh (full) ``--deepspeed finetune/ds_config_zero3.json``,
#   finetune_lora_ds.sh / finetune_qlora_ds.sh ``ds_config_zero2.json`` -- and finetune.py hands DeepSpeed the
#   model even on one GPU (``distributed_type = DistributedType.DEEPSPEED`` when WORLD_SIZE is 1).
SOURCE_SCRIPT_DEFAULTS: dict[str, dict[str, Any]] = {
    "QwenLM/Qwen": {
        "lora": {"r": 64, "alpha": 16, "dropout": 0.05, "targets": ["c_attn", "c_proj", "w1", "w2"]},
        "deepspeed_zero": {"full": 3, "lora": 2, "qlora": 2},
    },
}


def _source_script_defaults(rec: dict, notes: list[str]) -> dict:
    """The record's scenario with what its source's scripts fix filled into the unstated fields
    (:data:`SOURCE_SCRIPT_DEFAULTS`): the LoRA config, and the ZeRO stage of a run the record says DeepSpeed
    drove."""
    sc = rec["scenario"]
    where = " ".join(str(v) for v in (rec.get("source") or {}).values())
    repo = next((k for k in SOURCE_SCRIPT_DEFAULTS if re.search(rf"\b{re.escape(k)}\b(?!-)", where)), None)
    if repo is None:
        return sc
    d = SOURCE_SCRIPT_DEFAULTS[repo]
    out = dict(sc)
    if sc.get("method") in ("lora", "qlora", "dora") and sc.get("lora") is None and "lora" in d:
        out["lora"] = {**d["lora"], "modules_to_save": None}
        notes.append(f"LoRA config unstated: {repo}'s script defaults r={d['lora']['r']} on {d['lora']['targets']}")
    par = sc.get("parallel") or {}
    strategy = str((rec.get("parallel") or {}).get("strategy") or "").lower()
    stage = d.get("deepspeed_zero", {}).get(sc.get("method"))
    if "deepspeed" in strategy and par.get("zero_stage") is None and not par.get("fsdp") and stage:
        out["parallel"] = {**par, "zero_stage": stage}
        notes.append(f"DeepSpeed stage unstated: {repo}'s {sc.get('method')} script passes ZeRO-{stage}")
    return out


def _torch_version(rec: dict) -> tuple[int, int] | None:
    """(major, minor) of the PyTorch release the record's text names ("PyTorch 2.0", "torch 2.0.1",
    "PyTorch 2.1.0+cu121"), when it names exactly one."""
    text = " ".join(str(rec.get(k) or "") for k in ("notes", "measured_how", "precision"))
    text += " " + " ".join(str(v) for v in (rec.get("source") or {}).values())
    found = {(int(a), int(b)) for a, b in re.findall(r"\b(?:pytorch|torch)[ =v]*(\d)\.(\d+)", text, re.I)}
    return found.pop() if len(found) == 1 else None


def _method(sc: dict, arch: ModelArch, precision: str, notes: list[str], rec_source: dict | None = None,
            ds_engine: bool = False):
    kind = sc.get("method")
    wq = sc.get("weight_quant") or "none"
    lora = sc.get("lora")
    if kind in ("lora", "qlora", "dora"):
        kw: dict[str, Any] = {}
        lo = lora or {}
        if lora is None:
            notes.append(f"LoRA config unstated: PEFT defaults r={PEFT_LORA_DEFAULTS['r']}, alpha={PEFT_LORA_DEFAULTS['alpha']}")
        kw["r"] = lo.get("r") or PEFT_LORA_DEFAULTS["r"]
        kw["alpha"] = float(lo.get("alpha") or PEFT_LORA_DEFAULTS["alpha"])
        kw["dropout"] = float(lo.get("dropout") or PEFT_LORA_DEFAULTS["dropout"])
        kw["targets"] = _targets(lo.get("targets"), arch, notes)
        parts = _fused_qkv_parts(lo.get("targets"), arch) if sc.get("framework") == "litgpt" else None
        if parts is not None:
            kw["qkv_parts"] = parts
            notes.append(f"litgpt's LoRAQKVLinear on the fused q/k/v projection adapts {'+'.join(parts)}")
        if lo.get("modules_to_save"):
            kw["modules_to_save"] = list(lo["modules_to_save"])
        adt = _defaults(sc).get("adapter_dtype", "fp32")
        if adt != "fp32":
            kw["adapter_dtype"] = adt
            notes.append(f"{sc.get('framework')} keeps adapters in the model dtype")
        elif ds_engine:
            # DeepSpeed's engine casts every parameter, adapters included, to its fp16/bf16
            # (DeepSpeedEngine._configure_distributed_model); the fp32 copy lives on as the optimizer's master
            kw["adapter_dtype"] = "model"
            notes.append("DeepSpeed casts the adapters to its 16-bit dtype -> adapter_dtype 'model'")
        if kind == "dora":
            if wq == "none":
                return DoRA(**kw)
            if QUANTS.get(wq) not in BNB_QUANTS:
                raise Unsupported(f"DoRA on a {wq!r} base not modelled (PEFT's DoRA dequantizes bitsandbytes bases only)")
            kw["use_dora"] = True
            notes.append("DoRA on a quantized base: QDoRA (PEFT use_dora=True over bitsandbytes)")
        if kind == "qlora" or wq != "none":
            if wq == "none":
                wq = "nf4"
                notes.append("qlora without weight_quant: NF4 base")
            if _legacy_bnb(wq, rec_source, notes):
                kw["bnb_keeps_input"] = True
            if wq not in QUANTS or QUANTS[wq] == "fp8":
                raise Unsupported(f"LoRA on a {wq!r} base not modelled")
            dq = sc.get("double_quant")
            if dq is None:
                dq = _defaults(sc)["double_quant"]
                if QUANTS[wq] in ("nf4", "fp4"):
                    notes.append(f"double_quant unstated: {sc.get('framework')} default {dq}")
            compute = "fp16" if precision.startswith("fp16") else "bf16"
            up = _fp32_unquantized(sc, QUANTS[wq], precision, _source_year(rec_source), notes)
            return QLoRA(quant=QUANTS[wq], double_quant=bool(dq), compute_dtype=compute, fp32_unquantized=up, **kw)
        return LoRA(**kw)
    text = f"{kind} {sc.get('notes') or ''} {(rec_source or {}).get('where') or ''}".lower()
    if sc.get("framework") == "litgpt" and kind in LITGPT_ADAPTER_KINDS:
        # litgpt's finetune/adapter.py and adapter_v2.py: LLaMA-Adapter (V2), prompt length 10 from block 2
        v2 = kind in ("adapter_v2", "adapter-v2", "adapter v2", "llama-adapter-v2") or "adapter_v2" in text
        if wq != "none" and QUANTS.get(wq) not in BNB_QUANTS:
            raise Unsupported(f"LLaMA-Adapter on a {wq!r} base not modelled (litgpt quantizes with bitsandbytes)")
        dq = bool(sc.get("double_quant"))
        notes.append(f"litgpt {'adapter_v2' if v2 else 'adapter'}: LLaMA-Adapter{' V2' if v2 else ''}, "
                     "prompt length 10 from block 2 (litgpt defaults)")
        quant = QUANTS.get(wq, "none")
        return LlamaAdapter(v2=v2, quant=quant, double_quant=dq, bnb_keeps_input=_legacy_bnb(quant, rec_source, notes))
    if wq != "none":
        raise Unsupported(f"method {kind!r} on a {wq!r}-quantized base not modelled")
    if kind in ("full", "galore"):
        return Full()  # GaLore trains every weight; its projection is the optimizer's (see _galore_optimizer)
    if kind == "freeze":
        notes.append("freeze: trainable layers not in the record; default last 1 block")
        return Freeze()
    if kind == "prefix":
        notes.append(f"prefix tuning: {DEFAULT_VIRTUAL_TOKENS} virtual tokens assumed")
        return PrefixTuning(n_virtual_tokens=DEFAULT_VIRTUAL_TOKENS)
    if kind == "prompt":
        notes.append(f"prompt tuning: {DEFAULT_VIRTUAL_TOKENS} virtual tokens assumed")
        return PromptTuning(n_virtual_tokens=DEFAULT_VIRTUAL_TOKENS)
    if kind == "ia3":
        return IA3()
    raise Unsupported(f"method {kind!r} not modelled yet")


# A record that names a device family but not its memory size ("other:A100 (memory size not stated)") runs on
# that family's SXM variant with the most memory; one that names no device at all is predictable only for
# memory, which depends on the device through bf16 support alone: a bf16-capable stand-in.
UNSIZED_GPU_FAMILIES = (("a100", "A100-SXM-80GB"), ("h100", "H100-SXM-80GB"), ("h200", "H200-SXM-141GB"),
                        ("v100", "V100-SXM-32GB"), ("b200", "B200-SXM-180GB"))
STAND_IN_GPU = "H100-SXM-80GB"
DEVICE_FREE_METRICS = (*MEMORY_METRICS, "model_states_per_gpu_GB")


_FORMS = ("sxm", "pcie", "nvl")


def _named_device(text: str):
    """The catalog device a free-text GPU name ("other:NVIDIA A100 40GB PCIe", "2x RTX 3090") names, or None: the
    profile registry's own names and aliases first, then the one device whose family appears as a word and whose
    memory size and form factor, where the text states them, agree."""
    t = re.sub(r"\(.*?\)", " ", text.lower())
    t = re.sub(r"^\s*\d+\s*x\s*", "", t).replace("nvidia", " ").replace("tesla", " ").replace("geforce", " ").strip()
    try:
        return get_device(t)
    except Exception:
        pass
    words = set(re.findall(r"[a-z0-9]+", t))
    sizes = {int(m) for m in re.findall(r"(\d+)\s*gb", t)}
    forms = {f for f in _FORMS if f in words or (f == "sxm" and any(w.startswith("sxm") for w in words))}
    compact = re.sub(r"[\s_-]", "", t)
    hits = []
    for dev in all_devices():
        parts = dev.name.split("-")
        family = "".join(parts[:2]) if parts[0] == "rtx" else parts[0]
        if family not in words and not (parts[0] == "rtx" and family in compact):
            continue
        extra = [q for q in parts[2:] if not (q.endswith("gb") and q[:-2].isdigit()) and q not in _FORMS]
        if parts[0] == "rtx" and any(q not in compact for q in extra):
            continue  # 'Quadro RTX 6000' (Turing) is not the RTX 6000 Ada
        size = next((int(p[:-2]) for p in parts if p.endswith("gb") and p[:-2].isdigit()), None)
        form = next((p for p in parts if p in _FORMS), None)
        if sizes and size not in sizes:
            continue
        if forms and form is not None and form not in forms:
            continue
        hits.append(dev)
    return hits[0] if len(hits) == 1 else None


def _gpu(sc: dict, metric: str = "", notes: list[str] | None = None):
    g = sc.get("gpu") or ""
    notes = [] if notes is None else notes
    if g.startswith("other:"):
        dev = _named_device(g[len("other:"):])
        if dev is not None:
            notes.append(f"gpu {g!r} -> {dev.name}")
            return dev
    if not g or g.startswith("other:"):
        text = g.lower()
        family = next((dev for key, dev in UNSIZED_GPU_FAMILIES if key in text), None)
        if family is not None and metric != "fits":
            notes.append(f"gpu {g!r}: memory size not stated -> {family}")
            return get_device(family)
        if metric in DEVICE_FREE_METRICS:
            notes.append(f"gpu {g!r}: device not stated; memory does not depend on it beyond bf16 support -> "
                         f"stand-in {STAND_IN_GPU}")
            return get_device(STAND_IN_GPU)
        raise Unsupported(f"gpu {g!r}: the record does not name a device")
    try:
        return get_device(g)
    except Exception as err:
        dev = _named_device(g)  # a canonical-looking name the catalog spells otherwise ("H200-141GB")
        if dev is not None:
            notes.append(f"gpu {g!r} -> {dev.name}")
            return dev
        raise Unsupported(f"gpu {g!r} has no profile in hwprofiles/ ({str(err).split(';')[0]})") from None


def _parallel(sc: dict, arch: ModelArch, training: bool, notes: list[str]) -> dict[str, Any]:
    """The record's parallel layout as fitsim's ``parallel`` (degrees completed from n_gpus)."""
    p = sc.get("parallel") or {}
    n = int(sc.get("n_gpus") or 1)
    out: dict[str, Any] = {k: int(p.get(k) or 1) for k in ("tp", "pp", "cp", "ep")}
    if out["tp"] > 1 and (p.get("sp") or (p.get("sp") is None and sc.get("framework") == "torchtitan")):
        out["sp"] = True  # torchtitan's TP plan runs the norms sequence-parallel (SequenceParallel on the norms)
        if not p.get("sp"):
            notes.append("torchtitan tensor parallelism is sequence-parallel on the norms: sp on")
    inner = out["tp"] * out["pp"] * out["cp"]
    if n % inner:
        raise Unsupported(f"n_gpus={n} is not a multiple of tp x pp x cp = {inner}")
    out["dp"] = n // inner
    if p.get("dp") and int(p["dp"]) != out["dp"]:
        notes.append(f"dp {p['dp']} stated; {out['dp']} = n_gpus / (tp x pp x cp) used")
    zero = int(p.get("zero_stage") or 0)
    if training:
        if p.get("fsdp"):
            out["fsdp"] = "shard_grad_op" if zero == 2 else "full_shard"
        elif zero:
            out["zero"] = zero
            if sc.get("framework") in ACCELERATE_PLUGIN_FRAMEWORKS:
                notes.append(f"{sc.get('framework')} + DeepSpeed ZeRO-{zero} through accelerate's plugin (no config "
                             "file): DeepSpeed's code defaults (5e8 reduce buckets)")
            elif sc.get("framework") in HF_DEEPSPEED_FRAMEWORKS:
                out.update(_hf_deepspeed_config(zero, arch.hidden))
                notes.append(f"{sc.get('framework')} + DeepSpeed ZeRO-{zero}: the transformers docs' config "
                             + ("('auto' buckets from the hidden size)" if zero >= 3 else "(2e8 buckets, overlap_comm)"))
        for k in ("offload_optimizer", "offload_params"):
            if p.get(k) not in (None, "none"):
                out[k] = p[k]
    if not training and out["pp"] > 1:
        notes.append(f"device_map split over {out['pp']} GPUs: a pipeline of {out['pp']} stages run one after another")
    if out["ep"] > 1 and arch.moe is None:
        out["ep"] = 1
    return out


def _deepspeed_precision(precision: str, source_text: str, notes: list[str],
                         stated: bool = True) -> tuple[str, dict[str, bool]]:
    """DeepSpeed's fp16/bf16 engine casts the module to 16 bit and keeps the fp32 master copy in the optimizer
    (no torch.autocast unless its ``torch_autocast`` block is on).  "-pure" (no fp32 master) under ZeRO is the
    ``bf16_master_weights_and_grads`` + ``bf16_optimizer_states`` mode (DeepSpeed PR #7700); a 16-bit checkpoint
    dtype the record does not state (``stated`` False) is the engine's usual mode, with the fp32 master."""
    half = precision.removesuffix("-amp")
    flags: dict[str, bool] = {}
    if precision in ("bf16", "fp16") and not stated:
        notes.append(f"precision unstated: DeepSpeed's {half} engine keeps its fp32 master copy")
    elif precision in ("bf16", "fp16"):
        if half != "bf16":
            raise Unsupported("DeepSpeed without an fp32 master copy exists for bf16 only (bf16_master_weights_and_grads)")
        flags = {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
        notes.append("DeepSpeed bf16 with no fp32 master: bf16_master_weights_and_grads + bf16_optimizer_states")
    if "autocast" in source_text:
        notes.append(f"DeepSpeed torch_autocast on: {half} autocast over the {half} module")
        return f"{half}-amp", flags
    notes.append(f"DeepSpeed {half} engine: the module runs in {half} without autocast (fp32 master in the optimizer"
                 + (" replaced by bf16)" if flags else ")"))
    return half, flags


def _vllm_settings(text: str, notes: list[str]) -> dict[str, Any]:
    """vLLM's pool share and sequence cap as the record's text states them (``gpu_memory_utilization=0.95``,
    ``max_num_seqs 128``), else vLLM's defaults (0.9, 256)."""
    out: dict[str, Any] = {}
    m = re.search(r"gpu[_ -]memory[_ -]utili[sz]ation\D{0,4}(0?\.\d+|1(?:\.0+)?)\b", text, re.I)
    if m:
        out["gpu_memory_utilization"] = float(m.group(1))
    m = re.search(r"max[_ -]num[_ -]seqs\D{0,4}(\d+)", text, re.I)
    if m:
        out["max_num_seqs"] = int(m.group(1))
    default = InferenceQuant.model_fields
    notes.append(f"vLLM: KV pool filling {out.get('gpu_memory_utilization', default['gpu_memory_utilization'].default)}"
                 f" of the device, up to {out.get('max_num_seqs', default['max_num_seqs'].default)} sequences at once,"
                 " CUDA-graph decode" + ("" if out else " (vLLM's defaults)"))
    return out


def record_to_scenario(rec: dict, notes: list[str] | None = None) -> Scenario:
    """The record's ``scenario`` as a fitsim Scenario; raises :class:`Unsupported` (or a validation error)."""
    notes = [] if notes is None else notes
    sc = _source_script_defaults(rec, notes)
    notes_text = str(rec.get("notes") or "").lower()
    arch = _model(sc["model"], notes, notes_text, sc)
    dev = _gpu(sc, (rec.get("target") or {}).get("metric", ""), notes)
    d = _defaults(sc)
    wq = sc.get("weight_quant") or "none"
    quantized = wq != "none"
    # QLoRA's base is quantized whether or not the record names the format (NF4 then, see _method)
    precision = _precision(sc, arch, dev, quantized or sc.get("method") == "qlora", notes)
    year = _source_year(rec.get("source"))
    attention = _attention(sc, arch, precision, notes, year)
    sync = _host_sync_per_block(arch, sc, year, notes)

    if sc.get("task") == "infer" or sc.get("method") == "inference":
        inf = sc.get("inference") or {}
        engine = (inf.get("engine") or ("vllm" if sc.get("framework") == "vllm" else "")).lower()
        if engine in ("tgi", "tensorrt-llm", "sglang"):
            raise Unsupported(f"engine {engine!r}: its pool sizing and schedule are not modelled (vllm's are)")
        prompt = inf.get("prompt_len")
        if prompt is None:
            prompt = DEFAULT_PROMPT_LEN
            notes.append(f"prompt_len unstated: {DEFAULT_PROMPT_LEN} token assumed")
        gen = inf.get("gen_len")
        if gen is None:
            gen = DEFAULT_GEN_LEN
            notes.append(f"gen_len unstated: {DEFAULT_GEN_LEN} assumed")
        kv = inf.get("kv_dtype") or "auto"
        if quantized and wq not in QUANTS:
            raise Unsupported(f"weight_quant {wq!r} not modelled")
        weights = QUANTS.get(wq, "none")
        if weights in ("gptq", "awq") and precision not in ("fp16", "fp16-amp") and sc.get("precision") is None:
            precision = "fp16"
            notes.append("GPTQ/AWQ kernels run in fp16: precision fp16")
        prec = {"bf16-amp": "bf16", "fp16-amp": "fp16"}.get(precision, precision)
        dq = sc.get("double_quant")
        infer = {"weights": weights, "double_quant": bool(dq), "kv_dtype": kv}
        if engine == "vllm":
            infer.update(engine="vllm", **_vllm_settings(" ".join(str(rec.get(k) or "") for k in (
                "notes", "parallel", "precision")), notes))
        return Scenario(
            model=arch, gpu=dev.name, precision=prec, attention=attention,
            parallel=_parallel(sc, arch, False, notes),
            workload=InferWorkload(batch=inf.get("batch") or 1, prompt_len=int(prompt), gen_len=int(gen)),
            inference=infer, host_sync_per_block=sync,
        )

    if sc.get("framework") == "torchtitan" and precision == "bf16-amp" and (sc.get("parallel") or {}).get("fsdp"):
        # FSDP2's MixedPrecisionPolicy casts the gathered weights to bf16: activations and the residual stream
        # are bf16 (no autocast), the sharded fp32 master and states are kept by the FSDP model states
        precision = "bf16"
        notes.append("FSDP2 mixed precision: bf16 compute over fp32 sharded parameters -> precision bf16 under FSDP")
    ds_flags = {}
    zero = int((sc.get("parallel") or {}).get("zero_stage") or 0)
    # a ZeRO stage without FSDP is DeepSpeed whoever launches it: HF Trainer / accelerate hand a DeepSpeed config
    # to the DeepSpeed engine, which then owns the precision (accelerate turns its native autocast off under
    # DistributedType.DEEPSPEED)
    ds_engine = zero >= 1 and not (sc.get("parallel") or {}).get("fsdp") \
        and precision in ("bf16-amp", "fp16-amp", "bf16", "fp16")
    if ds_engine:
        precision, ds_flags = _deepspeed_precision(precision, str(rec.get("precision") or "").lower(), notes,
                                                   sc.get("precision") is not None)
    method = _method(sc, arch, precision, notes, rec.get("source"), ds_engine)
    mb, seq, ga = sc.get("micro_batch"), sc.get("seq_len"), sc.get("grad_accum")
    for k, v in (("micro_batch", mb), ("seq_len", seq), ("grad_accum", ga)):
        if v is None:
            notes.append(f"{k} unstated: {sc.get('framework')} default {d[k]}")
    loss = d.get("loss", "upcast")
    said_compiled = _compiled(notes_text)
    if loss == "chunked" and sc.get("framework") == "torchtune" and said_compiled:
        # the recipe's ``compile: True`` compiles the loss's per-chunk cross-entropy (training.compile_loss)
        loss = "chunked-compiled"
    if loss == "upcast" and year is not None and year <= 2023:
        # transformers before 4.46 (Oct 2024) and 2023 remote-code models shift a contiguous copy of the logits
        loss = "upcast-shift"
    if loss == "upcast-shift":
        notes.append(f"loss: a {year} source predates transformers 4.46 -> shifted contiguous logits copy "
                     "(loss='upcast-shift')")
    elif loss != "upcast":
        notes.append(f"loss: {sc.get('framework')} computes a chunked cross-entropy -> loss={loss!r}")
    optimizer = _galore_optimizer(sc, _optimizer(sc, notes, ds_engine, _torch_version(rec)),
                                  notes_text + " " + str(rec.get("optimizer") or "").lower(), notes)
    ga_v = ga or d["grad_accum"]
    if d.get("full_optimizer_in_bwd") and sc.get("method") == "full" and sc.get("n_gpus", 1) == 1 and ga_v == 1:
        optimizer = {**optimizer, "in_backward": True}
        notes.append(f"{sc.get('framework')} full single-device recipe steps the optimizer in backward")
    mb_v = mb or d["micro_batch"]
    par = {**_parallel(sc, arch, True, notes), **ds_flags}
    gb = sc.get("global_batch")
    if ga is None and gb:
        ga_v = max(1, int(gb) // (mb_v * par["dp"] * par.get("cp", 1)))
        notes.append(f"grad_accum from global_batch {gb} / (micro_batch {mb_v} x dp {par['dp']}) = {ga_v}")
    if sc.get("framework") == "torchtitan" and par.get("pp", 1) > 1 and par.get("fsdp") not in (None, "none"):
        # torchtitan's fsdp_reshard_after_forward "default": reshard after forward unless pipeline parallel
        par = {**par, "reshard_after_forward": False}
        notes.append("torchtitan FSDP under pipeline parallelism keeps the gathered parameters from forward to "
                     "backward (reshard_after_forward=False)")
    par = _fsdp_framework(sc, par, str(sc.get("method")), ga_v, notes)
    if sc.get("framework") == "torchtune" and par.get("fsdp") not in (None, "none", "no_shard"):
        # torchtune.training.shard_model calls fully_shard(m, reshard_after_forward=..., [offload_policy]): no
        # MixedPrecisionPolicy, so the bf16 model is sharded, reduced and stepped in bf16
        par = {**par, "fsdp_mixed_precision": False}
        notes.append("torchtune shards its bf16 model without a mixed-precision policy: bf16 shards, gradients "
                     "and optimizer states")
        if re.search(r"custom[ _]sharded", notes_text):
            # custom_sharded_layers ['tok_embeddings', 'output'] (llama3_1/70B_full.yaml, 8B_full.yaml)
            par = {**par, "fsdp_embedding_units": True}
            notes.append("torchtune shards tok_embeddings and output as FSDP units of their own "
                         "(custom_sharded_layers)")
    if sc.get("framework") == "torchtitan" and par.get("pp", 1) > 1 and mb_v > 1:
        # torchtitan splits each rank's local batch into micro-batches of parallelism.pipeline_parallel_
        # microbatch_size (default 1) that the schedule pipelines: m = local batch / 1
        mb_v, ga_v = 1, ga_v * mb_v
        notes.append(f"torchtitan pipeline: local batch {mb or d['micro_batch']} split into {ga_v} micro-batches of 1 "
                     "(pipeline_parallel_microbatch_size default 1)")
    # HF/PEFT/TRL/litgpt collators pad each batch to its longest sample and pass the attention mask;
    # packed datasets (torchtune, torchtitan, Megatron) have none
    padded = mb_v > 1 and sc.get("framework") not in UNPADDED_FRAMEWORKS and "packed" not in notes_text
    if padded:
        notes.append("micro-batch > 1 padded to its longest sample: SDPA gets an explicit mask")
    techniques = str((rec.get("parallel") or {}).get("techniques") or "").lower()
    compiled = said_compiled or "torch.compile" in techniques
    if compiled:
        notes.append("the run compiled the model (torch.compile): pointwise ops fused between its matmul and "
                     "attention kernels")
    scen = Scenario(
        model=arch, gpu=dev.name, method=method, precision=precision, attention=attention, loss=loss, compile=compiled,
        workload=TrainWorkload(micro_batch=mb_v, seq_len=seq or d["seq_len"], grad_accum=ga_v),
        optimizer=optimizer, checkpointing=_checkpointing(sc, notes, year), padded_batches=padded, parallel=par,
        implementation=sc.get("framework") if sc.get("framework") in ("litgpt", "torchtune") else "transformers",
        host_sync_per_block=sync,
    )
    return _checkpointing_that_ran(scen, sc, (rec.get("target") or {}).get("metric", ""), notes)


def _host_sync_per_block(arch: ModelArch, sc: dict, year: int | None, notes: list[str]) -> bool:
    """GPT-J in the transformers of 2022 built its rotary tables on the CPU in every layer and copied them to the
    GPU (``fixed_pos_embedding(...).to(x.device)``): the host waits for the GPU once per block."""
    if arch.family != "gptj" or sc.get("framework") in ("litgpt", "torchtune") or year is None or year > 2022:
        return False
    notes.append(f"GPT-J in {year}'s transformers copies its rotary tables to the GPU per layer: host and GPU "
                 "wait for each other once per block")
    return True


def _checkpointing_that_ran(scen: Scenario, sc: dict, metric: str, notes: list[str]) -> Scenario:
    """A run that was timed or whose memory was read fitted its GPUs: with checkpointing unstated and the
    framework's default (none) short of memory, the run must have recomputed -- full checkpointing when that
    fits (Megatron-DeepSpeed's GPT scripts pass ``--checkpoint-activations`` for the large models).  Records
    of whether a setup fits are left as stated: an out-of-memory report is their measurement."""
    if (sc.get("checkpointing") is not None or scen.checkpointing.mode != "none"
            or metric not in (*TIME_METRICS, *MEMORY_METRICS)):
        return scen
    from simulator import estimate

    if estimate(scen, what_fits=False, timing=False).fits:
        return scen
    # the modes by memory needed, most first: the last one tried is the one that needs the least
    for mode, how in (("full", "recomputed (full)"),
                      ("offload", "recomputed with its checkpoints in host memory (DeepSpeed cpu_checkpointing)")):
        recomputed = scen.model_copy(update={"checkpointing": scen.checkpointing.model_copy(update={"mode": mode})})
        if estimate(recomputed, what_fits=False, timing=False).fits:
            notes.append(f"checkpointing unstated and the default (none) does not fit: the run {how}")
            return recomputed
    # the run ran, so it recomputed, whatever the engine counts: with the mode that needs the least memory
    notes.append("checkpointing unstated and no mode fits by the engine's count: the run ran, so it recomputed with "
                 "its checkpoints in host memory (the least memory)")
    return recomputed


# ------------------------------------------------------------------------------------------------------------
# target -> prediction
# ------------------------------------------------------------------------------------------------------------

# Which Estimate field each `measured_how` corresponds to.  "unknown": the device reading (reserved + CUDA
# context) -- a table that reports "GPU memory" without naming its tool reads the card: nvidia-smi, or the
# NVML system metrics of W&B and gpustat, all of which include the context.  (Both unlabelled sources of the
# public records, the Qwen fine-tuning and inference tables, read above reserved at every size.)  "active" is
# allocated minus freed-but-cached, i.e. allocated.
MEASURED_FIELD = {
    "allocated": "peak_allocated_bytes",
    "active": "peak_allocated_bytes",
    "reserved": "peak_reserved_bytes",
    "nvidia-smi": "peak_memory_bytes",
    "unknown": "peak_memory_bytes",
    "n/a": "peak_reserved_bytes",
}


def memory_unit(target: dict) -> tuple[str, float]:
    """("GB" | "GiB", bytes per unit) of a memory record.

    The note says GiB -> GiB; it says 1e9 bytes -> GB.  Unclear ("GB as printed") -> GiB: the torch tools
    behind these tables print ``max_memory_allocated()/1024**3`` (or nvidia-smi MiB / 1024) and label it "GB".
    """
    note = (target.get("unit_note") or "").lower()
    if "gib" in note or "2^30" in note:
        return "GiB", GiB
    if "1e9" in note or "10^9" in note:
        return "GB", GB
    return "GiB", GiB


TIME_UNITS = {"step_time_s": "s", "tokens_per_s_per_gpu": "tokens/s", "tokens_per_s_total": "tokens/s",
              "samples_per_s_total": "samples/s", "tflops_per_gpu": "TFLOP/s", "mfu": "fraction",
              "decode_time_per_token_s": "s", "other:time_per_1000_microbatch_iterations": "min"}


def total_memory_bytes(e, scen: Scenario, field: str) -> float:
    """Sum of every rank's peak: each pipeline stage's peak times the ranks per stage (dp x tp x cp)."""
    ctx = e.memory_bytes.cuda_context
    shift = 0.0 if field == "peak_memory_bytes" else -ctx - (e.peak_memory_bytes - e.peak_reserved_bytes - ctx)
    if field == "peak_allocated_bytes":
        shift -= e.peak_reserved_bytes - e.peak_allocated_bytes
    per_stage = scen.parallel.n_gpus // scen.parallel.pp
    stages = e.stage_peak_bytes or {0: e.peak_memory_bytes}
    if len(stages) < scen.parallel.pp:  # long pipelines are checked at a few stages: the others as the largest
        stages = {i: stages.get(i, max(stages.values())) for i in range(scen.parallel.pp)}
    return sum(v + shift for v in stages.values()) * per_stage


def time_metric(e, scen: Scenario, metric: str, flops_convention: str | None) -> float:
    t = e.time
    if metric == "step_time_s":
        return t.step_s
    if metric == "tokens_per_s_per_gpu":
        return t.tokens_per_s_per_gpu
    if metric == "tokens_per_s_total":
        return t.tokens_per_s
    if metric == "samples_per_s_total":
        return t.tokens_per_s / scen.workload.seq_len
    if metric == "decode_time_per_token_s":
        return t.decode_per_token_s
    if metric == "mfu":
        return t.mfu
    if metric == "other:time_per_1000_microbatch_iterations":
        # litgpt's log: minutes per 1000 micro-batch iterations (the optimizer step amortised over grad_accum)
        return 1000.0 * t.step_s / scen.workload.grad_accum / 60.0
    # TFLOP/s per GPU: Megatron's formula counts the recomputed forward ("hardware"), torchtitan's does not
    f = e.flops
    flops = f.per_step if flops_convention == "hardware" else f.forward + f.backward
    return flops / (t.step_s * e.n_gpus) / 1e12


def _device_map_balanced(rec: dict, notes: list[str]) -> bool:
    """accelerate's "auto": sequential fill before v0.12 (2022-08), balanced after; a record that calls its
    split naive/sequential or balanced says which."""
    sc = rec.get("scenario") or {}
    text = " ".join(str(x) for x in (rec.get("parallel"), rec.get("notes"), sc.get("parallel"))).lower()
    if "balanced" in text:
        notes.append("device_map: balanced (get_balanced_memory)")
        return True
    if "naive" in text or "sequential" in text:
        notes.append("device_map: the record calls the split naive/sequential -> GPUs filled in order")
        return False
    year = _source_year(rec.get("source"))
    balanced = year is None or year >= 2023
    notes.append(f"device_map 'auto' of accelerate {'>= 0.12: balanced' if balanced else '< 0.12: GPUs filled in order'}"
                 f" (source year {year})")
    return balanced


def device_map_gpu_bytes(scen: Scenario, balanced: bool) -> list[float]:
    """Weight bytes accelerate's ``device_map="auto"`` places on each GPU of an inference scenario
    (``parallel.pp`` GPUs, each with its free memory after the CUDA context)."""
    from simulator.device_map import accelerate_device_map, bytes_per_gpu
    from simulator.estimate import cost_table_for

    if scen.model.arch != "decoder":
        raise Unsupported("device_map placement of an encoder-decoder model (two stacks sharing one embedding) "
                          "not modelled")
    ct = cost_table_for(scen)
    pre = sum(r.storage_bytes for r in ct.param_rows if r.where == "pre")
    post = sum(r.storage_bytes for r in ct.param_rows if r.where == "post")
    per_layer: dict[int, float] = {}
    for r in ct.param_rows:
        if r.where == "block":
            for i in r.layers:
                per_layer[i] = per_layer.get(i, 0.0) + r.storage_bytes
    blocks = [per_layer[i] for i in sorted(per_layer)]
    units = [pre, *blocks, post]
    dev = get_device(scen.gpu)
    n = scen.parallel.pp
    free = [float(dev.memory_total_bytes - dev.cuda_context_bytes)] * n
    placement = accelerate_device_map(units, free, balanced, max(blocks, default=0.0))
    return bytes_per_gpu(units, placement, n)


def _unsupported_metric(metric: str) -> str | None:
    if metric in SUPPORTED_METRICS:
        return None
    if metric == "run_time_s":
        return "run_time_s: the records do not state the tokens of the run"
    return f"metric {metric!r} not modelled"


PROMPT_AND_OUTPUT_WORDS = ("total tokens", "input and output", "input + output", "prompt and generated",
                           "prompt + generated", "encoded and generated", "input+output")


def _counts_prompt_tokens(rec: dict) -> bool:
    """Whether an inference throughput record counts the prompt tokens too (vLLM's benchmark_throughput
    "total tokens/s"), as its target's unit note or its notes say."""
    t = rec.get("target") or {}
    text = " ".join(str(x or "") for x in (t.get("unit_note"), t.get("measured_how"), rec.get("unit"),
                                           rec.get("measured_how"))).lower()
    return any(w in text for w in PROMPT_AND_OUTPUT_WORDS)


def predict_record(rec: dict) -> dict[str, Any]:
    """One prediction line: {id, predicted, unit, status, reason, notes, measured_as}."""
    t = rec.get("target") or {}
    metric = t.get("metric", "")
    out: dict[str, Any] = {"id": rec.get("id"), "predicted": None, "unit": None, "status": "unsupported",
                           "reason": None, "notes": []}
    why = _unsupported_metric(metric)
    if why:
        out["reason"] = why
        return out
    notes: list[str] = out["notes"]
    try:
        scen = record_to_scenario(rec, notes)
        if metric in MEMORY_METRICS:
            e = estimate(scen, what_fits=False, timing=False)
            field = MEASURED_FIELD.get(t.get("measured_how") or "unknown", "peak_reserved_bytes")
            unit, per = memory_unit(t)
            value = getattr(e, field)
            if metric == "peak_memory_total_GB":
                value = total_memory_bytes(e, scen, field)
                notes.append(f"total over {scen.parallel.n_gpus} GPUs: the sum of every rank's peak")
            out.update(predicted=round(value / per, 4), unit=unit, measured_as=field)
            if (t.get("measured_how") or "unknown") in ("unknown", "n/a"):
                notes.append("measured_how unknown: predicting the device reading (reserved + CUDA context)")
        elif metric in DEVICE_MAP_METRICS:
            # the memory a GPU holds after loading = the weights placed on it ("peak GPU memory is exactly the
            # size of the model put on a given GPU", accelerate's big-model-inference benchmark)
            per_gpu = device_map_gpu_bytes(scen, _device_map_balanced(rec, notes))
            unit, per = memory_unit(t)
            notes.append("GPU 0 memory = the weights device_map places on GPU 0 (allocated after loading)")
            out.update(predicted=round(per_gpu[0] / per, 4), unit=unit, measured_as="peak_allocated_bytes")
        elif metric in HOST_METRICS:
            # host RAM of the offloaded model states on the node (every rank's share)
            e = estimate(scen, what_fits=False, timing=False)
            unit, per = memory_unit(t)
            notes.append("host RAM = the offloaded states and parameters of the node's ranks; the process's own "
                         "memory (libraries, the checkpoint while loading) is not modelled")
            out.update(predicted=round(e.host_memory_bytes * scen.parallel.n_gpus / per, 4), unit=unit)
        elif metric == "model_states_per_gpu_GB":
            e = estimate(scen, what_fits=False, timing=False)
            unit, per = memory_unit(t)
            out.update(predicted=round(e.model_state_bytes / per, 4), unit=unit)
        elif metric in TIME_METRICS:
            e = estimate(scen, what_fits=False)
            value = time_metric(e, scen, metric, t.get("flops_convention"))
            if not scen.is_training and metric.startswith("tokens_per_s") and _counts_prompt_tokens(rec):
                w = scen.workload
                value *= (w.prompt_len + w.gen_len) / max(1, w.gen_len)
                notes.append("throughput counts prompt and generated tokens (the record's definition)")
            out.update(predicted=value, unit=TIME_UNITS[metric])
        elif metric == "fits":
            e = estimate(scen, what_fits=False)
            out.update(predicted=bool(e.fits), unit=None)
        elif metric == "max_seq_len_fit":
            e = estimate(scen, what_fits=True)
            if e.max_seq_len_that_fits is None:
                raise Unsupported("no sequence length fits (the setup does not fit at length 1)")
            out.update(predicted=int(e.max_seq_len_that_fits), unit="tokens")
        out["status"] = "ok"
    except Unsupported as err:
        out["reason"] = str(err)
    except ValidationError as err:  # a combination the inputs refuse: the field and the rule, as the CLI says it
        from simulator.cli import format_validation_error

        out["reason"] = f"not a valid scenario: {format_validation_error(err)}"[:500]
    except Exception as err:  # engine errors: one record never stops the run
        out["reason"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:500]
    if out["status"] != "ok":
        out["predicted"] = None
        out["unit"] = None
    return out


def predict_records(records: Iterable[dict]) -> list[dict[str, Any]]:
    return [predict_record(r) for r in records]


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, allow_nan=False, default=_json_default) + "\n")


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
