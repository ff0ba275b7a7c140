"""Exact ground truth for distributed training on CPU: real process groups (gloo), real sharding.

``measure_distributed(strategy, world_size)`` starts ``world_size`` processes that meet in a
``FileStore`` in a temporary folder (no network port), build the same tiny model on every rank
(``validate.torch_models.build_model``, seed 0), apply the strategy, train with
``torch.optim.AdamW(lr=1e-3, foreach=False)`` and send back, per rank:

* the parameters the rank holds (numel, bytes, storages; trainable part; per parameter name);
* the gradients held after ``loss.backward()`` of the last measured step;
* the optimizer state after its ``optimizer.step()`` (``step`` scalars counted apart);
* every collective issued during each measured step, with its size in the nccl-tests "S" convention.

Strategies (every one really runs; the model code is transformers' own)
-------------------------------------------------------------------------
``ddp``     ``DistributedDataParallel`` (knobs ``bucket_cap_mb`` = None -> DDP's 25 MiB with a 1 MiB
            first bucket; ``gradient_as_bucket_view`` = False; ``broadcast_buffers`` = True).
``fsdp2``   ``torch.distributed.fsdp.fully_shard`` on every transformer block, then on the root (knobs
            ``reshard_after_forward`` = True, ``param_dtype`` / ``reduce_dtype`` = None -> no
            ``MixedPrecisionPolicy``; e.g. ``param_dtype="bfloat16", reduce_dtype="float32"``).
``fsdp1``   ``FullyShardedDataParallel`` (FlatParameter) with ``ModuleWrapPolicy`` on the transformer block class:
            each block is one unit, whole, as Lightning Fabric's ``FSDPStrategy(auto_wrap_policy={Block})`` wraps
            it (knobs ``use_orig_params`` = True -- needed when a unit mixes frozen and trainable parameters,
            e.g. LoRA --, ``no_sync_micro_batches`` = 0: micro-batches run under ``no_sync()`` before the synced
            one in every step, as HF Accelerate and Lightning accumulate gradients).
``zero1``   ``ZeroRedundancyOptimizer(optimizer_class=AdamW)`` over a DDP model (knobs ``bucket_cap_mb``,
            ``parameters_as_bucket_view`` = False).
``tp``      DTensor tensor parallel on a 1-D ``"cpu"`` mesh: ``ColwiseParallel`` on q/k/v/gate/up and
            ``RowwiseParallel`` on o/down of every Llama block; embeddings, norms and the head stay plain
            replicated tensors.  The attention is not reconfigured: transformers' Llama attention reshapes
            with ``view(*input_shape, -1, head_dim)``, so each rank runs n_heads/tp query and kv_heads/tp
            key/value heads (the GQA group size is unchanged), as torchtitan's per-rank head counts.
``tp+sp``   ``tp`` plus sequence parallel as torchtitan plans it: ``SequenceParallel`` on both block norms
            and the final norm, ``PrepareModuleInput`` (Shard(1) -> Replicate) in front of the attention and
            the MLP, ``RowwiseParallel(output_layouts=Shard(1))`` on o/down.  The embedding stays replicated;
            block 0 takes the first sequence shard locally (Replicate -> Shard(1), no collective) so that
            transformers computes the rotary tables and mask for the full sequence; the head gathers the
            sequence back (Shard(1) -> Replicate).
``tp`` / ``tp+sp`` need a Llama-style model with full training (PEFT's LoRA layers are not ``nn.Linear``
and ``ColwiseParallel`` cannot shard them) and heads, kv heads and the intermediate size divisible by the
world size.

How collectives are captured
----------------------------
One ``TorchDispatchMode`` records every op of the ``c10d`` namespace (what ``ProcessGroup`` methods
dispatch to: the Python ``torch.distributed`` calls, DDP's C++ reducer, FSDP2's
``all_gather_single`` / ``reduce_scatter_single``, ZeRO's broadcasts) and of the
``_c10d_functional`` namespace (DTensor redistributions), like
``torch.distributed.tensor.debug.CommDebugMode`` (ops on ``DTensor`` arguments are passed on with
``NotImplemented`` so that the collectives inside the DTensor dispatch are seen too).  CPU autograd runs
the backward on the calling thread, so the mode also sees what runs in autograd hooks (DDP's bucket
all-reduces, FSDP2's reduce-scatters).

``Collective.bytes`` is nccl-tests' "S", the size of the *full* buffer of the operation:

=================  =====================================================================
all_reduce         the tensor (bucket) size
all_gather         the gathered output (world x input): for FSDP2 the padded, flat unsharded group
reduce_scatter     the input (world x output): for FSDP2 the padded, flat unsharded gradients
broadcast, reduce  the tensor size
all_to_all         the input size
=================  =====================================================================

Bus traffic per rank follows nccl-tests: all_reduce 2(n-1)/n S, all_gather / reduce_scatter (n-1)/n S.

Memory conventions
------------------
``*_bytes`` are numel x element size of each rank's *local* tensors (``DTensor.to_local()``);
``*_storage_bytes`` are the distinct storages behind them.  FSDP2 pads every parameter's dim-0 to a
multiple of the world size: a rank's ``to_local()`` is the unpadded view (for dim-0 = 130 over 4 ranks:
33, 33, 33 and 31 rows; ``_local_tensor`` is the same tensor) of a padded storage of ceil(130/4) = 33
rows, so ``param_storage_bytes`` includes the padding and ``param_bytes`` does not.  FSDP2's sharded
gradients are views of padded storages as well (``grad_storage_bytes`` includes the padding); the
optimizer states (``zeros_like`` of the local shard) are unpadded.  With DDP's ``gradient_as_bucket_view=True`` the
``.grad`` tensors are views of the bucket buffers (``grad_storage_bytes`` = the buckets); with False the
reducer keeps its bucket buffers in C++ besides the ``.grad`` tensors, which Python cannot see.

Warm-up
-------
``warmup`` steps run before the measured ones: step 1 allocates the optimizer state and runs FSDP2's
lazy init; DDP builds its buckets for real only at the start of step 2 (rebuilt in gradient arrival
order, with two ``broadcast`` calls of the bucket indices and sizes), so ``ddp`` and ``zero1`` warm up
for 2 steps by default and the other strategies for 1.

What each strategy issued per step (torch 2.13, tiny Llama, L blocks, fp32, b x s tokens, h hidden)
---------------------------------------------------------------------------------------------------
``ddp``     forward: one ``broadcast`` of the buffers (rotary ``inv_freq``, d_head/2 floats) unless
            ``broadcast_buffers=False``; backward: one ``all_reduce`` per gradient bucket, the buckets filled in
            gradient-arrival order (the reverse of the forward order) and closed as soon as they reach the cap.
``fsdp2``   forward: one ``all_gather`` per group (root, then each block); backward: the same all-gathers
            again when ``reshard_after_forward=True`` (the root included), none when False; one
            ``reduce_scatter`` per group with trainable parameters (blocks last-to-first, then the root).
            S is the group's padded flat size: sum over its parameters of world x ceil(dim0 / world) x the
            other dims, in ``param_dtype`` for the all-gather and ``reduce_dtype`` for the reduce-scatter.
``zero1``   DDP's broadcast and all-reduces, then in ``optimizer.step()`` one ``broadcast`` per parameter from
            the rank that owns it (``parameters_as_bucket_view=True``: one per rank, its whole partition).
``tp``      forward: one ``all_reduce`` of b x s x h per RowwiseParallel output (2 per block); backward: one
            ``all_reduce`` of b x s x h per ColwiseParallel input gradient (5 per block: q, k, v, gate, up).
``tp+sp``   forward: ``all_gather`` (2 per block, + 1 in front of the head) and ``reduce_scatter`` (2 per
            block), all of b x s x h (the full sequence); backward: one ``all_gather`` per forward
            reduce-scatter, one ``reduce_scatter`` per block all-gather, + 1 ``all_gather`` of the gradient of
            block 0's input (the embedding output is replicated); optimizer: the ``SequenceParallel`` norm
            weights are replicated DTensors whose gradients stay ``Partial``, and DTensor all-reduces such a
            gradient at each of its 3 reads in single-tensor AdamW (``exp_avg.lerp_(grad)``,
            ``addcmul_(grad, grad)``): 3 x (2L + 1) all-reduces of h floats.

Limits of gloo / CPU
--------------------
* gloo runs every collective these strategies issue, in float32 and bfloat16 (FSDP2's
  ``MixedPrecisionPolicy`` with ``param_dtype=bfloat16`` and ``reduce_dtype`` float32 or bfloat16 runs).
* ``Collective.module`` is the module ModTracker considers running when the call was issued.  In the
  forward that is exact up to hooks: FSDP2's pre-forward all-gather is charged to its block, a
  ``RowwiseParallel`` output redistribution (a hook after the linear's own forward) to the linear's
  parent (``self_attn``, ``mlp``).  In the backward a prefetch or a hook at a module boundary may be
  charged to a neighbour (FSDP2 prefetches block i-1 from block i's pre-backward) or to ``""``.
* DDP's bucket buffers live in the C++ reducer: with ``gradient_as_bucket_view=False`` they exist besides
  the ``.grad`` tensors but no Python object exposes them (``ddp_bucket_bytes`` gives their sizes).
* Ranks are started with ``forkserver`` (``spawn`` where it is missing): the calling program's main module
  must be importable without side effects (``if __name__ == "__main__":``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Literal, Sequence

from pydantic import BaseModel, ConfigDict

from simulator.config import ModelArch

__all__ = [
    "STRATEGIES",
    "TINY_ARCHS",
    "Collective",
    "DistTruth",
    "DistCase",
    "measure_distributed",
    "measure_distributed_many",
]

STRATEGIES: tuple[str, ...] = ("ddp", "fsdp1", "fsdp2", "zero1", "tp", "tp+sp")

_TINY_BASE = dict(family="llama", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128, vocab=128,
                  max_position_embeddings=64)
TINY_ARCHS: dict[str, dict[str, Any]] = {
    "llama": {**_TINY_BASE, "name": "tiny-llama"},
    # vocab 130: embed_tokens and lm_head have dim-0 = 130, uneven over 4 ranks (FSDP2 pads to 4 x 33 rows)
    "llama-v130": {**_TINY_BASE, "name": "tiny-llama-v130", "vocab": 130},
}
"""Tiny models by name: every dimension divides by 2 and 4 except ``llama-v130``'s vocabulary."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Collective(_Strict):
    """One collective call issued by one rank."""

    op: str
    """nccl-tests name: all_reduce, all_gather, reduce_scatter, broadcast, reduce, all_to_all, gather,
    scatter, send, recv, barrier."""
    bytes: int
    """nccl-tests "S": the full buffer (see the module docstring); 0 for a barrier."""
    numel: int
    """Elements in ``bytes``."""
    dtype: str
    """Element type (``float32``, ``bfloat16`` ...); ``mixed`` for a coalesced call over several types."""
    group_size: int
    """Ranks in the process group the call ran on."""
    phase: Literal["forward", "backward", "optimizer"]
    """Where in the training step it was issued."""
    step: int
    """Index of the measured step (0 = the first step after the warm-up)."""
    module: str
    """The innermost module whose forward or backward was running (``ModTracker``; see the module docstring
    for hooks), by its plain HF path (``model.layers.1``, ``lm_head``); ``""`` outside every submodule (the
    root's own code, the optimizer)."""
    torch_op: str
    """The dispatcher op (``c10d.allreduce_.default``, ``_c10d_functional.all_gather_into_tensor.default``)."""


class DistTruth(_Strict):
    """What each rank of a distributed training run on CPU held and sent.  Tuples are indexed by rank."""

    strategy: str
    world_size: int
    model: str
    """Name of the tiny architecture."""
    method: str
    """Method kind (``full``, ``lora``)."""
    knobs: dict[str, Any]
    """The strategy's settings as applied (defaults filled in)."""
    micro_batch: int
    seq_len: int
    steps: int
    """Measured steps (after ``warmup``)."""
    warmup: int

    param_numel: tuple[int, ...]
    """Elements of the parameters the rank holds (local shards), every parameter once."""
    param_bytes: tuple[int, ...]
    """``param_numel`` x element size."""
    param_storage_bytes: tuple[int, ...]
    """Bytes of the distinct storages behind the local parameters (FSDP2 dim-0 padding included)."""
    trainable_numel: tuple[int, ...]
    trainable_bytes: tuple[int, ...]
    """Local bytes of the parameters with ``requires_grad``."""
    param_numel_by_name: tuple[dict[str, int], ...]
    """Local elements per parameter, by its plain HF name (PEFT's ``default`` / ``base_layer`` dropped)."""

    grad_bytes: tuple[int, ...]
    """Local ``.grad`` numel x element size after the backward of the last measured step."""
    grad_storage_bytes: tuple[int, ...]
    """Distinct storages behind those gradients (DDP bucket views: the buckets)."""
    flat_grad_bytes: tuple[int, ...] | None
    """``fsdp1``: bytes of the FlatParameters' ``.grad`` after the last measured backward (the sharded flat
    gradients, frozen elements of a mixed unit included); None for the other strategies."""
    accumulated_grad_bytes: tuple[int, ...] | None
    """``fsdp1`` with ``no_sync_micro_batches`` > 0: bytes of the FlatParameters' ``.grad`` after the last
    ``no_sync()`` backward of the last measured step (unsharded); None otherwise."""

    optimizer_state_bytes: tuple[int, ...]
    """Local bytes of the optimizer's state tensors after the last measured step, ``step`` excluded."""
    optimizer_step_bytes: tuple[int, ...]
    """Bytes of AdamW's per-parameter ``step`` tensors (0-dim float32) held by the rank."""
    optimizer_state_bytes_by_key: tuple[dict[str, int], ...]
    """``optimizer_state_bytes`` + ``optimizer_step_bytes`` split by state key."""

    collectives_by_rank: tuple[tuple[Collective, ...], ...]
    """Every collective of the measured steps, in issue order, per rank."""
    ddp_bucket_bytes: tuple[int, ...] | None
    """DDP's own report of its (rebuilt) gradient bucket sizes in bytes, rank 0; None without DDP."""
    loss: tuple[float, ...]
    """Each rank's loss in the last measured step."""
    wall_s: float
    """Seconds the case took on rank 0 (build, warm-up, measured steps)."""

    @property
    def collectives(self) -> tuple[Collective, ...]:
        """Rank 0's collectives (every rank issues the same list in these strategies)."""
        return self.collectives_by_rank[0]

    def collectives_of(self, op: str, *, step: int | None = None, phase: str | None = None,
                       rank: int = 0) -> list[Collective]:
        """Rank ``rank``'s collectives named ``op``, optionally of one measured step / phase."""
        return [c for c in self.collectives_by_rank[rank]
                if c.op == op and (step is None or c.step == step) and (phase is None or c.phase == phase)]


@dataclass(frozen=True)
class DistCase:
    """One measurement: what ``measure_distributed`` takes besides the world size."""

    strategy: str
    model: str | dict[str, Any] = "llama"
    """A ``TINY_ARCHS`` name or ``ModelArch`` fields."""
    method: str | dict[str, Any] = "full"
    """``full``, ``lora`` (r = 4 on PEFT's default q/v targets) or a method dict of ``Scenario``."""
    steps: int = 1
    warmup: int | None = None
    """Unmeasured steps first; None: 2 for ``ddp`` / ``zero1`` (DDP rebuilds its buckets in step 2), else 1."""
    micro_batch: int = 2
    seq_len: int = 16
    knobs: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------

_KNOBS: dict[str, dict[str, Any]] = {
    "ddp": {"bucket_cap_mb": None, "gradient_as_bucket_view": False, "broadcast_buffers": True},
    "fsdp1": {"use_orig_params": True, "no_sync_micro_batches": 0},
    "fsdp2": {"reshard_after_forward": True, "param_dtype": None, "reduce_dtype": None},
    "zero1": {"bucket_cap_mb": None, "parameters_as_bucket_view": False},
    "tp": {},
    "tp+sp": {},
}
"""Knobs per strategy and their defaults (torch's own defaults)."""

_DTYPES = ("float32", "bfloat16", "float16")
"""Names FSDP2's ``param_dtype`` / ``reduce_dtype`` knobs take (attributes of ``torch``)."""


def _arch_fields(model: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(model, dict):
        return dict(model)
    try:
        return dict(TINY_ARCHS[model])
    except KeyError:
        raise ValueError(f"model={model!r}: not a tiny architecture (have {', '.join(TINY_ARCHS)})") from None


def _method_dict(method: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(method, dict):
        return dict(method)
    if method == "full":
        return {"kind": "full"}
    if method == "lora":
        return {"kind": "lora", "r": 4}
    raise ValueError(f"method={method!r}: use 'full', 'lora' or a method dict")


def _default_warmup(strategy: str) -> int:
    return 2 if strategy in ("ddp", "zero1") else 1


def _check(case: DistCase, world_size: int) -> dict[str, Any]:
    """The case's knobs with defaults, after the checks that need no process group."""
    if case.strategy not in STRATEGIES:
        raise ValueError(f"strategy={case.strategy!r}: have {', '.join(STRATEGIES)}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least 1 rank")
    if case.steps < 1 or (case.warmup is not None and case.warmup < 0):
        raise ValueError(f"steps={case.steps}, warmup={case.warmup}: need steps >= 1 and warmup >= 0")
    unknown = set(case.knobs) - set(_KNOBS[case.strategy])
    if unknown:
        raise ValueError(f"strategy {case.strategy!r} has no knobs {sorted(unknown)} "
                         f"(has {sorted(_KNOBS[case.strategy]) or 'none'})")
    for key in ("param_dtype", "reduce_dtype"):
        if case.knobs.get(key) not in (None, *_DTYPES):
            raise ValueError(f"{key}={case.knobs[key]!r}: use one of {', '.join(_DTYPES)} or None")
    arch = ModelArch(**_arch_fields(case.model))
    method = _method_dict(case.method)
    if case.strategy in ("tp", "tp+sp"):
        if arch.family != "llama" or arch.moe is not None:
            raise NotImplementedError(f"strategy {case.strategy!r}: the TP plan is written for dense Llama blocks")
        if method["kind"] != "full":
            raise NotImplementedError(
                f"strategy {case.strategy!r} with method {method['kind']!r}: PEFT wraps q/k/v/o/gate/up/down in "
                "its own layers, which ColwiseParallel / RowwiseParallel cannot shard")
        for what, n in (("n_heads", arch.n_heads), ("kv_heads", arch.kv_heads), ("intermediate", arch.intermediate)):
            if n % world_size:
                raise ValueError(f"strategy {case.strategy!r}: {what}={n} does not divide by world_size={world_size}")
        if case.strategy == "tp+sp" and case.seq_len % world_size:
            raise ValueError(f"tp+sp: seq_len={case.seq_len} does not divide by world_size={world_size}")
    return {**_KNOBS[case.strategy], **case.knobs}


def measure_distributed(strategy: str, world_size: int, *, model: str | dict[str, Any] = "llama",
                        method: str | dict[str, Any] = "full", steps: int = 1, warmup: int | None = None,
                        micro_batch: int = 2, seq_len: int = 16, timeout_s: float = 300.0,
                        **knobs: Any) -> DistTruth:
    """Run ``strategy`` on ``world_size`` CPU processes (gloo) and return what each rank held and sent.

    ``knobs`` are the strategy's settings (see the module docstring); ``warmup`` steps run unmeasured
    before the ``steps`` measured ones.  Raises ``TimeoutError`` after ``timeout_s`` seconds.
    """
    case = DistCase(strategy, model, method, steps, warmup, micro_batch, seq_len, dict(knobs))
    return measure_distributed_many([case], world_size, timeout_s=timeout_s)[0]


def measure_distributed_many(cases: Sequence[DistCase], world_size: int, *, timeout_s: float = 300.0,
                             start_method: str | None = None) -> list[DistTruth]:
    """Several cases in one set of ``world_size`` processes (one process start, one process group).

    ``start_method``: how the ranks start (see ``_start_method``; None picks the fastest available).
    """
    import torch.multiprocessing as mp

    _require_gloo()
    knobs = [_check(c, world_size) for c in cases]
    cases = [c if c.warmup is not None else replace(c, warmup=_default_warmup(c.strategy)) for c in cases]
    with tempfile.TemporaryDirectory(prefix="fitsim-dist-") as tmp:
        payload = [asdict(c) | {"knobs": k} for c, k in zip(cases, knobs)]
        ctx = mp.start_processes(_worker, args=(world_size, tmp, payload), nprocs=world_size, join=False,
                                 start_method=start_method or _start_method())
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed measurement ran past {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
                    p.join()
        per_rank = []
        for r in range(world_size):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return [_assemble(cases[i], knobs[i], world_size, [per_rank[r][i] for r in range(world_size)])
            for i in range(len(cases))]


def _start_method() -> str:
    """``fork`` on Linux, else ``spawn``.

    A forked rank starts with torch, transformers and peft already imported (spawn and forkserver import
    them again, seconds per rank on a small machine).  Forking a process that has run OpenMP regions is
    safe here because each rank calls ``torch.set_num_threads(1)`` before any tensor op: with one thread
    ATen runs every ``parallel_for`` inline and never enters an OpenMP region, and the process group and
    its gloo threads are created after the fork.
    """
    import sys

    return "fork" if sys.platform.startswith("linux") else "spawn"


def _require_gloo() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError("torch.distributed with the gloo backend is not available in this torch build")


def _assemble(case: DistCase, knobs: dict[str, Any], world_size: int, ranks: list[dict]) -> DistTruth:
    def col(key: str) -> tuple:
        return tuple(r[key] for r in ranks)

    arch = ModelArch(**_arch_fields(case.model))
    return DistTruth(
        strategy=case.strategy, world_size=world_size, model=arch.name, method=_method_dict(case.method)["kind"],
        knobs=knobs, micro_batch=case.micro_batch, seq_len=case.seq_len, steps=case.steps, warmup=case.warmup,
        param_numel=col("param_numel"), param_bytes=col("param_bytes"),
        param_storage_bytes=col("param_storage_bytes"), trainable_numel=col("trainable_numel"),
        trainable_bytes=col("trainable_bytes"), param_numel_by_name=col("param_numel_by_name"),
        grad_bytes=col("grad_bytes"), grad_storage_bytes=col("grad_storage_bytes"),
        flat_grad_bytes=None if ranks[0]["flat_grad_bytes"] is None else col("flat_grad_bytes"),
        accumulated_grad_bytes=None if ranks[0]["accumulated_grad_bytes"] is None else col("accumulated_grad_bytes"),
        optimizer_state_bytes=col("optimizer_state_bytes"), optimizer_step_bytes=col("optimizer_step_bytes"),
        optimizer_state_bytes_by_key=col("optimizer_state_bytes_by_key"),
        collectives_by_rank=tuple(tuple(Collective(**c) for c in r["collectives"]) for r in ranks),
        ddp_bucket_bytes=None if ranks[0]["ddp_bucket_bytes"] is None else tuple(ranks[0]["ddp_bucket_bytes"]),
        loss=col("loss"), wall_s=ranks[0]["wall_s"],
    )


# --------------------------------------------------------------------------------------------
# Rank side
# --------------------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, tmp: str, cases: list[dict]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # world_size processes share the cores
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=world_size)
    try:
        results = [_run_case(rank, world_size, c) for c in cases]
        dist.barrier()
    finally:
        dist.destroy_process_group()
    path = os.path.join(tmp, f"rank{rank}.json")
    with open(path + ".part", "w") as f:
        json.dump(results, f)
    os.replace(path + ".part", path)


_OP_NAMES = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce", "all_reduce_coalesced_": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_coalesced_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast", "reduce_": "reduce",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "gather_": "gather", "scatter_": "scatter", "send": "send", "recv_": "recv", "recv_any_source_": "recv",
    "barrier": "barrier",
}
"""Dispatcher op name (``c10d`` / ``_c10d_functional``) -> nccl-tests collective name."""

_FULL_BUFFER_ARG = {
    # which argument holds "S" (index into the op's positional arguments)
    "_allgather_base_": 0, "allgather_": 0, "allgather_coalesced_": 0, "allgather_into_tensor_coalesced_": 0,
    "_reduce_scatter_base_": 1, "reduce_scatter_": 1, "reduce_scatter_tensor_coalesced_": 1,
    "alltoall_": 1, "alltoall_base_": 1, "gather_": 0, "scatter_": 1,
}
"""c10d ops whose S is not their first argument; every other op's S is its first (tensor / list) argument."""


def _tensors(x: Any) -> list:
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _group_size(func, args: tuple, kwargs: dict) -> int:
    import torch
    import torch.distributed as dist

    if func.namespace == "c10d":
        for a in args:
            if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
                return dist.ProcessGroup.unbox(a).size()
        return dist.get_world_size()
    schema = func._schema
    values = dict(zip((a.name for a in schema.arguments), args)) | kwargs
    if "group_size" in values:
        return int(values["group_size"])
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(values["group_name"]).size()


class _CollectiveRecorder:
    """A ``TorchDispatchMode`` that records c10d and functional collectives (see the module docstring)."""

    def __init__(self) -> None:
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self
        from torch.distributed._tools.mod_tracker import ModTracker

        self.records: list[dict] = []
        self.tracker = ModTracker()
        self.phase = "forward"
        self.step = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(t is DTensor for t in types):
                    return NotImplemented  # let DTensor run: its redistributions dispatch back here
                kwargs = kwargs or {}
                if func.namespace in ("c10d", "_c10d_functional"):
                    rec._record(func, args, kwargs)
                return func(*args, **kwargs)

        self.mode = Mode()

    def _record(self, func, args: tuple, kwargs: dict) -> None:
        name = func._schema.name.split("::")[-1]
        op = _OP_NAMES.get(name)
        if op is None:  # wait_tensor, _wrap_tensor_autograd, monitored barrier helpers ...
            return
        group = _group_size(func, args, kwargs)
        if op == "barrier":
            numel, dtypes = 0, {"none"}
        else:
            if func.namespace == "c10d":
                tensors = _tensors(args[_FULL_BUFFER_ARG.get(name, 0)])
            else:
                tensors = _tensors(args[0])
            numel = sum(t.numel() for t in tensors)
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors}
            if func.namespace == "_c10d_functional" and op == "all_gather":
                numel, nbytes = numel * group, nbytes * group  # its argument is the per-rank input
        self.records.append(dict(
            op=op, bytes=0 if op == "barrier" else nbytes, numel=numel,
            dtype=dtypes.pop() if len(dtypes) == 1 else "mixed", group_size=group, phase=self.phase,
            step=self.step, module=self._module(), torch_op=str(func),
        ))

    def _module(self) -> str:
        if self.phase == "optimizer":
            return ""
        deepest = max(self.tracker.parents, key=lambda n: (n != "Global", n.count(".")))
        return _plain_path(deepest.partition(".")[2])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with self.tracker, self.mode:
            yield


def _plain_path(path: str) -> str:
    """A ``ModTracker`` / ``named_parameters`` path in plain HF naming: DDP's ``module``, PEFT's wrapper
    (``base_model.model``) and adapter segments dropped."""
    from .torch_models import _clean

    parts = path.split(".")
    if parts[:1] == ["module"]:
        parts = parts[1:]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return _clean(".".join(parts))


def _run_case(rank: int, world_size: int, case: dict) -> dict:
    import torch

    from simulator.config import Scenario

    from .torch_models import build_model

    t0 = time.perf_counter()
    arch = ModelArch(**_arch_fields(case["model"]))
    scenario = Scenario(
        model=arch, precision="fp32", attention="sdpa-math", method=_method_dict(case["method"]),
        workload={"task": "train", "micro_batch": case["micro_batch"], "seq_len": case["seq_len"]},
    )
    model = build_model(scenario)  # seed 0: the same weights on every rank
    strategy, knobs = case["strategy"], case["knobs"]
    wrapped, optimizer = _apply_strategy(model, strategy, knobs, world_size, case["seq_len"])
    # FSDP2 replaces the parameters by sharded ones in place: name them after the strategy ran
    names = {id(p): _plain_path(n) for n, p in model.named_parameters(remove_duplicate=False)}

    # TP ranks must see the same batch; data-parallel ranks each take their own
    gen = torch.Generator().manual_seed(1000 + (0 if strategy in ("tp", "tp+sp") else rank))
    ids = torch.randint(0, arch.vocab, (case["micro_batch"], case["seq_len"]), generator=gen)

    rec = _CollectiveRecorder()
    grads: dict[str, int] = {}
    accumulated = None

    def forward_backward():
        rec.phase = "forward"
        result = wrapped(input_ids=ids, labels=ids)
        rec.phase = "backward"
        result.loss.backward()
        return result

    for i in range(case["warmup"] + case["steps"]):
        measured = i >= case["warmup"]
        rec.step = i - case["warmup"]
        with rec.active() if measured else contextlib.nullcontext():
            for _ in range(knobs.get("no_sync_micro_batches", 0)):
                with wrapped.no_sync():
                    forward_backward()
                if measured:
                    accumulated = _flat_grad_bytes(wrapped)
            out = forward_backward()
            if measured:
                grads = _grad_bytes(wrapped)
                grads["flat_grad_bytes"] = _flat_grad_bytes(wrapped) if strategy == "fsdp1" else None
            rec.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach().item()

    params = _param_bytes(wrapped, names)
    return dict(
        **params, **grads, **_optimizer_bytes(optimizer),
        collectives=rec.records, ddp_bucket_bytes=_ddp_buckets(wrapped), loss=loss, accumulated_grad_bytes=accumulated,
        wall_s=time.perf_counter() - t0,
    )


def _blocks(model):
    from .torch_models import block_paths, unwrap

    base = unwrap(model)
    return base, [base.get_submodule(p) for p in block_paths(base)]


def _apply_strategy(model, strategy: str, knobs: dict, world_size: int, seq_len: int):
    """(the module to call, the optimizer) for ``strategy`` applied to ``model`` on every rank."""
    import torch

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-3, foreach=False)

    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_kw: dict[str, Any] = {"bucket_cap_mb": knobs["bucket_cap_mb"]}
        if strategy == "ddp":
            ddp_kw["gradient_as_bucket_view"] = knobs["gradient_as_bucket_view"]
            # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers; both sync at init
            renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            ddp_kw["forward_sync_buffers" if renamed else "broadcast_buffers"] = knobs["broadcast_buffers"]
        wrapped = DDP(model, **ddp_kw)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        if strategy == "ddp":
            return wrapped, adamw(trainable)
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return wrapped, ZeroRedundancyOptimizer(
            trainable, optimizer_class=torch.optim.AdamW, lr=1e-3, foreach=False,
            parameters_as_bucket_view=knobs["parameters_as_bucket_view"],
        )

    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        _, blocks = _blocks(model)
        with warnings.catch_warnings():  # FSDP1 warns about units mixing frozen and trainable parameters
            warnings.simplefilter("ignore")
            wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}),
                           use_orig_params=knobs["use_orig_params"], device_id=torch.device("cpu"))
        return wrapped, adamw([p for p in wrapped.parameters() if p.requires_grad])

    if strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"reshard_after_forward": knobs["reshard_after_forward"]}
        if knobs["param_dtype"] is not None or knobs["reduce_dtype"] is not None:
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=None if knobs["param_dtype"] is None else getattr(torch, knobs["param_dtype"]),
                reduce_dtype=None if knobs["reduce_dtype"] is None else getattr(torch, knobs["reduce_dtype"]),
            )
        _, blocks = _blocks(model)
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model, adamw([p for p in model.parameters() if p.requires_grad])

    if strategy in ("tp", "tp+sp"):
        _tensor_parallel(model, world_size, sequence_parallel=strategy == "tp+sp")
        return model, adamw([p for p in model.parameters() if p.requires_grad])

    raise ValueError(f"strategy={strategy!r}")


def _tensor_parallel(model, world_size: int, *, sequence_parallel: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world_size,))
    base, blocks = _blocks(model)
    out = Shard(1) if sequence_parallel else Replicate()
    for block in blocks:
        plan: dict[str, Any] = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=out),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=out),
        }
        if sequence_parallel:
            plan |= {
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                # transformers passes hidden_states to the attention by keyword, to the MLP positionally
                "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, mesh, plan)
    if sequence_parallel:
        # the residual stream between blocks is the local sequence shard (a plain tensor)
        parallelize_module(blocks[0], mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
        parallelize_module(base.model.norm, mesh, SequenceParallel())
        parallelize_module(base.lm_head, mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _param_bytes(model, names: dict[int, str]) -> dict:
    seen: set[int] = set()
    storages: dict[int, int] = {}
    numel = nbytes = t_numel = t_bytes = 0
    by_name: dict[str, int] = {}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        loc = _local(p)
        n, b = loc.numel(), loc.numel() * loc.element_size()
        numel += n
        nbytes += b
        if p.requires_grad:
            t_numel += n
            t_bytes += b
        storages.setdefault(loc.untyped_storage().data_ptr(), loc.untyped_storage().nbytes())
        by_name[names.get(id(p), f"<unnamed {len(by_name)}>")] = n
    return dict(param_numel=numel, param_bytes=nbytes, param_storage_bytes=sum(storages.values()),
                trainable_numel=t_numel, trainable_bytes=t_bytes, param_numel_by_name=by_name)


def _grad_bytes(model) -> dict:
    storages: dict[int, int] = {}
    nbytes = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.grad is None:
            continue
        g = _local(p.grad)
        nbytes += g.numel() * g.element_size()
        storages.setdefault(g.untyped_storage().data_ptr(), g.untyped_storage().nbytes())
    return dict(grad_bytes=nbytes, grad_storage_bytes=sum(storages.values()))


def _flat_grad_bytes(model) -> int:
    """Bytes of every FSDP1 FlatParameter's ``.grad`` (unsharded under ``no_sync()``, else the shard)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    total = 0
    for unit in FSDP.fsdp_modules(model):
        handle = unit._handle
        if handle is not None and handle.flat_param.grad is not None:
            g = handle.flat_param.grad
            total += g.numel() * g.element_size()
    return total


def _optimizer_bytes(optimizer) -> dict:
    import torch

    local_opt = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its shard in .optim
    by_key: dict[str, int] = {}
    for state in local_opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                loc = _local(value)
                by_key[key] = by_key.get(key, 0) + loc.numel() * loc.element_size()
    step = by_key.get("step", 0)
    return dict(optimizer_state_bytes=sum(by_key.values()) - step, optimizer_step_bytes=step,
                optimizer_state_bytes_by_key=by_key)


def _ddp_buckets(model) -> list[int] | None:
    """DDP's logged bucket sizes (bytes) after its rebuild, else its initial ones; None without DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return None
    data = model._get_ddp_logging_data()
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes")
    if isinstance(sizes, str):
        sizes = [int(s) for s in sizes.replace(",", " ").split()]
    return [int(s) for s in sizes] if sizes else None
