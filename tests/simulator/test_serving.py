"""simulator.serving and plan() with a request rate: the queueing formulas against textbook values, the
fleet sized by hand from an estimate, a brute-force check of the cheapest setup, monotonicity, the
binding reasons and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from hwprofiles import get_device
from simulator import serving as sv
from simulator.estimate import estimate
from simulator.plan_serving import describe
from simulator.planner import Job, PlanError, plan

MODEL = "llama-3.1-8b"
P, G = 512, 128
RATE = 5.0
SPACE = dict(gpus=["l4-24gb", "a100-sxm-80gb", "h100-sxm-80gb"], tp=[1, 2], infer_weights=["none", "awq"],
             micro_batches=[1, 4, 16, 64])
TARGETS = {"max_ttft_s": 1.0, "max_tpot_s": 0.08, "max_gpus": 16}


def _plan(rate=RATE, constraints=TARGETS, space=SPACE, model=MODEL, **kw):
    return plan(model=model, task="infer", request_rate_per_s=rate, prompt_len=P, gen_len=G,
                constraints=constraints, space=space, **kw)


def _erlang_c_recursion(c: int, a: float) -> float:
    """Erlang B by its recursion B(k) = a B(k-1) / (k + a B(k-1)), then C = c B / (c - a (1 - B))."""
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return c * b / (c - a * (1.0 - b)) if c > a else 1.0


def _est(gpu, tp, weights, batch, model=MODEL):
    # the planner's replicas replay their decode steps from CUDA graphs (a continuous-batching server)
    return estimate({"model": model, "gpu": gpu, "parallel": {"tp": tp},
                     "inference": {"weights": weights, "cuda_graphs": True},
                     "workload": {"task": "infer", "batch": batch, "prompt_len": P, "gen_len": G}}, what_fits=False)


# ------------------------------------------------------------------------------------ formulas


def test_erlang_c_textbook_values():
    # c = 2, a = 1: B = (1/2) / (1 + 1 + 1/2) = 0.2, C = 2 * 0.2 / (2 - 0.8) = 1/3
    assert sv.erlang_c(2, 1.0)[0] == pytest.approx(1 / 3, rel=1e-12)
    # one server: an arrival waits exactly when the server is busy, probability rho
    assert sv.erlang_c(1, 0.7)[0] == pytest.approx(0.7, rel=1e-12)
    # overloaded: everyone waits
    assert sv.erlang_c(10, 12.0)[0] == 1.0
    for a in (0.4, 7.5, 93.7, 1500.0):
        cs = [max(1, int(a * f)) + 1 for f in (1.0, 1.05, 1.3, 2.0)]
        got = sv.erlang_c(np.array(cs), a)
        want = [_erlang_c_recursion(c, a) for c in cs]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-300)


def test_md1_wait_is_pollaczek_khinchine():
    # M/D/1 mean wait = rho S / (2 (1 - rho)); at rho = 0.6, S = 2 s: 0.6 * 2 / 0.8 = 1.5 s
    assert sv.mdc_wait_mean_s(1, 0.6, 2.0)[0] == pytest.approx(1.5, rel=1e-12)
    # the tail: P(W > t) = C exp(-(c - a) t / S), halved: t99 = 0.5 S / (1 - 0.6) ln(0.6 / 0.01)
    assert sv.mdc_wait_quantile_s(1, 0.6, 2.0, 0.99)[0] == pytest.approx(0.5 * 2.0 / 0.4 * math.log(60.0), rel=1e-12)
    # fewer than 1 % of arrivals wait: the p99 wait is zero
    assert sv.mdc_wait_quantile_s(50, 10.0, 1.0, 0.99)[0] == 0.0
    assert sv.mdc_wait_mean_s(3, 3.0, 1.0)[0] == math.inf


def test_capacity_stalls_ttft_and_cost_by_hand():
    # 32 slots, 0.8 s to prefill 32 prompts, 25 ms per decode step, 200 tokens: a slot turns over in
    # 0.8 + 200 * 0.025 = 5.8 s, so a replica completes 32 / 5.8 requests/s
    assert sv.slot_time_s(0.8, 0.025, 200) == pytest.approx(5.8)
    assert sv.replica_capacity_per_s(32, 0.8, 0.025, 200) == pytest.approx(32 / 5.8)
    # 3 requests/s on one replica prefill 3 * 0.8 / 32 = 7.5 % of the time: TPOT 25 / 0.925 ms
    assert sv.prefill_share(3.0, 0.8, 32) == pytest.approx(0.075)
    assert sv.mean_tpot_s(0.025, 0.075) == pytest.approx(0.025 / 0.925)
    assert sv.ttft_s(0.1, 0.025, 0.05, tail=True) == pytest.approx(0.175)
    assert sv.ttft_s(0.1, 0.025, 0.05, tail=False) == pytest.approx(0.1625)
    assert sv.max_concurrency(20e9, 6e9, 0.5e9) == 28
    assert sv.max_concurrency(5e9, 6e9, 0.5e9) == 0
    # 3 replicas x 2 GPUs at $2/GPU-hour = $12/hour; 1000 tokens/s = 3.6M tokens/hour -> $3.33/M
    assert sv.usd_per_hour(3, 2, 2.0) == 12.0
    assert sv.usd_per_million_tokens(12.0, 1000.0) == pytest.approx(12.0 / 3.6)
    assert sv.kwh_per_million_tokens(6, 700.0, 1000.0) == pytest.approx(4.2 / 3.6)


def test_replicas_needed_is_the_first_count_meeting_every_target():
    lim = sv.ServingLimits(max_ttft_s=0.5, max_tpot_s=0.03, max_utilization=0.9)
    point, field, why = sv.replicas_needed(40.0, 32, 0.05, 0.8, 0.025, 200, lim)
    assert field is None and why is None
    r = point.replicas
    for n in (r - 1, r):
        p = sv.serving_point(40.0, n, 32, 0.05, 0.8, 0.025, 200)
        ok = (p["utilization"][0] <= 0.9 and p["tpot_mean"][0] <= 0.03 and p["ttft_tail"][0] <= 0.5)
        assert ok == (n == r)
    # the utilization cap alone: ceil(40 / (0.9 * 32 / 5.8)) replicas
    only_util = sv.replicas_needed(40.0, 32, 0.05, 0.8, 0.025, 200, sv.ServingLimits(max_utilization=0.9))[0]
    assert only_util.replicas == math.ceil(40.0 / (0.9 * 32 / 5.8))


def test_replicas_needed_names_the_floor_it_cannot_beat():
    _, field, why = sv.replicas_needed(1.0, 8, 0.05, 0.2, 0.04, 100, sv.ServingLimits(max_tpot_s=0.03))
    assert field == "max_tpot_s" and why == "TPOT 40.0 ms > 30.0 ms target at batch 8"
    _, field, why = sv.replicas_needed(1.0, 8, 0.3, 0.2, 0.01, 100, sv.ServingLimits(max_ttft_s=0.2))
    assert field == "max_ttft_s" and "prefill of one prompt 0.3 s" in why
    _, field, why = sv.replicas_needed(100.0, 8, 0.05, 0.2, 0.01, 100, sv.ServingLimits(max_replicas=4))
    # one replica serves 8 / (0.2 + 1.0) = 6.67/s; 100/s at 100 % needs 15 replicas
    assert field == "max_gpus" and why.startswith("needs 15 replicas") and "> 4 allowed" in why


# ------------------------------------------------------------------------------------ the planner


def test_replicas_and_cost_recomputed_from_the_estimate():
    rate = 50.0
    res = _plan(rate=rate, constraints={"gpu": "h100-sxm-80gb"},
                space=dict(tp=[1], infer_weights=["none"], micro_batches=[32]))
    s = res.best.serving
    e = _est("h100-sxm-80gb", 1, "none", 32)
    cap = 32 / (e.time.prefill_s + G * e.time.decode_per_token_s)
    replicas = math.ceil(rate / (0.9 * cap))
    assert s.replicas == replicas and res.best.n_gpus == replicas
    assert s.capacity_per_replica_per_s == pytest.approx(cap, rel=1e-12)
    assert s.utilization == pytest.approx(rate / (replicas * cap), rel=1e-12)
    assert s.tpot_s == e.time.decode_per_token_s
    assert s.prefill_batch_s == e.time.prefill_s
    price = get_device("h100-sxm-80gb").price_usd_per_hour
    assert s.usd_per_hour == pytest.approx(replicas * price, rel=1e-12)
    assert s.usd_per_million_output_tokens == pytest.approx(replicas * price / (rate * G * 3600) * 1e6, rel=1e-12)
    assert s.usd_per_million_tokens == pytest.approx(replicas * price / (rate * (P + G) * 3600) * 1e6, rel=1e-12)
    assert res.best.peak_memory_bytes == e.peak_memory_bytes
    # Llama 3.1 8B: 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 B = 128 KiB per token, at P + G tokens
    assert s.kv_cache_bytes_per_sequence == 131072 * (P + G)


def _brute_force(rate, max_ttft, max_tpot, max_gpus, u=0.9):
    """Every (GPU, tp, weights, batch) of SPACE through estimate() and every replica count up to
    max_gpus, the targets checked from the textbook formulas; the cheapest, then lowest p99 latency."""
    best = None
    for gpu, tp, wq, b in itertools.product(SPACE["gpus"], SPACE["tp"], SPACE["infer_weights"], SPACE["micro_batches"]):
        e = _est(gpu, tp, wq, b)
        if e.peak_memory_bytes > 0.95 * e.device_memory_bytes:
            continue
        prefill_one = _est(gpu, tp, wq, 1).time.prefill_s
        pf, tpot = e.time.prefill_s, e.time.decode_per_token_s
        service = pf + G * tpot
        for r in range(1, max_gpus // tp + 1):
            util = rate / (r * b / service)
            tpot_mean = tpot / (1 - (rate / r) * pf / b)
            if util > u or tpot_mean > max_tpot:
                continue
            a, c = rate * service, r * b
            cw = _erlang_c_recursion(c, a)
            wait99 = 0.5 * service / (c - a) * math.log(max(cw, 0.01) / 0.01)
            ttft99 = wait99 + tpot + prefill_one
            if ttft99 > max_ttft:
                continue
            key = (r * tp * e.cost.usd_per_gpu_hour, ttft99 + G * tpot_mean)
            if best is None or key < best[0]:
                best = (key, gpu, tp, wq, b, r)
            break
    return best


@pytest.mark.parametrize("rate,ttft,tpot", [(5.0, 1.0, 0.08), (20.0, 0.3, 0.03), (2.0, 0.1, 0.06)])
def test_cheapest_equals_brute_force(rate, ttft, tpot):
    res = _plan(rate=rate, constraints={"max_ttft_s": ttft, "max_tpot_s": tpot, "max_gpus": 16})
    key, gpu, tp, wq, b, r = _brute_force(rate, ttft, tpot, 16)
    s = res.best.serving
    assert (res.best.gpu, s.gpus_per_replica, s.weights, s.batch, s.replicas) == (gpu, tp, wq, b, r)
    assert s.usd_per_hour == pytest.approx(key[0], rel=1e-12)
    assert s.latency_p99_s == pytest.approx(key[1], rel=1e-9)
    assert s.ttft_p99_s <= ttft and s.tpot_mean_s <= tpot and s.utilization <= 0.9


def test_more_rate_needs_no_fewer_replicas_nor_less_money():
    fixed = dict(tp=[1], infer_weights=["none"], micro_batches=[16])
    prev_r, prev_usd = 0, 0.0
    for rate in (0.5, 2.0, 8.0, 32.0):
        one = _plan(rate=rate, constraints={"gpu": "a100-sxm-80gb", "max_gpus": 64}, space=fixed).best.serving
        assert one.replicas >= prev_r
        prev_r = one.replicas
        usd = _plan(rate=rate, constraints={**TARGETS, "max_gpus": 64}).best.serving.usd_per_hour
        assert usd >= prev_usd
        prev_usd = usd
    assert prev_r > 1


def test_tighter_tpot_means_a_smaller_batch_or_a_faster_gpu():
    # Llama 3.2 3B on one L4: the decode step is memory-bound, from 34 ms at batch 16 to 66 ms at batch 64
    def best(tpot, space):
        return plan(model="llama-3.2-3b", task="infer", request_rate_per_s=20.0, prompt_len=P, gen_len=G,
                    constraints={"max_tpot_s": tpot, "max_gpus": 8}, space=space).best

    fam = dict(gpus=["l4-24gb"], tp=[1], infer_weights=["none"])
    rows = [best(t, fam) for t in (0.08, 0.05, 0.04)]
    batches = [r.serving.batch for r in rows]
    assert batches == sorted(batches, reverse=True) and batches[-1] < batches[0]
    for t, r in zip((0.08, 0.05, 0.04), rows):
        assert r.serving.tpot_mean_s <= t
    # a smaller batch serves fewer requests per replica: the tighter target costs more GPUs
    assert [r.n_gpus for r in rows] == sorted(r.n_gpus for r in rows) and rows[-1].n_gpus > rows[0].n_gpus
    loose, tight = best(0.08, SPACE), best(0.04, SPACE)
    assert tight.serving.tpot_mean_s <= 0.04 < loose.serving.tpot_mean_s
    # the tighter target is bought with a smaller batch, a faster GPU or more replicas (fewer requests in flight each)
    assert tight.serving.batch < loose.serving.batch or tight.gpu != loose.gpu or tight.n_gpus > loose.n_gpus


def test_rows_equal_estimate_and_memory_has_headroom():
    res = _plan()
    for r in [*res.ranked, *res.pareto]:
        e = estimate(r.scenario, what_fits=False)
        assert r.peak_memory_bytes == e.peak_memory_bytes <= r.usable_memory_bytes
        assert r.step_time_s == e.time.step_s
        assert r.serving.tpot_s == e.time.decode_per_token_s
        assert r.n_gpus == r.serving.replicas * r.serving.gpus_per_replica
    # one row per family in the ranking; the front is fastest first with falling $/hour
    fams = [(r.gpu, r.serving.gpus_per_replica, r.serving.weights) for r in res.ranked]
    assert len(fams) == len(set(fams))
    front = res.pareto
    assert [r.serving.latency_p99_s for r in front] == sorted(r.serving.latency_p99_s for r in front)
    assert [r.serving.usd_per_hour for r in front] == sorted((r.serving.usd_per_hour for r in front), reverse=True)
    assert res.candidates_evaluated >= res.candidates_estimated > 0


def test_largest_batch_is_what_the_kv_cache_leaves_room_for():
    res = _plan(rate=2.0, constraints={"gpu": "l4-24gb", "max_gpus": 8},
                space=dict(tp=[1], infer_weights=["none"]))
    s = res.best.serving
    usable = 0.95 * get_device("l4-24gb").memory_total_bytes
    assert _est("l4-24gb", 1, "none", s.max_batch_fits).peak_memory_bytes <= usable
    assert _est("l4-24gb", 1, "none", s.max_batch_fits + 1).peak_memory_bytes > usable
    assert s.batch <= s.max_batch_fits
    limits = {r.serving.batch_limit for r in res.pareto}
    assert any(f"KV cache for {s.max_batch_fits + 1} sequences" in t and "GiB usable" in t for t in limits)


def test_batch_limited_by_tpot_says_what_the_next_batch_gives():
    res = plan(model="llama-3.2-3b", task="infer", request_rate_per_s=20.0, prompt_len=P, gen_len=G,
               constraints={"max_tpot_s": 0.04, "gpu": "l4-24gb", "max_gpus": 8},
               space=dict(tp=[1], infer_weights=["none"]))
    s = res.best.serving
    assert "TPOT" in s.batch_limit and "> 40.0 ms target at batch" in s.batch_limit
    assert s.batch_limit.endswith(f"batch {s.batch} gives {s.tpot_mean_s * 1e3:.1f} ms")


def test_rejected_families_carry_numbers():
    res = plan(model=MODEL, task="infer", request_rate_per_s=2.0, prompt_len=P, gen_len=G,
               constraints={"max_tpot_s": 0.05}, space=dict(gpus=["v100-sxm-16gb", "l4-24gb", "h100-sxm-80gb"],
                                                           tp=[1], infer_weights=["none", "awq"]))
    why = res.rejected_reasons
    assert why["weights none on 1x v100-sxm-16gb"].startswith("KV cache for 1 sequence")
    assert "GiB usable" in why["weights none on 1x v100-sxm-16gb"]
    # bf16 weights on an L4 are too slow to read at batch 1; AWQ's fused kernel reads a quarter of the bytes
    e = _est("l4-24gb", 1, "none", 1)
    assert why["weights none on 1x l4-24gb"] == (f"TPOT {e.time.decode_per_token_s * 1e3:.1f} ms > 50.0 ms target "
                                                 "at batch 1")
    assert "weights awq on 1x l4-24gb" not in why


def test_without_a_rate_the_one_batch_search_is_unchanged():
    res = plan(model=MODEL, task="infer", prompt_len=P, gen_len=G, constraints={"gpu": "a100-sxm-80gb"},
               space=dict(gpu_counts=[1], infer_weights=["none"], micro_batches=[4]))
    r = res.best
    assert r.serving is None and r.micro_batch == 4
    # one batch of transformers' generate: kernels launched one by one (no CUDA graphs)
    e = estimate({"model": MODEL, "gpu": "a100-sxm-80gb", "inference": {"weights": "none"},
                  "workload": {"task": "infer", "batch": 4, "prompt_len": P, "gen_len": G}}, what_fits=False)
    assert r.step_time_s == e.time.step_s and r.usd_per_million_tokens == e.cost.usd_per_million_tokens


# ------------------------------------------------------------------------------------ errors


def test_bad_input():
    for rate in (0, -1.0):
        with pytest.raises(ValidationError, match="request_rate_per_s"):
            Job(model=MODEL, task="infer", request_rate_per_s=rate)
    with pytest.raises(ValidationError, match="request_rate_per_s applies to task 'infer'"):
        Job(model=MODEL, task="finetune", request_rate_per_s=3.0)
    with pytest.raises(ValueError, match="constraints.max_ttft_s needs job.request_rate_per_s"):
        plan(model=MODEL, task="infer", constraints={"max_ttft_s": 0.5}, space=SPACE)
    with pytest.raises(ValueError, match="closest"):
        _plan(constraints={"gpu": "h100-nope"})
    with pytest.raises(ValidationError, match="max_utilization"):
        _plan(constraints={"max_utilization": 1.5})


def test_impossible_tpot_names_the_target_and_the_closest_setup():
    with pytest.raises(PlanError, match=r"constraints\.max_tpot_s=1 ms is binding") as exc:
        _plan(constraints={"max_tpot_s": 0.001, "max_ttft_s": 1.0, "max_gpus": 16})
    c = exc.value.closest
    assert c is not None and c.serving.tpot_mean_s > 0.001 and c.serving.ttft_p99_s <= 1.0
    assert describe(c) in str(exc.value) and "lowest any such setup reaches" in str(exc.value)


def test_impossible_ttft_and_too_few_gpus_are_named():
    with pytest.raises(PlanError, match=r"constraints\.max_ttft_s=0\.001 s is binding.*p99 TTFT") as exc:
        _plan(constraints={"max_ttft_s": 0.001})
    assert exc.value.closest.serving.ttft_p99_s > 0.001
    with pytest.raises(PlanError, match=r"constraints\.max_gpus=2 is binding.*needs \d+ GPUs") as exc:
        _plan(rate=60.0, constraints={"max_gpus": 2, "gpu": "l4-24gb"})
    assert exc.value.closest.n_gpus > 2
    assert any("allowed" in v for v in exc.value.rejected_reasons.values())


def test_nothing_fits_names_memory():
    with pytest.raises(PlanError, match="memory is binding") as exc:
        plan(model="llama-3.1-70b", task="infer", request_rate_per_s=1.0, constraints={"gpu": "l4-24gb"},
             space=dict(tp=[1], infer_weights=["none"]))
    assert "GiB usable" in str(exc.value)


def test_batches_of_the_space_that_overflow_say_how_many_fit():
    import re

    res = plan(model=MODEL, task="infer", request_rate_per_s=2.0, prompt_len=P, gen_len=G,
               space=dict(gpus=["l4-24gb", "h100-sxm-80gb"], tp=[1], infer_weights=["none"], micro_batches=[64, 128]))
    why = res.rejected_reasons["weights none on 1x l4-24gb"]
    assert why.startswith("KV cache for 64 sequences") and "GiB usable" in why
    n = int(re.search(r"at (\d+) sequences it fits$", why).group(1))
    usable = 0.95 * get_device("l4-24gb").memory_total_bytes
    assert _est("l4-24gb", 1, "none", n).peak_memory_bytes <= usable < _est("l4-24gb", 1, "none", n + 1).peak_memory_bytes


def test_latency_budget_fixed_count_and_objectives():
    cheap = _plan()
    fast = _plan(objective="time")
    assert fast.best.serving.latency_p99_s <= cheap.best.serving.latency_p99_s
    assert cheap.best.serving.usd_per_hour <= fast.best.serving.usd_per_hour
    # with a rate, max_latency_s bounds the p99 arrival-to-last-token time
    target = cheap.best.serving.latency_p99_s * 0.9
    res = _plan(constraints={**TARGETS, "max_latency_s": target})
    assert res.best.serving.latency_p99_s <= target
    with pytest.raises(PlanError, match=r"constraints\.max_latency_s=0\.05 s is binding.*p99 latency"):
        _plan(constraints={**TARGETS, "max_latency_s": 0.05})
    # n_gpus fixes the fleet: every row uses exactly that many GPUs
    four = _plan(constraints={"max_tpot_s": 0.08, "n_gpus": 4})
    assert {r.n_gpus for r in four.ranked} == {4}
    # budget_usd: dollars per million output tokens at the served rate
    usd_m = cheap.best.serving.usd_per_million_output_tokens
    with pytest.raises(PlanError, match=r"budget_usd=.* is binding.*costs \$"):
        _plan(constraints={**TARGETS, "budget_usd": usd_m * 0.5})
    assert _plan(constraints={**TARGETS, "budget_usd": usd_m * 1.01}).best.serving.usd_per_million_output_tokens <= usd_m
