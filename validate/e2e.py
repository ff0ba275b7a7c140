"""End-to-end cases: real transformers + peft training steps and generations of a :class:`Scenario`.

A case *is* a ``Scenario`` (plus warm-up and repeat counts): the report predicts the very object that
was measured, so prediction and measurement cannot drift apart.  Models are built from configs with
random weights directly on the device (:func:`validate.torch_models.build_model`; nothing is
downloaded); QLoRA / int8 / nf4 bases are quantized with bitsandbytes as ``BitsAndBytesConfig`` loading
does; the 8-bit optimizers are bitsandbytes'.

Training (:func:`run_train`): one optimizer step = ``grad_accum`` forward + backward passes of a
``micro_batch x seq_len`` batch of random tokens (labels = inputs), ``optimizer.step()``,
``zero_grad(set_to_none=True)``.  Inference (:func:`run_infer`): ``generate`` of ``gen_len`` tokens
(greedy, no early stop) for ``batch`` prompts of ``prompt_len`` tokens with the KV cache; the prefill
(one forward over the prompts, keeping the logits ``prefill_logits`` names: the last position's, as
``generate`` does) is timed on its own as well.

Memory: the allocated / reserved peaks over the warm-up and the timed steps, minus what was allocated
before the model was built; the peak statistics restart after the build so the set-up's own transients
(the 16-bit weights before quantization, say) are not counted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from simulator.config import InferWorkload, Scenario, TrainWorkload

from .schema import Measurement

__all__ = ["E2ECase", "e2e_cases", "run_e2e", "run_train", "run_infer", "case_from_spec", "TINY_ARCH",
           "PREFILL_POSITIONS", "prefill_logits_kwargs", "measured_scenario"]


class E2ECase(BaseModel):
    """One end-to-end case."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str = Field(min_length=1)
    scenario: Scenario
    warmup: int = Field(default=2, ge=0)
    """Untimed steps first (allocator warm-up, lazy CUDA init, optimizer state creation)."""
    repeats: int = Field(default=3, ge=1)
    """Timed steps (the median is reported)."""
    suite: Literal["e2e"] = "e2e"

    @property
    def kind(self) -> str:
        return self.scenario.workload.task

    def spec(self) -> dict[str, Any]:
        return {"scenario": self.scenario.model_dump(mode="json"), "warmup": self.warmup, "repeats": self.repeats}


def case_from_spec(case_id: str, spec: dict[str, Any]) -> E2ECase:
    """Rebuild the case a results file recorded."""
    return E2ECase(case_id=case_id, scenario=Scenario.model_validate(spec["scenario"]), warmup=spec.get("warmup", 2),
                   repeats=spec.get("repeats", 3))


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


def run_e2e(case: E2ECase, device: str) -> Measurement:
    """Measure one case on ``device`` ('cuda' or 'cpu')."""
    if isinstance(case.scenario.workload, TrainWorkload):
        return run_train(case, device)
    return run_infer(case, device)


def _unique_trainable(model) -> list:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def run_train(case: E2ECase, device: str) -> Measurement:
    """Time optimizer steps and record the memory peaks of a training scenario."""
    from .cpu_truth import make_optimizer, train_batch
    from .harness import PeakMemory, median_s, time_repeats_s
    from .torch_models import backward_context, build_model, forward_context

    sc = case.scenario
    wl = sc.workload
    if sc.parallel.n_gpus > 1:
        raise NotImplementedError(f"parallel.n_gpus={sc.parallel.n_gpus}: the single-process suite runs one GPU")
    with PeakMemory(device) as pm:
        model = build_model(sc, device=device)
        if sc.compile:
            model.compile()  # inductor, default mode: the warm-up steps compile, the timed ones run the graphs
        optimizer = make_optimizer(_unique_trainable(model), sc.optimizer, model)
        batch = {k: v.to(device) for k, v in train_batch(sc, seed=0).items()}

        def step() -> None:
            for _ in range(wl.grad_accum):
                with forward_context(sc, device):
                    loss = model(**batch).loss
                with backward_context(sc, device):
                    (loss / wl.grad_accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        pm.restart()
        samples = time_repeats_s(step, warmup=case.warmup, repeats=case.repeats, device=device)
        pm.read()
    t = median_s(samples)
    tokens = wl.micro_batch * wl.seq_len * wl.grad_accum
    return Measurement(allocated_peak_bytes=pm.allocated_peak_bytes, reserved_peak_bytes=pm.reserved_peak_bytes,
                       baseline_allocated_bytes=pm.baseline_allocated_bytes, time_s=t, time_samples_s=tuple(samples),
                       tokens_per_s=tokens / t, segment_bytes=pm.segment_bytes, extra=dict(pm.allocator))


def _prompt_scenario(sc: Scenario) -> Scenario:
    """An inference scenario as the training-shaped one the model builder and the batch take: a micro-batch
    of ``batch`` prompts of ``prompt_len`` tokens."""
    return sc.model_copy(update={"workload": TrainWorkload(micro_batch=sc.workload.batch,
                                                           seq_len=sc.workload.prompt_len)})


def _infer_model(sc: Scenario, device: str):
    """The model of an inference scenario: 16-bit (or fp32) weights, linears quantized per
    ``sc.inference.weights`` (bitsandbytes int8 / nf4 / fp4), eval mode, no gradients."""
    import torch

    from .torch_models import build_model, quantize_linears

    q = sc.inference.weights
    if q not in ("none", "int8", "nf4", "fp4"):
        raise NotImplementedError(f"inference.weights={q!r}: GPTQ / AWQ / fp8 need pre-quantized checkpoints")
    model = build_model(_prompt_scenario(sc), device=device)
    model.requires_grad_(False)
    if q != "none":
        dtype = torch.float16 if sc.precision.startswith("fp16") else torch.bfloat16
        quantize_linears(model, q, double_quant=sc.inference.double_quant, compute_dtype=dtype, device=device)
    model.eval()
    return model


PREFILL_POSITIONS = "prefill_logits_positions"
"""``Measurement.extra`` key: prompt positions the separately timed prefill computed logits for.  Results
written before it existed timed a plain forward, which computes every position's logits."""


def prefill_logits_kwargs(model: Any, wl: InferWorkload) -> dict[str, int]:
    """What makes a forward compute the logits ``wl.prefill_logits`` asks for: ``logits_to_keep=1`` for the
    last position, as ``generate`` passes it (transformers ``GenerationMixin._supports_logits_to_keep``);
    nothing for every position, or for a model whose forward takes no such argument."""
    import inspect

    if wl.prefill_logits == "last" and "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": 1}
    return {}


def measured_scenario(case: E2ECase, m: Measurement | None) -> Scenario:
    """The setup a measurement's memory peak and prefill time belong to: the case's, except that a generation
    measured before :data:`PREFILL_POSITIONS` was recorded timed its prefill as a plain forward, whose every
    position's logits are then part of the peak (``prefill_logits='all'``)."""
    sc = case.scenario
    wl = sc.workload
    if not isinstance(wl, InferWorkload) or m is None or PREFILL_POSITIONS in m.extra:
        return sc
    return sc.model_copy(update={"workload": wl.model_copy(update={"prefill_logits": "all"})})


def run_infer(case: E2ECase, device: str) -> Measurement:
    """Time a whole generation (and the prefill alone) and record the memory peaks."""
    import torch

    from .cpu_truth import train_batch
    from .harness import PeakMemory, median_s, time_repeats_s
    from .torch_models import backward_context

    sc = case.scenario
    wl: InferWorkload = sc.workload
    if sc.parallel.n_gpus > 1:
        raise NotImplementedError(f"parallel.n_gpus={sc.parallel.n_gpus}: the single-process suite runs one GPU")
    if sc.model.arch != "decoder":
        raise NotImplementedError(f"model.arch={sc.model.arch!r}: the generation cases run decoders")
    with PeakMemory(device) as pm:
        model = _infer_model(sc, device)
        ids = train_batch(_prompt_scenario(sc), seed=0)["input_ids"].to(device)
        mask = torch.ones_like(ids)

        def generate() -> None:
            with torch.no_grad(), backward_context(sc, device, fallback=True):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=wl.gen_len,
                               min_new_tokens=wl.gen_len, do_sample=False, use_cache=True, pad_token_id=0)

        keep = prefill_logits_kwargs(model, wl)

        def prefill() -> None:
            with torch.no_grad(), backward_context(sc, device, fallback=True):
                model(input_ids=ids, attention_mask=mask, use_cache=True, **keep)

        pm.restart()
        prefill_samples = time_repeats_s(prefill, warmup=1, repeats=case.repeats, device=device)
        samples = time_repeats_s(generate, warmup=case.warmup, repeats=case.repeats, device=device)
        pm.read()
    t = median_s(samples)
    t_prefill = median_s(prefill_samples)
    extra = {**pm.allocator, "prefill_s": t_prefill,
             PREFILL_POSITIONS: float(keep.get("logits_to_keep") or wl.prompt_len)}
    if wl.gen_len > 1:
        extra["decode_per_token_s"] = max(t - t_prefill, 0.0) / (wl.gen_len - 1)
    return Measurement(allocated_peak_bytes=pm.allocated_peak_bytes, reserved_peak_bytes=pm.reserved_peak_bytes,
                       baseline_allocated_bytes=pm.baseline_allocated_bytes, time_s=t, time_samples_s=tuple(samples),
                       tokens_per_s=wl.batch * wl.gen_len / t if wl.gen_len else None, extra=extra,
                       segment_bytes=pm.segment_bytes)


# --------------------------------------------------------------------------------------------
# The grids
# --------------------------------------------------------------------------------------------

TINY_ARCH: dict[str, Any] = dict(name="tiny-llama", family="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2,
                                 intermediate=160, vocab=128, max_position_embeddings=256)
"""The CPU grid's model: every code path of the GPU grid at a size that runs in milliseconds."""

LORA16 = {"kind": "lora", "r": 16, "alpha": 32, "targets": "all-linear"}
QLORA16 = {"kind": "qlora", "r": 16, "alpha": 32, "targets": "all-linear"}


def _label(method: dict[str, Any]) -> str:
    kind = method["kind"]
    if kind in ("lora", "dora", "qlora"):
        t = method.get("targets")
        return f"{kind}-r{method['r']}" + ("" if t == "all-linear" else "-" + "+".join(t or ["default"]))
    if kind == "prefix":
        return f"prefix-{method.get('n_virtual_tokens', 20)}"
    return kind


def _train(model: Any, method: dict[str, Any], *, precision: str = "bf16", seq: int = 2048, mb: int = 4,
           ck: str = "none", opt: str = "adamw", impl: str = "foreach", attention: str = "sdpa-flash",
           gpu: str = "h100-sxm-80gb", warmup: int = 2, repeats: int = 3, compile: bool = False) -> E2ECase:
    name = model if isinstance(model, str) else model["name"]
    sc = Scenario.model_validate({
        "model": model, "gpu": gpu, "precision": precision, "attention": attention, "method": method,
        "workload": {"task": "train", "micro_batch": mb, "seq_len": seq}, "compile": compile,
        "checkpointing": {"mode": ck}, "optimizer": {"name": opt, "impl": impl}})
    cid = f"e2e/train/{name}/{_label(method)}/{precision}/s{seq}-b{mb}" + {"none": "", "full": "-ck"}.get(ck, f"-ck-{ck}")
    cid += "" if opt == "adamw" and impl == "foreach" else f"-{opt}" + ("" if impl == "foreach" else f"-{impl}")
    cid += "" if attention == "sdpa-flash" else f"-{attention}"
    cid += "-compile" if compile else ""
    return E2ECase(case_id=cid, scenario=sc, warmup=warmup + (2 if compile else 0), repeats=repeats)


def _infer(model: Any, *, batch: int, prompt: int = 512, gen: int = 128, weights: str = "none",
           precision: str = "bf16", attention: str = "sdpa-flash", gpu: str = "h100-sxm-80gb", warmup: int = 1,
           repeats: int = 3) -> E2ECase:
    name = model if isinstance(model, str) else model["name"]
    sc = Scenario.model_validate({
        "model": model, "gpu": gpu, "precision": precision, "attention": attention,
        "workload": {"task": "infer", "batch": batch, "prompt_len": prompt, "gen_len": gen},
        "inference": {"weights": weights}})
    cid = f"e2e/infer/{name}/{weights}/{precision}/p{prompt}-g{gen}-b{batch}"
    cid += "" if attention == "sdpa-flash" else f"-{attention}"
    return E2ECase(case_id=cid, scenario=sc, warmup=warmup, repeats=repeats)


def _small_moe() -> dict[str, Any]:
    """Mixtral-8x7B's block at 4 layers (~5.7B parameters): the MoE case that fits one 80 GB GPU with LoRA."""
    from simulator.config.scenario import model_from_name

    arch = model_from_name("mixtral-8x7b")
    return {**arch.model_dump(mode="json"), "name": "mixtral-8x7b-4l", "n_layers": 4}


def gpu_grid(gpu: str = "h100-sxm-80gb") -> list[E2ECase]:
    """The single-GPU grid (about 72 cases, ≤ 20 min on one H100): methods, sizes, lengths and batches,
    checkpointing, optimizers, one MoE, and generation batch sweeps with 16-bit and quantized weights.
    A few cases are expected to run out of memory on an 80 GB device: they score the fits verdict."""
    g = dict(gpu=gpu)
    cases: list[E2ECase] = []
    # 1. every method on one 1B model, with and without checkpointing
    for ck in ("none", "full"):
        for method, prec, opt in (
            ({"kind": "full"}, "bf16-amp", "adamw"),
            ({"kind": "full"}, "bf16", "adamw"),
            ({"kind": "full"}, "bf16-amp", "adamw-8bit"),
            (LORA16, "bf16", "adamw"),
            ({"kind": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}, "bf16", "adamw"),
            ({"kind": "dora", "r": 16, "alpha": 32, "targets": "all-linear"}, "bf16", "adamw"),
            (QLORA16, "bf16", "adamw"),
            ({"kind": "prefix", "n_virtual_tokens": 20}, "bf16", "adamw"),
        ):
            # PEFT prefix tuning passes an attention mask (the virtual tokens): CUDA flash takes none
            att = "sdpa-mem-efficient" if method["kind"] == "prefix" else "sdpa-flash"
            cases.append(_train("llama-3.2-1b", method, precision=prec, opt=opt, ck=ck, seq=2048, mb=4, attention=att,
                                **g))
    # 1b. torchtitan's per-op selective checkpointing: full pure bf16 and LoRA on the 1B model, LoRA on 8B
    for m, method, mb in (("llama-3.2-1b", {"kind": "full"}, 4), ("llama-3.2-1b", LORA16, 4), ("llama-3.1-8b", LORA16, 2)):
        cases.append(_train(m, method, precision="bf16", ck="selective", seq=2048, mb=mb, **g))
    # 1c. torch.compile (inductor): full pure bf16 and LoRA on the 1B model, beside their eager cases in 1.
    for method in ({"kind": "full"}, LORA16):
        cases.append(_train("llama-3.2-1b", method, precision="bf16", ck="full", seq=2048, mb=4, compile=True, **g))
    # 2. model size: LoRA and QLoRA with checkpointing; full pure-bf16 on the small ones; full AMP on 8B (OOM)
    for m in ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-3b", "qwen2.5-7b", "llama-3.1-8b"):
        cases.append(_train(m, LORA16, seq=2048, mb=2, ck="full", **g))
        cases.append(_train(m, QLORA16, seq=2048, mb=2, ck="full", **g))
    for m in ("qwen2.5-0.5b", "qwen2.5-1.5b", "llama-3.2-3b"):
        cases.append(_train(m, {"kind": "full"}, precision="bf16", seq=2048, mb=2, ck="full", **g))
    cases.append(_train("llama-3.1-8b", {"kind": "full"}, precision="bf16-amp", seq=2048, mb=1, ck="full", **g))
    cases.append(_train("llama-3.1-8b", {"kind": "full"}, precision="bf16", seq=2048, mb=1, ck="full",
                        opt="adamw-8bit", **g))
    # 3. sequence length x micro-batch on 8B QLoRA; checkpointing on and off
    for seq, mb, ck in ((512, 8, "none"), (1024, 4, "none"), (2048, 2, "none"), (4096, 1, "none"),
                        (4096, 1, "full"), (8192, 1, "full"), (16384, 1, "full"), (2048, 8, "full")):
        cases.append(_train("llama-3.1-8b", QLORA16, seq=seq, mb=mb, ck=ck, **g))
    # 4. micro-batch sweep without checkpointing (activations dominate; the last ones should run out)
    for mb in (1, 2, 4, 8, 16, 32):
        cases.append(_train("qwen2.5-1.5b", LORA16, seq=1024, mb=mb, **g))
    # 5. optimizers and implementations on full fine-tuning of 0.5B
    for opt, impl in (("adamw", "fused"), ("adamw", "for-loop"), ("sgd", "foreach"), ("adafactor", "foreach")):
        cases.append(_train("qwen2.5-0.5b", {"kind": "full"}, precision="bf16-amp", seq=1024, mb=8, opt=opt, impl=impl,
                            **g))
    # 6. attention kernels and AMP precision on LoRA 3B
    for att in ("sdpa-mem-efficient", "eager"):
        cases.append(_train("llama-3.2-3b", LORA16, seq=2048, mb=2, attention=att, **g))
    cases.append(_train("llama-3.2-3b", LORA16, precision="bf16-amp", seq=2048, mb=2, **g))
    # 7. MoE: LoRA on attention, and full fine-tuning of a 4-layer Mixtral
    moe = _small_moe()
    cases.append(_train(moe, {"kind": "lora", "r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                        seq=2048, mb=2, ck="full", **g))
    cases.append(_train(moe, {"kind": "full"}, precision="bf16", seq=1024, mb=1, ck="full", opt="adamw-8bit", **g))
    # 8. generation: batch sweeps, quantized weights, a long prompt
    for b in (1, 4, 16, 64):
        cases.append(_infer("llama-3.1-8b", batch=b, **g))
    for w in ("int8", "nf4"):
        for b in (1, 16):
            cases.append(_infer("llama-3.1-8b", batch=b, weights=w, **g))
    for b in (1, 32, 128):
        cases.append(_infer("qwen2.5-0.5b", batch=b, **g))
    cases.append(_infer("llama-3.2-1b", batch=8, prompt=4096, gen=64, **g))
    cases.append(_infer("qwen2.5-7b", batch=8, prompt=2048, gen=128, **g))
    return cases


def cpu_grid() -> list[E2ECase]:
    """The same code paths at a size CPU runs in about a second each (CI's exercise of the harness)."""
    t = dict(model=TINY_ARCH, seq=64, mb=2, warmup=1, repeats=2, attention="sdpa-math")
    return [
        _train(method={"kind": "full"}, precision="fp32", **t),
        _train(method={"kind": "full"}, precision="bf16-amp", ck="full", **t),
        _train(method={"kind": "lora", "r": 4, "alpha": 8, "targets": "all-linear"}, precision="bf16", **t),
        _train(method={"kind": "dora", "r": 4, "alpha": 8, "targets": "all-linear"}, precision="fp32", **t),
        _train(method={"kind": "qlora", "r": 4, "alpha": 8, "targets": "all-linear"}, precision="bf16", **t),
        _train(method={"kind": "prefix", "n_virtual_tokens": 4}, precision="fp32", **t),
        _train(method={"kind": "full"}, precision="fp32", opt="adamw-8bit", **t),
        _train(method={"kind": "full"}, precision="fp32", attention="sdpa-mem-efficient",
               **{k: v for k, v in t.items() if k != "attention"}),
        _train(method={"kind": "lora", "r": 4, "alpha": 8, "targets": "all-linear"}, precision="bf16", ck="selective",
               attention="sdpa-flash", **{k: v for k, v in t.items() if k != "attention"}),
        _infer(TINY_ARCH, batch=2, prompt=16, gen=8, precision="fp32", attention="sdpa-math", warmup=1, repeats=2),
        _infer(TINY_ARCH, batch=2, prompt=16, gen=8, weights="nf4", precision="bf16", attention="sdpa-math", warmup=1,
               repeats=2),
    ]


def e2e_cases(scale: str) -> list[E2ECase]:
    """The grid for ``scale`` 'gpu' or 'cpu'."""
    if scale == "gpu":
        return gpu_grid()
    if scale == "cpu":
        return cpu_grid()
    raise ValueError(f"scale={scale!r}: allowed 'gpu', 'cpu'")
