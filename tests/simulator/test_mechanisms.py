"""Memory mechanisms beyond the CPU-exact set, each checked against its derivation."""

from __future__ import annotations

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
    3 x T x 3072 x 2 B less per block, 12 blocks (gpt2 is MHA, so no GQA expansion applies)."""
    base = {"model": "gpt2", "precision": "bf16", "attention": "sdpa-flash",
            "workload": {"task": "train", "micro_batch": B, "seq_len": S}}
    hf = cost_table_for(Scenario.model_validate(base))
    lit = cost_table_for(Scenario.model_validate({**base, "implementation": "litgpt"}))
    assert _saved(hf) - _saved(lit) == 12 * 3 * T * 3072 * 2


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
    # older transformers: logits.float() and a shifted .contiguous() fp32 copy on top
    fwd, bwd = loss_transient_bytes("upcast-shift", n, "bf16", "fp32", True)
    assert (fwd, bwd) == (n * 2 + n * 4 + n * 4, 2 * 4 * n)


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
