"""Communication model: bus factors, alpha-beta times, curve interpolation, hierarchical collectives,
p2p/host/NVMe transfers -- each number derived in the test from the formula and the profile."""

from __future__ import annotations

import numpy as np
import pytest

from hwprofiles import all_systems, get_system, system_for
from simulator import comm

GIB = 2**30
DGX = get_system("dgx-h100")
OPS = comm.OPS


def _curve_at(system, size):
    """busbw (B/s) of the system's curve at one of its own points."""
    return dict(system.intra_node.busbw_curve)[size] * 1e9


# dgx-h100 at 1 GiB: the 8-GPU all-reduce of the curve takes 2^30 x 1.75 / 476.3 GB/s, of which 6 tree
# steps x 5 us are latency; the rest, per bus byte, is the fabric's bandwidth cost.  Ring-based
# operations run at 370 / 479.5 of the all-reduce busbw.
RING_FRACTION = 370 / 479.5
S_PER_BUS_BYTE = (GIB * 1.75 / 476.3e9 - 6 * 5e-6) / (GIB * 1.75)


# ---- bus factors and latency steps ----


@pytest.mark.parametrize(
    ("op", "expected"),
    [("all_reduce", 2 * 7 / 8), ("all_gather", 7 / 8), ("reduce_scatter", 7 / 8), ("all_to_all", 7 / 8),
     ("broadcast", 1.0), ("reduce", 1.0), ("p2p", 1.0)],
)
def test_bus_factor_follows_nccl_tests(op, expected) -> None:
    assert comm.bus_factor(op, 8) == pytest.approx(expected)
    assert comm.bus_factor(op, 1) == 0.0


def test_latency_steps_ring_tree_auto() -> None:
    # all-reduce on 8: ring 2(8-1) = 14, tree 2 x log2(8) = 6
    assert comm.latency_steps("all_reduce", 8, "ring") == 14
    assert comm.latency_steps("all_reduce", 8, "tree") == 6
    assert comm.latency_steps("all_reduce", 8) == 6
    # all-gather on 1024: ring 1023, tree 10
    assert comm.latency_steps("all_gather", 1024) == 10
    # all-to-all has no tree: n - 1 messages
    assert comm.latency_steps("all_to_all", 8) == 7
    for op in OPS:
        assert comm.latency_steps(op, 1) == 0


def test_unknown_op_and_bad_ranks_raise() -> None:
    with pytest.raises(ValueError, match="unknown collective 'allreduce'.*all_reduce"):
        comm.bus_factor("allreduce", 8)
    with pytest.raises(ValueError, match="n_ranks"):
        comm.bus_factor("all_reduce", 0)
    with pytest.raises(ValueError, match="n_ranks"):
        comm.bus_factor("all_reduce", 2.5)


# ---- alpha-beta time ----


def test_one_gib_all_reduce_on_8_ranks() -> None:
    busbw, latency = 400e9, 5e-6
    # 1 GiB x 2 x 7/8 / 400 GB/s, plus min(14 ring, 6 tree) = 6 latencies
    expected = GIB * 2 * 7 / 8 / busbw + 6 * latency
    assert comm.collective_time_s("all_reduce", GIB, 8, busbw, latency) == pytest.approx(expected)
    # forcing the ring: 14 latencies
    ring = GIB * 2 * 7 / 8 / busbw + 14 * latency
    assert comm.collective_time_s("all_reduce", GIB, 8, busbw, latency, "ring") == pytest.approx(ring)


def test_all_gather_moves_seven_eighths_of_the_full_size() -> None:
    # S = the full gathered size: each rank receives 7/8 of it; ring 7 vs tree 3 steps -> 3
    expected = GIB * 7 / 8 / 370e9 + 3 * 5e-6
    assert comm.collective_time_s("all_gather", GIB, 8, 370e9, 5e-6) == pytest.approx(expected)


@pytest.mark.parametrize("op", OPS)
def test_one_rank_takes_no_time(op) -> None:
    assert comm.collective_time_s(op, GIB, 1, 400e9, 5e-6) == 0.0
    assert comm.group_collective_time_s(DGX, op, GIB, 1, 8) == 0.0


def test_vectorized_collective_time_equals_scalar_calls() -> None:
    sizes = np.array([1e3, 1e6, 1e9])
    ranks = np.array([2, 8, 64])
    vec = comm.collective_time_s("reduce_scatter", sizes[:, None], ranks[None, :], 300e9, 4e-6)
    for i, s in enumerate(sizes):
        for j, n in enumerate(ranks):
            assert vec[i, j] == comm.collective_time_s("reduce_scatter", float(s), int(n), 300e9, 4e-6)


# ---- curve interpolation ----


def test_achieved_busbw_at_points_between_and_outside() -> None:
    curve = DGX.intra_node.busbw_curve
    (s1, b1), (s2, b2) = curve[3], curve[4]  # 8 MiB -> 242.3, 64 MiB -> 427.6 GB/s
    assert comm.achieved_busbw_Bps(curve, s1) == pytest.approx(b1 * 1e9)
    # log-log interpolation: at the geometric mean size, the geometric mean busbw
    mid = comm.achieved_busbw_Bps(curve, (s1 * s2) ** 0.5)
    assert mid == pytest.approx((b1 * b2) ** 0.5 * 1e9)
    # clamped to the end points
    assert comm.achieved_busbw_Bps(curve, 1) == pytest.approx(curve[0][1] * 1e9)
    assert comm.achieved_busbw_Bps(curve, 1e15) == pytest.approx(curve[-1][1] * 1e9)


def test_ring_operations_use_the_ring_busbw() -> None:
    # 1 GiB is a curve point (476.3 GB/s all-reduce with NVLink SHARP); ring ops scale it by 370 / 479.5
    ar = _curve_at(DGX, GIB)
    assert comm.intra_node_busbw_Bps(DGX, "all_reduce", GIB) == pytest.approx(ar)
    assert comm.intra_node_busbw_Bps(DGX, "all_gather", GIB) == pytest.approx(ar * 370 / 479.5)


# ---- one node ----


def test_single_node_all_reduce_on_dgx_h100() -> None:
    # 1 GiB over 8 GPUs at the curve's 476.3 GB/s: 2^30 x 2 x 7/8 / 476.3e9 (the 6 x 5 us floor is far below)
    expected = GIB * 2 * 7 / 8 / _curve_at(DGX, GIB)
    assert comm.group_collective_time_s(DGX, "all_reduce", GIB, 8, 8) == pytest.approx(expected)
    assert expected == pytest.approx(3.945e-3, rel=1e-3)


def test_tiny_messages_pay_the_step_latency() -> None:
    # 8 bytes: the curve time (8 x 1.75 / 59.73 MB/s) is below the floor of 6 steps x 5 us
    assert comm.group_collective_time_s(DGX, "all_reduce", 8, 8, 8) == pytest.approx(6 * 5e-6)


# ---- spanning nodes ----


def test_hierarchical_all_reduce_on_two_dgx_h100() -> None:
    s, r = GIB, 8
    # reduce-scatter over the 8 local GPUs: 3 tree steps x 5 us + S x 7/8 bus bytes at the ring cost
    rs_intra = 3 * 5e-6 + s * 7 / 8 * S_PER_BUS_BYTE / RING_FRACTION
    ag_intra = rs_intra  # all-gather: the same volume and steps
    nic_share = min(8 * 400e9 / 8 * 0.94 / r, 63e9)  # 376 GB/s of NICs shared by 8 ranks = 47 GB/s
    # all-reduce of S/8 between 2 nodes: 2(2-1)/2 = 1 x S/8 over 47 GB/s, min(2, 2) = 2 steps of 10 us
    ar_inter = 2 * 10e-6 + (s / r) * 1.0 / nic_share
    expected = rs_intra + ar_inter + ag_intra
    assert comm.group_collective_time_s(DGX, "all_reduce", s, 16, 8) == pytest.approx(expected)
    # nccl-tests busbw of that: 2^30 x 2 x 15/16 / t ~ 250 GB/s (nccl-tests#309 saw ~250 on 2 HGX H100)
    assert GIB * 2 * 15 / 16 / expected / 1e9 == pytest.approx(252, rel=0.01)


def test_all_to_all_across_nodes_is_limited_by_the_nic_share() -> None:
    g, r, s = 16, 8, GIB
    # half of each rank's buffer leaves the node over its 47 GB/s share; 8 network messages of 10 us
    off_node = (g - r) * 10e-6 + s * (g - r) / g / 47e9
    assert comm.group_collective_time_s(DGX, "all_to_all", s, g, r) == pytest.approx(off_node)


@pytest.mark.parametrize("op", OPS)
def test_spanning_nodes_is_slower_than_one_node(op) -> None:
    sizes = np.logspace(3, 10, 8)
    one_node = np.asarray(comm.group_collective_time_s(DGX, op, sizes, 8, 8))
    for r in (4, 2, 1):
        spread = np.asarray(comm.group_collective_time_s(DGX, op, sizes, 8, r))
        assert np.all(spread > one_node), (op, r)


@pytest.mark.parametrize("system", all_systems(), ids=lambda s: s.name)
@pytest.mark.parametrize("op", OPS)
def test_more_bytes_never_take_less_time(system, op) -> None:
    sizes = np.concatenate([[0.0], np.logspace(0, 11, 60)])
    placements = [(n, system.gpus_per_node) for n in (2, system.gpus_per_node)]
    if system.multi_node:
        placements += [(4 * system.gpus_per_node, system.gpus_per_node), (8, 1)]
    for group, per_node in placements:
        times = np.asarray(comm.group_collective_time_s(system, op, sizes, group, per_node))
        assert np.all(np.diff(times) >= 0), (group, per_node)
        assert times[0] >= 0


def test_vectorized_group_time_equals_scalar_calls() -> None:
    sizes = np.array([1e3, 1e6, 1e9, 1e10])
    groups = np.array([8, 16, 64, 2])
    per_node = np.array([8, 8, 8, 2])
    vec = comm.group_collective_time_s(DGX, "all_reduce", sizes, groups, per_node)
    for i in range(len(sizes)):
        assert vec[i] == comm.group_collective_time_s(DGX, "all_reduce", sizes[i], int(groups[i]), int(per_node[i]))


def test_bad_placements_raise() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        comm.group_collective_time_s(DGX, "all_reduce", GIB, 12, 8)
    with pytest.raises(ValueError, match="gpus_per_node=8"):
        comm.group_collective_time_s(DGX, "all_reduce", GIB, 16, 16)
    workstation = get_system("rtx-4090-workstation")
    with pytest.raises(ValueError, match="'rtx-4090-workstation' is single-node"):
        comm.group_collective_time_s(workstation, "all_reduce", GIB, 4, 2)


def test_derived_systems_work_too() -> None:
    t4 = system_for("t4-16gb", 4)
    # 4 GPUs on one synthesised node: the curve's peak is the PCIe rate x 0.635
    t = comm.group_collective_time_s(t4, "all_reduce", 8 * GIB, 4, 4)
    peak = t4.intra_node.busbw_curve[-1][1] * 1e9  # 8 GiB is the last curve point
    assert t == pytest.approx(8 * GIB * 2 * 3 / 4 / peak)


# ---- point-to-point, host, NVMe ----


def test_p2p_inside_and_across_nodes() -> None:
    # inside: one 5 us step + 1 GiB at the ring cost per byte
    inside = 5e-6 + GIB * S_PER_BUS_BYTE / RING_FRACTION
    assert comm.p2p_time_s(DGX, GIB, cross_node=False) == pytest.approx(inside)
    # alone: one NIC at 47 GB/s; with all 8 GPUs sending, still 376 / 8 = 47 GB/s each; one 10 us step
    assert comm.p2p_time_s(DGX, GIB, cross_node=True) == pytest.approx(10e-6 + GIB / 47e9)
    assert comm.p2p_time_s(DGX, GIB, cross_node=True, senders_per_node=8) == pytest.approx(10e-6 + GIB / 47e9)
    # g5.48xlarge: one 100 Gb/s EFA at 0.9 = 11.25 GB/s, shared by 8 senders; one 20 us step
    g5 = get_system("aws-g5-48xlarge")
    assert comm.p2p_time_s(g5, GIB, True, senders_per_node=8) == pytest.approx(20e-6 + GIB / (11.25e9 / 8))
    with pytest.raises(ValueError, match="single-node"):
        comm.p2p_time_s(get_system("rtx-a6000-workstation"), GIB, cross_node=True)


def test_host_transfer_uses_the_per_gpu_link() -> None:
    # PCIe 5 x16: 1 GiB / 63 GB/s
    assert comm.host_transfer_time_s(DGX, GIB) == pytest.approx(GIB / 63e9)
    # GB200: 225 GB/s of NVLink-C2C per GPU
    assert comm.host_transfer_time_s(get_system("gb200-nvl72"), GIB) == pytest.approx(GIB / 225e9)


def test_nvme_transfer_shares_the_node_drives() -> None:
    # DGX H100: 50 GB/s of NVMe shared by 8 GPUs = 6.25 GB/s each (below the 63 GB/s link)
    assert comm.nvme_transfer_time_s(DGX, GIB) == pytest.approx(GIB / (50e9 / 8))
    # one GPU alone: min(50, 63) = 50 GB/s
    assert comm.nvme_transfer_time_s(DGX, GIB, concurrent_gpus=1) == pytest.approx(GIB / 50e9)
    with pytest.raises(ValueError, match="'l40s-8x-pcie' has no NVMe offload figures"):
        comm.nvme_transfer_time_s(get_system("l40s-8x-pcie"), GIB)


def test_transfers_are_vectorized_and_monotone() -> None:
    sizes = np.logspace(3, 11, 20)
    for f in (comm.host_transfer_time_s, comm.nvme_transfer_time_s):
        times = f(DGX, sizes)
        assert np.all(np.diff(times) > 0)
        assert times[5] == f(DGX, float(sizes[5]))
    p2p = comm.p2p_time_s(DGX, sizes, cross_node=False)
    assert np.all(np.diff(p2p) >= 0)


def test_float8_training_keeps_attention_in_16_bits():
    """torchao / Transformer Engine float8 converts the linear layers only: the fused attention runs at the
    bf16 peak, the GEMMs at the fp8 one."""
    from hwprofiles import get_device
    from simulator.compute import attention_dtype, attention_time_s

    dev = get_device("h100-sxm-80gb")
    assert attention_dtype("fp8") == "bf16" and attention_dtype("fp16") == "fp16"
    f = 1e15
    t = attention_time_s(f, 0.0, dev, attention_dtype("fp8"), causal=True)
    assert t == pytest.approx(0.5 * f / (989e12 * dev.efficiency.attention_fraction))


def test_system_for_reads_the_device_line_of_every_system_yaml() -> None:
    """system_for skips, unparsed, the systems whose ``device:`` line names another device: the choice is the
    one over every parsed system."""
    from hwprofiles.registry import _system_devices, list_devices

    systems = all_systems()
    assert {s.name: s.device for s in systems} == _system_devices()
    for dev in list_devices():
        for n in (1, 8, 64):
            mine = [s for s in systems if s.device == dev]
            covering = [s for s in mine if s.gpus_per_node >= n]
            if covering:
                want = min(covering, key=lambda s: (s.gpus_per_node, s.name)).name
            elif any(s.multi_node for s in mine):
                want = min((s for s in mine if s.multi_node), key=lambda s: (-s.gpus_per_node, s.name)).name
            else:  # none, or only single nodes too small: a derived system
                want = None
            got = system_for(dev, n)
            assert (got.name if want else got.derived) == (want or True), (dev, n)
