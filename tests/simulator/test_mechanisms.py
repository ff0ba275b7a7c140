"""Memory mechanisms beyond the CPU-exact set, each checked against its derivation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hwprofiles import get_device
from simulator import Scenario
from simulator.estimate import cost_table_for
from simulator.graph.ir import basis

B, S = 2, 1024
T = B * S  # tokens per micro-batch


def _table(**kw):
    base = {"model": "llama-3.1-8b", "precision": "bf16", "attention": "sdpa-flash",
            "workload": {"task": "train", "micro_batch": B, "seq_len": S}}
    return cost_table_for(Scenario.model_validate({**base, **kw}))


def _saved(ct, layer: str | None = None) -> float:
    poly = ct.saved if layer is None else ct.saved_by_layer[layer]
    return poly.at(basis(B, S))


def test_padded_batches_expand_gqa_keys_and_values():
    """A padding mask turns off SDPA's enable_gqa: repeat_kv copies K and V from 8 to 32 heads.
    Llama-3.1-8B, full fine-tuning: the kernel saves the two 32-head copies instead of the 8-head
    post-RoPE K and V (which nothing else saves): per block 2 x T x (32 - 8) x 128 x 2 B more."""
    plain, padded = _table(), _table(padded_batches=True)
    per_block = 2 * T * (32 - 8) * 128 * 2
    assert _saved(padded) - _saved(plain) == 32 * per_block


def test_litgpt_gelu_saves_one_tensor_instead_of_four():
    """GPT-2's HF NewGELU (Python) saves x, tanh(.), 0.5x and 1+tanh(.); F.gelu saves x only:
    3 x T x 3072 x 2 B less per block (gpt2 is MHA, so no GQA expansion applies).  litgpt copies the
    attention output before ``proj`` (its q is contiguous, and SDPA's output follows q's layout), which the
    trainable ``proj`` saves: T x 768 x 2 B more."""
    base = {"model": "gpt2", "precision": "bf16", "attention": "sdpa-flash",
            "workload": {"task": "train", "micro_batch": B, "seq_len": S}}
    hf = cost_table_for(Scenario.model_validate(base))
    lit = cost_table_for(Scenario.model_validate({**base, "implementation": "litgpt"}))
    for i in (1, 11):
        layer = f"transformer.h.{i}"
        assert _saved(hf, layer) - _saved(lit, layer) == 3 * T * 3072 * 2 - T * 768 * 2


def test_legacy_bitsandbytes_keeps_the_4bit_matmul_inputs():
    """bitsandbytes < 0.43.2 kept A in MatMul4Bit. In a block whose input needs grad (layer 1), QLoRA on
    q, v saves in addition: the normed input of q/k/v (one storage, T x 4096 x 2 B; the LoRA branch keeps
    its own fp32 copy), the normed input of gate/up (T x 4096 x 2 B) and down_proj's input (T x 14336 x 2 B);
    o_proj's input is the SDPA output, already saved by the kernel."""
    new = _table(method={"kind": "qlora", "targets": ["q_proj", "v_proj"]})
    old = _table(method={"kind": "qlora", "targets": ["q_proj", "v_proj"], "bnb_keeps_input": True})
    extra = T * 4096 * 2 + T * 4096 * 2 + T * 14336 * 2
    assert _saved(old, "model.layers.1") - _saved(new, "model.layers.1") == extra


def _estimate(**kw):
    from simulator import estimate

    base = {"model": "llama-3.1-8b", "precision": "bf16", "attention": "sdpa-flash",
            "workload": {"task": "train", "micro_batch": B, "seq_len": S}}
    return estimate({**base, **kw}, what_fits=False)


def test_optimizer_in_backward_holds_one_gradient():
    """Stepping each parameter in its grad hook: at most the largest gradient exists, here the untied
    lm_head / embedding (128256 x 4096 bf16), and the step's temporaries are one parameter's, not the
    foreach copy of all 8,030,261,248 bf16 parameters: the optimizer phase drops by 2 x (all - largest)."""
    e = _estimate(optimizer={"name": "adamw", "in_backward": True})
    largest, everything = 128256 * 4096 * 2, 8_030_261_248 * 2
    assert e.memory_bytes.gradients == largest
    full = _estimate()
    assert full.phase_allocated_bytes["optimizer"] - e.phase_allocated_bytes["optimizer"] == 2 * (everything - largest)


def test_chunked_loss_transients():
    """torchtune/litgpt: the bf16 logits exist whole, their fp32 copy and the two fp32 grads one chunk
    (of 8) at a time; HF's upcast holds the whole fp32 copy and two whole fp32 grads."""
    from simulator.memory import loss_transient_bytes

    n = T * 128256
    fwd, bwd = loss_transient_bytes("chunked", n, "bf16", "fp32", True)
    assert (fwd, bwd) == (n * 2 + n * 4 / 8, 2 * 4 * n / 8)
    fwd, bwd = loss_transient_bytes("upcast", n, "bf16", "fp32", True)
    assert (fwd, bwd) == (n * 2 + n * 4, 2 * 4 * n)
    # older transformers: ``logits = logits.float()`` drops the bf16 logits, then a shifted .contiguous() fp32 copy
    fwd, bwd = loss_transient_bytes("upcast-shift", n, "bf16", "fp32", True, "fp32")
    assert (fwd, bwd) == (n * 4 + n * 4, 2 * 4 * n)
    # Qwen v1: the bf16 logits and their shifted bf16 copy both live when autocast's cross_entropy upcasts
    fwd, bwd = loss_transient_bytes("upcast-shift", n, "bf16", "fp32", True, "bf16")
    assert (fwd, bwd) == (n * 2 + n * 2 + n * 4, 2 * 4 * n)


def test_sliding_window_caps_the_kv_cache():
    """Mistral-7B v0.1 slides every layer over 4096 tokens: 32 layers x 8 kv heads x 128 x 2 (K, V) x 2 B
    x 4096 tokens, whatever the context.  Gemma-2-9B alternates: 21 of its 42 layers keep the whole
    context, 21 keep 4096 (8 kv heads x 256 head dim)."""
    from simulator import estimate

    def kv(model: str, ctx: int) -> float:
        e = estimate({"model": model, "workload": {"task": "infer", "batch": 1, "prompt_len": ctx, "gen_len": 0}},
                     what_fits=False)
        return e.memory_bytes.kv_cache

    assert kv("mistral-7b", 16384) == 32 * 8 * 128 * 2 * 2 * 4096
    assert kv("gemma-2-9b", 16384) == 8 * 256 * 2 * 2 * (21 * 16384 + 21 * 4096)
    assert kv("llama-3.1-8b", 16384) == 32 * 8 * 128 * 2 * 2 * 16384


def test_offloaded_checkpoints_leave_no_block_inputs_on_the_gpu():
    """Checkpointing with offload keeps the 32 block inputs (T x 4096 x 2 B each, bf16) in host memory;
    the shared RoPE tables and position ids stay; one block input returns for its recompute."""
    full = _table(checkpointing={"mode": "full"})
    off = _table(checkpointing={"mode": "offload"})
    assert _saved(full) - _saved(off) == 32 * T * 4096 * 2


def test_encoder_decoder_decode_step_runs_the_decoder_only():
    """A generated token runs the decoder stack (the encoder output is computed once, at prefill): the
    decode time per token of T0pp (24 + 24 blocks) equals that of the same model with a 2-block encoder,
    while the prefill, which runs the encoder, grows with it."""
    from simulator import estimate, get_model

    t0pp = get_model("t0pp")
    small_enc = t0pp.model_copy(update={"n_layers": 2, "n_decoder_layers": 24})
    work = {"task": "infer", "batch": 1, "prompt_len": 8, "gen_len": 12}
    full, small = (estimate(Scenario.model_validate({"model": m, "gpu": "a100-sxm-80gb", "precision": "bf16",
                                                     "attention": "eager", "workload": work}))
                   for m in (t0pp, small_enc))
    assert full.time.decode_per_token_s == small.time.decode_per_token_s
    assert full.time.prefill_s > small.time.prefill_s


def test_fused_dequant_kernels_read_the_packed_weights_at_small_batches():
    from hwprofiles import get_device
    from simulator import compute

    assert compute.fused_dequant("nf4", 1) and not compute.fused_dequant("nf4", 2)  # bitsandbytes gemv_4bit
    assert compute.fused_dequant("gptq", 50) and not compute.fused_dequant("gptq", 51)
    assert compute.fused_dequant("awq", 1024) and not compute.fused_dequant("awq", 1025)
    assert not compute.fused_dequant("int8", 1) and not compute.fused_dequant("none", 1)
    sc = Scenario.model_validate(dict(model="llama-3.1-8b", inference={"weights": "nf4"},
                                      workload={"task": "infer", "batch": 1, "prompt_len": 512, "gen_len": 64}))
    ct = cost_table_for(sc)
    block = next(p for p in compute.op_arrays(ct) if p.where == "block")
    rows = [r for r in ct.param_rows if r.quantized and r.layers == block.layers]
    assert len(rows) == 7
    dev = get_device("h100-sxm-80gb")
    B = basis(1, 1, 512)
    plain = compute.part_time(block, B, dev, "bf16", 1, 1, False, True, False)
    fused = compute.part_time(block, B, dev, "bf16", 1, 1, False, True, True)
    # unfused, each linear dequantizes (packed read + 16-bit write) and its GEMM reads the 16-bit copy; fused,
    # the GEMV reads the packed weight once: one decode step of a block moves this much less
    moved_less = sum((r.storage_bytes + 2 * r.numel) + (2 * r.numel - r.storage_bytes) for r in rows)
    # (a little less: the smallest fused GEMVs reach the GEMM efficiency curve's floor for tiny calls)
    gain = plain.forward_s - fused.forward_s
    assert 0.97 * compute.memory_time_s(moved_less, dev) < gain <= compute.memory_time_s(moved_less, dev)
    # and issues no dequantize kernels
    assert plain.host_forward_s - fused.host_forward_s == pytest.approx(7 * compute.EAGER_OP_OVERHEAD_S)


def test_bitsandbytes_linears_add_their_wrapper_host_time():
    from simulator import compute

    base = dict(model="llama-3.1-8b", workload={"task": "infer", "batch": 1, "prompt_len": 16, "gen_len": 16})
    parts = {w: next(p for p in compute.op_arrays(cost_table_for(Scenario.model_validate(
        {**base, "inference": {"weights": w}}))) if p.where == "block") for w in ("nf4", "awq")}
    assert parts["nf4"].n_bnb_calls == 7 and parts["awq"].n_bnb_calls == 0
    assert parts["nf4"].host_forward_s == pytest.approx(
        parts["nf4"].n_kernels * compute.EAGER_OP_OVERHEAD_S + 7 * compute.BNB_CALL_HOST_S)


def test_qwen_remote_code_shifts_the_16_bit_logits_and_upcasts_only_under_autocast():
    """Qwen (v1) ``modeling_qwen.py``: ``shift_logits = lm_logits[..., :-1, :].contiguous()`` then
    ``CrossEntropyLoss()`` -- no ``.float()``.  Under torch.autocast cross_entropy upcasts the shifted copy:
    bf16 logits + bf16 shift + fp32 copy in forward, fp32 grads in backward.  In DeepSpeed's bf16 engine (no
    autocast) everything stays bf16.  HF Llama before 4.46 upcasts first and shifts the fp32 copy."""
    from simulator.memory import loss_transient_bytes

    w = {"task": "train", "micro_batch": 1, "seq_len": 2048}
    amp = cost_table_for(Scenario.model_validate({"model": "qwen-1.8b", "precision": "bf16-amp", "workload": w}))
    pure = cost_table_for(Scenario.model_validate({"model": "qwen-1.8b", "precision": "bf16", "workload": w}))
    llama = cost_table_for(Scenario.model_validate({"model": "llama-3.2-1b", "precision": "bf16-amp", "workload": w}))
    assert (amp.loss_dtype, amp.loss_shift_dtype, amp.loss_upcast_copy) == ("fp32", "bf16", True)
    assert (pure.loss_dtype, pure.loss_shift_dtype, pure.loss_upcast_copy) == ("bf16", "bf16", False)
    assert (llama.loss_dtype, llama.loss_shift_dtype) == ("fp32", "fp32")
    n = 2048 * 151936

    def tr(ct):
        return loss_transient_bytes("upcast-shift", n, ct.logits_dtype, ct.loss_dtype, ct.loss_upcast_copy,
                                    ct.loss_shift_dtype)
    assert tr(amp) == (n * (2 + 4 + 2), 2 * 4 * n)
    assert tr(pure) == (n * (2 + 2), 2 * 2 * n)
    # the saved log-softmax output follows the loss dtype: 4 B per logit under autocast, 2 B without; AMP also
    # saves autocast's bf16 copy of the fp32 head weight (151936 x 2048) for the head's backward, and the final
    # RMSNorm reads the fp32 residual stream (2 B more per hidden element); nll_loss's 0-dim total_weight: 4 B vs 2
    assert amp.post_saved.at(basis(1, 2048)) - pure.post_saved.at(basis(1, 2048)) == \
        2 * n + 151936 * 2048 * 2 + 2048 * 2048 * 2 + 2


def test_flash_attention_runs_at_its_benchmarked_rate_for_the_sequence_length():
    """The fused kernel's throughput grows with the length of each sequence (FlashAttention-2 benchmark,
    H100 SXM5, causal, head dim 128: 221 TFLOPs/s at 1k tokens, 328 at 16k).  A block's attention time
    follows it; every other operator does not care; and context-parallel ranks run the kernel on their
    chunk of the sequence, so 32k tokens over 4 ranks take the 8k rate."""
    import numpy as np

    from hwprofiles import get_device
    from simulator import compute

    dev = get_device("h100-sxm-80gb")
    peak = dev.peak_flops("bf16")
    assert dev.efficiency.attention_fraction_at(1024) * peak == pytest.approx(221e12, rel=0.005)
    assert dev.efficiency.attention_fraction_at(16384) * peak == pytest.approx(328e12, rel=0.005)
    assert dev.efficiency.attention_fraction_at(1 << 20) == dev.efficiency.attention_fraction  # clamped
    a100 = get_device("a100-sxm-80gb")  # the same benchmark on A100 80GB SXM4: 155 at 2k, 189 at 16k
    assert a100.efficiency.attention_fraction_at(2048) * a100.peak_flops("bf16") == pytest.approx(155e12, rel=0.005)
    assert a100.efficiency.attention_fraction_at(16384) * a100.peak_flops("bf16") == pytest.approx(189e12, rel=0.005)
    assert dev.efficiency.attention_fraction_at(np.array([1024.0, 16384.0])) == pytest.approx(
        [221e12 / peak, 328e12 / peak], rel=0.005)

    block = next(p for p in compute.op_arrays(_table()) if p.where == "block")
    attn = [op for op in block.ops if op.attention]
    assert len(attn) == 1

    def attention_s(b, s, cp=1):
        t = compute.part_time(block, basis(b, s), dev, "bf16", 1, cp, True, True)
        return t.attention_s, t.forward_s - t.attention_s

    # same tokens, 16x longer sequences: 16x the attention FLOPs at 328/221 the rate; the rest unchanged
    (a_short, rest_short), (a_long, rest_long) = attention_s(16, 1024), attention_s(1, 16384)
    assert a_long / a_short == pytest.approx(16 * 221 / 328, rel=0.01)
    assert rest_long == pytest.approx(rest_short, rel=1e-9)
    # context parallel: each of 4 ranks a quarter of the FLOPs, at the rate of 8k-token calls
    a_cp, _ = attention_s(1, 32768, cp=4)
    f = sum(sum(c * v for c, v in zip(op.fwd_flops, basis(1, 32768))) for op in attn) / 4
    assert a_cp == pytest.approx(0.5 * f / (peak * dev.efficiency.attention_fraction_at(8192)), rel=1e-9)


def test_gptq_training_dequantizes_with_pytorch_ops_and_keeps_the_fp16_weight():
    """AutoGPTQ's QuantLinear in training (no ExLlama: it has no backward) dequantizes each call of >= 128 rows
    with PyTorch ops -- int32 shift, int8 cast, and, minus zeros, times scales: 16 B of traffic and five
    kernels per weight matrix, after four unpacking the zero points, instead of bitsandbytes' one 2.5 B kernel,
    at about half the streaming rate (fitted on Qwen's Q-LoRA step times) -- with the int32 expansion and its int8
    cast live together (5 B per weight), and torch.matmul saves the fp16 weight for the input's gradient, so
    the backward does not dequantize again.  Inference keeps the one-kernel dequantization."""
    from simulator import compute

    def scen(task_kw, **kw):
        return Scenario.model_validate({"model": "llama-3.1-8b", **task_kw, **kw})

    train = {"method": {"kind": "qlora", "quant": "gptq", "r": 8, "targets": ["q_proj"]}, "precision": "fp16-amp",
             "workload": {"task": "train", "micro_batch": B, "seq_len": S}}
    nf4 = {**train, "method": {"kind": "qlora", "quant": "nf4", "r": 8, "targets": ["q_proj"]},
           "precision": "bf16-amp"}
    gptq_ct, nf4_ct = cost_table_for(scen(train)), cost_table_for(scen(nf4))
    mlp_n = 4096 * 14336  # the largest quantized matrix of a Llama-3.1-8B block
    assert gptq_ct.max_dequant_bytes == 5.0 * mlp_n and nf4_ct.max_dequant_bytes == 2.0 * mlp_n
    # the saved set of a block grows by every quantized matrix's fp16 copy whose input needs a gradient: all
    # 7 matrices (218.1M weights) from the second block on; in the first, q/k/v read the frozen embeddings'
    # output, so torch.matmul keeps nothing for them
    qkv_n = 4096 * 4096 + 2 * 4096 * 1024
    block_n = qkv_n + 4096 * 4096 + 3 * mlp_n
    assert _saved(gptq_ct, "model.layers.1") - _saved(nf4_ct, "model.layers.1") == pytest.approx(2.0 * block_n)
    assert _saved(gptq_ct, "model.layers.0") - _saved(nf4_ct, "model.layers.0") == pytest.approx(
        2.0 * (block_n - qkv_n))
    g = next(p for p in compute.op_arrays(gptq_ct) if p.where == "block")
    n = next(p for p in compute.op_arrays(nf4_ct) if p.where == "block")
    storage = sum(r.storage_bytes for r in gptq_ct.param_rows if r.quantized and r.layers == g.layers)
    assert g.dequant_bytes == pytest.approx(storage + 16.0 * block_n)
    assert (g.n_dequant_kernels, n.n_dequant_kernels) == (63, 7) and not g.dequant_in_backward
    assert g.torch_dequant and not n.torch_dequant
    # the dequantization's time: its bytes at the engine's share of the streaming rate, or the device's own
    # calibrated one
    dev = get_device("a100-sxm-80gb")
    assert dev.efficiency.gptq_torch_dequant_fraction is None
    fwd = compute.part_time(g, basis(B, S), dev, "fp16", 1, 1, False).forward_s
    streaming = compute.part_time(replace(g, torch_dequant=False), basis(B, S), dev, "fp16", 1, 1, False).forward_s
    extra = compute.memory_time_s(g.dequant_bytes, dev) * (1 / compute.GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION - 1)
    assert fwd - streaming == pytest.approx(extra, rel=1e-9)
    calibrated = dev.model_copy(update={"efficiency": dev.efficiency.model_copy(
        update={"gptq_torch_dequant_fraction": 0.8})})
    fwd_cal = compute.part_time(g, basis(B, S), calibrated, "fp16", 1, 1, False).forward_s
    assert fwd_cal - streaming == pytest.approx(compute.memory_time_s(g.dequant_bytes, dev) * (1 / 0.8 - 1), rel=1e-9)
    # the planner's arrays over several devices take each device's figure
    many = compute.Devices([dev, calibrated])
    both = compute.part_time(g, basis(B, S), many, "fp16", 1, 1, False).forward_s
    assert both.ravel().tolist() == pytest.approx([fwd, fwd_cal], rel=1e-12)
    assert g.elementwise_bytes == n.elementwise_bytes  # the fp16 copies are the dequantization's, not eager ops'
    infer = scen({"inference": {"weights": "gptq"}},
                 workload={"task": "infer", "batch": 8, "prompt_len": 512, "gen_len": 16})
    assert cost_table_for(infer).max_dequant_bytes == 2.0 * mlp_n
    assert next(p for p in compute.op_arrays(cost_table_for(infer)) if p.where == "block").dequant_in_backward


def test_torch_2_0_foreach_adamw_holds_two_temporaries():
    """torch <= 2.0's ``_multi_tensor_adamw`` builds ``denom = _foreach_add(exp_avg_sq_sqrt, eps)`` out of
    place, so both param-sized lists are alive at the update: full fine-tuning of Llama-3.1-8B in pure
    bf16 steps with one more bf16 copy of all 8,030,261,248 parameters than torch >= 2.1's in-place form."""
    new = _estimate(optimizer={"name": "adamw", "impl": "foreach"})
    old = _estimate(optimizer={"name": "adamw", "impl": "foreach-torch2.0"})
    one_copy = 8_030_261_248 * 2
    assert old.phase_allocated_bytes["optimizer"] - new.phase_allocated_bytes["optimizer"] == one_copy
    assert old.phase_allocated_bytes["forward"] == new.phase_allocated_bytes["forward"]
    # optimizers that do not compute a denominator keep their own transient
    sgd_new = _estimate(optimizer={"name": "sgd-momentum", "impl": "foreach"})
    sgd_old = _estimate(optimizer={"name": "sgd-momentum", "impl": "foreach-torch2.0"})
    assert sgd_old.phase_allocated_bytes == sgd_new.phase_allocated_bytes


def test_autocast_caches_the_adapter_copies_of_checkpointed_blocks_through_the_forward():
    """Under bf16 autocast, LoRA's fp32 A and B are leaves that require grad, so ``cached_cast`` keeps
    their bf16 copies until the forward's autocast region exits, although a checkpointed block saves
    nothing of its own. Llama-3.1-8B, r=8 on q_proj and v_proj: per block A_q 8x4096, B_q 4096x8,
    A_v 8x4096, B_v 1024x8 -> 2 B x 106,496 x 32 blocks on top of the forward; backward unchanged."""
    lora = {"kind": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}
    kw = {"precision": "bf16-amp", "method": lora}
    ct = _table(checkpointing={"mode": "full"}, **kw)
    per_block = 2 * (8 * 4096 + 4096 * 8 + 8 * 4096 + 1024 * 8)
    assert ct.checkpoint_cast_cache[-1][1] == per_block
    assert sum(nb * len(ls) for ls, nb in ct.checkpoint_cast_cache) == 32 * per_block == 2 * ct.n_trainable
    # without checkpointing the copies are saved by the matmuls instead: no separate cache term
    assert _table(**kw).checkpoint_cast_cache == ()
    # pure bf16 adapters need no cast
    assert _table(checkpointing={"mode": "full"}, method=lora).checkpoint_cast_cache == ()


def test_autocast_cache_adds_to_the_forward_phase_only():
    from simulator.estimate import micro_bytes

    lora = {"kind": "lora", "r": 8, "targets": ["q_proj", "v_proj"]}
    sc = Scenario.model_validate({"model": "llama-3.1-8b", "precision": "bf16-amp", "attention": "sdpa-flash",
                                  "checkpointing": {"mode": "full"}, "method": lora,
                                  "workload": {"task": "train", "micro_batch": B, "seq_len": S}})
    ct = cost_table_for(sc)
    mb = micro_bytes(ct, sc.parallel, basis(B, S), 0, sc.loss)
    assert mb.cast_cache == 2 * ct.n_trainable
    zero3 = sc.parallel.model_copy(update={"dp": 2, "zero": 3})
    assert micro_bytes(ct, zero3, basis(B, S), 0, sc.loss).cast_cache == 0.0  # gathered shards: not resident leaves
    zero2 = sc.parallel.model_copy(update={"dp": 2, "zero": 2})
    assert micro_bytes(ct, zero2, basis(B, S), 0, sc.loss).cast_cache == 0.0  # DeepSpeed's module is 16-bit
    from dataclasses import replace

    from simulator.estimate import rank_bytes, train_phase_bytes

    rb, _ = rank_bytes(ct, sc.parallel, sc.optimizer, 0, 1)
    with_cache, _, _ = train_phase_bytes(rb, mb, 1, 1, 0.0)
    without, _, _ = train_phase_bytes(rb, replace(mb, cast_cache=0.0), 1, 1, 0.0)
    assert with_cache["forward"] - without["forward"] == 2 * ct.n_trainable
    assert with_cache["backward"] == without["backward"] and with_cache["optimizer"] == without["optimizer"]


def test_t5_wo_stays_out_of_bitsandbytes_and_fp32_under_fp16():
    """T5's ``wo`` is one of ``_keep_in_fp32_modules``: bitsandbytes leaves it unquantized, and a model loaded in
    fp16 keeps it fp32 (transformers' dtype plan) -- for flan-t5-xl that is 48 x 2048 x 5120 weights."""
    from simulator.estimate import plan_of
    from simulator.graph.build import trace_model

    def wo_params(**kw):
        sc = Scenario.model_validate({"model": "flan-t5-xl", "workload": {"micro_batch": 1, "seq_len": 512}, **kw})
        mt = trace_model(sc.model, plan_of(sc), sc.loss)
        ps = [p for tr in (mt.pre, *(v.trace for v in mt.variants), mt.post) for p in tr.params]
        return {(p.storage, p.dtype) for p in ps if p.path.endswith(".wo.weight")}, {
            p.storage for p in ps if p.path.endswith(".wi_0.weight")}

    assert wo_params(method={"kind": "qlora"}, precision="bf16") == ({("dense", "bf16")}, {"nf4"})
    assert wo_params(method={"kind": "qlora", "compute_dtype": "fp16"}, precision="fp16") == ({("dense", "fp32")}, {"nf4"})
    assert wo_params(method={"kind": "full"}, precision="fp16") == ({("dense", "fp32")}, {"dense"})
    assert wo_params(method={"kind": "full"}, precision="bf16") == ({("dense", "bf16")}, {"dense"})


def test_host_sync_per_block_adds_each_blocks_launches_to_its_kernels():
    """A block whose forward copies a host tensor to the GPU (2022's GPT-J: its rotary tables, per layer) makes
    the host wait there: the block's launches and its kernels add up, where otherwise the host runs ahead and
    only the slower of the two counts.  The embeddings and the head still overlap; the decode step's time is
    the blocks' sums plus the rest's maximum."""
    from simulator import compute, timing

    sc = Scenario.model_validate({"model": "gpt-j-6b", "gpu": "titan-rtx-24gb", "precision": "fp16",
                                  "workload": {"task": "infer", "batch": 1, "prompt_len": 16, "gen_len": 32}})
    ct, dev = cost_table_for(sc), get_device("titan-rtx-24gb")
    B = basis(1, 1, 32)
    parts, counts = compute.op_arrays(ct), timing.part_counts(ct, 1, 0, decode_step=True)
    times = [compute.part_time(p, B, dev, "fp16", 1, 1, False) if n else None for p, n in zip(parts, counts)]
    wheres = tuple(p.where for p in parts)
    kw = dict(times=times, counts=counts, n_blocks=ct.n_blocks, training=False, wheres=wheres)
    plain, synced = timing.combine_parts(**kw), timing.combine_parts(**kw, host_sync=True)
    live = [(p, t, n) for p, t, n in zip(parts, times, counts) if n]
    blocks = sum(n * (t.forward_s + t.host_forward_s) for p, t, n in live if p.where == "block")
    rest_gpu = sum(n * t.forward_s for p, t, n in live if p.where != "block")
    rest_host = sum(n * t.host_forward_s for p, t, n in live if p.where != "block")
    assert synced.forward_s == pytest.approx(blocks + max(rest_gpu, rest_host), rel=1e-12)
    assert plain.forward_s == pytest.approx(max(sum(n * t.forward_s for _, t, n in live),
                                                sum(n * t.host_forward_s for _, t, n in live)), rel=1e-12)
    assert synced.forward_s > plain.forward_s
    # a CUDA graph replays the step with no per-kernel launches: nothing to wait on
    assert timing.combine_parts(**kw, host=False, host_sync=True).forward_s == timing.combine_parts(
        **kw, host=False).forward_s


def test_the_planner_refuses_families_that_sync_per_block():
    from simulator.grid import TrainGrid

    fam = Scenario.model_validate({"model": "gpt-j-6b", "host_sync_per_block": True,
                                   "workload": {"task": "train", "micro_batch": 1, "seq_len": 256}})
    with pytest.raises(ValueError, match="host_sync_per_block"):
        TrainGrid([fam], [1], [1], [get_device("h100-sxm-80gb")])
