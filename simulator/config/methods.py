"""Fine-tuning methods as a tagged union discriminated by ``kind``.

Adding a method = one config class here + its transform in ``simulator.graph.transforms``
+ its exact CPU test.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from .base import Strict

QuantKind = Literal["nf4", "fp4", "int8", "gptq", "awq", "fp8"]


class Full(Strict):
    kind: Literal["full"] = "full"


class Freeze(Strict):
    """Train only the first or last n blocks (everything else frozen)."""

    kind: Literal["freeze"] = "freeze"
    n_trainable_layers: int = Field(default=1, ge=0)
    """How many blocks stay trainable."""
    which: Literal["last", "first"] = "last"
    """Train the first or the last blocks."""
    train_embeddings: bool = False
    """Also train the input embeddings."""
    train_lm_head: bool = False
    """Also train the output head (and the final norm)."""


def _check_targets(targets) -> None:
    """An explicit target list names at least one module."""
    if isinstance(targets, list) and not targets:
        raise ValueError("targets: empty list; name at least one module or use 'all-linear'")


class _LoRABase(Strict):
    r: int = Field(default=8, gt=0)
    """LoRA rank (must be > 0)."""
    alpha: float = Field(default=16.0, gt=0)
    """LoRA scaling numerator (scaling = alpha / r)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch input; > 0 stores a mask and a dropped copy per adapted module."""
    targets: list[str] | Literal["all-linear"] | None = None
    """Module names to adapt (leaf names such as 'q_proj', or 'all-linear'; 'embed_tokens'/'lm_head' allowed);
    None = PEFT's default for the model family (q_proj, v_proj for Llama; c_attn for GPT-2 ...)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. 'lm_head', 'embed_tokens')."""
    lora_fa: bool = False
    """LoRA-FA: freeze lora_A, so only B trains and the full-width input is not stored."""
    adapter_dtype: Literal["fp32", "model"] = "fp32"
    """Adapter weight dtype: 'fp32' (PEFT's autocast_adapter_dtype default: each adapted input is upcast
    and stored in fp32) or 'model' (litgpt/torchtune keep adapters in the model dtype; DeepSpeed's fp16/bf16
    engine casts every parameter, adapters included, to its 16-bit dtype)."""
    qkv_parts: list[Literal["q", "k", "v"]] = Field(default_factory=lambda: ["q", "k", "v"])
    """Which of q, k, v an adapter on a fused q/k/v projection ('query_key_value', 'c_attn', 'Wqkv') covers.
    PEFT adapts the whole fused output (all three); litgpt's ``LoRAQKVLinear`` takes ``lora_query`` /
    ``lora_key`` / ``lora_value`` and zero-pads the parts it leaves out (implementation 'litgpt' only)."""

    @model_validator(mode="after")
    def _targets_nonempty(self):
        _check_targets(self.targets)
        if not self.qkv_parts or len(set(self.qkv_parts)) != len(self.qkv_parts):
            raise ValueError(f"qkv_parts={self.qkv_parts!r}: name each of 'q', 'k', 'v' at most once, at least one")
        return self


class LoRA(_LoRABase):
    kind: Literal["lora"] = "lora"


class DoRA(_LoRABase):
    kind: Literal["dora"] = "dora"


BNB_QUANTS: tuple[str, ...] = ("nf4", "fp4", "int8")
"""The base formats bitsandbytes stores: 4-bit NF4 / FP4 (``Linear4bit``) and int8 (``Linear8bitLt``)."""


class QLoRA(_LoRABase):
    """LoRA on a quantized, frozen base (bitsandbytes 4-bit by default; GPTQ/AWQ/int8 bases too)."""

    kind: Literal["qlora"] = "qlora"
    quant: Literal["nf4", "fp4", "int8", "gptq", "awq"] = "nf4"
    """Storage format of the frozen base weights."""
    double_quant: bool = True
    """bitsandbytes nested quantization of the absmax scales (4.127 instead of 4.5 bits/param)."""
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Dtype the base weights are dequantized to for the matmul."""
    group_size: int = Field(default=128, gt=0)
    """GPTQ/AWQ quantization group size."""
    blocksize: int = Field(default=64, gt=0)
    """bitsandbytes 4-bit block size (one absmax per block)."""
    bnb_keeps_input: bool = False
    """bitsandbytes before 0.43.2 (PR #1270, July 2024) kept each 4-bit matmul's input until backward
    (``ctx.tensors = (A, B)``) although the frozen weight needs no gradient; set it for older stacks."""
    use_dora: bool = False
    """QDoRA: PEFT ``LoraConfig(use_dora=True)`` on a bitsandbytes base (nf4, fp4, int8) -- DoRA's magnitude vector
    and weight norm, the base weight dequantized for the norm in every forward."""
    fp32_unquantized: Literal["none", "norms", "all"] = "none"
    """Frozen parameters left unquantized that are kept in fp32 whatever the precision.  'all' is what PEFT's
    ``prepare_model_for_kbit_training`` leaves (it casts every 16-bit parameter but the 4-bit ones to fp32:
    embeddings, norms, LM head, biases); TRL's ``SFTTrainer``, PEFT's examples and scripts following the QLoRA
    recipe call it on bitsandbytes bases.  'norms': the QLoRA repository's ``qlora.py``, and TRL's ``SFTTrainer`` with ``bf16=True``
    (``peft_module_casting_to_bf16``), cast the embeddings and head back to bf16 after it and keep the norms fp32.
    Either makes the residual stream fp32: each bitsandbytes layer casts its input to ``compute_dtype`` and its
    output back to the input's dtype.  Under precision fp32 every parameter is fp32 already."""

    @model_validator(mode="after")
    def _dora_base(self):
        if self.use_dora and self.quant not in BNB_QUANTS:
            raise ValueError(
                f"method.use_dora on quant={self.quant!r}: PEFT's DoRA dequantizes bitsandbytes bases only; allowed: "
                + ", ".join(BNB_QUANTS)
            )
        if self.fp32_unquantized != "none" and self.quant not in BNB_QUANTS:
            raise ValueError(
                f"method.fp32_unquantized={self.fp32_unquantized!r} on quant={self.quant!r}: PEFT's "
                "prepare_model_for_kbit_training skips GPTQ bases (since 0.5), and the cast-in/cast-out of the "
                "layers is modelled for bitsandbytes ones; allowed quant: " + ", ".join(BNB_QUANTS)
                + ", or fp32_unquantized 'none'"
            )
        return self


class IA3(Strict):
    kind: Literal["ia3"] = "ia3"
    targets: list[str] | None = None
    """Modules scaled by a learned vector; None = PEFT's default for the family (k, v, down for Llama)."""
    feedforward_modules: list[str] | None = None
    """Targets whose input (not output) is scaled; None = PEFT's default (down_proj for Llama)."""


class PrefixTuning(Strict):
    kind: Literal["prefix"] = "prefix"
    n_virtual_tokens: int = Field(default=20, gt=0)
    """Prefix length per layer (added to the keys and values)."""
    prefix_projection: bool = False
    """Reparametrise the prefix through an MLP (Li & Liang)."""
    encoder_hidden_size: int | None = Field(default=None, gt=0)
    """Hidden size of the prefix MLP (PEFT's default: the model's hidden size)."""


class PromptTuning(Strict):
    kind: Literal["prompt"] = "prompt"
    n_virtual_tokens: int = Field(default=20, gt=0)
    """Soft prompt length (lengthens every layer's sequence)."""


class BitFit(Strict):
    """Train only the bias terms."""

    kind: Literal["bitfit"] = "bitfit"


class Adapter(Strict):
    """Bottleneck adapters (Houlsby: after attention and after MLP; Pfeiffer: after MLP only)."""

    kind: Literal["adapter"] = "adapter"
    bottleneck: int = Field(default=64, gt=0)
    """Adapter bottleneck width m."""
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """Two adapters per block (houlsby) or one (pfeiffer)."""


class Shira(Strict):
    """Sparse fine-tuning as PEFT's SHiRA (Sparse High Rank Adapters, ``ShiraConfig``): in each targeted linear a
    fixed random set of r x (in + out) weight entries trains -- as many as a rank-r LoRA, spread over the whole
    matrix.  Every forward adds them (a sparse COO tensor) to a dense clone of the frozen weight, so the clone is
    kept for backward and the weight's gradient is computed densely before it is reduced to the entries."""

    kind: Literal["shira"] = "shira"
    r: int = Field(default=32, gt=0)
    """Trainable entries per targeted matrix, as r x (in_features + out_features) (PEFT ``r``)."""
    targets: list[str] | Literal["all-linear"] | None = None
    """Module names to adapt, or 'all-linear'; None = PEFT's default for the family (as LoRA's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the sparse entries."""

    @model_validator(mode="after")
    def _targets_nonempty(self):
        _check_targets(self.targets)
        return self


class LlamaAdapter(Strict):
    """LLaMA-Adapter (Zhang et al., arXiv 2303.16199) as litgpt implements it (``litgpt/adapter.py``): from block
    ``start_layer`` on, a learned prompt of ``prompt_length`` vectors is projected through the frozen q/k/v
    projection and attended to by every query (a second, unmasked attention), its output scaled by a per-head
    gate that starts at zero.  ``v2`` (``litgpt/adapter_v2.py``, arXiv 2304.15010) also gives every linear layer a
    trainable bias and scale per output feature and trains the norms.  Implementation 'litgpt' only."""

    kind: Literal["llama-adapter"] = "llama-adapter"
    prompt_length: int = Field(default=10, gt=0)
    """Adaption prompt vectors per adapted block (litgpt ``adapter_prompt_length``)."""
    start_layer: int = Field(default=2, ge=0)
    """First adapted block (litgpt ``adapter_start_layer``); the blocks below run unchanged."""
    v2: bool = False
    """LLaMA-Adapter V2: a bias and a scale on every linear layer's output, norms trainable."""
    quant: Literal["none", "nf4", "fp4", "int8"] = "none"
    """Frozen base weights quantized by bitsandbytes (litgpt ``--quantize bnb.nf4`` ...)."""
    double_quant: bool = False
    """bitsandbytes nested quantization of the 4-bit scales (litgpt ``bnb.nf4-dq``)."""
    bnb_keeps_input: bool = False
    """bitsandbytes before 0.43.2 kept each 4-bit matmul's input until backward (see QLoRA)."""


Method = Annotated[
    Union[Full, Freeze, LoRA, DoRA, QLoRA, IA3, PrefixTuning, PromptTuning, BitFit, Adapter, LlamaAdapter, Shira],
    Field(discriminator="kind"),
]
METHOD_KINDS = ("full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "bitfit", "adapter",
                "llama-adapter", "shira")
