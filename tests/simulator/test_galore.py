"""GaLore on full-size models: low-rank optimizer states, the step's transients, layer-wise updates and the rules
that keep it to whole, unsharded weights.  The CPU-exact comparison with galore-torch is tests/exact/test_galore_exact.py."""

from __future__ import annotations

import pytest

from simulator import Scenario, estimate
from simulator import memory as mem
from simulator.estimate import cost_table_for, rank_bytes

LLAMA7 = dict(model="llama-7b", gpu="rtx-4090-24gb", precision="bf16",
              workload={"task": "train", "micro_batch": 1, "seq_len": 256})
G8 = {"name": "galore-adamw-8bit", "galore_rank": 1024}


def _rank(sc: Scenario):
    return rank_bytes(cost_table_for(sc), sc.parallel, sc.optimizer, 0, 1)


def test_8bit_galore_states_of_llama_7b_by_hand():
    """Rank 1024, bf16 weights.  A 4096 x 4096 weight keeps two 8-bit 4096 x 1024 states (one byte each plus an fp32
    absmax per 256) and a bf16 1024 x 4096 projector; gate/up (11008 x 4096) keep 11008 x 1024 states, down
    (4096 x 11008) 1024 x 11008 ones, each with a 1024 x 4096 projector; embeddings, lm_head and norms keep
    bitsandbytes' full 8-bit states; one pair of quantization maps."""
    def eight_bit(n):
        return 2 * (n + n // 256 * 4)
    attn = eight_bit(4096 * 1024) + 1024 * 4096 * 2
    mlp = eight_bit(11008 * 1024) + 1024 * 4096 * 2
    rest = 2 * eight_bit(32000 * 4096) + 65 * eight_bit(4096)
    expected = 32 * (4 * attn + 3 * mlp) + rest + 2 * 256 * 4
    sc = Scenario.model_validate({**LLAMA7, "optimizer": G8})
    assert _rank(sc)[1].optimizer_states == expected
    assert mem.galore_matrix_state_bytes((4096, 4096), "bf16", "adamw-8bit", 1024, "std") == attn


def test_fp32_galore_projector_keeps_the_whole_svd_factor():
    """Under AMP the gradient is fp32, so the projector is a view of the SVD's Vh (or U): min(m, n)^2 fp32 values
    whatever the rank (galore-torch's get_orthogonal_matrix; measured on CPU in tests/exact)."""
    assert mem.galore_projector_bytes((11008, 4096), 128, "std", "fp32", "fp32") == 4 * 4096 * 4096
    assert mem.galore_projector_bytes((4096, 11008), 128, "std", "fp32", "fp32") == 4 * 4096 * 4096
    assert mem.galore_projector_bytes((11008, 4096), 128, "std", "bf16", "bf16") == 2 * 128 * 4096


def test_galore_adamw_step_transient_is_its_largest_single_parameter():
    """galore-torch's AdamW is a for-loop.  Llama-7B bf16 at rank 128: the embedding's unprojected update builds
    ``denom`` and ``exp_avg / denom`` (2 x 131,072,000 x 2 B = 524,288,000 B), more than the largest projector
    refresh (gate/up: an fp32 copy of the 11008 x 4096 gradient, U 11008 x 4096, S and Vh 4096 x 4096 in fp32)."""
    sc = Scenario.model_validate({**LLAMA7, "optimizer": {"name": "galore-adamw"}})
    rb, _ = _rank(sc)
    svd = 4 * (11008 * 4096 + 11008 * 4096 + 4096 + 4096 * 4096)
    assert mem.galore_matrix_step_bytes((11008, 4096), "bf16", "adamw", 128, "std") == svd
    assert rb.optimizer_transient == 2 * 32000 * 4096 * 2 > svd


def test_layerwise_galore_holds_one_gradient_and_peaks_in_backward():
    """The GaLore repo's 7B-on-a-24-GB-GPU recipe: 8-bit GaLore with per-layer weight updates."""
    whole = estimate(Scenario.model_validate({**LLAMA7, "optimizer": G8}))
    layer = estimate(Scenario.model_validate({**LLAMA7, "optimizer": {**G8, "in_backward": True}}))
    assert layer.memory_bytes.gradients == 32000 * 4096 * 2  # the embedding's bf16 gradient, the largest tensor
    assert whole.memory_bytes.gradients == 6_738_415_616 * 2
    assert layer.peak_phase == "backward" and whole.peak_phase == "optimizer"
    assert layer.fits and not whole.fits


def test_galore_targets_select_modules_like_transformers():
    """A list matches the exact name, a substring or a whole-name regex; here only the MLP of block 3."""
    sc = Scenario.model_validate({**LLAMA7, "optimizer": {"name": "galore-adamw", "galore_rank": 64,
                                                          "galore_targets": [r"model\.layers\.3\.mlp\..*"]}})
    from simulator import galore as gl
    proj = gl.projected_groups(cost_table_for(sc), sc.optimizer.galore)
    assert sorted((s, c) for _, _, s, c in proj) == [((4096, 11008), 1), ((11008, 4096), 2)]


@pytest.mark.parametrize("update,needle", [
    ({"method": {"kind": "lora"}}, "method.kind must be full or freeze"),
    ({"parallel": {"dp": 2, "zero": 2}, "gpu": "h100-sxm-80gb"}, "parallel.zero=2"),
    ({"parallel": {"dp": 2}, "gpu": "h100-sxm-80gb", "optimizer": {**G8, "in_backward": True}}, "parallel.dp=2"),
])
def test_galore_bad_setups_name_the_field(update, needle):
    data = {**LLAMA7, "optimizer": G8, **update}
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        Scenario.model_validate(data)


def test_galore_step_moves_seven_weight_sized_accesses():
    """Read the gradient, write the projected-back update, scale it (read + write), add it to the weight (read
    both, write): 7 x 2 B per bf16 parameter, the low-rank states being r / max(m, n) of that."""
    from simulator import compute as cp_
    from hwprofiles import get_device

    sc = Scenario.model_validate({**LLAMA7, "optimizer": {"name": "galore-adamw"}})
    e = estimate(sc)
    assert e.time.optimizer_s == pytest.approx(cp_.memory_time_s(6_738_415_616 * 7 * 2, get_device("rtx-4090-24gb")))


def test_qdora_norm_rebuilds_the_dequantized_base_weight():
    """DoRA's weight norm of W + s*BA: one out x in temporary in the adapter input's dtype (fp32 adapters); on a 4-bit
    base PEFT first dequantizes W (bf16) and casts it to that dtype (fp32), so the largest one -- gate/up,
    14336 x 4096 on Llama-3.1-8B -- doubles."""
    base = dict(model="llama-3.1-8b", gpu="a100-sxm-80gb", precision="bf16",
                workload={"task": "train", "micro_batch": 1, "seq_len": 256})
    dora = cost_table_for(Scenario.model_validate({**base, "method": {"kind": "dora", "targets": "all-linear"}}))
    qdora = cost_table_for(Scenario.model_validate(
        {**base, "method": {"kind": "qlora", "targets": "all-linear", "use_dora": True}}))
    assert dora.max_dequant_bytes == 14336 * 4096 * 4
    assert qdora.max_dequant_bytes == 2 * 14336 * 4096 * 4
