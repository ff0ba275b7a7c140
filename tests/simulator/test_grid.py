"""The array evaluation plan() uses (simulator.grid and the engine pieces that take arrays) against
estimate() and the scalar pieces, number for number."""

from __future__ import annotations

import numpy as np
import pytest

from hwprofiles import get_device
from simulator import memory as mem
from simulator import sharding as sh
from simulator.compute import Devices, matmul_dtype, op_arrays, part_time
from simulator.config import Scenario
from simulator.config.parallel import Parallel
from simulator.estimate import _system_named, cost_table_for, estimate
from simulator.graph.ir import basis
from simulator.grid import TrainGrid
from simulator.planner import _maybe_before, _maybe_on_front

MODEL = "llama-3.2-1b"
SEQ = 512
METHODS = [{"kind": "full"}, {"kind": "lora", "r": 16, "targets": "all-linear"},
           {"kind": "qlora", "r": 16, "targets": "all-linear"}]
LAYOUTS = [{}, {"dp": 2}, {"dp": 4, "zero": 1}, {"dp": 4, "zero": 2}, {"dp": 4, "zero": 3},
           {"dp": 8, "fsdp": "full_shard"}, {"dp": 2, "fsdp": "shard_grad_op"}, {"dp": 2, "tp": 2}, {"tp": 4},
           {"dp": 2, "pp": 2}, {"pp": 4, "pp_schedule": "gpipe"}, {"dp": 16, "fsdp": "full_shard"},
           {"cp": 2}, {"dp": 2, "cp": 2, "fsdp": "full_shard"}, {"dp": 2, "cp": 4, "zero": 3},
           {"zero": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}, {"dp": 4, "zero": 2, "offload_optimizer": "cpu"}]
MICRO_BATCHES = [1, 2, 8]
GRAD_ACCUM = np.array([1, 4, 2])
GPUS = ["h100-sxm-80gb", "l4-24gb", "v100-sxm-32gb"]  # V100: no fused-attention figure, no bf16 path


def _family(method: dict, optimizer: str, checkpointing: str) -> Scenario:
    return Scenario.model_validate({
        "model": MODEL, "method": method, "optimizer": {"name": optimizer}, "checkpointing": {"mode": checkpointing},
        "workload": {"task": "train", "seq_len": SEQ, "micro_batch": 1, "total_tokens": 1e7}})


@pytest.fixture(scope="module")
def grid() -> TrainGrid:
    fams = [_family(m, o, c) for m in METHODS for o in ("adamw", "adamw-8bit") for c in ("none", "full")]
    return TrainGrid(fams, MICRO_BATCHES, [1, 2, 4], [get_device(g) for g in GPUS])


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "single")
def test_grid_equals_estimate(grid, gpu, layout):
    # every (family, micro-batch) of one GPU and layout: peak memory and step time are estimate()'s, exactly
    dev = get_device(gpu)
    par = Parallel.model_validate(layout)
    system = _system_named(None, gpu, par.n_gpus)
    peak, _, spilled = grid.peak_bytes(dev, system, par, GRAD_ACCUM)
    step = grid.step_s(dev, system, par, GRAD_ACCUM, spilled)
    assert peak.shape == step.shape == (len(grid.families), len(MICRO_BATCHES))
    for i, sc in enumerate(grid.families):
        if par.offload_optimizer != "none" and sc.optimizer.name != "adamw":
            continue  # no host implementation: the planner never forms this candidate
        for k, mb in enumerate(MICRO_BATCHES):
            data = sc.model_dump()
            data.update(gpu=gpu, parallel=layout,
                        workload={**data["workload"], "micro_batch": mb, "grad_accum": int(GRAD_ACCUM[k])})
            e = estimate(data, what_fits=False)
            assert peak[i, k] == e.peak_memory_bytes
            assert step[i, k] == e.time.step_s


@pytest.mark.parametrize("attention", ["sdpa-flash", "eager"])
@pytest.mark.parametrize("method", METHODS[:2], ids=["full", "lora"])
def test_part_time_arrays_equal_one_setup(attention, method):
    # all operators at once over (tp, micro-batch) arrays, and over (device, tp, micro-batch), give the loop
    # over operators' numbers
    sc = Scenario.model_validate({"model": MODEL, "method": method, "attention": attention,
                                  "checkpointing": {"mode": "full"},
                                  "workload": {"task": "train", "seq_len": SEQ, "micro_batch": 1}})
    ct = cost_table_for(sc)
    tps, mbs = np.array([1, 2, 4]), np.array([1, 3, 16])
    devs = [get_device(g) for g in GPUS]
    dtype = matmul_dtype(ct.plan.precision.compute_dtype, sc.precision)
    fused = attention != "eager"
    for part in op_arrays(ct):
        every = part_time(part, basis(mbs[None, None, :], SEQ, SEQ), Devices(devs), dtype, tps[None, :, None], 1,
                          True, fused)
        for d, dev in enumerate(devs):
            many = part_time(part, basis(mbs[None, :], SEQ, SEQ), dev, dtype, tps[:, None], 1, True, fused)
            for a, tp in enumerate(tps):
                for b, mb in enumerate(mbs):
                    one = part_time(part, basis(int(mb), SEQ, SEQ), dev, dtype, int(tp), 1, True, fused)
                    for f in ("forward_s", "backward_s", "recompute_s", "attention_s"):
                        assert getattr(many, f)[a, b] == getattr(one, f), (part.where, f, tp, mb)
                        assert getattr(every, f)[d, a, b] == getattr(one, f), (dev.name, part.where, f, tp, mb)


def test_allocator_pieces_on_arrays():
    # segment rounding: <= 1 MiB -> a 2 MiB segment, < 10 MiB -> 20 MiB, else rounded up to 2 MiB
    requests = np.array([0.0, 512.0, 2.0**20, 2.0**20 + 1, 9.5 * 2**20, 10 * 2**20, 10 * 2**20 + 1, 3e9])
    assert mem.segment_bytes(requests).tolist() == [mem.segment_bytes(float(r)) for r in requests]
    assert mem.segment_bytes(np.array([10 * 2**20 + 1.0]))[0] == 12 * 2**20
    allocated = np.full_like(requests, 40e9)
    for expandable in (False, True):
        arr = mem.reserved_overhead_bytes(requests, allocated, expandable)
        assert arr.tolist() == [mem.reserved_overhead_bytes(float(r), 40e9, expandable) for r in requests]
    # the 3e9 request: rounded up to 1431 x 2 MiB, plus 3 % of the allocated 40 GB
    assert arr[-1] == 1431 * 2**21 - 3e9
    assert mem.reserved_overhead_bytes(requests, allocated, False)[-1] == 1431 * 2**21 - 3e9 + 0.03 * 40e9


def test_in_flight_microbatches_on_arrays():
    # 1F1B on 4 stages: stage 1 holds min(3, m) micro-batches; GPipe all m; interleaved x (1 + 3/(4*2))
    m = np.array([1, 2, 3, 8])
    par = Parallel(pp=4)
    assert sh.in_flight_microbatches(par, 1, m).tolist() == [1.0, 2.0, 3.0, 3.0]
    assert sh.in_flight_microbatches(Parallel(pp=4, pp_schedule="gpipe"), 1, m).tolist() == [1.0, 2.0, 3.0, 8.0]
    inter = Parallel(pp=4, pp_schedule="interleaved", pp_virtual=2)
    assert sh.in_flight_microbatches(inter, 0, m).tolist() == [x * 1.375 for x in (1.0, 2.0, 3.0, 4.0)]
    assert sh.in_flight_microbatches(Parallel(), 0, m) == 1.0


def test_maybe_before_keeps_near_ties_and_drops_clear_losers():
    # keys (cost, time, n): the 2nd-best is (10, 5, 2); a cost within 1e-9 of it is kept whatever its time,
    # an equal infinite cost or an equal integer passes the decision to the next component
    c = np.array([9.0, 10.0, 10.0 * (1 + 1e-12), 10.1, np.inf, 10.0])
    t = np.array([7.0, 5.0, 99.0, 1.0, 1.0, 5.0])
    n = np.array([1, 2, 4, 1, 1, 8])
    keep = _maybe_before((c, t, n), (10.0, 5.0, 2), (False, False, True))
    assert keep.tolist() == [True, True, True, False, False, True]
    # objective gpus (n, cost, time): n decides exactly, then cost
    keep = _maybe_before((n, c, t), (1, 10.0, 1.0), (True, False, False))
    assert keep.tolist() == [True, False, False, False, False, False]


def test_maybe_on_front():
    # (time, cost): (1, 10) and (2, 5) are on the front; (3, 6) is beaten by (2, 5); (2, 5 + tiny) is kept
    t = np.array([1.0, 2.0, 3.0, 2.0, 4.0])
    c = np.array([10.0, 5.0, 6.0, 5.0 * (1 + 1e-12), np.inf])
    assert _maybe_on_front(t, c).tolist() == [True, True, False, True, False]


@pytest.mark.parametrize("case", [
    dict(objective="cost", constraints={"global_batch_tokens": 8 * SEQ * 4}, space={"pp": [1, 2]}),
    dict(objective="gpus", total_tokens=None, space={}),
    dict(objective="time", constraints={"budget_usd": 0.9}, space={"sharding": ["zero1", "fsdp-grad-op"]}),
    dict(objective="time", space={"cp": [1, 2], "sharding": ["none", "fsdp", "zero3-offload"]}),
], ids=["pp-and-grad-accumulation", "per-million-tokens", "budget", "cp-and-offload"])
def test_plan_on_the_grid_equals_estimating_every_candidate(case):
    # the array search and the reference (estimate() on every screened candidate) rank and front alike
    from simulator.planner import plan

    args = dict(model=MODEL, task="finetune", seq_len=SEQ, total_tokens=case.get("total_tokens", 2e7), top_n=6,
                objective=case["objective"], constraints={"max_gpus": 4, **case.get("constraints", {})},
                space={"gpus": ["l4-24gb", "a100-sxm-80gb"], "gpu_counts": [1, 2, 4], "micro_batches": [1, 2, 8],
                       "methods": METHODS[:2], "optimizers": ["adamw"], "tp": [1, 2], **case["space"]})
    fast, ref = plan(**args), plan(**args, bound=False)
    assert fast.candidates_evaluated == ref.candidates_evaluated
    assert fast.candidates_estimated < ref.candidates_estimated
    assert [r.scenario for r in fast.ranked] == [r.scenario for r in ref.ranked]
    assert [r.scenario for r in fast.pareto] == [r.scenario for r in ref.pareto]
    assert fast.rejected_reasons.keys() == ref.rejected_reasons.keys()


def test_expert_parallel_layouts_on_a_moe_model_equal_estimate():
    """EP on a small Mixtral: the grid's peak and step time are estimate()'s for dp x cp ranks split over ep."""
    from simulator.config.scenario import model_from_name

    arch = model_from_name("mixtral-8x7b").model_copy(update={"name": "mixtral-2l", "n_layers": 2})
    fam = Scenario.model_validate({"model": arch, "method": {"kind": "full"}, "optimizer": {"name": "adamw"},
                                   "checkpointing": {"mode": "full"},
                                   "workload": {"task": "train", "seq_len": SEQ, "micro_batch": 1}})
    g = TrainGrid([fam], [1, 2], [1, 2, 4], [get_device("h100-sxm-80gb")])
    for layout in ({"dp": 8, "ep": 8, "zero": 1}, {"dp": 4, "ep": 2, "fsdp": "full_shard"}, {"dp": 2, "cp": 2, "ep": 4}):
        par = Parallel.model_validate(layout)
        system = _system_named(None, "h100-sxm-80gb", par.n_gpus)
        ga = np.array([1, 2])
        peak, _, spilled = g.peak_bytes(get_device("h100-sxm-80gb"), system, par, ga)
        step = g.step_s(get_device("h100-sxm-80gb"), system, par, ga, spilled)
        for k, mb in enumerate([1, 2]):
            data = fam.model_dump()
            data.update(gpu="h100-sxm-80gb", parallel=layout,
                        workload={**data["workload"], "micro_batch": mb, "grad_accum": int(ga[k])})
            e = estimate(data, what_fits=False)
            assert peak[0, k] == e.peak_memory_bytes and step[0, k] == e.time.step_s, layout

