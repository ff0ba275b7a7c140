"""Operator templates: each family's forward, traced op by op with the real module paths.

One block template is traced per distinct *variant* of a block (which weights train,
whether its input needs grad, whether it is checkpointed) and repeated by count, so a
126-layer model costs a handful of traces.  Module paths are those of the Hugging Face
implementation (``model.layers.3.self_attn.q_proj``), so every number can be compared
node by node with torch's FlopCounterMode / saved-tensor hooks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from ..config.methods import BNB_QUANTS
from ..config.model import ModelArch
from ..units import dtype_bytes
from .ir import ZERO, Param, Poly, Tensor, Trace, Tracer, promote
from .transforms import Plan

# ---------------------------------------------------------------------------------------------
# Family naming: module paths of the HF implementation.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    embed: str
    pos_embed: str | None
    layers: str  # prefix of block i: f"{layers}.{i}"
    final_norm: str
    lm_head: str
    norm1: str
    norm2: str
    q: str
    k: str
    v: str
    qkv: str | None  # fused projection
    o: str
    gate: str | None
    up: str
    down: str
    embed_norm: str | None = None
    act: str = "mlp.act_fn"  # module running the MLP activation

    @property
    def attn_core(self) -> str:
        """The module whose forward runs the attention kernel (parent of the q or fused qkv projection)."""
        return (self.qkv or self.q).rsplit(".", 1)[0]


NAMES: dict[str, Names] = {
    "llama": Names("model.embed_tokens", None, "model.layers", "model.norm", "lm_head", "input_layernorm",
                   "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None,
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "qwen": Names("transformer.wte", None, "transformer.h", "transformer.ln_f", "lm_head", "ln_1", "ln_2",
                  "", "", "", "attn.c_attn", "attn.c_proj", "mlp.w2", "mlp.w1", "mlp.c_proj", act="mlp"),
    "gpt2": Names("transformer.wte", "transformer.wpe", "transformer.h", "transformer.ln_f", "lm_head", "ln_1",
                  "ln_2", "", "", "", "attn.c_attn", "attn.c_proj", None, "mlp.c_fc", "mlp.c_proj", act="mlp.act"),
    "opt": Names("model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.layers",
                 "model.decoder.final_layer_norm", "lm_head", "self_attn_layer_norm", "final_layer_norm",
                 "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None, "self_attn.out_proj", None,
                 "fc1", "fc2", act="activation_fn"),
    "bloom": Names("transformer.word_embeddings", None, "transformer.h", "transformer.ln_f", "lm_head",
                   "input_layernorm", "post_attention_layernorm", "", "", "", "self_attention.query_key_value",
                   "self_attention.dense", None, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                   embed_norm="transformer.word_embeddings_layernorm", act="mlp.gelu_impl"),
    "falcon": Names("transformer.word_embeddings", None, "transformer.h", "transformer.ln_f", "lm_head",
                    "input_layernorm", "input_layernorm", "", "", "", "self_attention.query_key_value",
                    "self_attention.dense", None, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", act="mlp.act"),
    "gpt_neox": Names("gpt_neox.embed_in", None, "gpt_neox.layers", "gpt_neox.final_layer_norm", "embed_out",
                      "input_layernorm", "post_attention_layernorm", "", "", "", "attention.query_key_value",
                      "attention.dense", None, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", act="mlp.act"),
    "gptj": Names("transformer.wte", None, "transformer.h", "transformer.ln_f", "lm_head", "ln_1", "ln_1",
                  "attn.q_proj", "attn.k_proj", "attn.v_proj", None, "attn.out_proj", None, "mlp.fc_in",
                  "mlp.fc_out", act="mlp.act"),
    "phi": Names("model.embed_tokens", None, "model.layers", "model.final_layernorm", "lm_head", "input_layernorm",
                 "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", None,
                 "self_attn.dense", None, "mlp.fc1", "mlp.fc2", act="mlp.activation_fn"),
    "bert": Names("bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings", "bert.encoder.layer",
                  "", "cls.predictions.decoder", "attention.output.LayerNorm", "output.LayerNorm",
                  "attention.self.query", "attention.self.key", "attention.self.value", None,
                  "attention.output.dense", None, "intermediate.dense", "output.dense",
                  embed_norm="bert.embeddings.LayerNorm", act="intermediate.intermediate_act_fn"),
    "t5": Names("encoder.embed_tokens", None, "encoder.block", "encoder.final_layer_norm", "lm_head", "layer.0.layer_norm",
                "layer.1.layer_norm", "layer.0.SelfAttention.q", "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v", None, "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0",
                "layer.1.DenseReluDense.wi_1", "layer.1.DenseReluDense.wo", act="layer.1.DenseReluDense.act"),
}
# Phi-3 (modeling_phi3.py): the Llama layout with q/k/v in one ``qkv_proj`` and gate/up in one ``gate_up_proj``,
# sliced by views -- what a kernel saves of a slice is the whole fused output, and an adapter spans it.
NAMES["phi3"] = replace(NAMES["llama"], q="", k="", v="", qkv="self_attn.qkv_proj", gate="mlp.gate_up_proj",
                        up="mlp.gate_up_proj", act="mlp.activation_fn")
# A plain PyTorch model (DeepSpeedExamples' SimpleTransformerModel): nn.MultiheadAttention's packed in_proj
# (q, k, v in one 3h x h weight with bias) and out_proj, an nn.Sequential(Linear, GELU, Linear) MLP, post-LN
# norm1/norm2, learned positions, no final norm, a biased output projection.
NAMES["torch"] = Names("embedding", "pos_embedding", "layers", "", "output_proj", "norm1", "norm2", "", "", "",
                       "attention.in_proj", "attention.out_proj", None, "ff.0", "ff.2", act="ff.1")

# Families whose blocks normalise after the residual add (post-LN): x = norm1(x + attn(x)); x = norm2(x + mlp(x)).
POST_NORM_FAMILIES = frozenset({"bert", "roberta", "deberta_v2", "torch"})


def _renamed(n: Names, old: str, new: str, **extra: str) -> Names:
    """The same layout under another top-level prefix (BERT -> RoBERTa / DeBERTa)."""
    moved = {k: v.replace(old, new, 1) for k, v in n.__dict__.items() if isinstance(v, str) and v.startswith(old)}
    return replace(n, **moved, **extra)


NAMES["roberta"] = _renamed(NAMES["bert"], "bert.", "roberta.")
NAMES["deberta_v2"] = _renamed(NAMES["bert"], "bert.", "deberta.", q="attention.self.query_proj",
                               k="attention.self.key_proj", v="attention.self.value_proj")


def names_of(arch: ModelArch) -> Names:
    n = NAMES[arch.family]
    if arch.family == "llama" and arch.moe is not None:
        return replace(n, gate="mlp.experts.gate_up_proj", up="mlp.experts.gate_up_proj", down="mlp.experts.down_proj")
    if arch.family == "t5" and not arch.gated_mlp:
        return replace(n, gate=None, up="layer.1.DenseReluDense.wi")
    if arch.family == "deberta_v2" and arch.position == "relative":  # no absolute position table
        return replace(n, pos_embed=None)
    if arch.family == "falcon" and arch.kv_heads > 1:  # new decoder architecture: one norm per branch
        return replace(n, norm1="ln_attn", norm2="ln_mlp")
    return n


# families whose "gelu_tanh" is HF's Python NewGELUActivation ("gelu_new"), not F.gelu(approximate="tanh")
PYTHON_GELU_FAMILIES = frozenset({"gpt2", "gptj", "phi", "t5"})


# HF eager attention: these families run softmax in the input dtype; the others upcast to fp32
# (``softmax(..., dtype=torch.float32).to(query.dtype)``); read from each modeling_*.py.
EAGER_SOFTMAX_IN_INPUT_DTYPE = frozenset({"gpt2", "bert", "roberta", "t5", "falcon", "torch"})
# Causal-LM loss on the 16-bit logits as they are (no ``logits.float()`` in the model code): plain torch models,
# and Qwen (v1) remote code (``modeling_qwen.py``: ``shift_logits = lm_logits[..., :-1, :].contiguous()`` then
# ``CrossEntropyLoss()``).  Under torch.autocast cross_entropy still runs in fp32; without it (DeepSpeed's
# fp16/bf16 engine) log-softmax and its grads stay 16-bit.
LOSS_ON_LOGITS_AS_THEY_ARE = frozenset({"torch", "qwen"})
# Before transformers 4.46 (the shifted loss, "upcast-shift") these causal LMs shifted the logits as the head returned
# them, with no ``logits.float()``: GPT2LMHeadModel, OPTForCausalLM, BloomForCausalLM, GPTNeoXForCausalLM,
# FalconForCausalLM (``shift_logits = lm_logits[..., :-1, :].contiguous()`` then ``CrossEntropyLoss()``).  GPT-J
# upcast in its head (``.to(torch.float32)``) and the Llama-like models called ``logits.float()``.
SHIFT_16_BIT_LOGITS_BEFORE_446 = frozenset({"gpt2", "opt", "bloom", "gpt_neox", "falcon"})
# learned positions numbered per sequence: OPT's cumsum of the attention mask, RoBERTa's of the non-padding ids
PER_SEQUENCE_POSITION_IDS = frozenset({"opt", "roberta"})
# transformers 5 decoders whose eager attention receives a materialised (b, 1, s, s) causal mask
# (masking_utils ``create_causal_mask``; SDPA and flash get none without padding and run causal kernels).
EAGER_4D_MASK_FAMILIES = frozenset({"llama", "phi3", "gpt2", "gptj", "gpt_neox", "phi", "opt", "t5", "bloom",
                                    "falcon"})
# transformers models that materialise their causal mask whatever the attention kernel (FalconModel:
# ``create_causal_mask(..., allow_is_causal_skip=False)``), so SDPA is handed a mask (kept per call for
# backward) and runs its memory-efficient kernel
ALWAYS_4D_MASK_FAMILIES = frozenset({"falcon"})
# HF eager attention that upcasts q and k to fp32 before ``q @ k^T`` (modeling_gptj.py ``_attn``: "Keep the attention
# weights computation in fp32 to avoid overflow issues"), then casts the probabilities to the value's dtype.
EAGER_QK_FP32 = frozenset({"gptj"})
# transformers' rotary embedding sliced and concatenated back (``torch.cat([q_embed, q_pass], dim=-1)``) on q and k
# already transposed to (b, heads, s, d): the roped q is a contiguous (b, heads, s, d) tensor, not the projection's
# (b, s, heads, d) layout (modeling_gpt_neox.py, modeling_phi.py, modeling_phi3.py).  litgpt's roped q is laid out
# the same way.
ROPE_CAT_HEADS_MAJOR = frozenset({"gpt_neox", "phi", "phi3"})
# GPT-J gathers its sin/cos table in every layer and ``repeat_interleave``s it inside each q and k rotation
# (modeling_gptj.py ``apply_rotary_pos_emb``): four tables per layer, none shared.
ROPE_TABLES_PER_CALL = frozenset({"gptj"})


MOE_ROUTER = "mlp.gate"
"""The leaf path of an MoE block's router (``{layer}.mlp.gate``)."""


def is_moe_router(arch: ModelArch, module: str) -> bool:
    """``module`` is the router of an MoE block (replicated over TP, recomputed by selective checkpointing)."""
    return arch.moe is not None and module.endswith(MOE_ROUTER)


def attention_kernel(plan) -> str:
    """The fused kernel a plan's attention runs: FlashAttention 1 / 3 where named; the memory-efficient kernel
    for SDPA given an explicit mask (transformers passes one for padded batches, prepended prefixes and models
    that always materialise theirs, and SDPA's flash kernel takes none) or asked for it; FlashAttention-2
    otherwise."""
    att = plan.attention
    if att in ("flash1", "flash3"):
        return att
    if att == "sdpa-mem-efficient" or (att == "sdpa-flash" and plan.implementation == "transformers" and (
            plan.padded or plan.prefix_tokens > 0 or plan.arch.family in ALWAYS_4D_MASK_FAMILIES)):
        return "mem_efficient"
    return "flash2"


def fused_output_follows_query(plan, q_dtype: str) -> bool:
    """Whether a fused attention kernel lays its output out as the query is laid out.  FlashAttention allocates
    ``out = torch::empty_like(q)`` (flash-attention csrc/flash_attn/flash_api.cpp ``mha_fwd``, the same code in
    ATen's SDPA flash backend), and ``empty_like`` keeps a permuted tensor's strides; the memory-efficient kernel
    allocates (b, s, heads, d) whatever the query (ATen ``_efficient_attention_forward``).  SDPA's flash backend
    takes 16-bit inputs only: fp32 runs the memory-efficient kernel on CUDA."""
    if plan.attention not in ("sdpa-flash", "flash1", "flash2", "flash3") or attention_kernel(plan) == "mem_efficient":
        return False
    return plan.attention != "sdpa-flash" or q_dtype in ("fp16", "bf16")



def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


@functools.cache
def target_names(arch: ModelArch, *, embeddings: bool = True) -> frozenset[str]:
    """Leaf (and dotted) names of the modules PEFT can adapt: the nn.Linear layers (and, for LoRA, the
    input embedding).  MoE experts are 3-D parameters and the router is no nn.Linear in transformers 5,
    so they are not module targets; the MLM head's transform is reached by all-linear only."""
    out = {k for k in linear_shapes(arch) if not k.endswith(".transform.dense")}
    if embeddings:
        out.add(_leaf(names_of(arch).embed))
    return frozenset({_leaf(x) for x in out} | out)


@functools.cache
def linear_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the model's linear layers (attention, MLP, head) by their path inside a
    block (``self_attn.q_proj``, ``attention.output.dense``); match targets with :func:`matching_shapes`."""
    n = names_of(arch)
    H, qd, kvd, inter = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    out = {n.o: (qd, H), n.lm_head: (H, arch.vocab)}
    if n.qkv:
        out[n.qkv] = (H, qd + 2 * kvd)
    else:
        out.update({n.q: (H, qd), n.k: (H, kvd), n.v: (H, kvd)})
    if arch.moe is None:
        if n.gate:
            out[n.gate] = (H, inter)
        out.update({n.up: (H, 2 * inter if n.gate == n.up else inter), n.down: (inter, H)})
    if arch.family in ("bert", "roberta", "deberta_v2"):  # the MLM head's transform (an nn.Linear all-linear takes)
        out[f"{n.lm_head.rsplit('.', 1)[0]}.transform.dense"] = (H, H)
    if arch.family == "t5" and arch.arch == "encoder_decoder":  # the decoder's cross-attention and its MLP
        out.update({"layer.1.EncDecAttention.q": (H, qd), "layer.1.EncDecAttention.k": (H, kvd),
                    "layer.1.EncDecAttention.v": (H, kvd), "layer.1.EncDecAttention.o": (qd, H),
                    "layer.2.DenseReluDense.wo": (inter, H)})
    return {k: v for k, v in out.items() if k}


def shira_rank_error(r: int, name: str, in_f: int, out_f: int) -> str | None:
    """PEFT's SHiRA bound: r x (in + out) trained entries may not outnumber the matrix's (``update_layer``)."""
    if r * (in_f + out_f) <= in_f * out_f:
        return None
    return (f"method.r={r}: {name} ({out_f} x {in_f}) would train r x (in + out) = {r * (in_f + out_f)} entries, "
            f"more than its {in_f * out_f}; allowed: r <= {in_f * out_f // (in_f + out_f)}")


def matching_shapes(arch: ModelArch, target: str) -> list[tuple[int, int]]:
    """The shapes of the linear layers a PEFT target names (its leaf or a dotted suffix of the path)."""
    return [v for k, v in linear_shapes(arch).items() if k == target or k.endswith("." + target)]


# ---------------------------------------------------------------------------------------------
# Quantized weight storage
# ---------------------------------------------------------------------------------------------


BNB_4BIT_CODE_BYTES = 16 * 4
"""The nf4 / fp4 code table of one matrix: 16 fp32 values."""
BNB_NESTED_STATE_BYTES = 256 * 4 + 4
"""Double quantization's per-matrix extras: the 256-entry fp32 dynamic map copy and the fp32 offset."""

# AutoGPTQ's QuantLinear without its ExLlama kernels -- the path training takes (transformers'
# ``GPTQConfig(use_exllama=False)`` / ``disable_exllama=True``: ExLlama has no backward) -- dequantizes a call of
# at least ``kernel_switch_threshold`` (128) rows with PyTorch ops (auto_gptq/nn_modules/qlinear/
# qlinear_cuda_old.py ``forward``): ``bitwise_right_shift`` of the expanded int32 ``qweight`` (4 B written and
# read back per weight), ``.to(torch.int8)`` (1 B written), ``bitwise_and`` (1 read, 1 written), ``weight -
# zeros`` (1 + 1), ``scales * (...)`` (1 read, 2 written in fp16): 16 B per weight besides the packed read, in
# five kernels, after four small ones unpacking the zero points the same way (shift, int8 cast, ``bitwise_and``,
# ``+ 1``): nine kernels; the int32 expansion and its int8 cast are live together (5 B per weight).  Then
# ``torch.matmul(x, weight)``, whose backward uses the fp16 weight it saved instead of dequantizing again.
GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT = 16.0
GPTQ_TORCH_DEQUANT_KERNELS = 9
GPTQ_TORCH_DEQUANT_PEAK_BYTES_PER_WEIGHT = 5.0


def quant_storage_bytes(kind: str, numel: int, out_f: int, in_f: int, group: int, double_quant: bool,
                        blocksize: int = 64) -> tuple[float, float]:
    """(total bytes, of which scales/metadata) of one quantized weight matrix.

    - nf4/fp4 (bitsandbytes ``Params4bit``): 4 bits + one fp32 absmax per 64 weights = 4.5 bits;
      double quant: absmax as uint8 per 64 + one fp32 per 256 blocks = 4.127 bits
      (bitsandbytes ``functional.quantize_4bit``, ``blocksize=64``, nested ``blocksize=256``).  Each
      matrix's ``QuantState`` also holds its own 16-entry fp32 code table (``get_4bit_type`` builds one per
      call) and, nested, a copy of the 256-entry fp32 dynamic map (``quantize_blockwise`` stores
      ``code.to(device, copy=True)``) and the fp32 ``offset`` (bitsandbytes 0.50 ``functional.py``).
    - int8 (LLM.int8 ``Int8Params``): 1 B/weight + fp32 ``SCB`` per output row.
    - gptq (AutoGPTQ ``QuantLinear``): qweight 4 bits, fp16 scales and 4-bit qzeros per group of
      ``group`` inputs per output, int32 ``g_idx`` per input: bits = 4 + 20/g + 32/out.
    - awq: as GPTQ without ``g_idx``.
    - fp8: 1 B/weight + one fp32 per-tensor scale.
    """
    if kind in ("nf4", "fp4"):
        data = numel * 0.5
        nblocks = -(-numel // blocksize)
        if double_quant:
            scales = nblocks * 1.0 + (-(-nblocks // 256)) * 4.0 + BNB_NESTED_STATE_BYTES
        else:
            scales = nblocks * 4.0
        scales += BNB_4BIT_CODE_BYTES
        return data + scales, scales
    if kind == "int8":
        return numel * 1.0 + out_f * 4.0, out_f * 4.0
    if kind in ("gptq", "awq"):
        groups = -(-in_f // group)
        scales = groups * out_f * 2.0 + groups * out_f * 0.5
        if kind == "gptq":
            scales += in_f * 4.0
        return numel * 0.5 + scales, scales
    if kind == "fp8":
        return numel * 1.0 + 4.0, 4.0
    raise ValueError(f"unknown quantization {kind!r}; allowed: nf4, fp4, int8, gptq, awq, fp8")


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockVariant:
    key: tuple  # (base trains, input needs grad, checkpointed, decoder of an encoder-decoder)
    layers: list[int]
    trace: Trace
    out_requires_grad: bool
    input: Tensor | None = None  # the block's hidden-state input (what a checkpoint keeps)

    @property
    def checkpointed(self) -> bool:
        return len(self.key) > 2 and bool(self.key[2])


@dataclass
class ModelTrace:
    """Everything the cost model needs, symbolic in (b, s)."""

    arch: ModelArch
    plan: Plan
    pre: Trace  # embeddings (and globals such as RoPE cos/sin)
    variants: list[BlockVariant]
    post: Trace  # final norm, head, loss
    globals_: list[Tensor] = field(default_factory=list)
    checkpoint_inputs: list[Tensor] = field(default_factory=list)  # shared tensors every block receives
    checkpoint_from: dict[int, tuple[bool, int]] = field(default_factory=dict)  # id -> (decoder stack, first block)
    tensors: dict[int, Tensor] = field(default_factory=dict)  # every tensor by id
    layers_prefix: str = ""
    logits: Tensor | None = None
    loss_upcast_copy: bool = False
    loss_dtype: str = "fp32"
    loss_shift_dtype: str = "fp32"


class Builder:
    def __init__(self, arch: ModelArch, plan: Plan):
        self.arch, self.plan = arch, plan
        self.n = names_of(arch)
        p = plan.precision
        self.pdt = p.param_dtype
        self.base_dt = plan.base_dtype
        self.cdt = p.compute_dtype
        self.tr = Tracer(autocast=p.autocast)
        self.globals: dict[str, Tensor] = {}
        self.checkpoint_inputs: list[Tensor] = []
        self.checkpoint_from: dict[int, tuple[bool, int]] = {}  # id -> (decoder stack, first block taking it)
        self.logits: Tensor | None = None
        self.loss_fp32_copy = False
        self.loss_dtype = "fp32"
        self.loss_shift_dtype = "fp32"

    # -- parameters -----------------------------------------------------------------------
    def weight(self, path: str, numel: int, trainable: bool, *, dtype: str | None = None, quant: str = "dense",
               shape: tuple[int, ...] = (), tied_to: str | None = None, saved: bool = False,
               linear: bool = False) -> Tensor:
        """A parameter: trainable ones in the parameter dtype (fp32 masters under AMP), frozen base
        weights in the base dtype.  ``saved``: a PEFT ``modules_to_save`` module -- a trainable copy
        in the base dtype beside the frozen ``original_module``.  A module called again (DeBERTa's
        ``query_proj`` on the relative embeddings) gets the parameter it registered."""
        known = self.tr.param_tensors.get(path)
        if known is not None:
            return known
        if saved:
            # the original stays (still tied if it was); the trainable copy is a new, untied tensor
            self.weight(f"{path}.original_module", numel, False, dtype=dtype or self.base_dt, quant=quant,
                        shape=shape, tied_to=tied_to)
            dtype, trainable, tied_to = dtype or self.base_dt, True, None
        dtype = dtype or (self.pdt if trainable else self.base_dt)
        if quant == "dense":
            nbytes, scales = numel * dtype_bytes(dtype), 0.0
        else:
            blocksize = getattr(self.plan.lora, "blocksize", 64)
            nbytes, scales = quant_storage_bytes(quant, numel, shape[0], shape[1], self.plan.quant_group_size,
                                                 self.plan.double_quant, blocksize)
        return self.tr.param(Param(path, numel, dtype, trainable and quant == "dense", quant, nbytes, scales, tied_to,
                                   shape or (numel,), linear))

    # -- linear with its adapters ---------------------------------------------------------
    def linear(self, path: str, x: Tensor, in_f: int, out_f: int, *, bias: bool, trainable: bool,
               quantizable: bool = True, adapters: bool = True, dtype: str | None = None) -> Tensor:
        pl = self.plan
        leaf = _leaf(path)
        saved = pl.saved_module(leaf)
        quant = pl.base_quant if (quantizable and pl.base_quant != "dense" and not saved) else "dense"
        w = self.weight(f"{path}.weight", in_f * out_f, trainable, quant=quant, shape=(out_f, in_f), saved=saved,
                        linear=True, dtype=dtype)
        b = None
        if bias:
            b = self.weight(f"{path}.bias", out_f, trainable or pl.biases_trainable, saved=saved)
        ia3 = pl.ia3_on(path)
        if ia3 == "in":
            x = self._ia3_scale(path, x, in_f, True)
        if quant != "dense":
            out = self._quant_matmul(path, x, w, in_f, out_f, b, quant)
        elif adapters and pl.shira_on(path):
            out = self._shira(path, x, w, in_f, out_f, b)
        else:
            # float8 training converts every linear of the blocks but an MoE router (torchtitan's filter:
            # the output head stays 16-bit, and it is not built here)
            out = self.tr.matmul(path, x, w, in_f, out_f, bias=b,
                                 fp8_cast=pl.float8_linears and not is_moe_router(pl.arch, path))
        if ia3 == "out":
            out = self._ia3_scale(path, out, out_f, False)
        if adapters and pl.lora_on(path) and pl.training:
            out = self._lora(path, x, out, in_f, out_f, w, quant)
        if pl.adapter_v2:
            out = self._adapter_v2(path, out, out_f)
        return out

    def _shira(self, path: str, x: Tensor, w: Tensor, in_f: int, out_f: int, b: Tensor | None,
               op: str = "linear") -> Tensor:
        """PEFT SHiRA ``Linear.forward``: ``new_weight = base_weight.clone()``, ``new_weight +=
        sparse_coo_tensor(indices, shira_weight * scaling)`` (int64 indices; the in-place add keeps the sparse
        operand for its masked gradient), ``F.linear(x, new_weight, bias)``, which keeps x and the dense clone.
        The r x (in + out) entries are fp32 (PEFT's autocast_adapter_dtype), their int32 indices a device buffer;
        the backward forms the dense weight gradient before masking it to the entries."""
        tr = self.tr
        r = self.plan.shira.r
        k = r * (in_f + out_f)
        err = shira_rank_error(r, path, in_f, out_f)
        if err:
            raise ValueError(err)
        vals = self.weight(f"{path}.shira_weight", k, True, dtype="fp32")
        tr.param(Param(f"{path}.shira_indices", 2 * k, "int32", False, "dense", 2 * k * 4.0, 0.0, None,
                            (2, k), False, True))
        scaled = tr.new(path, Poly.const(k), vals.dtype, True)
        idx = tr.new(path, Poly.const(2 * k), "int64", False)
        new_w = tr.new(path, Poly.const(in_f * out_f), w.dtype, True)
        tr.save(path, idx, scaled)
        tr.transient(path, new_w.nbytes)
        return tr.matmul(path, x, new_w, in_f, out_f, bias=b, op=op)

    def _adapter_v2(self, path: str, out: Tensor, out_f: int) -> Tensor:
        """litgpt ``AdapterV2Linear``: ``adapter_scale * (linear(x) + adapter_bias)``; the product keeps the sum for
        the scale's gradient."""
        tr = self.tr
        bias = self.weight(f"{path}.adapter_bias", out_f, True)
        scale = self.weight(f"{path}.adapter_scale", out_f, True)
        return tr.mul(path, tr.add(path, out, bias), scale, out_numel=out.numel)

    def _quant_matmul(self, path: str, x: Tensor, w: Tensor, in_f: int, out_f: int, b: Tensor | None,
                      quant: str) -> Tensor:
        """Frozen quantized weight: dequantized to the compute dtype for each use (bitsandbytes
        ``MatMul4Bit``: ``linear(A, dequantize_4bit(B))`` in forward and ``grad @ dequantize_4bit(B)``
        in backward; the input is not saved).  GPTQ in training: AutoGPTQ's PyTorch-op dequantization
        (see ``GPTQ_TORCH_DEQUANT_BYTES_PER_WEIGHT``), the fp16 weight saved for backward."""
        tr = self.tr
        if quant == "gptq" and self.plan.training:
            # AutoGPTQ's PyTorch-op dequantization (no ExLlama in training): int32 + int8 intermediates, then
            # torch.matmul saves the fp16 weight for the input's gradient
            deq = tr.new(path, Poly.const(in_f * out_f), self.cdt, False)
            deq.weight_copy = True
            tr.transient(path, Poly.const(GPTQ_TORCH_DEQUANT_PEAK_BYTES_PER_WEIGHT * in_f * out_f))
            if x.requires_grad:
                tr.save(path, deq)
        else:
            deq = Tensor(-1, Poly.const(in_f * out_f), self.plan.quant_compute_dtype or self.cdt, False, path)
            tr.transient(path, deq.nbytes)
        bnb = quant in BNB_QUANTS and self.plan.quant_compute_dtype is not None
        x_in = x
        if bnb and quant != "int8":
            # bitsandbytes ``Linear4bit``: ``x.to(compute_dtype)`` (a copy when the residual stream is wider, e.g.
            # fp32 after prepare_model_for_kbit_training), the result ``.to(inp_dtype)``.  ``MatMul8bitLt``
            # quantizes a transient fp16 copy and returns the input's dtype itself.
            x = tr.cast(path, x, self.plan.quant_compute_dtype)
        legacy_bnb = getattr(self.plan.lora, "bnb_keeps_input", False) or getattr(self.plan.llama_adapter,
                                                                                   "bnb_keeps_input", False)
        if quant in ("nf4", "fp4") and x.requires_grad and legacy_bnb:
            tr.save(path, x)  # legacy MatMul4Bit: ctx.tensors = (A, B)
        rows = x.numel * (1.0 / in_f)
        mm = rows * (2.0 * in_f * out_f)
        tr.reads(x)
        # bitsandbytes: ``F.linear(A, dequantize(B).t(), bias)``; AutoGPTQ: ``torch.matmul`` + bias add
        tr.flops(path, "linear", mm, mm if x.requires_grad else ZERO,
                 rows * (dtype_bytes(x.dtype) * (in_f + out_f)) + Poly.const(w.nbytes.c[-1]),
                 aten="addmm" if b is not None and quant != "gptq" else "mm")
        rg = x.requires_grad or (b is not None and b.requires_grad)
        if bnb:
            return tr.returns(tr.cast(path, tr.new(path, rows * out_f, x.dtype, rg), x_in.dtype))
        return tr.returns(tr.new(path, rows * out_f, self.cdt if x.dtype == "fp32" and self.cdt != "fp32" else x.dtype,
                                 rg))

    def _lora(self, path: str, x: Tensor, result: Tensor, in_f: int, out_f: int, base_w: Tensor,
              base_quant: str = "dense") -> Tensor:
        """PEFT ``lora.Linear.forward``: ``result + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling``,
        then ``result.to(result_dtype)``.  Adapter weights are fp32 (``autocast_adapter_dtype=True``)."""
        tr, lo = self.tr, self.plan.lora
        adt = self.plan.adapter_dtype if self.pdt != "fp32" else "fp32"
        r = lo.r
        a_w = self.weight(f"{path}.lora_A.weight", in_f * r, not lo.lora_fa, dtype=adt, shape=(r, in_f))
        b_w = self.weight(f"{path}.lora_B.weight", r * out_f, True, dtype=adt, shape=(out_f, r))
        result_dtype = result.dtype
        xa = tr.cast(path, x, adt)
        xa = tr.dropout(f"{path}.lora_dropout", xa, lo.dropout)
        h = tr.matmul(f"{path}.lora_A", xa, a_w, in_f, r)
        if lo.kind == "dora" or getattr(lo, "use_dora", False):
            return self._dora_tail(path, xa, result, h, b_w, in_f, out_f, r, base_w, a_w, base_quant)
        h = tr.matmul(f"{path}.lora_B", h, b_w, r, out_f)
        h = tr.mul(path, h, None)  # * scaling
        out = tr.add(path, result, h)
        return tr.cast(path, out, result_dtype)

    def _dora_tail(self, path: str, x: Tensor, result: Tensor, a_out: Tensor, b_w: Tensor, in_f: int,
                   out_f: int, r: int, base_w: Tensor, a_w: Tensor, base_quant: str = "dense") -> Tensor:
        """PEFT ``DoraLinearLayer.forward``: ``lora_weight = lora_B(lora_A(eye(in)))`` (its graph is
        recorded: lora_A saves the identity, lora_B saves ``A(eye)``), the row norm of
        ``W + s*lora_weight`` is detached, ``mag_norm_scale = magnitude / norm``, and
        ``(mag_norm_scale - 1) * base + mag_norm_scale * lora(x) * s`` saves the base result, the LoRA
        result and two ``out``-sized vectors."""
        tr = self.tr
        adt = a_w.dtype
        mod_mag = f"{path}.lora_magnitude_vector"
        self.weight(f"{mod_mag}", out_f, True, dtype=adt)
        eye = tr.new(path, Poly.const(in_f * in_f), adt, False)
        a_eye = tr.matmul(f"{path}.lora_A", eye, a_w, in_f, r, tokens=Poly.const(in_f), detached=True)
        tr.matmul(f"{path}.lora_B", a_eye, b_w, r, out_f, tokens=Poly.const(in_f), detached=True)
        # W + s*lora_weight and its norm: one out x in temporary in the compute dtype; on a quantized base
        # PEFT's dequantize_module_weight first rebuilds W (dequantize_4bit: the quant state's 16-bit dtype;
        # int8: CB * SCB in fp32) and casts it to the input's dtype
        sum_bytes = in_f * out_f * dtype_bytes(x.dtype)
        deq_bytes = 0.0 if base_quant == "dense" else in_f * out_f * max(
            dtype_bytes(x.dtype), 4 if base_quant == "int8" else dtype_bytes(self.cdt))
        tr.transient(path, Poly.const(sum_bytes + deq_bytes))
        lora_res = tr.matmul(f"{path}.lora_B", a_out, b_w, r, out_f)
        # magnitude / weight_norm: the detached norm is saved for the magnitude's grad
        tr.save(mod_mag, tr.new(mod_mag, Poly.const(out_f), adt, False))
        scale = tr.new(mod_mag, Poly.const(out_f), adt, True)
        scale_m1 = tr.new(mod_mag, Poly.const(out_f), adt, True)
        t1 = tr.mul(mod_mag, scale_m1, result, out_numel=result.numel)
        t2 = tr.mul(mod_mag, scale, lora_res, out_numel=lora_res.numel)
        out = tr.add(path, result, tr.add(path, t1, tr.mul(path, t2, None)))
        return tr.cast(path, out, result.dtype)

    def _ia3_scale(self, path: str, x: Tensor, width: int, feedforward: bool) -> Tensor:
        """PEFT ``ia3.Linear.forward``: ``scaling = 1 * ia3_l.flatten()`` (a new tensor), then
        feed-forward targets scale their input ``(x.to(ia3 dtype) * scaling).to(x dtype)``, the
        others their output ``(result * scaling).to(result dtype)``."""
        tr = self.tr
        adt = self.plan.adapter_dtype if self.pdt != "fp32" else "fp32"
        v = self.weight(f"{path}.ia3_l", width, True, dtype=adt)
        scaling = tr.new(path, Poly.const(width), adt, True)
        src = tr.cast(path, x, adt) if feedforward else x
        y = tr.mul(path, src, scaling, out_numel=x.numel)
        del v
        return tr.cast(path, y, x.dtype)

    # -- norms ----------------------------------------------------------------------------
    def norm_weight(self, path: str, width: int, trainable: bool) -> Tensor:
        """A norm's weight: a frozen one in ``plan.norm_dtype`` where PEFT's kbit preparation left it fp32."""
        trainable = trainable or self.plan.saved_module(_leaf(path))
        return self.weight(f"{path}.weight", width, trainable, dtype=None if trainable else self.plan.norm_dtype)

    def rmsnorm(self, path: str, x: Tensor, width: int, trainable: bool) -> Tensor:
        """HF ``LlamaRMSNorm``: fp32 upcast, ``x * rsqrt(mean(x^2) + eps)``, ``weight * y.to(dtype)``.

        Saves the fp32 input (pow and mul share it), the fp32 rsqrt (b*s), and the cast-back
        normalised tensor when the weight trains."""
        tr = self.tr
        w = self.norm_weight(path, width, trainable)
        x32 = tr.cast(path, x, "fp32")
        if x32.requires_grad:
            tr.save(path, x32)  # pow(2) saves self
        rs = tr.new(path, x.numel * (1.0 / width), "fp32", x32.requires_grad)
        if x32.requires_grad:
            tr.save(path, rs)  # rsqrt saves its result
        y = tr.mul(path, x32, rs, out_numel=x.numel)
        if self.plan.implementation == "litgpt" or self.arch.norm_plus_one:
            # litgpt ``RMSNorm``: ``(x_normed * weight.float()).to(dtype)`` -- a fresh fp32 copy of the weight,
            # and the fp32 normalised input when the weight trains; Gemma's ``x_normed * (1.0 + weight.float())``
            # the same with the fresh fp32 ``1 + weight``
            wf = tr.new(path, w.numel, "fp32", w.requires_grad)
            return tr.cast(path, tr.mul(path, y, wf, out_numel=x.numel), x.dtype)
        y = tr.cast(path, y, x.dtype)
        return tr.mul(path, w, y, out_numel=x.numel)

    def layernorm(self, path: str, x: Tensor, width: int, trainable: bool, bias: bool = True) -> Tensor:
        """``aten.native_layer_norm``: saves input, mean and rstd (fp32, b*s each); autocast runs it in fp32."""
        tr = self.tr
        w = self.norm_weight(path, width, trainable)
        b = self.weight(f"{path}.bias", width, trainable or self.plan.biases_trainable) if bias else None
        if tr.autocast is not None:
            x = tr.cast(path, x, "fp32")
        rg = x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        if rg:
            tr.save(path, x)
            rows = x.numel * (1.0 / width)
            tr.save(path, tr.new(path, rows, "fp32", False), tr.new(path, rows, "fp32", False))
        return tr.new(path, x.numel, promote(x.dtype, w.dtype) if tr.autocast is None else "fp32", rg)

    def t5_norm(self, path: str, x: Tensor, width: int, trainable: bool) -> Tensor:
        """HF ``T5LayerNorm``: the variance from an fp32 copy, but ``x * rsqrt(var)`` multiplies the
        original-dtype input (saved too), then casts to the weight dtype before ``weight * y``."""
        tr = self.tr
        w = self.norm_weight(path, width, trainable)
        x32 = tr.cast(path, x, "fp32")
        if x32.requires_grad:
            tr.save(path, x32)
        rs = tr.new(path, x.numel * (1.0 / width), "fp32", x.requires_grad)
        y = tr.mul(path, x, rs, out_numel=x.numel)
        if rs.requires_grad:
            tr.save(path, rs)
        y = tr.cast(path, y, w.dtype) if w.dtype in ("bf16", "fp16") else y
        return tr.mul(path, w, y, out_numel=x.numel)

    def norm(self, path: str, x: Tensor, width: int, trainable: bool) -> Tensor:
        trainable = trainable or self.plan.adapter_v2  # LLaMA-Adapter V2 trains the norms
        if self.arch.norm == "rmsnorm":
            return self.rmsnorm(path, x, width, trainable)
        return self.layernorm(path, x, width, trainable, self.arch.norm_bias)

    # -- activations ----------------------------------------------------------------------
    def act(self, path: str, x: Tensor) -> Tensor:
        if self.arch.activation == "relu":
            return self.tr.relu(path, x)
        if (self.arch.activation == "gelu_tanh" and self.arch.family in PYTHON_GELU_FAMILIES
                and self.plan.implementation == "transformers"):
            return self.new_gelu(path, x)
        return self.tr.unary_saving_input(path, x, self.arch.activation)

    def new_gelu(self, path: str, x: Tensor) -> Tensor:
        """HF ``NewGELUActivation`` ("gelu_new"), written in Python:
        ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` saves x (pow), the tanh
        output, ``0.5 * x`` and ``1 + tanh`` -- four tensors of the input's size."""
        tr = self.tr
        if not x.requires_grad:
            return tr.new(path, x.numel, x.dtype, False)
        th = tr.new(path, x.numel, x.dtype, True)
        half = tr.new(path, x.numel, x.dtype, True)
        one_p = tr.new(path, x.numel, x.dtype, True)
        tr.save(path, x, th, half, one_p)
        return tr.new(path, x.numel, x.dtype, True)

    # -- attention core -------------------------------------------------------------------
    def attention_core(self, path: str, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True) -> Tensor:
        """Scaled dot-product attention as the chosen kernel stores it.

        - flash / mem-efficient (SDPA or flash-attn): saves q, k, v, the output O and the fp32
          logsumexp (b*a*s); GQA keys/values stay at n_kv heads (``enable_gqa``); the output is
          already (b, s, a, d)-contiguous, so HF's ``transpose(1, 2).contiguous()`` copies nothing.
        - eager: ``repeat_kv`` copies K/V to all heads, ``softmax(QK^T, dtype=fp32)`` saves its
          fp32 output (4*b*a*s^2 B) and the cast-back probabilities are saved by ``@ V``.
        - sdpa-math: the same as eager, decomposed inside ATen.
        FLOPs per torch's ``sdpa_flop_count``: 4*b*a*s*s_kv*d forward, 10*b*a*s*s_kv*d backward
        (causal masking is not discounted).
        """
        tr, arch, impl = self.tr, self.arch, self.plan.attention
        a, akv, d = arch.n_heads, arch.kv_heads, arch.d_head
        q = tr.autocast_in(path, q)
        k = tr.autocast_in(path, k)
        v = tr.autocast_in(path, v)
        rg = q.requires_grad or k.requires_grad or v.requires_grad
        fwd = Poly.att(4.0 * a * d)
        if impl == "eager":
            if arch.family in EAGER_QK_FP32 and self.plan.implementation == "transformers":
                # ``query.to(torch.float32)``, ``key.to(torch.float32)``; under autocast the matmul casts them back
                q = tr.autocast_in(path, tr.cast(path, q, "fp32"))
                k = tr.autocast_in(path, tr.cast(path, k, "fp32"))
            if akv != a:  # repeat_kv: expand + reshape copies K and V to all heads
                k = tr.new(path, Poly.kv(a * d), k.dtype, k.requires_grad)
                v = tr.new(path, Poly.kv(a * d), v.dtype, v.requires_grad)
            # softmax is on torch.autocast's fp32 list: under autocast it returns fp32 whatever the input
            if arch.family in EAGER_SOFTMAX_IN_INPUT_DTYPE and tr.autocast is None:
                probs32 = probs = tr.new(path, Poly.att(a), q.dtype, rg)  # softmax in the input dtype
            else:
                probs32 = tr.new(path, Poly.att(a), "fp32", rg)  # softmax(..., dtype=float32)
                probs = tr.cast(path, probs32, v.dtype)  # ``.to(query.dtype)`` / ``.to(value.dtype)``
            return self._explicit_attention(path, q, k, v, probs32, probs, fwd, v.dtype)
        if impl == "sdpa-math":
            # ATen's math kernel upcasts 16-bit q/k/v to fp32, scales q and k by sqrt(scale)
            # (new storages), repeats GQA heads, and keeps the softmax in fp32.
            acc = "fp32" if q.dtype in ("bf16", "fp16") else q.dtype
            qs = tr.new(path, Poly.tok(a * d), acc, q.requires_grad)
            ks = tr.new(path, Poly.kv(a * d), acc, k.requires_grad)
            if akv != a or v.dtype != acc:
                v = tr.new(path, Poly.kv(a * d), acc, v.requires_grad)
            probs = tr.new(path, Poly.att(a), acc, rg)
            return self._explicit_attention(path, qs, ks, v, probs, probs, fwd, q.dtype)
        mask = self.globals.get("attn_mask")
        expand = self.plan.padded or mask is not None or self.plan.implementation != "transformers"
        if expand and akv != a and impl.startswith("sdpa"):
            # HF passes SDPA an explicit mask when batches are padded or a prefix is prepended: no
            # enable_gqa, repeat_kv copies K and V to all heads, and CUDA uses the mem-efficient kernel.
            # litgpt and torchtune expand K and V to all heads themselves before calling SDPA.
            k = tr.new(path, Poly.kv(a * d), k.dtype, k.requires_grad)
            v = tr.new(path, Poly.kv(a * d), v.dtype, v.requires_grad)
        o = tr.new(path, Poly.tok(a * d), q.dtype, rg)
        if rg:
            lse = tr.new(path, Poly.tok(a), "fp32", False)
            tr.save(path, q, k, v, o, lse)
            if mask is not None:
                # each call hands the kernel its own copy of the float mask (a bool one, expanded over the batch,
                # turned additive per sequence in the query's dtype), kept for backward
                boolean = mask.dtype == "bool"
                tr.save(path, tr.new(path, Poly.att(1) if boolean else mask.numel, q.dtype if boolean else mask.dtype,
                                     False))
        tr.reads(q, k, v)
        tr.flops(path, "attention", fwd, Poly.att(10.0 * a * d) if rg else ZERO,
                 Poly.tok(2.0 * dtype_bytes(q.dtype) * a * d) + Poly.kv(2.0 * dtype_bytes(k.dtype) * akv * d),
                 aten="attention", outputs=(o.id, lse.id) if rg else (o.id,))
        return o

    def _explicit_attention(self, path: str, q: Tensor, k: Tensor, v: Tensor, probs_saved: Tensor, probs: Tensor,
                            fwd: Poly, out_dtype: str) -> Tensor:
        """``probs = softmax(q @ k^T)``, ``probs @ v`` with autograd's save rules; softmax saves its output."""
        tr, arch = self.tr, self.arch
        a, d = arch.n_heads, arch.d_head
        rg = q.requires_grad or k.requires_grad or v.requires_grad
        # matmul folds (b, heads) into one batch dimension with ``reshape``: an operand that is a slice of a fused
        # projection's output (b, s, 3 x hidden) cannot be viewed that way, so bmm gets -- and saves -- a copy
        q, k, v = (self._unless_slice(path, t) for t in (q, k, v))
        if q.requires_grad:
            tr.save(path, k)
        if k.requires_grad:
            tr.save(path, q)
        if rg:
            tr.save(path, probs_saved)
        if probs.requires_grad:
            tr.save(path, v)
        if v.requires_grad:
            tr.save(path, probs)
        bwd = ZERO
        if rg:
            n_mm = int(probs.requires_grad) + int(v.requires_grad) + int(q.requires_grad) + int(k.requires_grad)
            bwd = Poly.att(2.0 * a * d) * n_mm
        tr.reads(q, k, v, probs)
        # two bmm and a softmax, recorded as one attention op with no outputs named (so selective checkpointing,
        # whose policy would keep the bmm products, refuses it -- compile.sac_saved_ops)
        tr.flops(path, "attention", fwd, bwd, Poly.att(a * 6.0) + Poly.tok(4.0 * a * d), aten="attention")
        tr.new(path, Poly.tok(a * d), probs.dtype, rg)  # probs @ V in (b, a, s, d) layout
        return tr.new(path, Poly.tok(a * d), out_dtype, rg)  # cast back, transpose(1, 2).contiguous()

    def _unless_slice(self, path: str, t: Tensor) -> Tensor:
        """``t`` itself, or a copy of it where it is a slice of a larger storage (a fused q/k/v output)."""
        if t.is_param or t.numel == self.tr.all[t.id].numel:
            return t
        return self.tr.new(path, t.numel, t.dtype, t.requires_grad)

    # -- embeddings -----------------------------------------------------------------------
    def embedding(self, path: str, ids: Tensor, vocab: int, width: int, trainable: bool, rows: Poly,
                  saved: bool = False) -> Tensor:
        """``F.embedding`` saves the int64 indices when the table trains."""
        w = self.weight(f"{path}.weight", vocab * width, trainable, shape=(vocab, width), saved=saved)
        if w.requires_grad:
            self.tr.save(path, ids)
        out = self.tr.new(path, rows * width, w.dtype, w.requires_grad)
        pl = self.plan
        if pl.lora is not None and pl.training and pl.lora_targets is not None and pl.lora_on(path):
            # named explicitly: 'all-linear' covers nn.Linear layers only
            out = self._lora_embedding(path, ids, out, vocab, width, rows)
        return out

    def _lora_embedding(self, path: str, ids: Tensor, result: Tensor, vocab: int, width: int, rows: Poly) -> Tensor:
        """PEFT ``lora.Embedding``: ``embedding(ids, lora_embedding_A.T) @ lora_embedding_B.T * scaling``
        (A: r x V, B: h x r, in the adapter dtype); the lookup saves the ids, the matmul its r-wide input."""
        tr, lo = self.tr, self.plan.lora
        adt = self.plan.adapter_dtype if self.pdt != "fp32" else "fp32"
        a_w = self.weight(f"{path}.lora_embedding_A", lo.r * vocab, True, dtype=adt, shape=(lo.r, vocab))
        b_w = self.weight(f"{path}.lora_embedding_B", width * lo.r, True, dtype=adt, shape=(width, lo.r))
        tr.save(path, ids)
        h = tr.new(path, rows * lo.r, a_w.dtype, True)
        h = tr.matmul(path, h, b_w, lo.r, width, tokens=rows)
        out = tr.add(path, result, tr.mul(path, h, None))
        return tr.cast(path, out, result.dtype)




class ModelBuilder(Builder):
    """Traces embeddings -> blocks -> head -> loss for every family."""

    # -- block pieces ---------------------------------------------------------------------
    def rope(self, path: str, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x * cos + rotate_half(x) * sin``: saves the (shared) cos and sin; rotate_half's cat saves nothing."""
        tr = self.tr
        a = tr.mul(path, x, cos, out_numel=x.numel)
        rot = tr.new(path, x.numel, x.dtype, x.requires_grad)
        b = tr.mul(path, rot, sin, out_numel=x.numel)
        return tr.add(path, a, b)

    def self_attention(self, L: str, h: Tensor, train: bool, cross_kv: Tensor | None = None,
                       names: tuple[str, str, str, str] | None = None) -> Tensor:
        arch, n, tr, pl = self.arch, self.n, self.tr, self.plan
        H, qd, kvd, d = arch.hidden, arch.q_dim, arch.kv_dim, arch.d_head
        qn, kn, vn, on = names or (n.q, n.k, n.v, n.o)
        dora = pl.lora is not None and (pl.lora.kind == "dora" or getattr(pl.lora, "use_dora", False))
        # litgpt has no DoRA or SHiRA: PEFT's per-module layers then
        litgpt_qkv = pl.implementation == "litgpt" and not dora and pl.shira is None
        if litgpt_qkv and names is None and cross_kv is None and not n.qkv:
            q, k, v = self._litgpt_qkv(L, h, train)
        elif n.qkv and names is None:
            fused = f"{L}.{n.qkv}"
            litgpt = litgpt_qkv and pl.training and pl.lora_on(fused)
            qkv = self.linear(fused, h, H, qd + 2 * kvd, bias=arch.qkv_bias, trainable=train, adapters=not litgpt)
            if litgpt:  # litgpt's LoRAQKVLinear on the fused projection, over the parts it names
                widths = {"q": qd, "k": kvd, "v": kvd}
                enabled = [(f"{n.qkv}.{p}", widths[p]) for p in ("q", "k", "v") if p in pl.lora.qkv_parts]
                qkv = self._litgpt_qkv_lora(L, h, qkv, enabled, qd + 2 * kvd)
            if arch.family == "falcon" and pl.implementation == "transformers" and qkv.requires_grad:
                # FalconAttention._split_heads picks k and v with index lists (``fused_qkv[..., [-2], :]``): each
                # advanced index keeps its (1,) int64 index for backward
                tr.save(fused, *(tr.new(fused, Poly.const(1), "int64", False) for _ in ("k", "v")))
            # views into one storage: the kernel saves the storage once
            q, k, v = qkv.part(Poly.tok(qd)), qkv.part(Poly.tok(kvd)), qkv.part(Poly.tok(kvd))
        else:
            q = self.linear(f"{L}.{qn}", h, H, qd, bias=arch.qkv_bias, trainable=train)
            src = cross_kv if cross_kv is not None else h
            k = self.linear(f"{L}.{kn}", src, H, kvd, bias=arch.qkv_bias, trainable=train)
            v = self.linear(f"{L}.{vn}", src, H, kvd, bias=arch.qkv_bias, trainable=train)
        if arch.qk_norm:
            q = self.rmsnorm(f"{L}.self_attn.q_norm", q, d, train)
            k = self.rmsnorm(f"{L}.self_attn.k_norm", k, d, train)
        if arch.position == "rope" and cross_kv is None:
            cos, sin = self.globals["cos"], self.globals["sin"]
            if arch.family in ROPE_TABLES_PER_CALL and pl.implementation == "transformers":
                q = self.rope(f"{L}.self_attn", q, *self._rope_tables(L, q.dtype))
                k = self.rope(f"{L}.self_attn", k, *self._rope_tables(L, k.dtype))
            else:
                q = self.rope(f"{L}.self_attn", q, cos, sin)
                k = self.rope(f"{L}.self_attn", k, cos, sin)
        if pl.prefix_tokens and cross_kv is None:
            pk = self.globals["prefix"]
            k = tr.new(f"{L}.self_attn", Poly.kv(kvd), k.dtype, k.requires_grad or pk.requires_grad)
            v = tr.new(f"{L}.self_attn", Poly.kv(kvd), v.dtype, v.requires_grad or pk.requires_grad)
        core = qn.rsplit(".", 1)[0] if names is not None else n.attn_core
        o = self.attention_core(f"{L}.{core}", q, k, v)
        if names is None and cross_kv is None and pl.llama_adapter_on(getattr(self, "layer_index", -1)):
            # y + gating * ay is a fresh contiguous (B, T, heads, d) tensor: the reshape before proj is a view
            o = self._adaption_prompt(f"{L}.{core}", q, o)
        elif names is None and self._query_heads_major(cross_kv) and fused_output_follows_query(pl, q.dtype):
            # a contiguous (B, heads, T, d) roped q: a fused kernel's output follows its layout, so
            # ``y.transpose(1, 2).reshape(B, T, -1)`` copies before the output projection (a q in the projection's
            # (B, T, heads, d) layout gives a (B, T, heads, d) output and the reshape is a view)
            o = tr.new(f"{L}.{core}", o.numel, o.dtype, o.requires_grad)
        return self.linear(f"{L}.{on}", o, qd, H, bias=arch.attn_out_bias, trainable=train)

    # -- DeBERTa-v2 ------------------------------------------------------------------------
    def deberta_encoder_inputs(self, x: Tensor) -> Tensor:
        """``DebertaV2Embeddings`` multiplies its output by the (b, s) attention mask (saved); the encoder then makes
        the (b, 1, s, s) mask ``m[:, None, None, :] * m[:, None, :, None]``, the (1, s, s) int64 relative positions
        and ``LayerNorm(rel_embeddings.weight)`` (2 x buckets rows), all handed to every layer (a checkpoint keeps
        them).  The mask is the model's float ones without an attention mask, the tokenizer's int64 one when
        batches are padded."""
        arch, pl, tr = self.arch, self.plan, self.tr
        H = arch.hidden
        mask_dtype = "int64" if pl.padded else "fp32"
        mask = tr.new("deberta", Poly.tok(1), mask_dtype, False)
        x = tr.mul("deberta.embeddings", x, tr.cast("deberta.embeddings", mask, x.dtype))
        self.keep_for_checkpoints(tr.new("deberta.encoder", Poly.att(1), mask_dtype, False))
        if arch.position == "relative":
            self.keep_for_checkpoints(tr.new("deberta.encoder", Poly.pos2(1), "int64", False))
            rows = 2 * arch.relative_attention_num_buckets
            table = self.weight("deberta.encoder.rel_embeddings.weight", rows * H, pl.base_trainable, shape=(rows, H))
            rel = self.layernorm("deberta.encoder.LayerNorm", table, H, pl.base_trainable)
            self.keep_for_checkpoints(rel)
            self.globals["rel_embeddings"] = rel
        return x

    def _bmm(self, module: str, x: Tensor, y: Tensor, out_numel: Poly, fwd: Poly) -> Tensor:
        """``torch.bmm(x, y)`` (autocast's lower-precision list): saves y if x needs grad and x if y does; the
        backward runs one product per operand that needs grad."""
        tr = self.tr
        x, y = tr.autocast_in(module, x), tr.autocast_in(module, y)
        tr.reads(x, y)
        if x.requires_grad:
            tr.save(module, y)
        if y.requires_grad:
            tr.save(module, x)
        rg = x.requires_grad or y.requires_grad
        tr.flops(module, "bmm", fwd, fwd * (int(x.requires_grad) + int(y.requires_grad)), aten="bmm")
        return tr.returns(tr.new(module, out_numel, tr.autocast or promote(x.dtype, y.dtype), rg))

    def _scaled(self, module: str, x: Tensor) -> Tensor:
        """``x / scaled_size_sqrt(...).to(x.dtype)``: a 0-dim fp32 divisor (cast to x's dtype), saved for the
        backward of x."""
        tr = self.tr
        scale = tr.cast(module, tr.new(module, Poly.const(1), "fp32", False), x.dtype)
        if x.requires_grad:
            tr.save(module, scale)
        return tr.new(module, x.numel, x.dtype, x.requires_grad)

    def _gathered(self, module: str, x: Tensor, index: Tensor) -> Tensor:
        """``torch.gather(x, -1, index.expand(...))`` into a (b * heads, s, s) score tensor: saves x and the index."""
        tr = self.tr
        if x.requires_grad:
            tr.save(module, x, index)
        return tr.new(module, Poly.att(self.arch.n_heads), x.dtype, x.requires_grad)

    def deberta_attention(self, L: str, h: Tensor, train: bool) -> Tensor:
        """DeBERTa-v2's ``DisentangledSelfAttention`` (eager: transformers gives it no SDPA or flash path), with
        content-to-position and position-to-content terms on the shared projections (``share_att_key``).

        Per layer, beside BERT's projections: q, k and v copied to (b * heads, s, d) (``transpose_for_scores``'s
        ``contiguous``), the keys divided by the scale (a copy), ``query_proj`` / ``key_proj`` run again on the
        normalised relative table and repeated over the batch, the two (b * heads, s, 2 x buckets) products the
        gathers keep, their (s, s) int64 index tensors, a bool mask for ``masked_fill`` and the softmax output."""
        arch, n, tr = self.arch, self.n, self.tr
        H, a = arch.hidden, arch.n_heads
        core = f"{L}.{n.attn_core}"

        def heads(t: Tensor) -> Tensor:  # view -> permute(0, 2, 1, 3) -> contiguous
            return tr.new(core, t.numel, t.dtype, t.requires_grad)

        q = heads(self.linear(f"{L}.{n.q}", h, H, H, bias=arch.qkv_bias, trainable=train))
        k = heads(self.linear(f"{L}.{n.k}", h, H, H, bias=arch.qkv_bias, trainable=train))
        v = heads(self.linear(f"{L}.{n.v}", h, H, H, bias=arch.qkv_bias, trainable=train))
        scores = self._bmm(core, q, self._scaled(core, k), Poly.att(a), Poly.att(2.0 * H))
        if arch.position == "relative":
            rel = self.globals["rel_embeddings"]
            rows = 2 * arch.relative_attention_num_buckets

            def positions(proj: str) -> Tensor:  # the projection of the table, in heads, repeated over the batch
                p = heads(self.linear(f"{L}.{proj}", rel, H, H, bias=arch.qkv_bias, trainable=train))
                return tr.new(core, Poly.seq(rows * H), p.dtype, p.requires_grad)

            pos_q, pos_k = positions(n.q), positions(n.k)
            index = lambda: tr.new(core, Poly.pos2(1), "int64", False)  # noqa: E731  clamp(+-rel_pos + span)
            c2p = self._bmm(core, q, pos_k, Poly.tok(a * rows), Poly.tok(2.0 * rows * H))
            score = self._scaled(core, self._gathered(core, c2p, index()))
            score = tr.new(core, score.numel, score.dtype, score.requires_grad)  # ``score = 0; score += c2p / scale``
            p2c = self._bmm(core, k, pos_q, Poly.tok(a * rows), Poly.tok(2.0 * rows * H))
            p2c = self._scaled(core, self._gathered(core, p2c, index()))
            score.requires_grad = score.requires_grad or p2c.requires_grad  # ``score += p2c / scale``: in place
            scores = tr.add(core, scores, score)
        # ``attention_mask.bool()`` and its inverse, which masked_fill keeps
        tr.new(core, Poly.att(1), "bool", False)
        inverse = tr.new(core, Poly.att(1), "bool", False)
        if scores.requires_grad:
            tr.save(core, inverse)
        scores = tr.new(core, scores.numel, scores.dtype, scores.requires_grad)
        # softmax is on CUDA autocast's fp32 list; it saves its output
        probs = tr.new(core, scores.numel, "fp32" if tr.autocast else scores.dtype, scores.requires_grad)
        if probs.requires_grad:
            tr.save(core, probs)
        ctx = self._bmm(core, probs, v, Poly.tok(H), Poly.att(2.0 * H))
        o = heads(ctx)  # back to (b, s, hidden): permute + contiguous
        return self.linear(f"{L}.{n.o}", o, H, H, bias=arch.attn_out_bias, trainable=train)

    def _rope_tables(self, L: str, dtype: str) -> tuple[Tensor, Tensor]:
        """GPT-J's ``apply_rotary_pos_emb``: sin and cos gathered per layer in the key's dtype and
        ``repeat_interleave``d per call -- a (1, s, 1, rotary_dim) pair of the call's own."""
        d = self.arch.rotary_dim
        return (self.tr.new(f"{L}.self_attn", Poly.pos(d), dtype, False),
                self.tr.new(f"{L}.self_attn", Poly.pos(d), dtype, False))

    def _query_heads_major(self, cross_kv: Tensor | None) -> bool:
        """Whether the roped query reaches attention as a contiguous (b, heads, s, d) tensor
        (:data:`ROPE_CAT_HEADS_MAJOR`, litgpt)."""
        pl, arch = self.plan, self.arch
        if pl.implementation == "litgpt":
            return True
        return (pl.implementation == "transformers" and arch.family in ROPE_CAT_HEADS_MAJOR
                and arch.position == "rope" and cross_kv is None)

    def _adaption_prompt(self, P: str, q: Tensor, y: Tensor) -> Tensor:
        """litgpt adapter ``CausalSelfAttention.scaled_dot_product_attention`` from ``adapter_start_layer`` on: the
        prompt (``adapter_wte``, prompt_length x hidden) through the frozen q/k/v projection (V2: with its bias and
        scale) gives one sequence of prompt keys and values, which SDPA cannot hand a fused kernel (their batch is 1,
        the queries' is b), so ATen's math path runs: q, k and v upcast to fp32 and scaled, ``q @ k^T`` (keeps the
        fp32 q for the prompt's grad, the batch-expanded fp32 keys when q needs grad), softmax (keeps its fp32
        output), ``@ v`` (keeps the batch-expanded fp32 values), back to 16 bits; then ``y + gating_factor * ay``,
        whose product keeps ``ay`` for the gate."""
        arch, tr, la, pl = self.arch, self.tr, self.plan.llama_adapter, self.plan
        H, qd, kvd, a = arch.hidden, arch.q_dim, arch.kv_dim, arch.n_heads
        aT = la.prompt_length
        self.weight(f"{P}.adapter_wte.weight", aT * H, True, shape=(aT, H))
        gate = self.weight(f"{P}.gating_factor", a, True)
        width = qd + 2 * kvd
        prefix_mm = Poly.const(2.0 * aT * H * width)
        tr.flops(P, "linear", prefix_mm, prefix_mm)  # the prompt's grad through the frozen projection
        if pl.adapter_v2:
            tr.save(P, tr.new(P, Poly.const(aT * width), self.cdt, True))  # the V2 scale's product keeps linear + bias
        qs = tr.new(P, Poly.tok(qd), "fp32", q.requires_grad)
        ks = tr.new(P, Poly.seq(aT * qd), "fp32", True)
        vs = tr.new(P, Poly.seq(aT * qd), "fp32", True)
        probs = tr.new(P, Poly.tok(a * aT), "fp32", True)
        tr.save(P, qs, probs, vs)
        if q.requires_grad:
            tr.save(P, ks)
        mm = Poly.tok(2.0 * aT * qd)
        tr.flops(P, "attention", mm * 2.0, mm * (4.0 if q.requires_grad else 3.0),
                 Poly.tok(2.0 * dtype_bytes(q.dtype) * qd + 8.0 * a * aT))
        ay = tr.new(P, Poly.tok(qd), q.dtype, True)
        gated = tr.mul(P, gate, ay, out_numel=ay.numel)
        return tr.add(P, y, gated)

    def _litgpt_qkv(self, L: str, h: Tensor, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        """litgpt's ``CausalSelfAttention``: one fused ``attn`` linear for q, k and v (its parameters are
        counted under the HF names), split by views.  With as many key/value heads as query heads the value
        stays a view of that output, so SDPA keeps the whole fused storage for backward; grouped heads are
        expanded into copies (see :meth:`attention_core`).  The adapters of the targeted projections are one
        ``LoRAQKVLinear`` (:meth:`_litgpt_qkv_lora`)."""
        arch, n, tr, pl = self.arch, self.n, self.tr, self.plan
        H, qd, kvd = arch.hidden, arch.q_dim, arch.kv_dim
        parts = ((n.q, qd), (n.k, kvd), (n.v, kvd))
        base = [self.linear(f"{L}.{name}", h, H, out_f, bias=arch.qkv_bias, trainable=train, adapters=False)
                for name, out_f in parts]
        rg = any(t.requires_grad for t in base)
        qkv = tr.new(f"{L}.{n.q}", Poly.tok(qd + 2 * kvd), base[0].dtype, rg)
        enabled = [(name, out_f) for name, out_f in parts if pl.training and pl.lora_on(f"{L}.{name}")]
        if enabled:
            qkv = self._litgpt_qkv_lora(L, h, qkv, enabled, qd + 2 * kvd)
        views = tuple(qkv.part(Poly.tok(w)) for w in (qd, kvd, kvd))
        return views

    def _litgpt_qkv_lora(self, L: str, x: Tensor, pretrained: Tensor, enabled: list[tuple[str, int]],
                         total_out: int) -> Tensor:
        """litgpt ``LoRAQKVLinear.forward``: one dropout of the input, ``lora_A`` for every enabled projection at
        once (r per projection), a grouped ``conv1d`` with the stacked ``lora_B`` (saves its r-wide input), then
        ``zero_pad`` -- zeros of the fused width and ``index_copy_``, which saves its source and the int64 index --
        unless all three projections are adapted, ``* scaling`` and ``pretrained + lora``."""
        tr, lo, arch = self.tr, self.plan.lora, self.arch
        H, r = arch.hidden, lo.r
        adt = self.plan.adapter_dtype if self.pdt != "fp32" else "fp32"
        a_w = b_w = None
        for name, out_f in enabled:
            path = f"{L}.{name}"
            a = self.weight(f"{path}.lora_A.weight", H * r, not lo.lora_fa, dtype=adt, shape=(r, H))
            b = self.weight(f"{path}.lora_B.weight", r * out_f, True, dtype=adt, shape=(out_f, r))
            a_w, b_w = a_w or a, b_w or b
        P = f"{L}.{enabled[0][0]}"
        out_en = sum(out_f for _, out_f in enabled)
        xa = tr.dropout(f"{P}.lora_dropout", tr.cast(P, x, adt), lo.dropout)
        h = tr.matmul(f"{P}.lora_A", xa, a_w, H, r * len(enabled))
        after_b = tr.matmul(f"{P}.lora_B", h, b_w, r, out_en, tokens=h.numel * (1.0 / (r * len(enabled))))
        if len(enabled) < 3:
            idx = tr.new(P, Poly.const(out_en), "int64", False)
            if after_b.requires_grad:
                tr.save(P, after_b, idx)
            after_b = tr.new(P, Poly.tok(total_out), after_b.dtype, after_b.requires_grad)
        return tr.add(P, pretrained, tr.mul(P, after_b, None))

    def mlp(self, L: str, x: Tensor, train: bool) -> Tensor:
        arch, n, tr = self.arch, self.n, self.tr
        H, inter = arch.hidden, arch.intermediate
        if arch.moe is not None:
            return self.moe(L, x, train)
        if arch.gated_mlp and n.gate == n.up:
            # one gate_up projection chunked into views: the activation saves its slice, i.e. the whole output
            gu = self.linear(f"{L}.{n.up}", x, H, 2 * inter, bias=arch.mlp_bias, trainable=train)
            m = tr.mul(f"{L}.mlp", gu.part(Poly.tok(inter)), self.act(f"{L}.{n.act}", gu.part(Poly.tok(inter))))
        elif arch.gated_mlp:
            g = self.linear(f"{L}.{n.gate}", x, H, inter, bias=arch.mlp_bias, trainable=train)
            u = self.linear(f"{L}.{n.up}", x, H, inter, bias=arch.mlp_bias, trainable=train)
            a = self.act(f"{L}.{n.act}", g)
            m = tr.mul(f"{L}.mlp", a, u)
        else:
            u = self.linear(f"{L}.{n.up}", x, H, inter, bias=arch.mlp_bias, trainable=train)
            m = self.act(f"{L}.{n.act}", u)
        if arch.family == "t5" and self.plan.implementation == "transformers":
            # T5DenseActDense / T5DenseGatedActDense: ``hidden_states.to(self.wo.weight.dtype)`` where they differ
            # (fp32 weights under autocast: an fp32 copy that autocast casts back down for the matmul)
            wo_dtype, wo_quantizable = self._t5_wo(train)
            return self.linear(f"{L}.{n.down}", tr.cast(f"{L}.{n.down}", m, wo_dtype), inter, H, bias=arch.mlp_bias,
                               trainable=train, quantizable=wo_quantizable, dtype=wo_dtype)
        return self.linear(f"{L}.{n.down}", m, inter, H, bias=arch.mlp_bias, trainable=train)

    def _t5_wo(self, trainable: bool) -> tuple[str, bool]:
        """(dtype, quantizable) of T5's ``wo``, one of ``_keep_in_fp32_modules``: ``from_pretrained`` keeps it fp32
        when the model loads in fp16 (transformers ``_get_dtype_plan``), else it takes the weights' dtype, and
        bitsandbytes leaves it unquantized (its ``modules_to_not_convert``)."""
        loads_fp16 = "fp16" in (self.pdt, self.base_dt)
        dtype = "fp32" if loads_fp16 else (self.pdt if trainable else self.base_dt)
        # transformers' bnb quantizers leave a model's ``_keep_in_fp32_modules`` unconverted
        return dtype, self.plan.base_quant not in BNB_QUANTS

    def _t5_clamp(self, L: str, x: Tensor) -> Tensor:
        """T5Block in fp16: ``torch.clamp(x, min=-clamp_value, max=clamp_value)`` with 0-dim fp32 bounds from
        ``torch.where`` -- the clamp keeps its input and both bounds for backward."""
        tr = self.tr
        if x.dtype != "fp16" or self.plan.implementation != "transformers":
            return x
        if x.requires_grad:
            tr.save(L, x, tr.new(L, Poly.const(1), "fp32", False), tr.new(L, Poly.const(1), "fp32", False))
        return tr.new(L, x.numel, x.dtype, x.requires_grad)

    def moe(self, L: str, x: Tensor, train: bool) -> Tensor:
        """HF Mixtral sparse MoE with the grouped-GEMM experts (transformers ``integrations/moe.py``).

        Router: ``linear -> softmax(fp32) -> topk -> /= sum`` (saves probs, top-k indices, the sum and
        a clone of the top-k values).  Experts over the R = tokens x top_k routed rows: gather
        ``hidden[perm // k]`` (saves the int64 index), ``grouped_mm`` with the gate_up weights (saves
        its input and the int32 group offsets), ``silu(gate) * up`` (the gate_up output storage and
        the silu output), ``grouped_mm`` down (its input), ``* routing weight`` and the inverse
        permutation gather.  Routed rows always total tokens x top_k, so sizes are deterministic.
        grouped_mm is not autocast-enabled: inputs are cast to the weight dtype.
        """
        arch, tr, moe = self.arch, self.tr, self.arch.moe
        H, ei, E, k = arch.hidden, arch.expert_intermediate, moe.n_experts, moe.top_k
        R = x.numel * (k / H)  # routed rows (tokens x top_k)
        # the router is a bare weight (transformers 5's MixtralTopKRouter), no nn.Linear: no adapter targets it
        G = f"{L}.{MOE_ROUTER}"
        logits = self.linear(G, x, H, E, bias=False, trainable=train, quantizable=False, adapters=False)
        probs = tr.new(G, logits.numel, "fp32", logits.requires_grad)
        topi = tr.new(G, R, "int64", False)
        ssum = tr.new(G, x.numel * (1.0 / H), "fp32", probs.requires_grad)
        vals = tr.new(G, R, "fp32", probs.requires_grad)
        if probs.requires_grad:
            tr.save(G, probs, topi, ssum, vals)
        X = f"{L}.mlp.experts"
        q = self.plan.base_quant
        wgu = self.weight(f"{X}.gate_up_proj", E * 2 * ei * H, train, shape=(E * 2 * ei, H), quant=q)
        wd = self.weight(f"{X}.down_proj", E * ei * H, train, shape=(E * H, ei), quant=q)
        if q != "dense":  # each expert's matrices are dequantized when used
            tr.transient(X, Poly.const(2 * ei * H * dtype_bytes(self.cdt)))
        rows_idx = tr.new(X, R, "int64", False)  # perm // k
        perm = tr.new(X, R, "int64", False)
        if x.requires_grad:
            tr.save(X, rows_idx)
        if vals.requires_grad:
            tr.save(X, perm)
        cur = tr.new(X, R * H, x.dtype, x.requires_grad)  # hidden_states[perm // k]
        cur = tr.cast(X, cur, wgu.dtype)
        offs = tr.new(X, Poly.const(E), "int32", False)
        gu = tr.matmul(X, cur, wgu, H, 2 * ei, tokens=R, autocast=False)
        if gu.requires_grad:
            tr.save(X, offs)
        gate = gu.part(R * ei)
        a = self.act(f"{X}.act_fn", gate)
        m = tr.mul(X, a, gate)  # silu(gate) * up: both views share the gate_up storage
        dn = tr.matmul(X, m, wd, ei, H, tokens=R, autocast=False)
        w_g = tr.new(X, R, "fp32", vals.requires_grad)  # sample_weights[perm].unsqueeze(-1)
        y = tr.mul(X, dn, w_g, out_numel=dn.numel)
        inv = tr.new(X, R, "int64", False)
        if y.requires_grad:
            tr.save(X, inv)
        out = tr.new(f"{L}.mlp", x.numel, x.dtype, y.requires_grad)  # summed over top_k, cast back
        if moe.n_shared_experts:
            out = tr.add(f"{L}.mlp", out, self.shared_expert(L, x, train))
        return out

    def shared_expert(self, L: str, x: Tensor, train: bool) -> Tensor:
        """Qwen2-MoE always-on expert: a gated MLP of width n_shared x shared_intermediate, scaled by
        ``sigmoid(shared_expert_gate(x))`` (a Linear(h, 1))."""
        arch, tr, moe = self.arch, self.tr, self.arch.moe
        H = arch.hidden
        si = (moe.shared_intermediate or arch.intermediate) * moe.n_shared_experts
        S = f"{L}.mlp.shared_expert"
        g = self.linear(f"{S}.gate_proj", x, H, si, bias=False, trainable=train)
        u = self.linear(f"{S}.up_proj", x, H, si, bias=False, trainable=train)
        m = tr.mul(S, self.act(f"{S}.act_fn", g), u)
        d = self.linear(f"{S}.down_proj", m, si, H, bias=False, trainable=train)
        gate = self.linear(f"{L}.mlp.shared_expert_gate", x, H, 1, bias=False, trainable=train)
        return tr.mul(f"{L}.mlp", tr.sigmoid(f"{L}.mlp", gate), d, out_numel=d.numel)

    def bottleneck(self, path: str, x: Tensor) -> Tensor:
        """Houlsby/Pfeiffer adapter ``x + up(relu(down(x)))``."""
        m, H, tr = self.plan.adapter.bottleneck, self.arch.hidden, self.tr
        down = self.weight(f"{path}.down.weight", H * m, True, dtype=self.pdt, shape=(m, H))
        db = self.weight(f"{path}.down.bias", m, True, dtype=self.pdt)
        h = tr.matmul(f"{path}.down", x, down, H, m, bias=db)
        h = tr.relu(f"{path}.act", h)
        up = self.weight(f"{path}.up.weight", m * H, True, dtype=self.pdt, shape=(H, m))
        ub = self.weight(f"{path}.up.bias", H, True, dtype=self.pdt)
        h = tr.matmul(f"{path}.up", h, up, m, H, bias=ub)
        return tr.add(path, x, h)

    def block(self, i: int, x: Tensor, *, decoder_of_encdec: bool = False, enc_out: Tensor | None = None) -> Tensor:
        arch, n, tr, pl = self.arch, self.n, self.tr, self.plan
        H = arch.hidden
        train = pl.layer_base_trainable(i)
        self.layer_index = i
        L = f"{n.layers}.{i}" if not decoder_of_encdec else f"decoder.block.{i}"
        if arch.family in POST_NORM_FAMILIES:
            a = self.deberta_attention(L, x, train) if arch.family == "deberta_v2" else self.self_attention(L, x, train)
            if pl.adapter is not None and pl.adapter.placement == "houlsby":
                a = self.bottleneck(f"{L}.{n.o}.adapter", a)
            x = self.norm(f"{L}.{n.norm1}", tr.add(L, a, x), H, train)
            m = self.mlp(L, x, train)
            if pl.adapter is not None:
                m = self.bottleneck(f"{L}.{n.down}.adapter", m)
            return self.norm(f"{L}.{n.norm2}", tr.add(L, m, x), H, train)
        if arch.family == "t5":
            return self.t5_block(L, x, train, enc_out)
        h1 = self.norm(f"{L}.{n.norm1}", x, H, train)
        a = self.self_attention(L, h1, train)
        if arch.sandwich_norm:
            a = self.norm(f"{L}.post_attention_layernorm", a, H, train)
        if pl.adapter is not None and pl.adapter.placement == "houlsby":
            a = self.bottleneck(f"{L}.{n.o}.adapter", a)
        if arch.parallel_block:
            h2 = h1 if n.norm2 == n.norm1 else self.norm(f"{L}.{n.norm2}", x, H, train)
            m = self.mlp(L, h2, train)
            if pl.adapter is not None:
                m = self.bottleneck(f"{L}.{n.down}.adapter", m)
            return tr.add(L, tr.add(L, x, a), m)
        x = tr.add(L, x, a)
        norm2 = "pre_feedforward_layernorm" if arch.sandwich_norm else n.norm2
        m = self.mlp(L, self.norm(f"{L}.{norm2}", x, H, train), train)
        if arch.sandwich_norm:
            m = self.norm(f"{L}.post_feedforward_layernorm", m, H, train)
        if pl.adapter is not None:
            m = self.bottleneck(f"{L}.{n.down}.adapter", m)
        return tr.add(L, x, m)

    def t5_block(self, L: str, x: Tensor, train: bool, enc_out: Tensor | None) -> Tensor:
        """T5 block: pre-RMSNorm self-attention (+ cross-attention in the decoder) and FF, no biases."""
        arch, tr = self.arch, self.tr
        H = arch.hidden
        stack = "decoder" if enc_out is not None else "encoder"
        if self._bias_trains[stack] and 0 not in self.plan.checkpointed:
            # block 0 computes the bias (a checkpointed block 0 recomputes it and keeps nothing)
            tr.save(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias", self.globals[f"{stack}_buckets"])
        h = self.t5_norm(f"{L}.layer.0.layer_norm", x, H, train)
        a = self.self_attention(L, h, train)
        if self.plan.adapter is not None and self.plan.adapter.placement == "houlsby":
            a = self.bottleneck(f"{L}.layer.0.SelfAttention.o.adapter", a)
        x = self._t5_clamp(L, tr.add(L, x, a))
        ff_idx = 1
        if enc_out is not None:
            h = self.t5_norm(f"{L}.layer.1.layer_norm", x, H, train)
            ca = self.self_attention(L, h, train, cross_kv=enc_out, names=(
                "layer.1.EncDecAttention.q", "layer.1.EncDecAttention.k", "layer.1.EncDecAttention.v",
                "layer.1.EncDecAttention.o"))
            x = self._t5_clamp(L, tr.add(L, x, ca))
            ff_idx = 2
        h = self.t5_norm(f"{L}.layer.{ff_idx}.layer_norm", x, H, train)
        old = self.n
        self.n = replace(old, **{k: getattr(old, k).replace("layer.1.", f"layer.{ff_idx}.")
                                 for k in ("gate", "up", "down", "act") if getattr(old, k)})
        m = self.mlp(L, h, train)
        if self.plan.adapter is not None:
            m = self.bottleneck(f"{L}.{self.n.down}.adapter", m)
        self.n = old
        return self._t5_clamp(L, tr.add(L, x, m))

    # -- whole model ----------------------------------------------------------------------
    def pre(self) -> Tensor:
        arch, n, tr, pl = self.arch, self.n, self.tr, self.plan
        H = arch.hidden
        ids = tr.new("", Poly.tok(1), "int64", False)
        self.globals["ids"] = ids
        x = self.embedding(n.embed, ids, arch.vocab, H, pl.embeddings_trainable, Poly.tok(1),
                           saved=pl.saved_module(_leaf(n.embed)))
        self.embed_dtype = x.dtype
        if pl.checkpointed:
            # transformers' gradient_checkpointing_enable() calls enable_input_require_grads() for text
            # models: a hook makes the embedding output require grad, so frozen blocks backpropagate
            x.requires_grad = True
        if pl.prompt_tokens:
            # PEFT prompt tuning: Embedding(n_virtual, h) prepended; the sequence grows by n_virtual
            # PEFT keeps the prompt embedding in fp32 (autocast_adapter_dtype); its output is cast to the model dtype
            self.weight("prompt_encoder.embedding.weight", pl.prompt_tokens * H, True, dtype=pl.adapter_dtype)
            # prompt ids: (1, n_virtual) int64 expanded over the batch (a view), saved by the embedding
            tr.save("prompt_encoder.embedding", tr.new("prompt_encoder", Poly.const(pl.prompt_tokens), "int64", False))
            x = tr.new("", Poly.tok(H), x.dtype, True)
        if pl.prefix_tokens:
            pk = self.prefix_encoder()
            self.globals["prefix"] = pk
            # PEFT prepends ones to the attention mask: HF builds a (b, 1, s, p + s) float mask, one for all layers
            self.globals["attn_mask"] = tr.new("model", Poly.att(1), x.dtype, False)
        if n.pos_embed:
            # learned positions: OPT offsets its table by 2 rows
            rows = arch.max_position_embeddings + (2 if arch.family == "opt" else 0)
            # position ids: arange (GPT-2), a cumsum per sequence (OPT over the attention mask, RoBERTa over the
            # non-padding ids: (b, s)) or a registered buffer (BERT: not an activation)
            per = Poly.tok(1) if arch.family in PER_SEQUENCE_POSITION_IDS else Poly.pos(1)
            if arch.family == "opt":
                # the cumsum ids themselves go to every block (a checkpoint keeps them); the table reads ids + 2
                self.globals["position_ids"] = tr.new("model", per, "int64", False)
                self.keep_for_checkpoints(self.globals["position_ids"])
            pos_ids = tr.new("", per, "int64", False) if arch.arch != "encoder" or arch.family == "roberta" else \
                Tensor(-1, per, "int64", False, "", is_param=True)
            pe = self.embedding(n.pos_embed, pos_ids, rows, H, pl.embeddings_trainable, per)
            x = tr.add("", x, pe)
        if arch.type_vocab_size:
            # token_type_ids: a (1, s) slice of a zeros buffer, expanded over the batch; RoBERTa gathers it at its
            # (b, s) position ids, and DeBERTa-v2 makes ``torch.zeros(input_shape)``: new (b, s) tensors
            per = Poly.tok(1) if arch.family in ("roberta", "deberta_v2") else Poly.pos(1)
            tt = self.embedding(n.embed.replace("word_embeddings", "token_type_embeddings"),
                                tr.new("", per, "int64", False),
                                arch.type_vocab_size, H, pl.embeddings_trainable, Poly.tok(1))
            x = tr.add("", x, tt)
        if n.embed_norm:
            x = self.layernorm(n.embed_norm, x, H, pl.embeddings_trainable)
        if arch.family == "deberta_v2":
            x = self.deberta_encoder_inputs(x)
        if arch.position == "rope":
            d = arch.rotary_dim
            dt = x.dtype
            self.globals["cos"] = tr.new("model.rotary_emb", Poly.pos(d), dt, False)
            self.globals["sin"] = tr.new("model.rotary_emb", Poly.pos(d), dt, False)
            # (1, s) int64 position ids: handed to every block (a checkpoint keeps them alive)
            self.globals["position_ids"] = tr.new("model", Poly.pos(1), "int64", False)
            self.keep_for_checkpoints(self.globals["position_ids"])
        if arch.position == "alibi":
            # BLOOM's ALiBi bias, (b * heads, 1, s) in the hidden states' dtype, handed to every block
            self.keep_for_checkpoints(tr.new("model", Poly.tok(arch.n_heads), x.dtype, False))
        if arch.arch == "decoder":
            self.eager_causal_mask(x.dtype, decoder=False)
        if arch.family == "t5":
            self.relative_bias("encoder")
        return x

    def prefix_encoder(self) -> Tensor:
        """PEFT ``PrefixEncoder``: an Embedding(p, L*2*kv_dim) looked up with (1, p) ids expanded over the
        batch, or with ``prefix_projection`` Embedding(p, kv_dim) -> Linear(kv_dim, e) -> Tanh ->
        Linear(e, L*2*kv_dim), all trainable in the adapter dtype.  Output: (b, p, L*2*kv_dim)."""
        arch, pl, tr = self.arch, self.plan, self.tr
        p, L, kvd, e = pl.prefix_tokens, arch.n_layers, arch.kv_dim, pl.prefix_hidden
        adt = pl.adapter_dtype
        ids = tr.new("prompt_encoder", Poly.const(p), "int64", False)
        tr.save("prompt_encoder.embedding", ids)
        rows = Poly.seq(p)
        if not e:
            self.weight("prompt_encoder.embedding.weight", p * L * 2 * kvd, True, dtype=adt)
            return tr.new("prompt_encoder", rows * (L * 2 * kvd), self.pdt, True)
        self.weight("prompt_encoder.embedding.weight", p * kvd, True, dtype=adt)
        emb = tr.new("prompt_encoder.embedding", rows * kvd, adt, True)
        w1 = self.weight("prompt_encoder.transform.0.weight", kvd * e, True, dtype=adt, shape=(e, kvd))
        b1 = self.weight("prompt_encoder.transform.0.bias", e, True, dtype=adt)
        h = tr.matmul("prompt_encoder.transform.0", emb, w1, kvd, e, bias=b1, tokens=rows)
        h = tr.tanh("prompt_encoder.transform.1", h)
        w2 = self.weight("prompt_encoder.transform.2.weight", e * L * 2 * kvd, True, dtype=adt, shape=(L * 2 * kvd, e))
        b2 = self.weight("prompt_encoder.transform.2.bias", L * 2 * kvd, True, dtype=adt)
        return tr.matmul("prompt_encoder.transform.2", h, w2, e, L * 2 * kvd, bias=b2, tokens=rows)

    def relative_bias(self, stack: str) -> None:
        """T5 relative position bias: an Embedding(buckets, heads) in block 0 of each stack, looked up
        with an (s, s) int64 bucket matrix (saved when the table trains)."""
        arch, pl, tr = self.arch, self.plan, self.tr
        path = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
        w = self.weight(f"{path}.weight", arch.relative_attention_num_buckets * arch.n_heads,
                        pl.layer_base_trainable(0 if stack == "encoder" else arch.n_layers))
        # the bucket matrix is looked up in block 0 and its bias reused by every block of the stack:
        # a shared tensor, charged once to block 0
        self.globals[f"{stack}_buckets"] = tr.new(path, Poly.pos2(1), "int64", False)
        self._bias_trains = {**getattr(self, "_bias_trains", {}), stack: w.requires_grad}
        # block 0 returns the (1, heads, s, s) bias in the table's dtype and every later block takes it as an
        # input (a checkpoint keeps it); the decoder's block 0 also returns the cross-attention's zero bias
        # (1, heads, s, s_enc) in the query's dtype
        dec = stack == "decoder"
        self.keep_for_checkpoints(tr.new(path, Poly.pos2(arch.n_heads), w.dtype, w.requires_grad), dec, 1)
        if dec:
            self.keep_for_checkpoints(tr.new(path, Poly.pos2(arch.n_heads), self.cdt, False), dec, 1)

    def keep_for_checkpoints(self, t: Tensor, decoder: bool = False, first: int = 0) -> None:
        """``t`` is an input of every block of its stack from block ``first`` on: a checkpointed block keeps it."""
        self.checkpoint_inputs.append(t)
        self.checkpoint_from[t.id] = (decoder, first)

    def eager_causal_mask(self, dtype: str, decoder: bool) -> None:
        """transformers 5 hands eager attention a materialised (b, 1, s, s) causal mask in the hidden states'
        dtype (masking_utils ``eager_mask``; SDPA and flash get none without padding): one for all blocks."""
        pl, arch = self.plan, self.arch
        materialised = arch.family in ALWAYS_4D_MASK_FAMILIES or (
            pl.attention == "eager" and arch.family in EAGER_4D_MASK_FAMILIES)
        if materialised and pl.implementation == "transformers" and "attn_mask" not in self.globals:
            # eager's mask is additive in the hidden dtype, one per sequence; the one made for SDPA is a bool
            # (s, s) mask expanded over the batch (masking_utils sdpa_mask)
            eager = pl.attention == "eager"
            numel, dtype = (Poly.att(1), dtype) if eager else (Poly.pos2(1), "bool")
            self.globals["attn_mask"] = self.tr.new("model", numel, dtype, False)
            self.keep_for_checkpoints(self.globals["attn_mask"], decoder)
            if arch.sliding_window and arch.full_attention_every > 1 and arch.n_layers >= arch.full_attention_every:
                # sliding and global layers (Gemma 2/3) get a mask each: the global one from the first global layer
                self.keep_for_checkpoints(self.tr.new("model", numel, dtype, False), decoder,
                                          arch.full_attention_every - 1)

    def post(self, x: Tensor, loss: str) -> None:
        arch, n, tr, pl = self.arch, self.n, self.tr, self.plan
        H, V = arch.hidden, arch.vocab
        head_tr = pl.lm_head_trainable
        head_saved = pl.saved_module(_leaf(n.lm_head))
        if n.final_norm:
            x = (self.t5_norm if arch.family == "t5" else self.norm)(n.final_norm, x, H, head_tr)
        if arch.family in ("bert", "roberta", "deberta_v2"):
            base = n.lm_head.rsplit(".", 1)[0]
            x = self.linear(f"{base}.transform.dense", x, H, H, bias=True, trainable=head_tr, quantizable=False)
            x = self.act(f"{base}.transform.transform_act_fn", x)
            x = self.layernorm(f"{base}.transform.LayerNorm", x, H, head_tr)
        if arch.family == "t5" and arch.tied_embeddings:
            x = tr.mul("", x, None)  # sequence_output * d_model**-0.5
        tied = f"{n.embed}.weight" if arch.tied_embeddings else None
        w = self.weight(f"{n.lm_head}.weight", V * H, head_tr, tied_to=tied, shape=(V, H), saved=head_saved)
        b = self.weight(f"{n.lm_head}.bias", V, head_tr) if (arch.lm_head_bias or arch.family in ("bert", "roberta", "deberta_v2")) else None
        ia3 = pl.ia3_on(n.lm_head) if pl.training else None
        if ia3 == "in":
            x = self._ia3_scale(n.lm_head, x, H, True)
        if pl.shira_on(n.lm_head):
            logits = self._shira(n.lm_head, x, w, H, V, b, op="lm_head")
        else:
            logits = self.tr.matmul(n.lm_head, x, w, H, V, bias=b, op="lm_head")
        if ia3 == "out":
            logits = self._ia3_scale(n.lm_head, logits, V, False)
        if self.plan.lora_on(n.lm_head) and pl.training:
            logits = self._lora(n.lm_head, x, logits, H, V, w)
        if pl.adapter_v2:
            logits = self._adapter_v2(n.lm_head, logits, V)
        self.logits = logits
        if not pl.training:
            return
        if loss == "fused":
            # fused linear + cross-entropy (Liger) computes the grads chunk by chunk in forward:
            # nothing b*s*V-sized is saved, the hidden states' grad (fp32) is
            tr.save("", tr.new("", Poly.tok(arch.hidden), "fp32", False))
            return
        if loss == "chunked-compiled" and logits.dtype != "fp32":
            # torchtune's CEWithChunkedOutputLoss with ``compute_cross_entropy`` under torch.compile: per chunk,
            # inductor's partitioner saves the 16-bit logits chunk (the model's output, already live), the
            # labels and two per-row fp32 reductions (max and logsumexp) and recomputes the softmax in
            # backward -- no fp32 log-softmax is kept (checked on CPU: tests/exact/test_compiled_loss.py)
            labels = tr.new("", Poly.tok(1), "int64", False)
            row_max = tr.new("", Poly.tok(1), "fp32", False)
            row_lse = tr.new("", Poly.tok(1), "fp32", False)
            if logits.requires_grad:
                tr.save("", logits, labels, row_max, row_lse)
            self.loss_fp32_copy = False
            self.loss_dtype = logits.dtype
            self.loss_shift_dtype = logits.dtype
            return
        # HF ForCausalLMLoss: logits.float(); labels padded and shifted (.contiguous(), int64);
        # cross_entropy = log_softmax (saves its output) + nll_loss (saves the target and a 0-dim
        # total_weight).  BERT's MLM head calls CrossEntropyLoss on the logits as they are (no upcast).
        as_they_are = arch.family in LOSS_ON_LOGITS_AS_THEY_ARE or (
            loss == "upcast-shift" and arch.family in SHIFT_16_BIT_LOGITS_BEFORE_446)
        if as_they_are or pl.implementation == "litgpt":
            # nn.CrossEntropyLoss on the logits as they are (litgpt's ``chunked_cross_entropy`` too); autocast
            # runs cross_entropy in fp32
            upcast = tr.autocast is not None
        else:
            # BERT's MLM head and T5 call CrossEntropyLoss on the logits as they are: fp32 under autocast too
            upcast = arch.family not in ("bert", "roberta", "deberta_v2", "t5") or tr.autocast is not None
        lf = tr.cast("", logits, "fp32") if upcast else logits
        lsm = tr.new("", lf.numel, lf.dtype, lf.requires_grad)
        # causal LM: labels padded and shifted (.contiguous(): a new int64 tensor); MLM: the labels themselves
        labels = tr.new("", Poly.tok(1), "int64", False) if arch.arch != "encoder" else self.globals["ids"]
        total_weight = tr.new("", Poly.const(1), lf.dtype, False)
        if lf.requires_grad:
            tr.save("", lsm, labels, total_weight)
        self.loss_fp32_copy = lf is not logits
        self.loss_dtype = lf.dtype
        # the shifted contiguous copy (older HF, remote code) is taken after ``logits.float()`` where the
        # model code upcasts; Qwen (v1) shifts the 16-bit logits and autocast upcasts the shifted copy
        self.loss_shift_dtype = logits.dtype if as_they_are else lf.dtype


def _variant_key(pl: Plan, i: int, in_rg: bool) -> tuple:
    return (pl.layer_base_trainable(i), in_rg, i in pl.checkpointed, pl.llama_adapter_on(i))


def trace_model(arch: ModelArch, plan: Plan, loss: str = "upcast") -> ModelTrace:
    """Trace the whole model once per distinct block variant."""
    b = ModelBuilder(arch, plan)
    pre = b.tr.trace
    x = b.pre()
    variants: dict[tuple, BlockVariant] = {}
    in_rg = x.requires_grad
    enc_out = None
    layer_ids: list[tuple[int, bool]] = [(i, False) for i in range(arch.n_layers)]
    if arch.arch == "encoder_decoder":
        layer_ids += [(i, True) for i in range(arch.n_decoder_layers or arch.n_layers)]
    for i, is_dec in layer_ids:
        if is_dec and enc_out is None:
            # encoder output (after the final norm) feeds every cross-attention
            b.tr.trace = Trace()
            enc_out = b.t5_norm(NAMES["t5"].final_norm, x, arch.hidden, plan.base_trainable)
            b.globals["encoder_output"] = enc_out  # one storage read by every cross-attention
            b.keep_for_checkpoints(enc_out, True)  # every decoder block takes it
            # decoder: shift_right(labels) ids through the shared embedding, its own relative bias table
            dec_ids = b.tr.new("", Poly.tok(1), "int64", False)
            if plan.embeddings_trainable:
                b.tr.save("decoder.embed_tokens", dec_ids)
            b.relative_bias("decoder")
            b.eager_causal_mask(b.embed_dtype, decoder=True)
            variants[("encoder_final_norm",)] = BlockVariant(("encoder_final_norm",), [0], b.tr.trace, True)
            # the shared embedding's enable_input_require_grads hook (checkpointing) fires for the decoder too
            x = b.tr.new("decoder.embed_tokens", Poly.tok(arch.hidden), b.embed_dtype,
                         plan.embeddings_trainable or bool(plan.checkpointed))
            in_rg = x.requires_grad
        # T5 in fp16 turns its residual stream fp32 at the first fp32 ``wo``: blocks differ by their input dtype
        key = _variant_key(plan, i, in_rg) + ((x.dtype,) if x.dtype != b.embed_dtype else ()) + (is_dec,)
        if key in variants:
            variants[key].layers.append(i)
            in_rg = variants[key].out_requires_grad
            continue
        b.tr.trace = Trace()
        xin = b.tr.new(f"{arch.name}.block_input", Poly.tok(arch.hidden), x.dtype, in_rg)
        out = b.block(i, xin, decoder_of_encdec=is_dec, enc_out=enc_out)
        variants[key] = BlockVariant(key, [i], b.tr.trace, out.requires_grad, xin)
        in_rg = out.requires_grad
        x = out
    b.tr.trace = Trace()
    x_final = b.tr.new("final_input", Poly.tok(arch.hidden), x.dtype, in_rg)
    if arch.family == "t5":
        b.n = replace(b.n, final_norm="decoder.final_layer_norm")
    b.post(x_final, loss)
    post = b.tr.trace
    return ModelTrace(arch, plan, pre, list(variants.values()), post, list(b.globals.values()),
                      checkpoint_inputs=b.checkpoint_inputs, checkpoint_from=b.checkpoint_from, tensors=b.tr.all,
                      layers_prefix=b.n.layers,
                      logits=b.logits, loss_upcast_copy=b.loss_fp32_copy, loss_dtype=b.loss_dtype,
                      loss_shift_dtype=b.loss_shift_dtype)
