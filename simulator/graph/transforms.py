"""Scenario -> Plan: the ordered transforms applied while the templates are traced.

Order (each reads the result of the previous one):

1. **method**: which parameters train, which modules get adapters (LoRA/DoRA/IA3/bottleneck),
   extra virtual tokens (prefix/prompt tuning);
2. **quantization**: storage format of the frozen base linears (QLoRA, or inference weights);
3. **recompute**: which blocks are activation-checkpointed.

The Plan is consumed by ``build.trace_model``; it holds no sizes, only decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Scenario
from ..config.methods import BNB_QUANTS, IA3, Adapter, BitFit, Freeze, Full, LlamaAdapter, PrefixTuning, PromptTuning, QLoRA, Shira, _LoRABase
from ..config.model import ModelArch

# PEFT's LoRA defaults (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
LORA_DEFAULTS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "qwen": ("c_attn",),
    "gpt2": ("c_attn",),
    "opt": ("q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "falcon": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "gptj": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "t5": ("q", "v"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "deberta_v2": ("query_proj", "value_proj"),
}

# Families PEFT has no default for: ``target_modules`` must be named (PEFT raises "Please specify
# `target_modules` in `peft_config`" for a model_type missing from the mappings above).
NO_PEFT_DEFAULT_TARGETS = frozenset({"phi3"})

# PEFT's IA3 defaults (peft/utils/constants.py TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / FEEDFORWARD mapping).
IA3_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "qwen": (("c_attn", "w2"), ("w2",)),
    "gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
    "opt": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "bloom": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "falcon": (("query_key_value", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",)),
    "gpt_neox": (("query_key_value", "dense_4h_to_h"), ("dense_4h_to_h",)),
    "gptj": (("q_proj", "v_proj", "fc_out"), ("fc_out",)),
    "phi": (("k_proj", "v_proj", "fc2"), ("fc2",)),
    "t5": (("k", "v", "wo"), ("wo",)),
    "bert": (("key", "value", "output.dense"), ("output.dense",)),
    "roberta": (("key", "value", "output.dense"), ("output.dense",)),
    "deberta_v2": (("key_proj", "value_proj", "output.dense"), ("output.dense",)),
}


@dataclass(frozen=True)
class Precision:
    param_dtype: str  # dtype the weights are stored in
    compute_dtype: str  # dtype activations flow in
    autocast: str | None  # lower-precision dtype under torch.autocast
    master_fp32: bool  # fp32 master weights (AMP)


def precision_of(name: str) -> Precision:
    """Map the precision knob to dtypes (AMP keeps fp32 params and autocasts matmuls)."""
    return {
        "fp32": Precision("fp32", "fp32", None, False),
        "bf16-amp": Precision("fp32", "bf16", "bf16", True),
        "fp16-amp": Precision("fp32", "fp16", "fp16", True),
        "bf16": Precision("bf16", "bf16", None, False),
        "fp16": Precision("fp16", "fp16", None, False),
        # float8 training (torchao): bf16 weights, fp8 matmul operands cast on the fly.
        "fp8": Precision("bf16", "bf16", None, False),
    }[name]


# Methods that freeze the whole base and train small add-ons: under AMP the base is loaded in the
# 16-bit dtype (no fp32 master copy is needed for weights that never update), the add-ons in fp32.
ADDON_METHODS = frozenset({"lora", "dora", "qlora", "ia3", "prefix", "prompt", "adapter", "llama-adapter", "shira"})


@dataclass(frozen=True)
class Plan:
    arch: ModelArch
    precision: Precision
    base_dtype: str  # dtype of the frozen base weights
    kind: str  # method kind
    training: bool
    base_trainable: bool  # every base weight trains (full)
    layers_trainable: frozenset[int]  # blocks whose base weights train (freeze)
    embeddings_trainable: bool
    lm_head_trainable: bool
    biases_trainable: bool  # BitFit
    lora: _LoRABase | None
    lora_targets: frozenset[str] | None  # None = all-linear
    adapter_dtype: str  # LoRA/IA3 weights: fp32 under PEFT's autocast_adapter_dtype
    ia3_targets: frozenset[str]
    ia3_feedforward: frozenset[str]
    adapter: Adapter | None
    prefix_tokens: int
    prefix_hidden: int  # > 0: PEFT prefix_projection MLP width (encoder_hidden_size)
    prompt_tokens: int
    base_quant: str  # dense | nf4 | fp4 | int8 | gptq | awq | fp8
    quant_group_size: int
    double_quant: bool
    checkpointed: frozenset[int]
    attention: str
    modules_to_save: frozenset[str]
    padded: bool = False
    implementation: str = "transformers"
    offload_checkpoints: bool = False  # checkpointed block inputs live in host memory
    selective_checkpoints: bool = False  # torchtitan's per-op policy keeps some op outputs (compile.sac_saved_ops)
    reentrant_checkpoints: bool = False  # a checkpointed block's whole forward reruns (no early stop)
    float8_linears: bool = False  # float8 training: the blocks' linears cast to fp8 and run _scaled_mm (torchao)
    compiled: bool = False  # torch.compile: pointwise chains fuse between the matmul / attention kernels
    llama_adapter: Any = None  # LlamaAdapter settings (litgpt's adaption prompts), or None
    shira: Any = None  # Shira settings (PEFT's sparse entries), or None
    shira_targets: frozenset[str] | None = None  # None = all-linear
    norm_dtype: str | None = None  # frozen norm weights' dtype when it is not base_dtype (fp32 after kbit prep)
    quant_compute_dtype: str | None = None  # dtype a bitsandbytes layer computes in (its input cast to it and back)

    def shira_on(self, path: str) -> bool:
        """PEFT target matching for SHiRA (as :meth:`lora_on`)."""
        return self.shira is not None and self.training and _targeted(path, self.shira_targets)

    def llama_adapter_on(self, i: int) -> bool:
        """Block ``i`` attends to an adaption prompt."""
        return self.llama_adapter is not None and self.training and i >= self.llama_adapter.start_layer

    @property
    def adapter_v2(self) -> bool:
        """Every linear has a trainable output bias and scale, the norms train (LLaMA-Adapter V2)."""
        return self.llama_adapter is not None and self.training and self.llama_adapter.v2

    def layer_base_trainable(self, i: int) -> bool:
        return self.base_trainable or i in self.layers_trainable

    def lora_on(self, path: str) -> bool:
        """PEFT target matching: a target names a module's leaf or a dotted suffix of its path."""
        return self.lora is not None and _targeted(path, self.lora_targets)

    def ia3_on(self, path: str) -> str | None:
        """'in' (feed-forward: scale the input), 'out' (scale the output) or None."""
        if not self.ia3_targets or not _matches(path, self.ia3_targets):
            return None
        return "in" if _matches(path, self.ia3_feedforward) else "out"

    def saved_module(self, leaf: str) -> bool:
        return leaf in self.modules_to_save


def _matches(path: str, names: frozenset[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _targeted(path: str, targets: frozenset[str] | None) -> bool:
    """PEFT target matching: a target names a module's leaf or a dotted suffix of its path; None is all-linear,
    every linear but the output layer."""
    if targets is None:
        return path.rsplit(".", 1)[-1] != "lm_head" and not path.endswith("predictions.decoder")
    return _matches(path, targets)


def peft_targets(asked, family: str):
    """The targets an adapter config gives (a list or 'all-linear'), or PEFT's default for the family."""
    return asked if asked is not None else LORA_DEFAULTS.get(family, ("q_proj", "v_proj"))


def _checkpointed_layers(sc: Scenario) -> frozenset[int]:
    ck, n = sc.checkpointing, sc.model.n_layers
    if not sc.is_training or ck.mode == "none":
        return frozenset()
    if ck.mode in ("full", "offload", "selective"):
        return frozenset(range(n))
    return frozenset(i for i in range(n) if i % ck.every_k == 0)


def plan_of(sc: Scenario) -> Plan:
    """Apply the transforms in order: method -> quantization -> recompute."""
    arch, m = sc.model, sc.method
    prec = precision_of(sc.precision)
    training = sc.is_training
    # 1. method
    base_trainable = training and isinstance(m, Full)
    layers_trainable: frozenset[int] = frozenset()
    emb_tr = lm_tr = base_trainable
    if isinstance(m, Freeze):
        n = m.n_trainable_layers
        idx = range(arch.n_layers - n, arch.n_layers) if m.which == "last" else range(n)
        layers_trainable = frozenset(idx)
        emb_tr, lm_tr = m.train_embeddings, m.train_lm_head
    lora = m if isinstance(m, _LoRABase) else None
    targets = None
    mts: frozenset[str] = frozenset()
    if lora is not None:
        asked = peft_targets(lora.targets, arch.family)
        targets = None if asked == "all-linear" else frozenset(asked)
        mts = frozenset(lora.modules_to_save)
    shira_t: frozenset[str] | None = None
    if isinstance(m, Shira):
        asked_s = peft_targets(m.targets, arch.family)
        shira_t = None if asked_s == "all-linear" else frozenset(asked_s)
        mts = frozenset(m.modules_to_save)
    ia3_t: frozenset[str] = frozenset()
    ia3_ff: frozenset[str] = frozenset()
    if isinstance(m, IA3):
        dflt = IA3_DEFAULTS.get(arch.family, ((), ()))
        ia3_t = frozenset(m.targets if m.targets is not None else dflt[0])
        ia3_ff = frozenset(m.feedforward_modules if m.feedforward_modules is not None else dflt[1])
    # 2. quantization
    base_quant, group, dq = "dense", 128, False
    norm_dtype, quant_cdt = None, None
    if isinstance(m, QLoRA):
        base_quant, group, dq = m.quant, m.group_size, m.double_quant
        if sc.precision in ("bf16", "fp16"):
            prec = Precision(m.compute_dtype, m.compute_dtype, None, False)
        if m.quant in BNB_QUANTS:
            # bitsandbytes: ``x.to(compute_dtype)``, the matmul (autocast's dtype under AMP), ``.to(input dtype)``;
            # Linear8bitLt always quantizes a 16-bit input
            quant_cdt = prec.autocast or ("fp16" if m.quant == "int8" and m.compute_dtype == "fp32"
                                          else m.compute_dtype)
        if m.fp32_unquantized != "none":
            norm_dtype = "fp32"
    elif isinstance(m, LlamaAdapter) and m.quant != "none":
        base_quant, dq = m.quant, m.double_quant
    elif not training and sc.inference.weights != "none":
        base_quant, group, dq = sc.inference.weights, sc.inference.group_size, sc.inference.double_quant
    base_dtype = prec.autocast if (prec.autocast and m.kind in ADDON_METHODS) else prec.param_dtype
    if isinstance(m, QLoRA) and m.fp32_unquantized == "all":
        base_dtype = "fp32"  # prepare_model_for_kbit_training: every 16-bit parameter but the 4-bit ones
    return Plan(
        arch=arch,
        precision=prec,
        base_dtype=base_dtype,
        kind=m.kind,
        training=training,
        base_trainable=base_trainable,
        layers_trainable=layers_trainable,
        embeddings_trainable=emb_tr,
        lm_head_trainable=lm_tr,
        biases_trainable=isinstance(m, BitFit),
        lora=lora,
        lora_targets=targets,
        adapter_dtype="fp32" if lora is None else ("fp32" if lora.adapter_dtype == "fp32" else prec.param_dtype),
        shira=m if isinstance(m, Shira) else None,
        shira_targets=shira_t,
        ia3_targets=ia3_t,
        ia3_feedforward=ia3_ff,
        adapter=m if isinstance(m, Adapter) else None,
        prefix_tokens=m.n_virtual_tokens if isinstance(m, PrefixTuning) else 0,
        # PEFT sets encoder_hidden_size to token_dim = the model's hidden size before it narrows token_dim to
        # head_dim * n_kv_heads for GQA (peft/utils/other.py _prepare_prompt_learning_config)
        prefix_hidden=(m.encoder_hidden_size or arch.hidden) if isinstance(m, PrefixTuning) and m.prefix_projection else 0,
        prompt_tokens=m.n_virtual_tokens if isinstance(m, PromptTuning) else 0,
        base_quant=base_quant,
        quant_group_size=group,
        double_quant=dq,
        # 3. recompute
        checkpointed=_checkpointed_layers(sc),
        offload_checkpoints=sc.is_training and sc.checkpointing.mode == "offload",
        selective_checkpoints=sc.is_training and sc.checkpointing.mode == "selective",
        reentrant_checkpoints=sc.is_training and sc.checkpointing.reentrant,
        compiled=sc.compile,
        float8_linears=sc.is_training and sc.precision == "fp8",
        attention=sc.attention,
        modules_to_save=mts,
        padded=sc.padded_batches,
        implementation=sc.implementation,
        llama_adapter=m if isinstance(m, LlamaAdapter) else None,
        norm_dtype=norm_dtype,
        quant_compute_dtype=quant_cdt,
    )


__all__ = ["ADDON_METHODS", "IA3_DEFAULTS", "LORA_DEFAULTS", "NO_PEFT_DEFAULT_TARGETS", "Plan", "Precision", "plan_of", "precision_of"]
