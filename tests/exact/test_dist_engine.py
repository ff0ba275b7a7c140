"""The engine's per-rank placement and collectives against real torch.distributed runs (gloo, CPU).

Each case runs the tiny model of ``validate.dist_truth`` under a real strategy and compares the bytes each
rank holds and the bytes each collective moves with what ``simulator.sharding`` / ``simulator.timing`` use.
Where torch differs from the framework the engine models (DTensor TP does not fuse the backward
all-reduces the way Megatron does), the test says so and compares what is common.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from simulator import Scenario  # noqa: E402
from simulator import sharding as sh  # noqa: E402
from simulator.estimate import cost_table_for  # noqa: E402
from validate.dist_truth import TINY_ARCHS, DistCase, measure_distributed_many  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend unavailable")]

MB, SEQ = 2, 16


@functools.cache
def _runs(world: int) -> dict[str, object]:
    names = ["ddp", "fsdp2", "zero1"] + (["tp"] if world == 2 else [])
    truths = measure_distributed_many([DistCase(strategy=n) for n in names], world)
    return dict(zip(names, truths))


def _scenario(par: dict) -> Scenario:
    return Scenario.model_validate(dict(model=TINY_ARCHS["llama"], precision="fp32",
                                        workload={"micro_batch": MB, "seq_len": SEQ}, parallel=par))


def _states(par: dict):
    sc = _scenario(par)
    rp = sh.rank_params(cost_table_for(sc), sc.parallel)
    return rp, sh.model_state_bytes(rp, sc.parallel, "adamw", "foreach", True, "fp32", "fp32", sc.parallel.dp)


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_ranks_hold_everything_and_all_reduce_every_gradient(world):
    t = _runs(world)["ddp"]
    rp, ms = _states({"dp": world})
    for r in range(world):
        assert t.param_bytes[r] == rp.trainable_bytes + rp.frozen_bytes
        assert t.grad_bytes[r] == ms.gradients
        assert t.optimizer_state_bytes[r] == ms.optimizer_states
    # one step all-reduces every fp32 gradient once (the buckets' S add up to the gradient bytes)
    assert sum(c.bytes for c in t.collectives_of("all_reduce")) == rp.trainable_numel * 4
    # the reducer's buckets are a second copy of the gradients, which the engine charges as comm buckets
    assert sum(t.ddp_bucket_bytes) == ms.bucket_bytes


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_shards_params_grads_and_states_evenly(world):
    t = _runs(world)["fsdp2"]
    rp, ms = _states({"dp": world, "fsdp": "full_shard"})
    # every dim-0 of the tiny model divides by 2 and 4: no padding, the shards are exact
    for r in range(world):
        assert t.param_bytes[r] == ms.trainable_weights
        assert t.grad_bytes[r] == ms.gradients
        assert t.optimizer_state_bytes[r] == ms.optimizer_states
    # forward and backward each all-gather every parameter (reshard_after_forward), and the gradients are
    # reduce-scattered once: the S the engine's FSDP time uses
    gathered = sum(c.bytes for c in t.collectives_of("all_gather"))
    scattered = sum(c.bytes for c in t.collectives_of("reduce_scatter"))
    assert gathered == 2 * rp.trainable_numel * 4
    assert scattered == rp.trainable_numel * 4


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_partitions_the_optimizer_states(world):
    t = _runs(world)["zero1"]
    rp, ms = _states({"dp": world, "zero": 1})
    # torch's ZeroRedundancyOptimizer assigns whole parameters greedily, so ranks differ; the engine's even
    # partition (DeepSpeed's flat one) has the same total.  Under fp32 there is no master copy.
    assert sum(t.optimizer_state_bytes) == ms.optimizer_states * world
    assert max(t.optimizer_state_bytes) < 2 * 4 * rp.trainable_numel  # each rank holds a part, not all


def test_tensor_parallel_splits_the_block_matrices_and_replicates_the_norms():
    t = _runs(2)["tp"]
    sc = _scenario({"tp": 2})
    ct = cost_table_for(sc)
    # the DTensor plan splits the block linears (column: q/k/v/gate/up, row: o/down) and leaves the embedding,
    # the head and the norms whole; the engine's block rows say the same (it also splits the vocabulary, which
    # this plan does not, so the embedding and head are compared whole)
    blocks = sum((r.storage_bytes / 2 if r.tp_split else r.storage_bytes) * len(r.layers)
                 for r in ct.param_rows if r.where == "block")
    top = sum(r.storage_bytes for r in ct.param_rows if r.where != "block")
    assert t.param_bytes[0] == t.param_bytes[1] == blocks + top
    # forward: one all-reduce of the b x s x h activations per row-parallel linear (2 per block), as Megatron
    arch = TINY_ARCHS["llama"]
    fwd = t.collectives_of("all_reduce", phase="forward")
    assert len(fwd) == 2 * arch["n_layers"]
    assert {c.bytes for c in fwd} == {MB * SEQ * arch["hidden"] * 4}
