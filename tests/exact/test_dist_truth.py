"""The distributed CPU truth (gloo) is self-consistent: every number derives from the model config.

``validate.dist_truth`` runs DDP, FSDP2, ZeRO-1, TP and TP+SP for real on 2 or 4 CPU processes.  Here
its per-rank bytes and its collectives are checked against the config arithmetic written beside each
assertion (fp32 = 4 B, bf16 = 2 B), so that the engine's per-rank predictions can later be compared with
it integer for integer.  Two process groups are started for the whole file (world 2 and world 4); every
case of a world size runs in the same processes.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch.distributed as dist  # noqa: E402

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from simulator.config import ModelArch  # noqa: E402
from validate.dist_truth import TINY_ARCHS, DistCase, measure_distributed, measure_distributed_many  # noqa: E402

pytestmark = pytest.mark.torch

FP32, BF16 = 4, 2
ARCH = ModelArch(**TINY_ARCHS["llama"])
UNEVEN = ModelArch(**TINY_ARCHS["llama-v130"])
LORA_R = 4
SMALL_BUCKET_MB = 0.05

CASES_2 = {
    "ddp": DistCase("ddp"),
    "ddp-small-buckets": DistCase("ddp", knobs={"bucket_cap_mb": SMALL_BUCKET_MB, "gradient_as_bucket_view": True}),
    "ddp-lora": DistCase("ddp", method="lora"),
    "fsdp2": DistCase("fsdp2", steps=2),
    "fsdp2-keep": DistCase("fsdp2", knobs={"reshard_after_forward": False}),
    "fsdp2-bf16": DistCase("fsdp2", knobs={"param_dtype": "bfloat16", "reduce_dtype": "float32"}),
    "fsdp2-lora": DistCase("fsdp2", method="lora"),
    "zero1": DistCase("zero1"),
    "zero1-bucket-view": DistCase("zero1", knobs={"parameters_as_bucket_view": True}),
    "tp": DistCase("tp"),
    "tp+sp": DistCase("tp+sp"),
}
CASES_4 = {
    "fsdp2-uneven": DistCase("fsdp2", model="llama-v130"),
    "zero1-uneven": DistCase("zero1", model="llama-v130"),
}


@pytest.fixture(scope="module")
def runs():
    out = dict(zip(CASES_2, measure_distributed_many(list(CASES_2.values()), 2)))
    out |= dict(zip(CASES_4, measure_distributed_many(list(CASES_4.values()), 4)))
    return out


# --------------------------------------------------------------------------------------------
# The tiny Llama from its config
# --------------------------------------------------------------------------------------------


def block_shapes(a: ModelArch) -> dict[str, tuple[int, ...]]:
    """One Llama block's parameters in forward order: q (H*d, h), k/v (K*d, h), o (h, H*d), gate/up (I, h),
    down (h, I), two RMSNorm weights (h)."""
    h, q, kv, inter = a.hidden, a.n_heads * a.d_head, a.kv_heads * a.d_head, a.intermediate
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }


def root_shapes(a: ModelArch) -> dict[str, tuple[int, ...]]:
    """Outside the blocks: embedding (V, h), final norm (h), untied head (V, h)."""
    return {"model.embed_tokens.weight": (a.vocab, a.hidden), "model.norm.weight": (a.hidden,),
            "lm_head.weight": (a.vocab, a.hidden)}


def forward_order(a: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every parameter by name, in the order the forward first uses it."""
    out = {"model.embed_tokens.weight": (a.vocab, a.hidden)}
    for i in range(a.n_layers):
        out |= {f"model.layers.{i}.{k}": v for k, v in block_shapes(a).items()}
    out |= {"model.norm.weight": (a.hidden,), "lm_head.weight": (a.vocab, a.hidden)}
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def total_numel(a: ModelArch) -> int:
    return sum(numel(s) for s in forward_order(a).values())


def lora_numel(a: ModelArch) -> int:
    """PEFT's default Llama targets q_proj and v_proj: A (r, h) + B (out, r) each, per block."""
    q, kv = a.n_heads * a.d_head, a.kv_heads * a.d_head
    return LORA_R * ((a.hidden + q) + (a.hidden + kv))


def padded_numel(shape: tuple[int, ...], world: int) -> int:
    """FSDP2 shards dim 0 into world chunks of ceil(dim0 / world) rows, the last ones padded."""
    return world * math.ceil(shape[0] / world) * numel(shape[1:])


def fsdp2_rows(dim0: int, world: int) -> list[int]:
    """torch.chunk's rows per rank: ceil(dim0 / world) each until dim0 runs out."""
    chunk = math.ceil(dim0 / world)
    return [max(0, min(chunk, dim0 - r * chunk)) for r in range(world)]


def activation_bytes(t) -> int:
    """One b x s x h fp32 activation (TP all-reduces, SP all-gathers / reduce-scatters)."""
    return t.micro_batch * t.seq_len * ARCH.hidden * FP32


def sizes(colls) -> list[int]:
    return [c.bytes for c in colls]


# --------------------------------------------------------------------------------------------
# Every strategy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CASES_2, *CASES_4])
def test_ranks_agree_and_steps_are_measured(runs, name):
    t = runs[name]
    world = t.world_size
    assert len(t.param_bytes) == len(t.collectives_by_rank) == world
    assert all(c == t.collectives_by_rank[0] for c in t.collectives_by_rank)  # same calls, same sizes
    assert t.collectives and all(c.group_size == world for c in t.collectives)
    assert {c.step for c in t.collectives} == set(range(t.steps))
    assert all(math.isfinite(x) for x in t.loss)


# --------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------


def test_ddp_replicates_and_all_reduces_every_gradient(runs):
    t, n = runs["ddp"], total_numel(ARCH)
    n_tensors = len(forward_order(ARCH))  # 2 blocks x 9 + embed + norm + head = 21
    assert t.param_numel == (n,) * 2 and t.grad_bytes == (FP32 * n,) * 2
    assert t.optimizer_state_bytes == (2 * FP32 * n,) * 2  # exp_avg + exp_avg_sq
    assert t.optimizer_step_bytes == (FP32 * n_tensors,) * 2  # one 0-dim fp32 step per tensor
    # default caps: a 1 MiB first bucket then 25 MiB; 4 x 90432 B < 1 MiB, so one bucket holds every gradient
    assert FP32 * n < 2**20
    assert sizes(t.collectives_of("all_reduce", phase="backward")) == [FP32 * n]
    assert list(t.ddp_bucket_bytes) == [FP32 * n]
    # the forward re-broadcasts the buffers in one call: the rotary inv_freq and original_inv_freq
    # (transformers keeps both), d_head / 2 fp32 each
    assert sizes(t.collectives_of("broadcast", phase="forward")) == [2 * ARCH.d_head // 2 * FP32]
    assert len(t.collectives) == 2


def test_ddp_buckets_close_at_the_cap_in_gradient_arrival_order(runs):
    t = runs["ddp-small-buckets"]
    cap = int(SMALL_BUCKET_MB * 2**20)  # DDP: int(bucket_cap_mb * 1 MiB); an explicit cap also caps bucket 0
    buckets, current = [], 0
    for shape in reversed(forward_order(ARCH).values()):  # gradients arrive in reverse forward order
        current += FP32 * numel(shape)
        if current >= cap:  # a bucket closes as soon as it reaches the cap
            buckets.append(current)
            current = 0
    if current:
        buckets.append(current)
    assert len(buckets) > 1
    assert sizes(t.collectives_of("all_reduce")) == buckets
    assert list(t.ddp_bucket_bytes) == buckets
    # gradient_as_bucket_view: the .grad tensors are views of the buckets, one storage per bucket
    assert t.grad_storage_bytes == (sum(buckets),) * 2 == (FP32 * total_numel(ARCH),) * 2


def test_ddp_lora_reduces_only_the_adapters(runs):
    t = runs["ddp-lora"]
    trainable = ARCH.n_layers * lora_numel(ARCH)
    assert t.trainable_numel == (trainable,) * 2
    assert t.param_numel == (total_numel(ARCH) + trainable,) * 2
    assert sizes(t.collectives_of("all_reduce")) == [FP32 * trainable]
    assert t.grad_bytes == (FP32 * trainable,) * 2
    assert t.optimizer_state_bytes == (2 * FP32 * trainable,) * 2


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


def groups(a: ModelArch) -> tuple[int, int]:
    """(root group numel, one block's numel): fully_shard on each block, then the root keeps the rest."""
    return sum(numel(s) for s in root_shapes(a).values()), sum(numel(s) for s in block_shapes(a).values())


def test_fsdp2_shards_sum_to_the_model(runs):
    t, world, n = runs["fsdp2"], 2, total_numel(ARCH)
    n_tensors = len(forward_order(ARCH))
    # every dim-0 of the tiny Llama is even: each rank holds exactly half of every parameter
    assert t.param_numel == (n // world,) * world and sum(t.param_numel) == n
    assert t.param_storage_bytes == t.param_bytes == (FP32 * n // world,) * world
    for r in range(world):
        assert t.param_numel_by_name[r] == {k: numel(s) // world for k, s in forward_order(ARCH).items()}
    assert sum(t.grad_bytes) == FP32 * n
    assert sum(t.optimizer_state_bytes) == 2 * FP32 * n
    assert t.optimizer_step_bytes == (FP32 * n_tensors,) * world  # every rank steps a shard of every tensor


def test_fsdp2_collectives_are_the_unsharded_groups(runs):
    t, (root, block) = runs["fsdp2"], groups(ARCH)
    for step in range(t.steps):
        # forward: the root, then each block; S = the gathered flat group in fp32
        fwd = t.collectives_of("all_gather", step=step, phase="forward")
        assert sizes(fwd) == [FP32 * root] + [FP32 * block] * ARCH.n_layers
        assert [c.module for c in fwd] == [""] + [f"model.layers.{i}" for i in range(ARCH.n_layers)]
        # reshard_after_forward=True: every group (the root too) is gathered again for the backward
        assert sorted(sizes(t.collectives_of("all_gather", step=step, phase="backward"))) == sorted(sizes(fwd))
        # one reduce-scatter per group, last block first; S = its unsharded gradients
        rs = t.collectives_of("reduce_scatter", step=step)
        assert sizes(rs) == [FP32 * block] * ARCH.n_layers + [FP32 * root]
        assert {c.phase for c in rs} == {"backward"} and {c.dtype for c in rs} == {"float32"}


def test_fsdp2_without_reshard_gathers_once(runs):
    t, (root, block) = runs["fsdp2-keep"], groups(ARCH)
    assert sizes(t.collectives_of("all_gather")) == [FP32 * root] + [FP32 * block] * ARCH.n_layers
    assert t.collectives_of("all_gather", phase="backward") == []
    assert len(t.collectives_of("reduce_scatter")) == ARCH.n_layers + 1


def test_fsdp2_mixed_precision_gathers_bf16_and_reduces_fp32(runs):
    t, (root, block), n = runs["fsdp2-bf16"], groups(ARCH), total_numel(ARCH)
    ag = t.collectives_of("all_gather", phase="forward")
    assert sizes(ag) == [BF16 * root] + [BF16 * block] * ARCH.n_layers
    assert {c.dtype for c in t.collectives_of("all_gather")} == {"bfloat16"}
    rs = t.collectives_of("reduce_scatter")
    assert sizes(rs) == [FP32 * block] * ARCH.n_layers + [FP32 * root]
    assert {c.dtype for c in rs} == {"float32"}
    assert t.param_bytes == (FP32 * n // 2,) * 2  # the sharded parameters stay fp32


def test_fsdp2_lora_gathers_everything_and_reduces_the_adapters(runs):
    t, (root, block) = runs["fsdp2-lora"], groups(ARCH)
    lora = lora_numel(ARCH)
    assert sizes(t.collectives_of("all_gather", phase="forward")) == [FP32 * root] + [FP32 * (block + lora)] * ARCH.n_layers
    # the root has nothing to train: one reduce-scatter per block, of its adapters' gradients
    assert sizes(t.collectives_of("reduce_scatter")) == [FP32 * lora] * ARCH.n_layers
    assert sum(t.trainable_numel) == ARCH.n_layers * lora


def test_fsdp2_pads_an_uneven_dim0(runs):
    t, world, a = runs["fsdp2-uneven"], 4, UNEVEN
    rows = fsdp2_rows(a.vocab, world)  # 130 rows over 4 ranks: 33, 33, 33, 31
    assert sum(rows) == a.vocab and len(set(rows)) == 2
    even = total_numel(a) - 2 * a.vocab * a.hidden  # every other dim-0 divides by 4
    local = [even // world + 2 * rows[r] * a.hidden for r in range(world)]  # embed and head rows
    assert list(t.param_numel) == local and sum(t.param_numel) == total_numel(a)
    for r in range(world):
        assert t.param_numel_by_name[r]["lm_head.weight"] == rows[r] * a.hidden
    # to_local() is unpadded; its storage keeps ceil(130 / 4) = 33 rows on every rank
    padded = sum(padded_numel(s, world) for s in forward_order(a).values())
    assert t.param_bytes == tuple(FP32 * x for x in local)
    assert t.param_storage_bytes == (FP32 * padded // world,) * world
    assert t.grad_bytes == t.param_bytes and t.grad_storage_bytes == t.param_storage_bytes
    assert t.optimizer_state_bytes == tuple(2 * b for b in t.param_bytes)  # zeros_like(local): unpadded
    # the collectives move the padded flat groups
    root = sum(padded_numel(s, world) for s in root_shapes(a).values())
    block = sum(padded_numel(s, world) for s in block_shapes(a).values())
    assert root > sum(numel(s) for s in root_shapes(a).values())
    assert sizes(t.collectives_of("reduce_scatter")) == [FP32 * block] * a.n_layers + [FP32 * root]
    assert sizes(t.collectives_of("all_gather", phase="forward")) == [FP32 * root] + [FP32 * block] * a.n_layers


# --------------------------------------------------------------------------------------------
# ZeRO-1
# --------------------------------------------------------------------------------------------


def zero_partition(a: ModelArch, world: int) -> list[list[int]]:
    """ZeroRedundancyOptimizer: parameters sorted by numel (largest first), each to the rank holding the
    fewest elements so far (lowest rank on ties).  Returns the numels each rank owns."""
    owned: list[list[int]] = [[] for _ in range(world)]
    for n in sorted((numel(s) for s in forward_order(a).values()), reverse=True):
        r = min(range(world), key=lambda i: sum(owned[i]))
        owned[r].append(n)
    return owned


@pytest.mark.parametrize("name,arch,world", [("zero1", ARCH, 2), ("zero1-uneven", UNEVEN, 4)])
def test_zero1_partitions_the_optimizer_states(runs, name, arch, world):
    t, n = runs[name], total_numel(arch)
    owned = zero_partition(arch, world)
    assert t.param_numel == (n,) * world and t.grad_bytes == (FP32 * n,) * world  # params, grads replicated
    assert list(t.optimizer_state_bytes) == [2 * FP32 * sum(o) for o in owned]
    assert list(t.optimizer_step_bytes) == [FP32 * len(o) for o in owned]
    assert sum(t.optimizer_state_bytes) == 2 * FP32 * n
    assert sizes(t.collectives_of("all_reduce")) == [FP32 * n]  # DDP underneath, one bucket
    # each owner broadcasts its updated parameters: one broadcast per parameter
    bcast = t.collectives_of("broadcast", phase="optimizer")
    assert sorted(sizes(bcast)) == sorted(FP32 * numel(s) for s in forward_order(arch).values())


def test_zero1_bucket_view_broadcasts_one_partition_per_rank(runs):
    t = runs["zero1-bucket-view"]
    owned = zero_partition(ARCH, 2)
    assert sizes(t.collectives_of("broadcast", phase="optimizer")) == [FP32 * sum(o) for o in owned]


# --------------------------------------------------------------------------------------------
# Tensor parallel
# --------------------------------------------------------------------------------------------

TP_SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name", ["tp", "tp+sp"])
def test_tp_shards_the_linears_and_replicates_the_rest(runs, name):
    t, world = runs[name], 2
    expected = {k: numel(s) // world if k.split(".")[-2] in TP_SHARDED else numel(s)
                for k, s in forward_order(ARCH).items()}
    for r in range(world):
        assert t.param_numel_by_name[r] == expected
    local = sum(expected.values())
    assert t.param_numel == (local,) * world
    assert t.grad_bytes == (FP32 * local,) * world
    assert t.optimizer_state_bytes == (2 * FP32 * local,) * world
    assert t.loss[0] == pytest.approx(t.loss[1], rel=1e-6)  # the same batch on both ranks


def test_tp_all_reduces_activations(runs):
    t, L = runs["tp"], ARCH.n_layers
    act = activation_bytes(t)
    fwd = t.collectives_of("all_reduce", phase="forward")
    # forward: the partial sums of o_proj and down_proj (RowwiseParallel), 2 per block
    assert sizes(fwd) == [act] * 2 * L
    assert [c.module for c in fwd] == [f"model.layers.{i}.{m}" for i in range(L) for m in ("self_attn", "mlp")]
    # backward: the input gradient of every ColwiseParallel linear (q, k, v, gate, up), 5 per block
    assert sizes(t.collectives_of("all_reduce", phase="backward")) == [act] * 5 * L
    assert len(t.collectives) == 7 * L


def test_tp_sp_gathers_and_scatters_the_sequence(runs):
    t, L = runs["tp+sp"], ARCH.n_layers
    act = activation_bytes(t)  # S is the full-sequence activation for both all-gather and reduce-scatter
    # forward: all-gather in front of attention and MLP, reduce-scatter after o/down, all-gather before the head
    assert sizes(t.collectives_of("all_gather", phase="forward")) == [act] * (2 * L + 1)
    assert sizes(t.collectives_of("reduce_scatter", phase="forward")) == [act] * 2 * L
    # backward: each reduce-scatter's gradient is gathered, each block all-gather's gradient reduce-scattered,
    # and block 0's input gradient gathered for the replicated embedding
    assert sizes(t.collectives_of("all_gather", phase="backward")) == [act] * (2 * L + 1)
    assert sizes(t.collectives_of("reduce_scatter", phase="backward")) == [act] * 2 * L
    assert t.collectives_of("all_reduce", phase="backward") == []
    # optimizer: the SequenceParallel norm weights' Partial gradients are all-reduced at each of the 3 reads of
    # single-tensor AdamW (lerp_(grad), addcmul_(grad, grad)); 2 norms per block + the final norm
    assert sizes(t.collectives_of("all_reduce", phase="optimizer")) == [ARCH.hidden * FP32] * 3 * (2 * L + 1)


# --------------------------------------------------------------------------------------------
# Inputs checked before any process starts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,kwargs,error", [
    (("pipeline", 2), {}, ValueError),
    (("tp", 4), {}, ValueError),  # kv_heads = 2 does not divide by 4
    (("tp", 2), {"method": "lora"}, NotImplementedError),
    (("ddp", 2), {"reshard_after_forward": False}, ValueError),  # an FSDP2 knob
    (("fsdp2", 2), {"model": "nope"}, ValueError),
    (("fsdp2", 2), {"param_dtype": "float8"}, ValueError),
])
def test_bad_requests_fail_before_spawning(args, kwargs, error):
    with pytest.raises(error):
        measure_distributed(*args, **kwargs)
