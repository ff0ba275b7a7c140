"""Model architecture: the 'what' of a scenario.

Every field that changes memory or FLOPs is explicit (GQA, tied embeddings, gated
MLPs, MoE, biases, norms, vocab, encoder-decoder cross-attention); nothing is
averaged.  Named architectures live as YAML in ``simulator/models/``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Strict

Family = Literal[
    "llama",  # Llama 1/2/3, Mistral, Qwen1.5/2/2.5/3, Mixtral, Gemma/Gemma2, Yi ...: the HF Llama-style decoder
    "phi3",  # Phi-3: the Llama-style decoder with fused qkv_proj and gate_up_proj and a concatenated rotary
    "qwen",  # Qwen (v1): fused c_attn, w1/w2 gated MLP
    "gpt2",
    "opt",
    "bloom",
    "falcon",
    "gpt_neox",
    "gptj",  # GPT-J: one LayerNorm feeding attention and MLP in parallel, partial rotary, biased MLP and LM head
    "phi",
    "t5",
    "torch",  # plain PyTorch post-LN decoder: nn.MultiheadAttention, norm(x + attn), norm(x + MLP), learned positions
    "bert",
    "roberta",
    "deberta_v2",
]


class MoE(Strict):
    n_experts: int = Field(ge=1)
    """Routed experts per MoE layer."""
    top_k: int = Field(ge=1)
    """Experts each token is routed to."""
    expert_intermediate: int | None = Field(default=None, ge=1)
    """Intermediate size of one expert (defaults to the model's intermediate size)."""
    n_shared_experts: int = Field(default=0, ge=0)
    """Always-active shared experts (DeepSeek/Qwen-MoE style)."""
    shared_intermediate: int | None = Field(default=None, ge=1)
    """Intermediate size of the shared expert block."""

    @model_validator(mode="after")
    def _check(self) -> "MoE":
        if self.top_k > self.n_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.n_experts={self.n_experts}")
        return self


class ModelArch(Strict):
    name: str
    """Catalog name, e.g. 'llama-3.1-8b'."""
    family: Family
    """Implementation family that fixes module names and the operator template."""
    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """Decoder-only LM, encoder-only (BERT-like) or encoder-decoder (T5)."""
    source: str = ""
    """Where the numbers come from (the config.json URL)."""
    hf_id: str | None = None
    """Hugging Face repository id, when there is one."""

    n_layers: int = Field(ge=1)
    """Transformer blocks (the encoder's, for encoder-decoder models)."""
    n_decoder_layers: int | None = Field(default=None, ge=1)
    """Decoder blocks of an encoder-decoder model."""
    hidden: int = Field(ge=1)
    """Model width h."""
    n_heads: int = Field(ge=1)
    """Query heads a."""
    n_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads (GQA/MQA); defaults to n_heads."""
    head_dim: int | None = Field(default=None, ge=1)
    """Per-head dimension; defaults to hidden / n_heads."""
    intermediate: int = Field(ge=1)
    """MLP intermediate size i."""
    vocab: int = Field(ge=1)
    """Vocabulary size V (the embedding matrix rows)."""
    max_position_embeddings: int = Field(default=2048, ge=1)
    """Context length the model was trained for (sizes learned position tables)."""

    position: Literal["rope", "learned", "alibi", "relative"] = "rope"
    """Position encoding; 'learned' adds a max_position x hidden table."""
    rotary_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of each head's dims the rotary embedding turns (HF partial_rotary_factor / rotary_pct, GPT-J
    rotary_dim / head_dim): sizes the cos/sin tables."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer type."""
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    """MLP activation."""
    gated_mlp: bool = True
    """SwiGLU/GeGLU MLP (gate, up, down) instead of two matrices."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2, GPT-2, OPT, BERT ...)."""
    attn_out_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on the MLP projections."""
    norm_bias: bool = False
    """LayerNorm has a bias (RMSNorm never does)."""
    norm_plus_one: bool = False
    """RMSNorm scales by (1 + weight), computed in fp32 before the cast back (Gemma 1/2/3)."""
    lm_head_bias: bool = False
    """Bias on the LM head (Phi-1.5)."""
    tied_embeddings: bool = False
    """LM head shares the input embedding matrix."""
    parallel_block: bool = False
    """Attention and MLP read the same normed input (GPT-J/NeoX/Falcon/Phi)."""
    qk_norm: bool = False
    """RMSNorm over q and k per head (Qwen3, Gemma3)."""
    sandwich_norm: bool = False
    """Extra post-attention and post-MLP norms (Gemma2): four norms per block."""
    moe: MoE | None = None
    """Mixture-of-experts MLP, or None for a dense MLP."""
    sliding_window: int | None = Field(default=None, ge=1)
    """Sliding-window attention span in tokens (Mistral v0.1, Gemma 2 local layers): a sliding layer's KV
    cache keeps only the last window."""
    full_attention_every: int = Field(default=0, ge=0)
    """With a sliding window: every k-th layer attends globally (Gemma 2: 2); 0 = every layer slides."""
    type_vocab_size: int = Field(default=0, ge=0)
    """Token-type embeddings (BERT)."""
    relative_attention_num_buckets: int = Field(default=32, ge=1)
    """T5 relative position buckets (one table per stack)."""
    torch_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Dtype of the released checkpoint."""

    @model_validator(mode="after")
    def _check(self) -> "ModelArch":
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        if self.head_dim is None and self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}; give head_dim")
        if self.arch == "encoder_decoder" and self.n_decoder_layers is None:
            object.__setattr__(self, "n_decoder_layers", self.n_layers)
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head the rotary embedding turns (``int(head_dim * partial_rotary_factor)`` as HF sizes it)."""
        return int(self.d_head * self.rotary_fraction)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d_head

    @property
    def expert_intermediate(self) -> int:
        if self.moe is None or self.moe.expert_intermediate is None:
            return self.intermediate
        return self.moe.expert_intermediate

    @property
    def full_attention_layers(self) -> int:
        """Decoder layers whose KV cache holds the whole context."""
        if self.sliding_window is None:
            return self.decoder_layers
        return self.decoder_layers // self.full_attention_every if self.full_attention_every else 0

    @property
    def decoder_layers(self) -> int:
        """Blocks that hold a KV cache at generation time."""
        if self.arch == "encoder_decoder":
            return self.n_decoder_layers or self.n_layers
        return self.n_layers
