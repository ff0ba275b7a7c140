"""simulator.plan: the chosen setup against a brute-force loop over estimate(), exactness of the rows,
objectives, rejected families and bad input."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from pydantic import ValidationError

from simulator import Scenario
from simulator.estimate import estimate
from simulator.planner import SHARDING_PARALLEL, Constraints, PlanError, SearchSpace, plan

MODEL = "llama-3.2-1b"
SEQ = 1024
TOKENS = 2e7
SPACE = dict(
    gpus=["l4-24gb", "a100-sxm-80gb"], gpu_counts=[1, 2], precisions=["bf16"],
    methods=[{"kind": "full"}, {"kind": "lora", "r": 16, "targets": "all-linear"}],
    optimizers=["adamw", "adamw-8bit"], micro_batches=[1, 4, 16], checkpointing=["none", "full"],
    sharding=["none", "zero3"], tp=[1],
)


def _plan(**kw):
    args = dict(model=MODEL, task="finetune", seq_len=SEQ, total_tokens=TOKENS, space=SPACE, top_n=5)
    args.update(kw)
    return plan(**args)


def _brute_force(objective: str, headroom: float = 0.05, budget: float | None = None):
    """Every setup of SPACE through estimate(); the best by the objective, then cost, time, GPUs, JSON."""
    best = None
    for gpu, n, m, opt, mb, ck, sh in itertools.product(
            SPACE["gpus"], SPACE["gpu_counts"], SPACE["methods"], SPACE["optimizers"], SPACE["micro_batches"],
            SPACE["checkpointing"], SPACE["sharding"]):
        if n == 1 and sh != "none":
            continue
        sc = {"model": MODEL, "gpu": gpu, "method": m, "precision": "bf16", "optimizer": {"name": opt},
              "checkpointing": {"mode": ck}, "parallel": {"dp": n, **SHARDING_PARALLEL[sh]},
              "workload": {"task": "train", "seq_len": SEQ, "micro_batch": mb, "total_tokens": TOKENS}}
        e = estimate(sc, what_fits=False)
        if e.peak_memory_bytes > (1 - headroom) * e.device_memory_bytes:
            continue
        if budget is not None and e.cost.run_usd > budget:
            continue
        t, c = e.cost.run_time_s, e.cost.run_usd
        key = {"cost": (c, t, n), "time": (t, c, n)}[objective]
        if best is None or key < best[0]:
            best = (key, e)
    return best


@pytest.fixture(scope="module")
def by_cost():
    return _plan(objective="cost")


@pytest.fixture(scope="module")
def by_time():
    return _plan(objective="time")


@pytest.mark.parametrize("objective", ["cost", "time"])
def test_best_equals_brute_force(objective, by_cost, by_time):
    res = by_cost if objective == "cost" else by_time
    key, e = _brute_force(objective)
    b = res.best
    assert (b.gpu, b.n_gpus) == (e.gpu, e.n_gpus)
    assert b.run_usd == pytest.approx(e.cost.run_usd, rel=1e-12)
    assert b.run_time_s == pytest.approx(e.cost.run_time_s, rel=1e-12)
    assert b.peak_memory_bytes == pytest.approx(e.peak_memory_bytes, rel=1e-12)


def test_branch_and_bound_matches_exhaustive(by_cost):
    full = _plan(objective="cost", bound=False)
    assert full.candidates_estimated >= by_cost.candidates_estimated
    assert [r.scenario for r in full.ranked] == [r.scenario for r in by_cost.ranked]
    assert [r.scenario for r in full.pareto] == [r.scenario for r in by_cost.pareto]


def _assert_row_equals_estimate(r) -> None:
    e = estimate(r.scenario, what_fits=False)
    assert e.peak_memory_bytes == pytest.approx(r.peak_memory_bytes, rel=1e-9)
    assert e.time.step_s == pytest.approx(r.step_time_s, rel=1e-9)
    assert e.cost.run_usd == pytest.approx(r.run_usd, rel=1e-9)
    assert e.cost.run_kwh == pytest.approx(r.run_kwh, rel=1e-9)


def test_rows_equal_estimate(by_cost, by_time):
    rows = {json.dumps(r.scenario, sort_keys=True): r for r in [*by_cost.ranked, *by_cost.pareto, *by_time.ranked]}
    sample = random.Random(0).sample(sorted(rows), min(8, len(rows)))
    for k in sample:
        r = rows[k]
        _assert_row_equals_estimate(r)
        assert r.peak_memory_bytes <= r.usable_memory_bytes


def test_objectives_pull_the_right_way(by_cost, by_time):
    assert by_time.best.run_time_s <= by_cost.best.run_time_s
    assert by_cost.best.run_usd <= by_time.best.run_usd
    # ranked is sorted by the objective; the front is fastest first with falling cost
    costs = [r.run_usd for r in by_cost.ranked]
    assert costs == sorted(costs)
    front = by_cost.pareto
    assert [r.run_time_s for r in front] == sorted(r.run_time_s for r in front)
    assert [r.run_usd for r in front] == sorted((r.run_usd for r in front), reverse=True)
    assert by_cost.candidates_evaluated >= by_cost.candidates_estimated > 0
    gpus = _plan(objective="gpus")
    assert gpus.best.n_gpus == 1


def test_rejected_family_names_memory():
    res = plan(model="llama-3.1-8b", task="finetune", seq_len=SEQ, total_tokens=TOKENS,
               constraints={"max_gpus": 1, "gpu": "l4-24gb"},
               space={"methods": [{"kind": "full"}, {"kind": "qlora", "r": 16, "targets": "all-linear"}],
                      "optimizers": ["adamw"], "micro_batches": [1], "checkpointing": ["full"]})
    assert res.best.method.startswith("qlora")
    reason = res.rejected_reasons["full on 1x l4-24gb"]
    assert "GiB usable" in reason and ">" in reason


def test_budget_too_small_names_the_budget():
    with pytest.raises(PlanError, match=r"budget_usd=\$0\.01 is binding.*costs \$") as exc:
        _plan(objective="cost", constraints={"budget_usd": 0.01})
    assert exc.value.closest is not None and exc.value.closest.run_usd > 0.01


def test_budget_filters_like_brute_force():
    cheapest = _brute_force("cost")[1].cost.run_usd
    budget = cheapest * 1.5
    res = _plan(objective="time", constraints={"budget_usd": budget})
    key, e = _brute_force("time", budget=budget)
    assert res.best.run_time_s == pytest.approx(e.cost.run_time_s, rel=1e-12)
    assert all(r.run_usd <= budget for r in res.ranked)


def test_no_fit_names_memory():
    with pytest.raises(PlanError, match="memory is binding"):
        plan(model="llama-3.1-70b", task="finetune", seq_len=SEQ, constraints={"max_gpus": 1, "gpu": "l4-24gb"},
             space={"methods": [{"kind": "full"}], "micro_batches": [1]})


def test_bad_input():
    with pytest.raises(ValueError, match="closest"):
        _plan(constraints={"gpu": "h100-nope"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Constraints(max_gpus=0)
    with pytest.raises(ValidationError):
        SearchSpace(gpu_counts=[])
    with pytest.raises(ValidationError):
        SearchSpace(bogus=1)
    with pytest.raises(ValueError, match="total_tokens"):
        plan(model=MODEL, task="finetune", constraints={"budget_usd": 10}, space=SPACE)
    with pytest.raises(ValueError, match="objective"):
        _plan(objective="fastest")
    with pytest.raises(ValueError, match="max_gpus"):
        _plan(constraints={"max_gpus": 1}, space={**SPACE, "gpu_counts": [2, 4]})


def test_two_hundred_sampled_rows_equal_estimate():
    # a wider space (four GPU types, up to 8 GPUs, ZeRO-2/3 and FSDP) ranked deep enough to hold 200+ rows
    space = dict(SPACE, gpus=["l4-24gb", "a100-sxm-80gb", "h100-sxm-80gb", "rtx-4090-24gb"], gpu_counts=[1, 2, 4, 8],
                 sharding=["none", "zero2", "zero3", "fsdp"])
    res = _plan(objective="cost", space=space, top_n=400, pareto=False)
    rows = {json.dumps(r.scenario, sort_keys=True): r for r in res.ranked}
    assert len(rows) >= 200
    for k in random.Random(1).sample(sorted(rows), 200):
        _assert_row_equals_estimate(rows[k])


def test_offload_is_searched_on_one_gpu_and_host_ram_binds():
    """ZeRO-3 with the optimizer and parameters in host RAM is a candidate on a single GPU: full fine-tuning
    of an 8B model fits one 24 GB card that way; on a workstation with 256 GB of host RAM a 70B model's
    offloaded states do not, and the reason says so with the numbers."""
    from simulator.sharding import host_ram_bytes
    from hwprofiles import get_system

    space = {"gpus": ["rtx4090-24gb"], "gpu_counts": [1], "methods": [{"kind": "full"}], "optimizers": ["adamw"],
             "micro_batches": [1], "checkpointing": ["full"], "sharding": ["none", "zero3-offload"]}
    res = plan(model="llama-3.1-8b", task="finetune", seq_len=2048, total_tokens=1e7, space=space)
    assert res.best.parallel == "ZeRO-3 + CPU optimizer and params"
    assert Scenario.model_validate(res.best.scenario).parallel.offload_params == "cpu"
    with pytest.raises(PlanError) as exc:
        plan(model="llama-3.1-70b", task="finetune", seq_len=2048, total_tokens=1e7, space=space)
    reason = str(exc.value)
    ram = host_ram_bytes(get_system("rtx-4090-workstation"))
    assert "host RAM of the node" in reason and f"{ram / 2**30:.1f} GiB" in reason


def test_context_and_expert_parallel_degrees_are_searched():
    """cp and ep join the layouts: a MoE model's best full fine-tune on 8 H100s splits its experts, every row
    is estimate()'s, and on a dense model expert parallelism is ruled out with the reason."""
    space = {"gpus": ["h100-sxm-80gb"], "gpu_counts": [8], "methods": [{"kind": "full"}], "optimizers": ["adamw"],
             "micro_batches": [1, 2], "checkpointing": ["full"], "sharding": ["fsdp"], "ep": [1, 8], "cp": [1, 2]}
    res = plan(model="mixtral-8x7b", task="finetune", seq_len=4096, total_tokens=1e8, space=space, top_n=20)
    pars = {r.parallel for r in res.ranked}
    assert any("ep8" in p for p in pars) and any("cp2" in p for p in pars)
    for r in res.ranked:
        sc = Scenario.model_validate(r.scenario)
        e = estimate(sc, what_fits=False)
        assert e.peak_memory_bytes == r.peak_memory_bytes and e.time.step_s == r.step_time_s
        assert sc.parallel.n_gpus == 8 and f"ep{sc.parallel.ep}" in r.parallel or sc.parallel.ep == 1
    with pytest.raises(PlanError, match="ep") as exc:
        plan(model="llama-3.2-1b", task="finetune", seq_len=2048, total_tokens=1e7, space={**space, "ep": [8]})
    assert any("ep" in v for v in exc.value.rejected_reasons.values())
