"""Scenario = model (what) + workload/method/precision/... (how) + gpu (on what)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Strict
from .methods import Freeze, Full, IA3, Method, PrefixTuning, PromptTuning, QLoRA, Shira, _LoRABase
from .model import ModelArch
from .parallel import Parallel
from .training import Attention, Checkpointing, InferenceQuant, InferWorkload, Optimizer, Precision, TrainWorkload, Workload


def model_from_name(v: Any) -> Any:
    """A catalog name (or Hugging Face id) becomes its ModelArch; anything else is left to validation."""
    if isinstance(v, str):
        from ..models import get_model

        return get_model(v)
    return v


class Scenario(Strict):
    model: ModelArch
    """Architecture, or a catalog name such as 'llama-3.1-8b' (see `fitsim models`)."""
    gpu: str = "h100-sxm-80gb"
    """Device profile name (see `fitsim gpus`); left out with a system named, the system's GPU."""
    workload: Workload = Field(default_factory=TrainWorkload)
    """What one step does: training (micro-batch, seq len, grad accumulation) or inference (batch, prompt, generation)."""
    method: Method = Field(default_factory=Full)
    """Fine-tuning method (training only)."""
    precision: Precision = "bf16"
    """Numerics: fp32, bf16-amp/fp16-amp (fp32 master weights), bf16/fp16 (pure; under FSDP the shards stay fp32
    unless parallel.fsdp_mixed_precision is off), fp8."""
    optimizer: Optimizer = Field(default_factory=Optimizer)
    """Optimizer and its implementation."""
    checkpointing: Checkpointing = Field(default_factory=Checkpointing)
    """Activation checkpointing policy."""
    attention: Attention = "sdpa-flash"
    """Attention kernel: eager (materialised scores), sdpa-math, sdpa-mem-efficient (also what SDPA runs when handed
    a mask: padded batches, prefixes), sdpa-flash / flash2 (FlashAttention-2), flash1 (FlashAttention 1, flash-attn
    before 2.0), flash3 (FlashAttention-3, Hopper)."""
    inference: InferenceQuant = Field(default_factory=InferenceQuant)
    """Weight and KV-cache quantization at inference."""
    loss: Literal["upcast", "upcast-shift", "chunked", "chunked-compiled", "fused"] = "upcast"
    """'upcast': HF loss casts all b*s*V logits to fp32 at once; 'upcast-shift': older transformers
    (< 4.46) and remote-code models also make a shifted contiguous copy of the fp32 logits; 'chunked':
    16-bit logits, upcast and cross-entropy one chunk at a time (torchtune/litgpt); 'chunked-compiled': the
    same with the per-chunk cross-entropy under torch.compile (torchtune ``compile: True``), which keeps the
    16-bit logits for backward instead of an fp32 log-softmax; 'fused': linear +
    cross-entropy fused per chunk (Liger), the logits never exist whole."""
    implementation: Literal["transformers", "litgpt", "torchtune"] = "transformers"
    """Whose model code runs: Hugging Face transformers + PEFT (the traced reference), or litgpt / torchtune,
    whose blocks use a fused F.gelu and expand GQA keys/values to all heads before SDPA."""
    padded_batches: bool = False
    """Batches padded to their longest sequence with an attention mask (HF collators): SDPA then gets an
    explicit mask, so GQA keys/values are expanded to all heads (repeat_kv) and flash gives way to the
    mem-efficient kernel."""
    compile: bool = False
    """The model runs under torch.compile (inductor): the pointwise ops between two matmul / attention kernels
    fuse into one kernel, so only the tensors those kernels read or return, the ones saved for backward and the
    block's output go through memory, and a block issues a few fused kernels instead of one per op (the
    backward likewise).  Saved activations are counted as the eager model saves them (the partitioner's choice
    of what to recompute is not modelled)."""
    expandable_segments: bool = False
    """PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation in reserved memory)."""
    host_sync_per_block: bool = False
    """The model's code copies a host tensor to the GPU in every block, so the host waits for the GPU there and
    launching a block's kernels stops overlapping running them (forward and recompute): GPT-J in transformers
    releases of 2022, which built its rotary tables on the CPU per layer (``fixed_pos_embedding(...).to(x.device)``)."""
    parallel: Parallel = Field(default_factory=Parallel)
    """How the job is spread over GPUs: dp x tp x pp x cp ranks, ZeRO / FSDP sharding, offload."""
    system: str | None = None
    """Node type the GPUs sit in (see `fitsim systems`); default: the catalog node for the GPU, or one derived from its links."""

    @model_validator(mode="before")
    @classmethod
    def _default_task(cls, data: Any) -> Any:
        """A workload without 'task' is training unless it names inference fields."""
        if isinstance(data, dict) and isinstance(data.get("workload"), dict) and "task" not in data["workload"]:
            w = dict(data["workload"])
            w["task"] = "infer" if {"batch", "prompt_len", "gen_len"} & set(w) else "train"
            data = {**data, "workload": w}
        return data

    @model_validator(mode="before")
    @classmethod
    def _gpu_of_the_system(cls, data: Any) -> Any:
        """A named system without a named GPU runs the system's GPUs (a system holds one kind)."""
        if isinstance(data, dict) and data.get("gpu") is None and isinstance(data.get("system"), str):
            from hwprofiles import UnknownNameError, get_system

            try:
                data = {**data, "gpu": get_system(data["system"]).device}
            except UnknownNameError:
                pass  # the estimate names the closest systems
        return data

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, v: Any) -> Any:
        return model_from_name(v)

    @field_validator("gpu")
    @classmethod
    def _resolve_gpu(cls, v: str) -> str:
        from hwprofiles import get_device

        return get_device(v).name

    @model_validator(mode="after")
    def _parallel_fits_model(self) -> "Scenario":
        check_parallel(self.parallel, self.model, self.workload, self.attention)
        off = self.parallel.offload_optimizer
        if off != "none" and self.optimizer.name not in ("adamw", "adam"):
            raise ValueError(f"parallel.offload_optimizer={off!r} runs DeepSpeed's CPU Adam on the host; "
                             f"optimizer.name={self.optimizer.name!r} has no host implementation (use adamw or adam)")
        return self

    @model_validator(mode="after")
    def _cross_check(self) -> "Scenario":
        m, arch = self.method, self.model
        if isinstance(self.workload, InferWorkload):
            if arch.arch == "encoder" and self.workload.gen_len > 0:
                raise ValueError(
                    f"workload.gen_len={self.workload.gen_len}: {arch.name!r} is an encoder (no generation, no KV cache); "
                    "use gen_len 0 to estimate one forward pass"
                )
            ctx = self.workload.prompt_len + self.workload.gen_len
            if arch.position == "learned" and ctx > arch.max_position_embeddings:
                raise ValueError(
                    f"workload.prompt_len + gen_len = {ctx} exceeds model {arch.name!r} "
                    f"max_position_embeddings={arch.max_position_embeddings} (learned position table)"
                )
            if not isinstance(m, Full):
                raise ValueError(
                    f"method.kind={m.kind!r} applies to training; for inference leave method 'full' and set inference.weights"
                )
            return self
        if self.inference.weights != "none":
            raise ValueError(
                f"inference.weights={self.inference.weights!r} applies to task 'infer'; to train on a quantized base use method.kind='qlora'"
            )
        if m.kind == "llama-adapter":
            if self.implementation != "litgpt":
                raise ValueError(
                    f"method.kind='llama-adapter' is litgpt's (adapter.py / adapter_v2.py); "
                    f"implementation={self.implementation!r}: set implementation 'litgpt'")
            if m.start_layer >= arch.n_layers:
                raise ValueError(f"method.start_layer={m.start_layer} leaves no block adapted: model {arch.name!r} "
                                 f"has n_layers={arch.n_layers}; allowed: 0 to {arch.n_layers - 1}")
            if m.quant != "none" and self.precision not in ("bf16", "fp16", "bf16-amp", "fp16-amp"):
                raise ValueError(f"method.quant={m.quant!r} with precision={self.precision!r}: bitsandbytes bases "
                                 "compute in 16 bits; allowed precisions: bf16, fp16, bf16-amp, fp16-amp")
        parts = getattr(m, "qkv_parts", None)
        if parts is not None and set(parts) != {"q", "k", "v"} and self.implementation != "litgpt":
            raise ValueError(
                f"method.qkv_parts={parts!r} needs implementation 'litgpt' (its LoRAQKVLinear adapts parts of a fused "
                f"q/k/v projection); implementation={self.implementation!r} adapts whole modules: use separate targets"
            )
        seq = self.workload.seq_len
        if "seq_len" not in self.workload.model_fields_set and seq > arch.max_position_embeddings:
            # the default length, not the user's: shorten it to what the model can take
            seq = arch.max_position_embeddings
            object.__setattr__(self, "workload", self.workload.model_copy(update={"seq_len": seq}))
        if arch.position == "learned" and seq + getattr(m, "n_virtual_tokens", 0) * isinstance(m, PromptTuning) > arch.max_position_embeddings:
            raise ValueError(
                f"workload.seq_len={seq} exceeds model {arch.name!r} max_position_embeddings={arch.max_position_embeddings} "
                "(learned position table)"
            )
        if isinstance(m, QLoRA) and m.fp32_unquantized == "norms" and self.precision in ("bf16", "fp16", "fp8"):
            raise ValueError(
                f"method.fp32_unquantized='norms' with precision={self.precision!r}: fp32 norms feed an fp32 stream "
                "into the 16-bit embeddings' and head's matmuls, which only autocast runs; use precision 'bf16-amp' "
                "or 'fp16-amp', or fp32_unquantized 'all'"
            )
        if isinstance(m, QLoRA) and self.precision == "fp32":
            raise ValueError("method.kind='qlora' with precision='fp32': QLoRA computes in 16-bit; use precision 'bf16' or "
                             "'fp16' (a model loaded in fp32 around its 4-bit layers: add method.fp32_unquantized='all')")
        if isinstance(m, (PrefixTuning, PromptTuning)) and m.n_virtual_tokens >= seq:
            raise ValueError(
                f"method.n_virtual_tokens={m.n_virtual_tokens} must be smaller than workload.seq_len={seq}"
            )
        if isinstance(m, Freeze) and m.n_trainable_layers > arch.n_layers:
            raise ValueError(
                f"method.n_trainable_layers={m.n_trainable_layers} exceeds the model's n_layers={arch.n_layers}"
            )
        if isinstance(m, Shira):
            from ..graph.build import linear_shapes, matching_shapes, shira_rank_error
            from ..graph.transforms import peft_targets

            asked = peft_targets(m.targets, arch.family)
            names = [k for k in linear_shapes(arch) if not k.endswith("lm_head")] if asked == "all-linear" else asked
            for name in names:
                for i, o in matching_shapes(arch, name):
                    err = shira_rank_error(m.r, name, i, o)
                    if err:
                        raise ValueError(err)
        if isinstance(m, (_LoRABase, IA3, Shira)):
            from ..graph.build import target_names
            from ..graph.transforms import NO_PEFT_DEFAULT_TARGETS

            known = target_names(arch, embeddings=isinstance(m, _LoRABase))
            if m.targets is None and arch.family in NO_PEFT_DEFAULT_TARGETS:
                raise ValueError(
                    f"method.targets: PEFT has no default target modules for family {arch.family!r} (model "
                    f"{arch.name!r}); name them, allowed: {', '.join(sorted(k for k in known if '.' not in k))}"
                    + ("" if isinstance(m, IA3) else ", all-linear"))
            asked = m.targets if not isinstance(m, IA3) else (m.targets or [])
            if asked is not None and asked != "all-linear":
                missing = [t for t in asked if t not in known]
                if missing:
                    raise ValueError(
                        f"method.targets: {missing} not in model {arch.name!r}; allowed: {', '.join(sorted(known))}"
                        + ("" if isinstance(m, IA3) else ", all-linear")
                    )
            if isinstance(m, IA3) and m.feedforward_modules is not None:
                from ..graph.transforms import IA3_DEFAULTS

                targets = set(m.targets if m.targets is not None else IA3_DEFAULTS.get(arch.family, ((), ()))[0])
                extra = [f for f in m.feedforward_modules if f not in targets]
                if extra:
                    raise ValueError(
                        f"method.feedforward_modules: {extra} must be among the IA3 targets ({', '.join(sorted(targets))})"
                    )
        if self.optimizer.in_backward and self.workload.grad_accum > 1:
            raise ValueError(
                f"optimizer.in_backward steps each parameter during backward, so workload.grad_accum must be 1 "
                f"(got {self.workload.grad_accum})"
            )
        if self.optimizer.galore is not None:
            self._check_galore(m)
        if self.is_training and self.optimizer.forward_only:
            self._check_mezo()
        if self.precision == "fp8" and not isinstance(m, Full):
            raise ValueError(f"precision='fp8' (float8 training) applies to method 'full'; got method.kind={m.kind!r}")
        if self.checkpointing.mode == "selective" and self.attention in ("eager", "sdpa-math"):
            raise ValueError(
                f"checkpointing.mode='selective' keeps the fused attention kernel's output and logsumexp; "
                f"attention={self.attention!r} is not modelled under it: allowed attention: sdpa-flash, "
                "sdpa-mem-efficient, flash1, flash2, flash3 (or checkpointing.mode 'full')")
        return self

    def _check_mezo(self) -> None:
        """MeZO's reference trainer (princeton-nlp/MeZO, large_models/trainer.py) steps one device's whole
        parameters from two forwards of one batch: nothing to shard, accumulate, recompute or step in backward."""
        par, w = self.parallel, self.workload
        bad = [f"parallel.n_gpus={par.n_gpus}"] if par.n_gpus > 1 else []
        bad += [f"parallel.{k}={v!r}" for k, v, none in (("offload_optimizer", par.offload_optimizer, "none"),
                                                         ("offload_params", par.offload_params, "none")) if v != none]
        if w.grad_accum != 1:
            bad.append(f"workload.grad_accum={w.grad_accum}")
        if self.checkpointing.mode != "none":
            bad.append(f"checkpointing.mode={self.checkpointing.mode!r}")
        if self.optimizer.in_backward:
            bad.append("optimizer.in_backward=True")
        if bad:
            raise ValueError(
                "optimizer.name='mezo' runs two forwards of one batch on one GPU with no backward (no sharding, "
                "accumulation, checkpointing or in-backward step); got " + ", ".join(bad)
            )

    def _check_galore(self, m: Any) -> None:
        """GaLore projects the gradients of full-rank trainable weights, one parameter at a time, unsharded
        (galore-torch; transformers' ``galore_*`` optimizers; the layer-wise variant on a single GPU)."""
        name = self.optimizer.name
        if not isinstance(m, (Full, Freeze)):
            raise ValueError(
                f"optimizer.name={name!r} projects full-rank weight gradients: method.kind must be full or freeze "
                f"(got {m.kind!r})"
            )
        par = self.parallel
        sharded = [f"{k}={v!r}" for k, v, none in (("zero", int(par.zero), 0), ("fsdp", par.fsdp, "none"),
                   ("tp", par.tp, 1), ("pp", par.pp, 1), ("cp", par.cp, 1), ("ep", par.ep, 1),
                   ("offload_optimizer", par.offload_optimizer, "none"), ("offload_params", par.offload_params, "none"))
                   if v != none]
        if sharded:
            raise ValueError(
                f"optimizer.name={name!r} runs on whole, unsharded parameters (data parallel only); "
                f"got parallel.{', parallel.'.join(sharded)}"
            )
        if self.optimizer.in_backward and par.dp > 1:
            raise ValueError(
                f"optimizer.in_backward with {name!r} (layer-wise GaLore) runs on a single GPU; got parallel.dp={par.dp}"
            )

    @property
    def is_training(self) -> bool:
        return isinstance(self.workload, TrainWorkload)

    # YAML round trip -------------------------------------------------------------------------
    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Scenario":
        import yaml

        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("scenario YAML must be a mapping with at least 'model'")
        return cls.model_validate(data)


def check_parallel(par: Parallel, arch: ModelArch, workload: Any, attention: str) -> None:
    """Parallel degrees against the model and the workload; each error names the fields and quotes the numbers."""
    if arch.n_heads % par.tp:
        raise ValueError(f"parallel.tp={par.tp} does not divide the model's n_heads={arch.n_heads} ({arch.name!r})")
    training = isinstance(workload, TrainWorkload)
    if par.tp > 1 and arch.kv_heads % par.tp and (training or par.tp % arch.kv_heads):
        raise ValueError(
            f"parallel.tp={par.tp} does not divide the model's n_kv_heads={arch.kv_heads} ({arch.name!r})"
            + ("" if training else "; for inference tp may also be a multiple of n_kv_heads (replicated KV heads)")
        )
    layers = arch.n_layers + (arch.n_decoder_layers or 0) if arch.arch == "encoder_decoder" else arch.n_layers
    if par.pp > layers:
        raise ValueError(f"parallel.pp={par.pp} exceeds the model's {layers} layers ({arch.name!r})")
    if par.pp * par.pp_virtual > layers:
        raise ValueError(
            f"parallel.pp={par.pp} x pp_virtual={par.pp_virtual} = {par.pp * par.pp_virtual} model chunks exceed the model's {layers} layers"
        )
    if par.ep > 1:
        if arch.moe is None:
            raise ValueError(f"parallel.ep={par.ep} needs an MoE model; {arch.name!r} is dense")
        if arch.moe.n_experts % par.ep:
            raise ValueError(f"parallel.ep={par.ep} does not divide the model's n_experts={arch.moe.n_experts}")
    if par.cp > 1:
        if attention in ("eager", "sdpa-math"):
            raise ValueError(
                f"parallel.cp={par.cp} (ring attention) needs a fused attention kernel; attention={attention!r} "
                "materialises the scores; allowed: sdpa-flash, sdpa-mem-efficient, flash1, flash2, flash3"
            )
        if arch.arch != "decoder":
            raise ValueError(f"parallel.cp={par.cp} applies to decoder-only models; {arch.name!r} is {arch.arch}")
    if training:
        if par.cp > 1 and workload.seq_len % par.cp:
            raise ValueError(f"workload.seq_len={workload.seq_len} must be divisible by parallel.cp={par.cp}")
        if par.sp and workload.seq_len % par.tp:
            raise ValueError(f"workload.seq_len={workload.seq_len} must be divisible by parallel.tp={par.tp} with sequence parallelism")
    else:
        if par.zero > 0 or par.fsdp != "none" or par.offload_optimizer != "none":
            raise ValueError(
                "parallel.zero / fsdp / offload_optimizer apply to training; for inference use tp, pp (and ep)"
            )
        if par.cp > 1:
            raise ValueError("parallel.cp applies to training; for long-context inference use tp or pp")
