"""Paged optimizer states (bitsandbytes, CUDA managed memory): they fill the memory PyTorch leaves free, the driver
keeps the rest in host memory and migrates it at every step; only the largest tensor's states must fit."""

from __future__ import annotations

import numpy as np
import pytest

from hwprofiles import get_device
from simulator import Scenario, estimate
from simulator import comm
from simulator import memory as mem
from simulator.estimate import _system_named, cost_table_for, rank_bytes
from simulator.grid import TrainGrid

# torchtune's llama3_1/8B_full_single_device recipe: pure bf16, PagedAdamW8bit stepped in backward, checkpointing
# (its README: 18.9 GiB peak on a 24 GiB RTX 4090, where the 15 GiB of 8-bit states cannot all stay)
TORCHTUNE_8B_FULL = {
    "model": "llama-3.1-8b", "method": {"kind": "full"}, "precision": "bf16",
    "optimizer": {"name": "paged-adamw-8bit", "in_backward": True}, "checkpointing": {"mode": "full"},
    "loss": "chunked", "workload": {"task": "train", "micro_batch": 2, "seq_len": 2048},
}


def _scenario(gpu: str, **upd) -> Scenario:
    return Scenario.model_validate({**TORCHTUNE_8B_FULL, "gpu": gpu, **upd})


def _paged_and_working(sc: Scenario) -> tuple[float, float]:
    rb, ms = rank_bytes(cost_table_for(sc), sc.parallel, sc.optimizer, 0, 1)
    return rb.paged, rb.paged_working


def test_the_working_set_is_the_largest_tensors_8_bit_states():
    sc = _scenario("rtx-4090-24gb")
    paged, working = _paged_and_working(sc)
    # the (128256, 4096) embedding and output projections are the largest tensors: two uint8 states and one fp32
    # absmax per 256-element block each (bitsandbytes blockwise 8-bit Adam)
    numel = 128256 * 4096
    assert working == mem.bnb_8bit_state_bytes(numel, 2) == 2 * numel + 2 * 4 * (numel // 256)
    assert paged > 10 * working


def test_states_that_do_not_fit_spill_to_host_memory_and_migrate_every_step():
    sc = _scenario("rtx-4090-24gb")
    dev = get_device(sc.gpu)
    e = estimate(sc, what_fits=False)
    paged, working = _paged_and_working(sc)
    free = dev.memory_total_bytes - e.peak_reserved_bytes - dev.cuda_context_bytes
    assert 0 < free < paged  # the case torchtune ran: the device holds part of the states
    assert e.fits
    assert e.paged_host_bytes == pytest.approx(paged - free, rel=1e-12)
    assert e.peak_memory_bytes == pytest.approx(dev.memory_total_bytes, rel=1e-12)  # nvidia-smi: the device is full
    assert e.headroom_bytes == pytest.approx(free - working, rel=1e-9)
    assert e.required_memory_bytes == pytest.approx(e.device_memory_bytes - e.headroom_bytes, rel=1e-12)
    assert e.memory_bytes.total == pytest.approx(e.peak_memory_bytes, rel=1e-9)
    assert e.host_memory_bytes >= e.paged_host_bytes
    # the spilled states come in while as many go out (full duplex): one direction's time over the host link
    system = _system_named(None, sc.gpu, 1)
    migrate = comm.host_transfer_time_s(system, e.paged_host_bytes, dev.efficiency.host_transfer_fraction)
    assert e.time.offload_s == pytest.approx(migrate, rel=1e-12)
    assert 0.2 < migrate < 1.0  # ~10 GiB over PCIe 4.0 x16
    roomy = estimate(_scenario("h100-sxm-80gb"), what_fits=False)
    assert roomy.paged_host_bytes == 0 and roomy.time.offload_s == 0


def test_states_that_fit_stay_on_the_device():
    sc = _scenario("h100-sxm-80gb")
    dev = get_device(sc.gpu)
    e = estimate(sc, what_fits=False)
    paged, working = _paged_and_working(sc)
    assert e.paged_host_bytes == 0
    assert e.peak_memory_bytes == pytest.approx(e.peak_reserved_bytes + paged + dev.cuda_context_bytes, rel=1e-12)
    # what must fit is everything but the states beyond the largest tensor's (the driver evicts them if needed)
    assert e.headroom_bytes == pytest.approx(
        dev.memory_total_bytes - (e.peak_reserved_bytes + working + dev.cuda_context_bytes), rel=1e-9)


def test_a_working_set_that_does_not_fit_is_the_shortfall():
    # 32-bit paged states: the embedding's are 4 GiB; at a long sequence nothing like that is left free
    sc = _scenario("rtx-4090-24gb", optimizer={"name": "paged-adamw-32bit", "in_backward": True},
                   workload={"task": "train", "micro_batch": 4, "seq_len": 4096})
    dev = get_device(sc.gpu)
    e = estimate(sc, what_fits=False)
    paged, working = _paged_and_working(sc)
    assert working == 2 * 4 * 128256 * 4096
    free = dev.memory_total_bytes - e.peak_reserved_bytes - dev.cuda_context_bytes
    assert free < working and not e.fits
    assert e.headroom_bytes == pytest.approx(free - working, rel=1e-9)


def test_more_tokens_never_need_less_memory_with_paged_states():
    needs = []
    for mb in (1, 2, 4, 8):
        e = estimate(_scenario("rtx-4090-24gb", workload={"task": "train", "micro_batch": mb, "seq_len": 2048}),
                     what_fits=False)
        needs.append(e.device_memory_bytes - e.headroom_bytes)
        assert e.paged_host_bytes > 0
    assert needs == sorted(needs)


def test_the_planners_arrays_agree_with_estimate_when_states_spill():
    fam = _scenario("rtx-4090-24gb")
    dev = get_device("rtx-4090-24gb")
    grid = TrainGrid([fam], [1, 2, 4], [1], [dev])
    par = fam.parallel
    system = _system_named(None, dev.name, 1)
    ga = np.array([1, 1, 1])
    peak, need, spilled = grid.peak_bytes(dev, system, par, ga)
    step = grid.step_s(dev, system, par, ga, spilled)
    for k, mb in enumerate([1, 2, 4]):
        e = estimate(fam.model_copy(update={"workload": fam.workload.model_copy(update={"micro_batch": mb})}),
                     what_fits=False)
        assert e.paged_host_bytes > 0
        assert peak[0, k] == e.peak_memory_bytes
        assert need[0, k] == e.required_memory_bytes == e.device_memory_bytes - e.headroom_bytes
        assert spilled[0, k] == e.paged_host_bytes
        assert step[0, k] == e.time.step_s


def test_the_report_says_where_the_spilled_states_are_and_what_their_migration_costs():
    from simulator.report import render

    sc = _scenario("rtx-4090-24gb")
    e = estimate(sc, what_fits=False)
    text = render(e, sc)
    assert "paged optimizer states the device has no room for" in text
    assert "offload (exposed; paged migration)" in text
    roomy = render(estimate(_scenario("h100-sxm-80gb"), what_fits=False))
    assert "paged migration" not in roomy and "no room" not in roomy
