"""Which fused attention kernel runs, and its speed relative to FlashAttention-2 from the device profile."""

from __future__ import annotations

import pytest

from hwprofiles import get_device
from simulator import Scenario, compute, estimate, timing
from simulator.estimate import _dims, cost_table_for
from simulator.graph.build import fused_output_follows_query
from simulator.graph.ir import basis


def _sc(attention: str = "sdpa-flash", gpu: str = "a100-sxm-80gb", padded: bool = False, **kw) -> Scenario:
    return Scenario.model_validate({
        "model": "llama-3.2-1b", "gpu": gpu, "precision": "bf16-amp", "attention": attention,
        "padded_batches": padded, "workload": {"micro_batch": 2, "seq_len": 4096}, **kw})


def _attention_s(sc: Scenario) -> tuple[float, float]:
    """(forward attention seconds of one micro-batch, the whole backward) on the scenario's GPU."""
    ct = cost_table_for(sc)
    dev = get_device(sc.gpu)
    B = basis(*_dims(sc, ct))
    dtype = compute.matmul_dtype(ct.plan.precision.compute_dtype, sc.precision)
    s = timing.stage_compute(ct, sc.parallel, B, dev, dtype, 0, True)
    return s.attention_s, s.backward_s


def test_the_kernel_follows_the_attention_setting_and_the_mask():
    assert compute.attention_kernel(cost_table_for(_sc()).plan) == "flash2"
    # transformers hands SDPA a mask for padded batches: the flash kernel takes none, the efficient one runs
    assert compute.attention_kernel(cost_table_for(_sc(padded=True)).plan) == "mem_efficient"
    assert compute.attention_kernel(cost_table_for(_sc("sdpa-mem-efficient")).plan) == "mem_efficient"
    assert compute.attention_kernel(cost_table_for(_sc("flash1")).plan) == "flash1"
    assert compute.attention_kernel(cost_table_for(_sc("flash3", "h100-sxm-80gb")).plan) == "flash3"
    # Falcon materialises its causal mask whatever the kernel: SDPA gets it and runs the memory-efficient kernel
    assert compute.attention_kernel(cost_table_for(_sc(model="falcon-40b")).plan) == "mem_efficient"
    # litgpt and torchtune build their own mask-free calls
    assert compute.attention_kernel(cost_table_for(_sc(padded=True, implementation="litgpt")).plan) == "flash2"


def _block_saved_bytes(model: str, attention: str, precision: str = "bf16", **kw) -> float:
    sc = Scenario.model_validate({
        "model": model, "gpu": "a100-sxm-80gb", "precision": precision, "attention": attention,
        "workload": {"micro_batch": 2, "seq_len": 1024}, **kw})
    return estimate(sc, what_fits=False, timing=False).activations_by_layer["gpt_neox.layers.1"]


def test_a_heads_major_query_costs_an_output_copy_under_the_kernels_whose_output_follows_it():
    """GPT-NeoX's roped q is a contiguous (b, heads, s, d) tensor: FlashAttention's output copies that layout and
    the reshape before ``dense`` copies it (one b*s*hidden tensor saved); the memory-efficient kernel writes
    (b, s, heads, d) and the reshape is a view."""
    copy = 2 * 1024 * 6144 * 2  # micro-batch x seq x hidden x 2 B
    flash = _block_saved_bytes("gpt-neox-20b", "sdpa-flash")
    assert flash - _block_saved_bytes("gpt-neox-20b", "sdpa-mem-efficient") == copy
    assert _block_saved_bytes("gpt-neox-20b", "flash2") == flash
    # a padded batch hands SDPA a mask, so the memory-efficient kernel runs: no copy
    assert flash - _block_saved_bytes("gpt-neox-20b", "sdpa-flash", padded_batches=True) == copy
    plan = cost_table_for(_sc()).plan
    assert compute.attention_kernel(plan) == "flash2"
    assert fused_output_follows_query(plan, "bf16") and not fused_output_follows_query(plan, "fp32")
    assert not fused_output_follows_query(cost_table_for(_sc("sdpa-mem-efficient")).plan, "bf16")
    assert not fused_output_follows_query(cost_table_for(_sc("eager")).plan, "bf16")


def test_slower_kernels_take_their_measured_share_of_flashattention_2s_speed():
    dev = get_device("a100-sxm-80gb")
    fa2, _ = _attention_s(_sc())
    for attention, padded, kernel in (("sdpa-flash", True, "mem_efficient"), ("flash1", False, "flash1")):
        slow, _ = _attention_s(_sc(attention, padded=padded))
        ratio = dev.efficiency.attention_kernel_ratio(kernel, 4096)
        # FlashAttention-2's A100 figure: xformers 87 and FlashAttention 76 TFLOP/s against 173 at 4k tokens
        assert ratio == pytest.approx({"mem_efficient": 87 / 173, "flash1": 76 / 173}[kernel], abs=0.005)
        assert slow == pytest.approx(fa2 / ratio, rel=1e-9)


def test_flashattention_3_speeds_up_the_forward_only_and_only_where_measured():
    h100 = get_device("h100-sxm-80gb")
    f2, b2 = _attention_s(_sc("flash2", "h100-sxm-80gb"))
    f3, b3 = _attention_s(_sc("flash3", "h100-sxm-80gb"))
    assert f3 == pytest.approx(f2 / h100.efficiency.attention_kernel_ratio("flash3", 4096), rel=1e-9)
    assert 1.8 < f2 / f3 < 1.85  # 579 / 319 TFLOP/s forward at 4k tokens
    assert b3 == b2  # no backward figure is published with it
    # a device without a figure for a kernel runs it at FlashAttention-2's speed
    assert get_device("l40s-48gb").efficiency.attention_kernel_ratio("flash3", 4096) == 1.0


@pytest.mark.parametrize(("attention", "gpu", "says"), [
    ("flash2", "v100-sxm-32gb", "runs on sm80 or newer and v100-sxm-32gb is sm70"),
    ("flash2", "t4-16gb", "runs on sm80 or newer and t4-16gb is sm75"),
    ("flash3", "a100-sxm-80gb", "runs on sm90 only and a100-sxm-80gb is sm80"),
    ("flash1", "v100-sxm-32gb", "runs on sm75 or newer and v100-sxm-32gb is sm70"),
    ("sdpa-flash", "t4-16gb", "SDPA runs its memory-efficient kernel"),
])
def test_a_kernel_built_for_other_gpus_is_named_with_both_architectures(attention, gpu, says):
    assert says in compute.attention_support_warning(attention, get_device(gpu))


@pytest.mark.parametrize(("attention", "gpu"), [
    ("flash2", "a100-sxm-80gb"), ("flash2", "rtx-4090-24gb"), ("flash2", "h100-sxm-80gb"), ("flash3", "h100-sxm-80gb"),
    ("flash1", "t4-16gb"), ("sdpa-flash", "l4-24gb"), ("sdpa-mem-efficient", "v100-sxm-32gb"), ("eager", "t4-16gb"),
    ("flash2", "mi300x-192gb"),  # ROCm builds its own FlashAttention-2
])
def test_kernels_on_the_gpus_they_are_built_for_pass_without_a_word(attention, gpu):
    assert compute.attention_support_warning(attention, get_device(gpu)) is None


def test_the_estimate_warns_for_a_kernel_that_cannot_run_and_notes_sdpa_falling_back():
    e = estimate(_sc("flash2", "v100-sxm-32gb", precision="fp16"), what_fits=False)
    assert any("'flash2' runs on sm80 or newer" in w for w in e.warnings)
    t4 = estimate(_sc("sdpa-flash", "t4-16gb", precision="fp16"), what_fits=False)
    assert not any("sm75" in w for w in t4.warnings)
    assert any("memory-efficient kernel instead" in n for n in t4.notes)
    assert not any("sm" in w for w in estimate(_sc("flash2", "h100-sxm-80gb"), what_fits=False).warnings)


def test_hfu_counts_the_flops_the_kernels_run():
    """FLOPs are counted as FlopCounterMode counts them (the whole score matrix, backward 2.5x the forward);
    a fused causal kernel runs half of the attention's.  Llama-3.1-8B, 2 x 4096 tokens: the attention's
    counted forward is 4 b s^2 (heads x head_dim) per block, so the executed FLOPs are half of
    (1 + 2.5 [+ 1 recomputed]) x 32 blocks of it fewer; eager attention runs them all.  At 128k tokens
    the counted FLOPs put MFU above what the GPU can do if HFU used them; the executed ones keep it below 1."""
    base = {"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "method": {"kind": "lora"},
            "workload": {"task": "train", "micro_batch": 2, "seq_len": 4096}}
    attn_fwd = 4 * 2 * 4096**2 * 4096 * 32
    for attention, ck, passes in (("sdpa-flash", "none", 3.5), ("sdpa-flash", "full", 4.5), ("eager", "none", 0)):
        e = estimate({**base, "attention": attention, "checkpointing": {"mode": ck}}, what_fits=False)
        assert e.flops.per_step - e.flops.executed_per_step == 0.5 * passes * attn_fwd
        peak = compute.peak_flops(get_device("h100-sxm-80gb"), "bf16")
        assert e.time.hfu == pytest.approx(e.flops.executed_per_step / (e.time.step_s * peak), rel=1e-12)
    long = estimate({**base, "gpu": "a100-sxm-80gb", "method": {"kind": "qlora"}, "loss": "fused",
                     "workload": {"task": "train", "micro_batch": 1, "seq_len": 131072},
                     "checkpointing": {"mode": "offload"}}, what_fits=False)
    assert 0.3 < long.time.hfu < 1 and long.time.hfu < long.time.mfu
    infer = estimate({"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb",
                      "workload": {"task": "infer", "batch": 1, "prompt_len": 4096, "gen_len": 1}}, what_fits=False)
    # the prefill's causal half is skipped; a decode step's single query attends every key
    assert infer.flops.per_step - infer.flops.executed_per_step == 0.5 * 4 * 4096**2 * 4096 * 32
