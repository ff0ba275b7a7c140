"""torchtitan's per-op selective activation checkpointing on a catalog model, checked against the policy worked
out by hand: a Llama block runs seven mm in forward order (q, k, v, o, gate, up, down), so the policy keeps the
1st, 3rd, 5th and 7th products (q, v, gate, down), the flash kernel's output and fp32 logsumexp, and the block
input; the backward reruns the k, o and up projections and every elementwise op.  The exact CPU comparison with
torch's own SAC cache is in ``tests/exact/test_cpu_exact.py``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from simulator import Scenario, estimate
from simulator.estimate import cost_table_for
from simulator.graph.ir import basis

B, S = 2, 1024
T = B * S
BASE = {"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", "precision": "bf16", "method": {"kind": "full"},
        "workload": {"micro_batch": B, "seq_len": S}}
D, KV, FFN, HEADS = 4096, 1024, 14336, 32  # Llama 3.1 8B: hidden, GQA k/v width, MLP width, query heads


def _table(mode: str, **kw):
    sc = Scenario.model_validate({**BASE, "checkpointing": {"mode": mode}, **kw})
    return cost_table_for(sc), basis(B, S)


def test_a_block_keeps_its_input_every_other_product_and_the_attention_output():
    ct, bas = _table("selective")
    kept_per_token = 2 * (D + D + KV + FFN + D) + 2 * D + 4 * HEADS  # input, q, v, gate, down; attn out; lse
    assert ct.at(ct.saved_by_layer["model.layers.5"], bas) == T * kept_per_token
    full, _ = _table("full")
    assert ct.at(full.saved_by_layer["model.layers.5"], bas) == T * 2 * D  # full keeps the input alone


def test_the_backward_reruns_only_the_products_it_did_not_keep():
    ct, bas = _table("selective")
    per_block = 2 * T * (D * KV + D * D + D * FFN)  # k_proj, o_proj, up_proj forwards
    assert ct.at(ct.recompute_flops, bas) == 32 * per_block
    full, _ = _table("full")
    # full checkpointing reruns the whole forward up to the last saved tensor (its early stop spares down_proj)
    assert ct.at(ct.recompute_flops, bas) < full.at(full.recompute_flops, bas)


def test_float8_linears_are_kept_whatever_the_count():
    ct, bas = _table("selective", precision="fp8")
    kept_per_token = 2 * (D + D + KV + KV + D + FFN + FFN + D) + 2 * D + 4 * HEADS  # every product kept
    assert ct.at(ct.saved_by_layer["model.layers.5"], bas) == T * kept_per_token
    assert ct.at(ct.recompute_flops, bas) == 0.0  # only elementwise work is rerun


def test_memory_and_time_sit_between_no_and_full_checkpointing():
    runs = {m: estimate({**BASE, "method": {"kind": "lora"}, "checkpointing": {"mode": m}})
            for m in ("none", "selective", "full")}
    acts = {m: e.memory_bytes.activations for m, e in runs.items()}
    assert acts["full"] < acts["selective"] < acts["none"]
    steps = {m: e.time.step_s for m, e in runs.items()}
    assert steps["none"] < steps["selective"] < steps["full"]
    assert 0.0 < runs["selective"].time.recompute_s < runs["full"].time.recompute_s


def test_explicit_attention_is_refused_with_the_allowed_kernels():
    with pytest.raises(ValidationError, match="checkpointing.mode='selective'.*attention='eager'.*sdpa-flash"):
        Scenario.model_validate({**BASE, "attention": "eager", "checkpointing": {"mode": "selective"}})


def test_a_job_without_checkpointing_is_offered_the_selective_policy_first():
    e = estimate({**BASE, "method": {"kind": "lora"}, "workload": {"micro_batch": 3, "seq_len": 4096}})
    assert not e.fits
    first = e.suggestions[0]
    assert first.change.startswith("selective activation checkpointing") and first.fits
    assert e.suggestions[1].change == "activation checkpointing on every block" and e.suggestions[1].fits


def test_a_reentrant_checkpoint_reruns_the_whole_block_and_keeps_the_same_tensors():
    """Early stop ends a non-reentrant rerun at the last saved tensor, the gate and up products: Llama's down_proj
    (2 x tokens x intermediate x hidden per block) reruns only under a reentrant checkpoint."""
    base = {"model": "llama-3.1-8b", "gpu": "a100-sxm-80gb", "method": {"kind": "full"},
            "workload": {"micro_batch": 1, "seq_len": 2048}}
    early = estimate({**base, "checkpointing": {"mode": "full"}}, what_fits=False)
    whole = estimate({**base, "checkpointing": {"mode": "full", "reentrant": True}}, what_fits=False)
    assert whole.flops.recompute - early.flops.recompute == 32 * 2 * 2048 * 14336 * 4096
    assert whole.flops.recompute == pytest.approx(whole.flops.forward - _head_forward_flops(base), rel=1e-12)
    assert whole.memory_bytes.activations == early.memory_bytes.activations
    assert whole.time.recompute_s > early.time.recompute_s


def _head_forward_flops(base: dict) -> float:
    """Forward FLOPs outside the blocks (LM head; embeddings run none): what no checkpoint reruns."""
    return 2 * 2048 * 4096 * 128256


def test_reentrant_selective_checkpointing_is_refused_naming_the_modes():
    with pytest.raises(ValidationError, match="reentrant=True.*'full', 'every_k' or 'offload'"):
        Scenario.model_validate({"model": "llama-3.1-8b", "gpu": "a100-sxm-80gb",
                                 "checkpointing": {"mode": "selective", "reentrant": True}})
