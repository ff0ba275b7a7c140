"""GaLore's optimizer states against galore-torch 1.0 on CPU: bytes equal, each storage once.

galore-torch's projector keeps a slice of ``torch.linalg.svd``'s U or Vh; for an fp32 gradient that slice
is a view, so the whole factor stays alive -- the fp32 and AMP cases below measure it.  GaLoreAdamW8bit
synchronizes CUDA in its step and has no CPU run (its formula is tested in tests/simulator).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("galore_torch")

from simulator import galore as gl  # noqa: E402
from simulator.config import ModelArch, Scenario  # noqa: E402
from simulator.estimate import cost_table_for  # noqa: E402
from simulator.memory import step_counter_bytes  # noqa: E402
from validate.cpu_truth import measure  # noqa: E402

pytestmark = pytest.mark.torch

LLAMA = dict(name="tiny", family="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=160, vocab=128,
             max_position_embeddings=256)
GPT2 = dict(LLAMA, family="gpt2", n_kv_heads=4, position="learned", norm="layernorm", norm_bias=True,
            activation="gelu_tanh", gated_mlp=False, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
            tied_embeddings=False)
OPTIMIZERS = [
    {"name": "galore-adamw", "galore_rank": 8},
    {"name": "galore-adamw", "galore_rank": 100},  # above min(m, n): the SVD keeps min(m, n) directions
    {"name": "galore-adamw", "galore_rank": 8, "galore_proj_type": "full"},
    {"name": "galore-adamw", "galore_rank": 8, "galore_proj_type": "reverse_std"},
    {"name": "galore-adamw", "galore_rank": 8, "galore_proj_type": "left", "galore_targets": ["q_proj", "mlp.down"]},
    {"name": "galore-adamw", "galore_rank": 8, "galore_targets": [r"model\.layers\.1\..*"]},  # a regex: one block
    {"name": "galore-adafactor", "galore_rank": 8},
    {"name": "galore-adafactor", "beta1": False, "galore_rank": 8, "galore_proj_type": "right"},
]


def _scenario(arch: dict, precision: str, opt: dict, method: dict | None = None) -> Scenario:
    return Scenario(model=ModelArch(**arch), precision=precision, attention="sdpa-flash",
                    method=method or {"kind": "full"}, optimizer=opt, workload={"task": "train", "micro_batch": 2, "seq_len": 16})


def _predicted(sc: Scenario) -> float:
    ct = cost_table_for(sc)
    g = sc.optimizer.galore
    states = gl.galore_state_bytes(ct.trainable_groups, gl.projected_groups(ct, g), sc.optimizer.name, g, sc.optimizer.beta1)
    return states + step_counter_bytes(ct.n_trainable_tensors, sc.optimizer.name, on_device_only=False)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: '-'.join(f'{k}={v}' for k, v in o.items()))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-amp"])
def test_galore_state_bytes_equal_galore_torch(opt, precision):
    sc = _scenario(LLAMA, precision, opt)
    assert _predicted(sc) == measure(sc).optimizer_state_bytes


def test_galore_fp32_projector_keeps_the_whole_svd_factor():
    """At rank 8 the fp32 projector of a 160 x 64 weight holds all of Vh (64 x 64 x 4 B), the bf16 one an 8 x 64
    copy; a 32 x 64 (k_proj) weight keeps U's columns instead (32 x 32 fp32, 32 x 8 bf16)."""
    fp32 = measure(_scenario(LLAMA, "fp32", OPTIMIZERS[0])).optimizer_state_bytes_by_key["projector"]
    bf16 = measure(_scenario(LLAMA, "bf16", OPTIMIZERS[0])).optimizer_state_bytes_by_key["projector"]
    # per block: q, o (64 x 64), k, v (32 x 64), gate, up (160 x 64), down (64 x 160); two blocks
    assert fp32 == 2 * 4 * (2 * 64 * 64 + 2 * 32 * 32 + 2 * 64 * 64 + 64 * 64)
    assert bf16 == 2 * 2 * (2 * 8 * 64 + 2 * 32 * 8 + 2 * 8 * 64 + 64 * 8)


def test_galore_skips_gpt2_conv1d():
    """GPT-2's block projections are transformers' Conv1D, not nn.Linear: nothing in the blocks is projected,
    so only the untied lm_head (not matched by attn/mlp) and everything else keep full AdamW states."""
    sc = _scenario(GPT2, "fp32", OPTIMIZERS[0])
    assert gl.projected_groups(cost_table_for(sc), sc.optimizer.galore) == []
    assert _predicted(sc) == measure(sc).optimizer_state_bytes
