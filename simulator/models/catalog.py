"""Named architectures (one YAML per model in this folder) and a loader for a local HF ``config.json``.

Nothing is read at import time: the folder is listed on the first ``list_models()``, a YAML is parsed on the
first ``get_model()`` of that name, and the alias table (Hugging Face ids) is built on the first name that is
not a file name.  Every returned ``ModelArch`` is cached, so the same name gives the same object.

Name resolution, in order:
  1. catalog name or HF id, case/underscore-insensitive ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B");
  2. the same after dropping the organisation, a leading "meta-" and release-variant tokens
     ("-Instruct", "-Chat", "-hf", "-it", "-Base", "-GPTQ", "-AWQ", "-Int4", "-Int8", "-FP8"), which change
     weights or their storage but not the architecture ("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4" -> qwen2.5-7b);
  3. otherwise ``hwprofiles.names.UnknownNameError`` listing the closest names.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from hwprofiles import diskcache
from hwprofiles.names import UnknownNameError, normalize, resolve_name
from hwprofiles.registry import load_yaml, yaml_files

from .._code import ENGINE_CODE
from ..config.model import ModelArch, MoE

_DIR = pathlib.Path(__file__).resolve().parent

# Tokens that name a release variant of the same architecture (chat/instruct tuning, HF conversion, quantized
# storage).  Dropped only after the name failed to resolve as given.
_VARIANT_TOKENS = frozenset({"instruct", "chat", "hf", "it", "base", "gptq", "awq", "int4", "int8", "fp8"})


# ------------------------------------------------------------------------------------------------ catalog


@functools.cache
def _catalog_files() -> dict[str, pathlib.Path]:
    return yaml_files(_DIR)


def list_models() -> list[str]:
    """Catalog names, sorted (the YAML file names in ``simulator/models/``)."""
    return list(_catalog_files())


@functools.cache
def _load(name: str) -> ModelArch:
    path = _catalog_files()[name]
    return diskcache.load_or_build("model", name, lambda: _validate(name, path), code=ENGINE_CODE, sources=(path,))


def _validate(name: str, path: pathlib.Path) -> ModelArch:
    data = load_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a mapping of ModelArch fields, got {type(data).__name__}")
    try:
        arch = ModelArch.model_validate(data)
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err
    if arch.name != name:
        raise ValueError(f"{path.name}: name {arch.name!r} differs from the file name {name!r}")
    return arch


@functools.cache
def _aliases() -> dict[str, str]:
    """HF id -> catalog name, plus the repository part of the id ('Llama-2-7b-hf')."""
    table: dict[str, str] = {}
    for name in _catalog_files():
        hf_id = _load(name).hf_id
        if hf_id:
            table.setdefault(hf_id, name)
            table.setdefault(hf_id.rsplit("/", 1)[-1], name)
    return table


@functools.cache
def _lookup() -> dict[str, str]:
    """normalized name or alias -> catalog name (the same normalisation as ``resolve_name``)."""
    table = {normalize(n): n for n in _catalog_files()}
    for alias, target in _aliases().items():
        table.setdefault(normalize(alias), target)
    return table


def _variant_candidates(name: str) -> list[str]:
    """Names to try when ``name`` itself is unknown: without org, 'meta-' prefix and variant tokens."""
    key = normalize(name)
    out: list[str] = []
    base = key.rsplit("/", 1)[-1]
    out.append(base)
    if base.startswith("meta-"):
        out.append(base[len("meta-") :])
    for b in list(out):
        kept = [t for t in b.split("-") if t not in _VARIANT_TOKENS]
        if kept:
            out.append("-".join(kept))
    return out


def resolve_model_name(name: str) -> str:
    """Canonical catalog name for a catalog name, HF id or variant; raises ``UnknownNameError``."""
    table = _lookup()
    key = normalize(name)
    if key in table:
        return table[key]
    for cand in _variant_candidates(name):
        if cand in table:
            return table[cand]
    # Not found: let the shared helper raise with the closest names.
    return resolve_name(name, list_models(), "model", _aliases())


def get_model(name: str) -> ModelArch:
    """The named architecture: a catalog name, a Hugging Face id, or a chat/instruct/quantized variant of one."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    files = _catalog_files()
    canonical = name if name in files else resolve_model_name(name)
    return _load(canonical)


# ------------------------------------------------------------------------------------------ HF config.json

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# HF activation names (transformers.activations.ACT2FN keys) -> ModelArch.activation.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "bloom_gelu": "gelu_tanh",
    "relu": "relu",
}


class _Cfg:
    """Read access to a config dict that names the missing key in its error."""

    def __init__(self, data: Mapping[str, Any], model_type: str):
        self.data = data
        self.model_type = model_type

    def req(self, *keys: str) -> Any:
        """First present (non-None) key among ``keys``; ValueError naming them when none is."""
        for k in keys:
            if self.data.get(k) is not None:
                return self.data[k]
        names = " or ".join(repr(k) for k in keys)
        raise ValueError(f"config.json (model_type {self.model_type!r}) is missing required key {names}")

    def get(self, key: str, default: Any = None) -> Any:
        v = self.data.get(key)
        return default if v is None else v


def _activation(name: str, model_type: str) -> str:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"config.json (model_type {model_type!r}): activation {name!r} not supported; known: {', '.join(_ACTIVATIONS)}"
        ) from None


def _dtype(c: _Cfg, default: str = "fp32") -> str:
    # transformers >= 5 writes "dtype"; older configs "torch_dtype".  A config without one loads as float32 in HF.
    raw = c.get("dtype", c.get("torch_dtype"))
    if raw is None:
        return default
    raw = str(raw).removeprefix("torch.")
    if raw not in _DTYPES:
        raise ValueError(f"config.json: torch_dtype {raw!r} not supported; known: {', '.join(_DTYPES)}")
    return _DTYPES[raw]


def _rotary_fraction(c: _Cfg, key: str = "partial_rotary_factor", default: float = 1.0) -> float:
    """The share of each head the rotary embedding turns: transformers 5 keeps it in ``rope_parameters``,
    released configs at the top level (``partial_rotary_factor``; GPT-NeoX ``rotary_pct``)."""
    rope = c.get("rope_parameters") or {}
    value = rope.get("partial_rotary_factor") if isinstance(rope, Mapping) else None
    if value is None:
        value = c.get(key, default)
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"config.json (model_type {c.model_type!r}): {key}={value} must be in (0, 1]")
    return float(value)


def _llama_like(c: _Cfg) -> dict[str, Any]:
    """HF Llama-style decoders: llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, gemma, gemma2, phi3."""
    mt = c.model_type
    attn_bias = bool(c.get("attention_bias", False)) and mt in ("llama", "qwen3", "gemma", "gemma2")
    out: dict[str, Any] = dict(
        family="phi3" if mt == "phi3" else "llama",
        n_layers=c.req("num_hidden_layers"),
        hidden=c.req("hidden_size"),
        n_heads=c.req("num_attention_heads"),
        n_kv_heads=c.get("num_key_value_heads"),
        head_dim=c.get("head_dim"),
        intermediate=c.req("intermediate_size"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position="rope",
        norm="rmsnorm",
        gated_mlp=True,
        # `attention_bias` drives q/k/v/o in llama, qwen3, gemma, gemma2; mistral, mixtral and phi3 have none.
        qkv_bias=attn_bias,
        attn_out_bias=attn_bias,
        mlp_bias=bool(c.get("mlp_bias", False)) and mt == "llama",
        tied_embeddings=bool(c.get("tie_word_embeddings", mt in ("gemma", "gemma2"))),
    )
    act = c.get("hidden_act", "silu")
    if mt == "gemma":
        # HF forces the tanh approximation for Gemma ("gelu" in the official configs is a legacy value).
        act = c.get("hidden_activation") or ("gelu_pytorch_tanh" if act == "gelu" else act)
    elif mt == "gemma2":
        act = c.get("hidden_activation", c.get("hidden_act", "gelu_pytorch_tanh"))
    out["activation"] = _activation(act, mt)
    out["norm_plus_one"] = mt in ("gemma", "gemma2")
    if mt in ("qwen2", "qwen2_moe"):
        # Qwen2 q/k/v always carry a bias (o_proj never); qwen2_moe spells it `qkv_bias`.
        out["qkv_bias"] = bool(c.get("qkv_bias", True))
        out["attn_out_bias"] = False
    if mt == "qwen3":
        out["qk_norm"] = True
    if mt == "gemma2":
        out["sandwich_norm"] = True
    window = c.get("sliding_window")
    if window and (mt in ("mistral", "mixtral", "gemma2") or c.get("use_sliding_window")):
        out["sliding_window"] = int(window)
        # Gemma 2 alternates local (sliding) and global layers: layer i slides when (i + 1) % 2 != 0
        out["full_attention_every"] = 2 if mt == "gemma2" else 0
    if mt == "mixtral":
        out["moe"] = MoE(n_experts=c.req("num_local_experts"), top_k=c.req("num_experts_per_tok"))
    if mt == "qwen2_moe":
        # Every `decoder_sparse_step`-th layer is MoE unless listed in `mlp_only_layers`; ModelArch has one MLP kind
        # per model, so a mixed layout cannot be represented.
        step, dense_only = c.get("decoder_sparse_step", 1), c.get("mlp_only_layers", [])
        if step != 1 or dense_only:
            raise ValueError(
                "qwen2_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not representable in ModelArch"
            )
        shared = c.get("shared_expert_intermediate_size", 0)
        out["moe"] = MoE(
            n_experts=c.req("num_experts"),
            top_k=c.req("num_experts_per_tok"),
            expert_intermediate=c.req("moe_intermediate_size"),
            n_shared_experts=1 if shared else 0,
            shared_intermediate=shared or None,
        )
    if mt == "phi3":
        out["rotary_fraction"] = _rotary_fraction(c)
    # phi3: qkv_proj and gate_up_proj are fused Linears (family "phi3"): the parameter count equals the unfused Llama
    # layout; what is saved for backward and what an adapter spans do not.  partial_rotary_factor changes no
    # parameter or memory size beyond the shared cos/sin.
    out["torch_dtype"] = _dtype(c)
    return out


def _qwen_v1(c: _Cfg) -> dict[str, Any]:
    """Qwen (v1, remote code): fused c_attn with bias; w1/w2 each of width intermediate_size/2."""
    inter = c.req("intermediate_size")
    if inter % 2:
        raise ValueError(f"qwen config: intermediate_size={inter} is odd; w1/w2 are each intermediate_size/2 wide")
    flags = [d for d in ("bf16", "fp16", "fp32") if c.get(d)]
    no_bias = bool(c.get("no_bias", True))
    return dict(
        family="qwen",
        n_layers=c.req("num_hidden_layers"),
        hidden=c.req("hidden_size"),
        n_heads=c.req("num_attention_heads"),
        head_dim=c.get("kv_channels"),
        intermediate=inter // 2,
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("max_position_embeddings", c.get("seq_length", 2048)),
        position="rope",
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        qkv_bias=True,
        attn_out_bias=not no_bias,
        mlp_bias=not no_bias,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        # bf16/fp16/fp32 are runtime switches (all false = auto); the released checkpoints are bfloat16.
        torch_dtype=_dtype(c, default=flags[0] if flags else "bf16"),
    )


def _gpt2(c: _Cfg) -> dict[str, Any]:
    h = c.req("n_embd", "hidden_size")
    return dict(
        family="gpt2",
        n_layers=c.req("n_layer", "num_hidden_layers"),
        hidden=h,
        n_heads=c.req("n_head", "num_attention_heads"),
        intermediate=c.get("n_inner") or 4 * h,
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("n_positions", 1024),
        position="learned",
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("activation_function", "gelu_new"), c.model_type),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        torch_dtype=_dtype(c),
    )


def _opt(c: _Cfg) -> dict[str, Any]:
    h = c.req("hidden_size")
    proj = c.get("word_embed_proj_dim", h)
    if proj != h:
        # OPT-350m: embeddings of width word_embed_proj_dim with project_in/project_out Linears.
        raise ValueError(
            f"opt config: word_embed_proj_dim={proj} != hidden_size={h} (project_in/out) is not representable in ModelArch"
        )
    bias = bool(c.get("enable_bias", True))
    return dict(
        family="opt",
        n_layers=c.req("num_hidden_layers"),
        hidden=h,
        n_heads=c.req("num_attention_heads"),
        intermediate=c.req("ffn_dim"),
        vocab=c.req("vocab_size"),
        # The learned table has max_position_embeddings + 2 rows (OPT's padding offset); the template adds the 2.
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position="learned",
        norm="layernorm",
        norm_bias=bool(c.get("layer_norm_elementwise_affine", True)),
        activation=_activation(c.get("activation_function", "relu"), c.model_type),
        gated_mlp=False,
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        torch_dtype=_dtype(c),
    )


def _bloom(c: _Cfg) -> dict[str, Any]:
    h = c.req("hidden_size", "n_embed")
    return dict(
        family="bloom",
        n_layers=c.req("n_layer", "num_hidden_layers"),
        hidden=h,
        n_heads=c.req("n_head", "num_attention_heads"),
        intermediate=4 * h,
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("seq_length", 2048),  # ALiBi: no table; the training length
        position="alibi",
        norm="layernorm",
        norm_bias=True,
        activation="gelu_tanh",  # bloom_gelu is the tanh approximation
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        torch_dtype=_dtype(c),
    )


def _falcon(c: _Cfg) -> dict[str, Any]:
    h = c.req("hidden_size")
    n_heads = c.req("num_attention_heads", "n_head")
    # model_type "RefinedWeb" (early falcon-40b upload) is the new decoder architecture; "RefinedWebModel" the 7B one.
    new_arch = bool(c.get("new_decoder_architecture", c.model_type == "RefinedWeb"))
    multi_query = bool(c.get("multi_query", True))
    # As FalconAttention: kv heads = num_kv_heads for the new decoder architecture or without multi_query, else 1.
    if new_arch or not multi_query:
        n_kv = c.get("num_kv_heads", c.get("n_head_kv", n_heads))
    else:
        n_kv = 1
    bias = bool(c.get("bias", False))
    return dict(
        family="falcon",
        n_layers=c.req("num_hidden_layers", "n_layer"),
        hidden=h,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        intermediate=c.get("ffn_hidden_size") or 4 * h,
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position="alibi" if c.get("alibi", False) else "rope",
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("activation", "gelu"), c.model_type),
        gated_mlp=False,
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        # new_decoder_architecture has two LayerNorms (ln_attn, ln_mlp) on the same input: the falcon template
        # derives that from n_kv_heads/new architecture, ModelArch has no field for it.
        parallel_block=bool(c.get("parallel_attn", True)) or new_arch,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        torch_dtype=_dtype(c),
    )


def _gpt_neox(c: _Cfg) -> dict[str, Any]:
    bias = bool(c.get("attention_bias", True))
    return dict(
        family="gpt_neox",
        n_layers=c.req("num_hidden_layers"),
        hidden=c.req("hidden_size"),
        n_heads=c.req("num_attention_heads"),
        intermediate=c.req("intermediate_size"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position="rope",
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("hidden_act", "gelu"), c.model_type),
        gated_mlp=False,
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=True,
        rotary_fraction=_rotary_fraction(c, "rotary_pct"),
        # Parallel residual still uses two LayerNorms (input_layernorm, post_attention_layernorm).
        parallel_block=bool(c.get("use_parallel_residual", True)),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        torch_dtype=_dtype(c),
    )


def _gptj(c: _Cfg) -> dict[str, Any]:
    """GPT-J: one LayerNorm (ln_1) feeds attention and MLP in parallel; q/k/v/out_proj have no bias, fc_in/fc_out
    and the untied lm_head do; rotary on ``rotary_dim`` of each head's dims (no parameters)."""
    head = c.req("n_embd") // c.req("n_head")
    rotary_dim = c.get("rotary_dim") or head
    if not 0 < rotary_dim <= head:
        raise ValueError(f"gptj config: rotary_dim={rotary_dim} must be in 1..{head} (the head dim)")
    return dict(
        family="gptj",
        rotary_fraction=rotary_dim / head,
        n_layers=c.req("n_layer"),
        hidden=c.req("n_embd"),
        n_heads=c.req("n_head"),
        intermediate=c.get("n_inner") or 4 * c.req("n_embd"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("n_positions", 2048),
        position="rope",
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("activation_function", "gelu_new"), c.model_type),
        gated_mlp=False,
        qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=True,
        lm_head_bias=True,
        parallel_block=True,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        torch_dtype=_dtype(c),
    )


def _phi(c: _Cfg) -> dict[str, Any]:
    return dict(
        family="phi",
        n_layers=c.req("num_hidden_layers"),
        hidden=c.req("hidden_size"),
        n_heads=c.req("num_attention_heads"),
        n_kv_heads=c.get("num_key_value_heads"),
        intermediate=c.req("intermediate_size"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        position="rope",
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("hidden_act", "gelu_new"), c.model_type),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        parallel_block=True,
        rotary_fraction=_rotary_fraction(c, default=0.5),
        qk_norm=bool(c.get("qk_layernorm", False)),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        torch_dtype=_dtype(c),
    )


def _t5(c: _Cfg) -> dict[str, Any]:
    proj = str(c.get("feed_forward_proj", "relu"))
    gated = proj.startswith("gated-")
    act = proj.removeprefix("gated-")
    if gated and act == "gelu":
        act = "gelu_new"  # T5Config maps "gated-gelu" to dense_act_fn "gelu_new" (tanh approximation)
    n_layers = c.req("num_layers")
    tied = bool(c.get("tie_word_embeddings", True))
    if c.data.get("scale_decoder_outputs") is False:
        # transformers >= 5 rewrites tie_word_embeddings to True for every T5 and keeps the checkpoint's choice
        # here (False = T5 v1.1 / FLAN-T5 layout with a separate lm_head, which from_pretrained leaves untied).
        tied = False
    return dict(
        family="t5",
        arch="encoder_decoder",
        n_layers=n_layers,
        n_decoder_layers=c.get("num_decoder_layers", n_layers),
        hidden=c.req("d_model"),
        n_heads=c.req("num_heads"),
        head_dim=c.req("d_kv"),
        intermediate=c.req("d_ff"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=c.get("n_positions", 512),
        position="relative",
        norm="rmsnorm",  # T5LayerNorm: scale only, no bias, no mean subtraction
        activation=_activation(act, c.model_type),
        gated_mlp=gated,
        tied_embeddings=tied,
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        torch_dtype=_dtype(c),
    )


def _bert_like(family: str) -> Callable[[_Cfg], dict[str, Any]]:
    def build(c: _Cfg) -> dict[str, Any]:
        pos = c.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(
                f"{c.model_type} config: position_embedding_type {pos!r} is not supported (only 'absolute')"
            )
        return dict(
            family=family,
            arch="encoder",
            n_layers=c.req("num_hidden_layers"),
            hidden=c.req("hidden_size"),
            n_heads=c.req("num_attention_heads"),
            intermediate=c.req("intermediate_size"),
            vocab=c.req("vocab_size"),
            max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2),
            position="learned",
            norm="layernorm",
            norm_bias=True,
            activation=_activation(c.get("hidden_act", "gelu"), c.model_type),
            gated_mlp=False,
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tied_embeddings=bool(c.get("tie_word_embeddings", True)),
            torch_dtype=_dtype(c),
        )

    return build


def _deberta_v2(c: _Cfg) -> dict[str, Any]:
    relative = bool(c.get("relative_attention", False))
    biased_input = bool(c.get("position_biased_input", True))
    if c.get("conv_kernel_size", 0):
        raise ValueError("deberta-v2 config: the ConvLayer (conv_kernel_size > 0) is not representable in ModelArch")
    if relative and biased_input:
        raise ValueError(
            "deberta-v2 config: both relative_attention and position_biased_input are set; "
            "ModelArch holds one position encoding"
        )
    if relative:
        # the engine's DisentangledSelfAttention is DeBERTa-v3's (and v2-xlarge's): c2p and p2c on shared q/k
        kinds = c.get("pos_att_type") or []
        kinds = sorted({k.strip() for k in (kinds.split("|") if isinstance(kinds, str) else kinds)})
        if kinds != ["c2p", "p2c"] or not c.get("share_att_key", False):
            raise ValueError(f"deberta-v2 config: pos_att_type {kinds} with share_att_key="
                             f"{c.get('share_att_key', False)} is not modelled; allowed: ['c2p', 'p2c'] with "
                             "share_att_key=true (DeBERTa-v3)")
        if "layer_norm" not in str(c.get("norm_rel_ebd", "none")).lower():
            raise ValueError("deberta-v2 config: norm_rel_ebd without 'layer_norm' is not modelled; allowed: 'layer_norm'")
    max_pos = c.get("max_position_embeddings", 512)
    buckets = c.get("position_buckets", -1)
    if buckets <= 0:
        span = c.get("max_relative_positions", -1)
        buckets = span if span > 0 else max_pos
    return dict(
        family="deberta_v2",
        arch="encoder",
        n_layers=c.req("num_hidden_layers"),
        hidden=c.req("hidden_size"),
        n_heads=c.req("num_attention_heads"),
        intermediate=c.req("intermediate_size"),
        vocab=c.req("vocab_size"),
        max_position_embeddings=max_pos,
        type_vocab_size=c.get("type_vocab_size", 0),
        # relative: a shared rel_embeddings table of 2 x buckets rows (position_buckets, else the relative span).
        position="relative" if relative else "learned",
        relative_attention_num_buckets=buckets,
        norm="layernorm",
        norm_bias=True,
        activation=_activation(c.get("hidden_act", "gelu"), c.model_type),
        gated_mlp=False,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        torch_dtype=_dtype(c),
    )


_BUILDERS: dict[str, Callable[[_Cfg], dict[str, Any]]] = {
    **{
        mt: _llama_like
        for mt in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "phi3")
    },
    "qwen": _qwen_v1,
    "gpt2": _gpt2,
    "opt": _opt,
    "bloom": _bloom,
    "falcon": _falcon,
    "RefinedWeb": _falcon,
    "RefinedWebModel": _falcon,
    "gpt_neox": _gpt_neox,
    "gptj": _gptj,
    "phi": _phi,
    "t5": _t5,
    "mt5": _t5,
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
    "deberta-v2": _deberta_v2,
}


def supported_model_types() -> list[str]:
    """HF ``model_type`` values that ``from_hf_config`` maps."""
    return sorted(_BUILDERS)


def _read_config(config: Mapping[str, Any] | str | pathlib.Path) -> tuple[dict[str, Any], pathlib.Path | None]:
    if isinstance(config, Mapping):
        return dict(config), None
    path = pathlib.Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data, path


def from_hf_config(config: Mapping[str, Any] | str | pathlib.Path, name: str | None = None) -> ModelArch:
    """Map a local Hugging Face ``config.json`` (dict, file, or directory holding one) to a ``ModelArch``.

    ``name`` defaults to the config's ``_name_or_path``, else the directory name, else the model_type.
    Raises ValueError for an unsupported ``model_type`` (listing the supported ones), a missing required key
    (naming it), or a feature ModelArch cannot represent.
    """
    data, path = _read_config(config)
    model_type = data.get("model_type")
    if model_type is None:
        raise ValueError("config.json is missing required key 'model_type'")
    model_type = str(model_type)
    builder = _BUILDERS.get(model_type) or _BUILDERS.get(model_type.replace("_", "-"))
    if builder is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}")
    fields = builder(_Cfg(data, model_type))

    name_or_path = str(data.get("_name_or_path") or "").strip()
    if name is None:
        if name_or_path:
            name = name_or_path
        elif path is not None:
            name = path.parent.name
        else:
            name = model_type
    hf_id = name_or_path if _looks_like_hf_id(name_or_path) else None
    source = str(path) if path is not None else "Hugging Face config (dict)"
    return ModelArch(name=name, source=source, hf_id=hf_id, **fields)


def _looks_like_hf_id(s: str) -> bool:
    if not s or s.startswith((".", "/", "~")) or "\\" in s:
        return False
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not pathlib.Path(s).exists()


__all__ = [
    "UnknownNameError",
    "from_hf_config",
    "get_model",
    "list_models",
    "resolve_model_name",
    "supported_model_types",
]
