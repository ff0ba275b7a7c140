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
from simulator import timing  # noqa: E402
from simulator.estimate import accumulated_gradient_bytes, cost_table_for  # noqa: E402
from validate.dist_truth import TINY_ARCHS, DistCase, measure_distributed_many  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend unavailable")]

MB, SEQ = 2, 16


# FSDP1 as Lightning Fabric / HF Accelerate drive it: whole blocks as units, LoRA mixing frozen and trainable
# parameters in each, and one micro-batch accumulated under no_sync() before the synced one
FSDP1_LORA = DistCase(strategy="fsdp1", method="lora", knobs={"no_sync_micro_batches": 1})


@functools.cache
def _runs(world: int) -> dict[str, object]:
    names = ["ddp", "fsdp2", "zero1"] + (["tp", "fsdp1-lora"] if world == 2 else [])
    cases = [FSDP1_LORA if n == "fsdp1-lora" else DistCase(strategy=n) for n in names]
    truths = measure_distributed_many(cases, world)
    return dict(zip(names, truths))


def _scenario(par: dict, method: dict | None = None) -> Scenario:
    return Scenario.model_validate(dict(model=TINY_ARCHS["llama"], precision="fp32",
                                        workload={"micro_batch": MB, "seq_len": SEQ}, parallel=par,
                                        **({"method": method} if method else {})))


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


def test_fsdp1_units_mixing_frozen_and_lora_weights_carry_whole_flat_gradients():
    t = _runs(2)["fsdp1-lora"]
    par = {"dp": 2, "fsdp": "full_shard", "fsdp_version": 1, "fsdp1_mixed_units": True, "fsdp_no_sync": True}
    sc = _scenario(par, {"kind": "lora", "r": 4})
    ct = cost_table_for(sc)
    rp = sh.rank_params(ct, sc.parallel)
    ms = sh.model_state_bytes(rp, sc.parallel, "adamw", "foreach", True, "fp32", "fp32", 2)
    # the sharded flat gradients cover every element of each block unit, frozen ones included (the engine's
    # even split of them; the root unit holds nothing trainable and gets no gradient)
    assert ms.gradients > rp.trainable_bytes  # more than the LoRA weights' own gradients
    assert t.flat_grad_bytes == (ms.gradients, ms.gradients)
    # under no_sync() each rank holds the unsharded flat gradients of every block
    acc = accumulated_gradient_bytes(rp, sc.parallel, ct.plan.precision, 2, ms.gradients)
    assert t.accumulated_grad_bytes == (acc, acc) == (2 * ms.gradients, 2 * ms.gradients)
    # one reduce-scatter per block unit and step (none in the no_sync micro-batch), of the whole flat unit
    rank = timing.rank_state(ct, sc.parallel, 0, sc.optimizer)
    scatters = t.collectives_of("reduce_scatter")
    assert len(scatters) == TINY_ARCHS["llama"]["n_layers"]
    assert sum(c.bytes for c in scatters) == rank.trainable_numel * rank.grad_elem_bytes + rank.frozen_grad_bytes


def test_fsdp1_lora_without_mixed_units_keeps_only_adapter_gradients():
    # the same layout with the adapters in units of their own (PEFT's fsdp_auto_wrap_policy): the engine's
    # gradients shrink back to the LoRA weights', and no_sync holds them unsharded
    sc = _scenario({"dp": 2, "fsdp": "full_shard", "fsdp_version": 1, "fsdp_no_sync": True}, {"kind": "lora", "r": 4})
    ct = cost_table_for(sc)
    rp = sh.rank_params(ct, sc.parallel)
    ms = sh.model_state_bytes(rp, sc.parallel, "adamw", "foreach", True, "fp32", "fp32", 2)
    assert ms.gradients == rp.trainable_bytes / 2
    assert accumulated_gradient_bytes(rp, sc.parallel, ct.plan.precision, 2, ms.gradients) == rp.trainable_bytes
