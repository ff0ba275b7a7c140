"""Communication time on a system's fabrics, one small pure function per quantity.

Every function takes plain numbers or numpy arrays (message sizes, group sizes, ranks per node)
and broadcasts them; a call with scalars returns a float.  Hardware figures come from the
:class:`hwprofiles.System` (its intra-node busbw curve, NIC count and rate, host link, NVMe).

Conventions are those of nccl-tests ``doc/PERFORMANCE.md`` (reference §6.4):

* ``S`` is the message size of the collective: the buffer reduced by an all-reduce, the *full*
  gathered buffer of an all-gather, the full input of a reduce-scatter, the send buffer of one rank
  in an all-to-all, the message of a broadcast/reduce/point-to-point.
* ``busbw = algbw x bus_factor`` with ``algbw = S / t``, so ``t = S x bus_factor / busbw``: the
  bus factor turns the message size into the bytes that cross the busiest link, and busbw is then
  comparable across rank counts and with the link rate.
* Small messages are latency-bound: ``t = alpha + S x bus_factor / busbw`` ("on large sizes, the time
  becomes linear with the size ... roughly equal to overhead + size / bw").
"""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import numpy as np

from hwprofiles import System

from .units import GB

Op = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "p2p"]
"""Collective operations, named as in ``torch.distributed`` / NCCL."""
OPS: tuple[str, ...] = get_args(Op)

Algorithm = Literal["ring", "tree", "auto"]
"""Step structure of the latency term: ring, binary tree, or the cheaper of the two (NCCL's tuner
picks, per message size, the algorithm of lowest predicted time)."""
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)

US = 1e-6
"""Microseconds -> seconds."""


# ---------------------------------------------------------------------------------------------
# argument checks (raise on user input, quoting the values)
# ---------------------------------------------------------------------------------------------


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown collective {op!r}; allowed: {', '.join(OPS)}")


def _ranks(n, what: str = "n_ranks") -> np.ndarray:
    if isinstance(n, int | float | np.integer | np.floating) and not isinstance(n, bool):
        # one group size: checked without numpy's array machinery
        if not (n >= 1 and n == math.floor(n)):
            raise ValueError(f"{what} must be whole numbers >= 1, got {n!r}")
        return np.float64(n)
    arr = np.asarray(n, dtype=float)
    if np.any(arr < 1) or np.any(arr != np.floor(arr)):
        raise ValueError(f"{what} must be whole numbers >= 1, got {n!r}")
    return arr


def _bytes(nbytes, what: str = "message_bytes") -> np.ndarray:
    if isinstance(nbytes, int | float | np.integer | np.floating) and not isinstance(nbytes, bool):
        if not (nbytes >= 0 and math.isfinite(nbytes)):
            raise ValueError(f"{what} must be finite and >= 0, got {nbytes!r}")
        return np.float64(nbytes)
    if isinstance(nbytes, np.ndarray) and nbytes.dtype == float and nbytes.ndim:
        if not (nbytes.min() >= 0 and np.isfinite(nbytes.max())):
            raise ValueError(f"{what} must be finite and >= 0, got {nbytes!r}")
        return nbytes
    arr = np.asarray(nbytes, dtype=float)
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite and >= 0, got {nbytes!r}")
    return arr


def _out(value: np.ndarray):
    return float(value) if np.ndim(value) == 0 else value


# ---------------------------------------------------------------------------------------------
# the algebra of one collective
# ---------------------------------------------------------------------------------------------


def bus_factor(op: Op, n):
    """Bytes crossing the busiest link per byte of message, for ``n`` ranks (nccl-tests conventions).

    * all_reduce: ``2(n-1)/n`` -- a ring reduce-scatter then all-gather, each moving ``(n-1)/n`` of S;
    * all_gather, reduce_scatter: ``(n-1)/n`` with S the full (gathered / scattered) size;
    * all_to_all: ``(n-1)/n`` -- ``1/n`` of the send buffer stays local (sjeaugey, NVIDIA/nccl-tests#130);
    * broadcast, reduce, p2p: 1.

    One rank moves nothing: every factor is 0 at ``n == 1``.
    Source: nccl-tests ``doc/PERFORMANCE.md`` @03a204a (reference §6.4).
    """
    _check_op(op)
    n = _ranks(n)
    if op == "all_reduce":
        factor = 2.0 * (n - 1) / n
    elif op in ("all_gather", "reduce_scatter", "all_to_all"):
        factor = (n - 1) / n
    else:
        factor = np.where(n > 1, 1.0, 0.0)
    return _out(factor)


def latency_steps(op: Op, n, algorithm: Algorithm = "auto"):
    """Sequential message latencies an ``n``-rank collective pays.

    Ring: all_reduce ``2(n-1)`` (reduce-scatter then all-gather around the ring), all_gather /
    reduce_scatter / broadcast / reduce ``n-1``.  Tree: the depth of a binary tree,
    ``ceil(log2 n)`` per pass, two passes (reduce up, broadcast down) for all_reduce.  ``auto`` takes
    the cheaper, as NCCL's tuner does for small messages at scale.  all_to_all sends one message to
    each of the ``n-1`` peers (no tree form); p2p is one message.  Zero at ``n == 1``.
    """
    _check_op(op)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; allowed: {', '.join(ALGORITHMS)}")
    n = _ranks(n)
    depth = np.ceil(np.log2(n))
    if op == "all_reduce":
        ring, tree = 2.0 * (n - 1), 2.0 * depth
    elif op in ("all_gather", "reduce_scatter", "broadcast", "reduce"):
        ring, tree = n - 1, depth
    elif op == "all_to_all":
        ring = tree = n - 1
    else:  # p2p
        ring = tree = np.where(n > 1, 1.0, 0.0)
    steps = {"ring": ring, "tree": tree, "auto": np.minimum(ring, tree)}[algorithm]
    return _out(np.asarray(steps, dtype=float))


def collective_time_s(op: Op, message_bytes, n_ranks, busbw_Bps, latency_s, algorithm: Algorithm = "auto"):
    """Alpha-beta time of one collective: ``latency_steps x latency_s + S x bus_factor / busbw``.

    ``busbw_Bps`` is the bus bandwidth the fabric sustains (nccl-tests busbw, B/s), ``latency_s`` the
    latency of one step.  Example: a 1 GiB all-reduce on 8 ranks at busbw B takes
    ``2^30 x 2 x 7/8 / B`` plus ``min(14, 6) = 6`` step latencies.  Zero for one rank.
    """
    steps = np.asarray(latency_steps(op, n_ranks, algorithm))
    factor = np.asarray(bus_factor(op, n_ranks))
    size = _bytes(message_bytes)
    busbw = np.asarray(busbw_Bps, dtype=float)
    if np.any(busbw <= 0):
        raise ValueError(f"busbw_Bps must be > 0, got {busbw_Bps!r}")
    latency = np.asarray(latency_s, dtype=float)
    if np.any(latency < 0):
        raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
    return _out(steps * latency + size * factor / busbw)


@functools.lru_cache(maxsize=64)
def _log_curve(curve: tuple) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(log sizes, log busbw, smallest size, largest size) of a busbw curve."""
    sizes = np.array([s for s, _ in curve], dtype=float)
    busbw_GBps = np.array([b for _, b in curve], dtype=float)
    return np.log(sizes), np.log(busbw_GBps), sizes[0], sizes[-1]


def achieved_busbw_Bps(curve, message_bytes):
    """Bus bandwidth (B/s) a measured curve gives at ``message_bytes``.

    ``curve`` is ``[[message_bytes, busbw_GBps], ...]`` (an ``IntraNodeFabric.busbw_curve``).
    Interpolated linearly in log(size)-log(busbw): between two points the implied time
    ``S / busbw(S)`` then changes as a power of S, so it stays non-decreasing whenever it is so at
    the points (which the schema checks).  Clamped to the end points outside the measured range.
    """
    log_sizes, log_busbw_GBps, lo, hi = _log_curve(tuple(map(tuple, curve)))
    size = np.clip(_bytes(message_bytes), lo, hi)
    log_busbw = np.interp(np.log(size), log_sizes, log_busbw_GBps)
    return _out(np.exp(log_busbw) * GB)


# ---------------------------------------------------------------------------------------------
# tiers of a system
# ---------------------------------------------------------------------------------------------


def intra_node_busbw_Bps(system: System, op: Op, message_bytes):
    """End-to-end bus bandwidth of ``op`` over all the GPUs of one node of ``system`` at ``message_bytes``, B/s.

    The curve is the all-reduce busbw; other operations are ring-based and get the curve scaled by
    ``ring_busbw_GBps / peak`` (below 1 only where NVLink SHARP lifts all-reduce above the wire rate:
    ~480 vs ~370 GB/s on 8x H100, sjeaugey in NVIDIA/nccl-tests#212).
    """
    _check_op(op)
    fabric = system.intra_node
    scale = 1.0 if op == "all_reduce" else fabric.ring_fraction
    return _out(np.asarray(achieved_busbw_Bps(fabric.busbw_curve, message_bytes)) * scale)


def _intra_s_per_bus_byte(system: System, op: Op, message_bytes) -> np.ndarray:
    """Seconds per bus byte the intra fabric adds on top of the step latencies, at ``message_bytes``.

    The curve is an end-to-end busbw of an N-rank all-reduce (N = ``gpus_per_node``): its time
    ``S x 2(N-1)/N / busbw(S)`` already holds the N-rank step latencies.  Taking them out leaves the
    bandwidth part, per bus byte; for a curve built with the latency-bound shape this is exactly
    ``1 / peak``.  Below the curve's range (or wherever the measured time is under the latency) it is 0:
    latency-bound.  Ring-based operations divide by ``ring_busbw / peak``.
    """
    fabric = system.intra_node
    n_curve = max(system.gpus_per_node, 2)
    factor = 2.0 * (n_curve - 1) / n_curve
    size = _bytes(message_bytes)
    curve_time = size * factor / np.asarray(achieved_busbw_Bps(fabric.busbw_curve, size))
    bandwidth_time = np.maximum(curve_time - latency_steps("all_reduce", n_curve) * fabric.latency_us * US, 0.0)
    bus_bytes = size * factor
    per_byte = np.divide(bandwidth_time, bus_bytes, out=np.zeros_like(bus_bytes), where=bus_bytes > 0)
    return per_byte if op == "all_reduce" else per_byte / fabric.ring_fraction


def intra_node_time_s(system: System, op: Op, message_bytes, n_ranks):
    """Time of ``op`` over ``n_ranks`` GPUs of one node of ``system``:
    ``latency_steps(op, n) x latency_us + S x bus_factor(op, n) x seconds_per_bus_byte(S)``.

    The seconds per bus byte come from the busbw curve with its own latency taken out (see
    ``_intra_s_per_bus_byte``), so the curve's size dependence is kept and the latency is counted once,
    with the step count of this operation and group.  For an all-reduce over the whole node this is the
    curve's own time ``S x 2(N-1)/N / busbw(S)``.
    """
    _check_op(op)
    n = _ranks(n_ranks)
    size = _bytes(message_bytes)
    return _out(_intra_time_s(system, op, size, n, _intra_s_per_bus_byte(system, "all_reduce", size)))


def _intra_time_s(system: System, op: Op, size: np.ndarray, n: np.ndarray, per_bus_byte_all_reduce) -> np.ndarray:
    """:func:`intra_node_time_s` of checked arguments, given the all-reduce's seconds per bus byte at ``size``."""
    fabric = system.intra_node
    per_bus_byte = per_bus_byte_all_reduce if op == "all_reduce" else per_bus_byte_all_reduce / fabric.ring_fraction
    latency = np.asarray(latency_steps(op, n, "auto")) * fabric.latency_us * US
    return latency + size * np.asarray(bus_factor(op, n)) * per_bus_byte


def _require_network(system: System, why: str) -> None:
    if system.inter_node is None:
        raise ValueError(f"system {system.name!r} is single-node (inter_node is null): {why}")


def nic_share_Bps(system: System, ranks_per_node):
    """Network bandwidth one of ``ranks_per_node`` local ranks gets when they all use the network at once, B/s.

    The node's NICs at their achieved rate, shared equally, and never more than the GPU's own host
    link (GPUDirect RDMA traffic leaves the GPU over it).
    """
    _require_network(system, "it has no network bandwidth to share")
    r = _ranks(ranks_per_node, "ranks_per_node")
    host_link = system.host.host_to_gpu_bandwidth_GBps * GB
    return _out(np.minimum(system.inter_node.node_achieved_Bps / r, host_link))


def inter_node_time_s(system: System, op: Op, message_bytes, n_nodes, ranks_per_node):
    """Alpha-beta time of ``op`` among ``n_nodes`` nodes, run by one rank per node on ``message_bytes``
    while ``ranks_per_node`` local ranks do the same on their own slices and share the NICs."""
    _require_network(system, "a collective across nodes needs inter_node")
    bandwidth = nic_share_Bps(system, ranks_per_node)
    return collective_time_s(op, message_bytes, n_nodes, bandwidth, system.inter_node.latency_us * US, "auto")


def group_collective_time_s(system: System, op: Op, message_bytes, group_size, ranks_per_node):
    """Time of ``op`` over a group of ``group_size`` GPUs placed ``ranks_per_node`` to a node.

    One node (``group_size <= ranks_per_node``): :func:`intra_node_time_s`.  Spanning
    ``m = group_size / ranks_per_node`` nodes, the hierarchical scheme of NCCL's multi-node
    all-reduce (intra-node reduce-scatter, inter-node collective on ``1/ranks_per_node`` of the data by
    every local rank at once over the node's shared NICs, intra-node all-gather):

    * all_reduce = RS_intra(S, r) + AR_inter(S/r, m) + AG_intra(S, r)
    * reduce_scatter = RS_intra(S, r) + RS_inter(S/r, m); all_gather = AG_inter(S/r, m) + AG_intra(S, r)
    * reduce = RS_intra(S, r) + reduce_inter(S/r, m); broadcast = broadcast_inter(S/r, m) + AG_intra(S, r)
    * all_to_all: each rank sends ``S/G`` to each peer; ``S(G-r)/G`` leaves the node over the rank's
      NIC share, ``S(r-1)/G`` stays on the intra fabric, both at once: the slower path sets the time
      (busbw = (G-1)/(G-r) x NIC share, the "N/(N-1) x the bandwidth per GPU" of sjeaugey in
      NVIDIA/nccl-tests#130);
    * p2p: one message between nodes (:func:`p2p_time_s` with ``cross_node=True``).

    The tiers are summed, not overlapped: NCCL pipelines them, so this is an upper bound.  On
    2 x 8 H100 it gives an all-reduce busbw near 250 GB/s; nccl-tests#309 reports ~250 GB/s on 2 HGX
    H100 nodes and "nearly 370-380" on DGX.  Placing ``group_size`` not a multiple of
    ``ranks_per_node``, or more ranks on a node than it has GPUs, is an error.
    """
    _check_op(op)
    size = _bytes(message_bytes)
    g = _ranks(group_size, "group_size")
    r = np.minimum(_ranks(ranks_per_node, "ranks_per_node"), g)
    if np.any(r > system.gpus_per_node):
        raise ValueError(
            f"ranks_per_node={ranks_per_node!r} exceeds gpus_per_node={system.gpus_per_node} of {system.name!r}"
        )
    if np.any(np.mod(g, r) != 0):
        raise ValueError(f"group_size={group_size!r} is not a multiple of ranks_per_node={ranks_per_node!r}")
    nodes = g / r
    per_bus_byte = _intra_s_per_bus_byte(system, "all_reduce", size)  # every intra-node tier moves S
    single = None if np.all(nodes > 1) else _intra_time_s(system, op, size, g, per_bus_byte)
    if not np.any(nodes > 1):
        return _out(single)
    _require_network(system, f"a group of {group_size!r} at {ranks_per_node!r} per node spans {nodes!r} nodes")

    def intra(o: Op, s):
        return _intra_time_s(system, o, s, r, per_bus_byte)

    def inter(o: Op, s):
        return np.asarray(inter_node_time_s(system, o, s, nodes, r))

    if op == "all_reduce":
        multi = intra("reduce_scatter", size) + inter("all_reduce", size / r) + intra("all_gather", size)
    elif op == "reduce_scatter":
        multi = intra("reduce_scatter", size) + inter("reduce_scatter", size / r)
    elif op == "all_gather":
        multi = inter("all_gather", size / r) + intra("all_gather", size)
    elif op == "reduce":
        multi = intra("reduce_scatter", size) + inter("reduce", size / r)
    elif op == "broadcast":
        multi = inter("broadcast", size / r) + intra("all_gather", size)
    elif op == "all_to_all":
        on_node = ((r - 1) * system.intra_node.latency_us * US
                   + size * (r - 1) / g * (per_bus_byte / system.intra_node.ring_fraction))
        off_node = ((g - r) * system.inter_node.latency_us * US
                    + size * (g - r) / g / np.asarray(nic_share_Bps(system, r)))
        multi = np.maximum(on_node, off_node)
    else:  # p2p
        multi = np.asarray(p2p_time_s(system, size, cross_node=True, senders_per_node=r))
    return _out(multi if single is None else np.where(nodes > 1, multi, single))


# ---------------------------------------------------------------------------------------------
# point-to-point, host and NVMe transfers
# ---------------------------------------------------------------------------------------------


def p2p_time_s(system: System, message_bytes, cross_node: bool, senders_per_node=1):
    """Time to send ``message_bytes`` from one GPU to another (pipeline-parallel activations).

    Inside a node: one step latency plus the intra fabric at its ring bandwidth
    (:func:`intra_node_time_s` with ``p2p`` on 2 ranks).  Across nodes: one network latency plus
    ``S / bw`` with bw the smallest of one NIC's achieved rate, the node's NICs shared by
    ``senders_per_node`` GPUs sending at once (a pipeline stage boundary has every local GPU sending),
    and the GPU's host link.
    """
    size = _bytes(message_bytes)
    if not cross_node:
        return intra_node_time_s(system, "p2p", size, 2)
    _require_network(system, "a cross-node p2p needs inter_node")
    senders = _ranks(senders_per_node, "senders_per_node")
    if np.any(senders > system.gpus_per_node):
        raise ValueError(f"senders_per_node={senders_per_node!r} exceeds gpus_per_node={system.gpus_per_node}")
    net = system.inter_node
    bandwidth = np.minimum(net.nic_achieved_Bps, np.asarray(nic_share_Bps(system, senders)))
    return _out(net.latency_us * US + size / bandwidth)


def host_transfer_time_s(system: System, nbytes, measured_fraction: float | None = None):
    """Time to copy ``nbytes`` between host memory and one GPU in one direction (CPU offload).

    ``nbytes / host_to_gpu_bandwidth``: each GPU has its own link (PCIe x16, or its share of
    NVLink-C2C), so GPUs offloading at once do not slow each other ("aggregate PCI-E bandwidth
    between GPU and CPU across all the GPUs", DeepSpeed ZeRO-3 Offload post, reference §6.2).
    Bandwidth-bound; pinned host memory is assumed (pageable copies are slower).
    ``measured_fraction``: the device's calibrated ``efficiency.host_transfer_fraction`` (achieved /
    link figure, from the micro suite); None: the link figure as is.
    """
    fraction = 1.0 if measured_fraction is None else measured_fraction
    return _out(_bytes(nbytes, "nbytes") / (system.host.host_to_gpu_bandwidth_GBps * GB * fraction))


def nvme_transfer_time_s(system: System, nbytes, concurrent_gpus=None):
    """Time to move ``nbytes`` between local NVMe and one GPU (ZeRO-Infinity offload).

    The node's aggregate NVMe bandwidth is shared by the ``concurrent_gpus`` GPUs streaming at once
    (default: every GPU of the node, as ZeRO-Infinity partitions across all of them), and data also
    crosses the GPU's host link: ``nbytes / min(nvme_bw / concurrent_gpus, host_link)`` (the
    bytes / min(PCIe, NVMe bandwidth) model of reference §6.2).  A system without an NVMe figure
    raises ValueError naming it.
    """
    host = system.host
    if host.nvme_bandwidth_GBps is None:
        raise ValueError(
            f"system {system.name!r} has no NVMe offload figures (host.nvme_bandwidth_GBps is null); "
            "offload to host memory instead, or choose a system with local NVMe"
        )
    sharers = _ranks(system.gpus_per_node if concurrent_gpus is None else concurrent_gpus, "concurrent_gpus")
    if np.any(sharers > system.gpus_per_node):
        raise ValueError(f"concurrent_gpus={concurrent_gpus!r} exceeds gpus_per_node={system.gpus_per_node}")
    per_gpu = np.minimum(host.nvme_bandwidth_GBps * GB / sharers, host.host_to_gpu_bandwidth_GBps * GB)
    return _out(_bytes(nbytes, "nbytes") / per_gpu)
