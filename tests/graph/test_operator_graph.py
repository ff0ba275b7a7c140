"""The operator graph: networkx nodes named like torch module paths, one block template per variant."""

from __future__ import annotations

from simulator import Scenario
from simulator.estimate import cost_table_for
from simulator.graph.ir import basis


def _table(**kw):
    return cost_table_for(Scenario.model_validate({"model": "llama-3.1-8b", "gpu": "h100-sxm-80gb", **kw}))


def test_nodes_are_module_paths_with_params_and_flops():
    g = _table().graph
    q = "model.layers.0.self_attn.q_proj"
    assert q in g
    assert g.nodes[q]["params"] == 4096 * 4096  # q_proj: hidden x (heads * head_dim), no bias
    # forward FLOPs of q_proj per token: 2 * 4096 * 4096 (one multiply-add per weight)
    assert g.nodes[q]["fwd_flops"].at(basis(1, 1)) == 2 * 4096 * 4096
    assert g.has_edge("model.layers.0.self_attn", q)  # containment
    assert "lm_head" in g and "model.embed_tokens" in g


def test_repeated_blocks_are_one_template():
    """32 identical trainable blocks trace as one variant: the graph holds the representative block."""
    ct = _table()
    assert ct.trace is not None
    assert [len(v.layers) for v in ct.trace.variants] == [32]


def test_frozen_first_block_is_its_own_variant():
    """With LoRA the first block's input needs no grad (frozen embeddings), so it saves less: two variants."""
    ct = _table(method={"kind": "lora"})
    sizes = sorted(len(v.layers) for v in ct.trace.variants)
    assert sizes == [1, 31]
    b = basis(1, 2048)
    first, rest = ct.saved_by_layer["model.layers.0"], ct.saved_by_layer["model.layers.1"]
    assert first.at(b) < rest.at(b)


def test_qwen2_moe_shared_expert_parameters_equal_transformers():
    """Routed experts + the always-on shared expert and its sigmoid gate, against the real module."""
    import pytest

    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from simulator import from_hf_config
    from simulator.estimate import count_params

    cfg = Qwen2MoeConfig(hidden_size=64, intermediate_size=160, moe_intermediate_size=48,
                         shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
                         decoder_sparse_step=1, mlp_only_layers=[])
    model = AutoModelForCausalLM.from_config(cfg)
    assert count_params(from_hf_config(cfg.to_dict(), name="tiny-qwen2-moe")) == sum(p.numel() for p in model.parameters())
