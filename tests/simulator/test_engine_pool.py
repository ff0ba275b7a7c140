"""Inference under a serving engine that sizes its KV pool up front (inference.engine 'vllm'): the device
shows the engine's share, the pool holds what the rest leaves, sequences run up to max_num_seqs at once,
and decode steps replay CUDA graphs."""

from __future__ import annotations

import math

import pytest

from hwprofiles import get_device
from simulator import Scenario, estimate
from simulator import memory as mem
from simulator import timing
from simulator.estimate import cost_table_for

GIB = 2**30


def _sc(batch: int = 64, prompt: int = 1000, gen: int = 500, model: str = "llama-3.1-8b", **inf) -> Scenario:
    return Scenario.model_validate({
        "model": model, "gpu": "h100-sxm-80gb", "precision": "bf16",
        "workload": {"task": "infer", "batch": batch, "prompt_len": prompt, "gen_len": gen},
        "inference": {"engine": "vllm", **inf}})


def _kv_per_token(sc: Scenario) -> float:
    a = sc.model
    return 2.0 * a.n_layers * a.kv_heads * a.d_head * 2  # bf16 K and V over every layer


def test_the_device_shows_the_engines_share_and_the_pool_fills_what_the_rest_leaves():
    dev = get_device("h100-sxm-80gb")
    for util in (0.9, 0.5):
        e = estimate(_sc(gpu_memory_utilization=util), what_fits=False)
        share = util * dev.memory_total_bytes
        assert e.fits and e.peak_memory_bytes == pytest.approx(share)
        pool = e.engine_pool
        assert pool.share_bytes == pytest.approx(share)
        # what the setup needs: weights, the profiled forward and 64 sequences of 1008 + ... tokens (whole blocks)
        running = 64 * mem.paged_context_tokens(1500, 16) * _kv_per_token(_sc())
        assert pool.needed_bytes < share
        assert pool.pool_bytes == pytest.approx(share - (pool.needed_bytes - running), rel=1e-9)
        assert e.memory_bytes.kv_cache == pytest.approx(pool.pool_bytes, rel=1e-9)
        # the headroom is what the share leaves beyond what the engine needs to start: one sequence's KV
        assert e.headroom_bytes == pytest.approx(share - (pool.needed_bytes - running + running / 64), rel=1e-9)
        assert pool.pool_tokens == math.floor(pool.pool_bytes / _kv_per_token(_sc()))
    # transformers' generate holds only what it uses: a little more than the engine's setup needs, since it
    # prefills all 64 prompts in one forward where the engine profiled 2048 tokens
    plain = estimate(_sc().model_copy(update={"inference": _sc().inference.model_copy(
        update={"engine": "transformers"})}), what_fits=False)
    assert plain.engine_pool is None
    assert pool.needed_bytes < plain.peak_memory_bytes < 1.15 * pool.needed_bytes


def test_sequences_hold_whole_blocks():
    assert mem.paged_context_tokens(1500, 16) == 1504
    assert mem.paged_context_tokens(1504, 16) == 1504
    a = estimate(_sc(batch=1, prompt=1000, gen=488), what_fits=False)  # 1488 = 93 blocks
    b = estimate(_sc(batch=1, prompt=1000, gen=489), what_fits=False)  # 1489 -> 94 blocks
    c = estimate(_sc(batch=1, prompt=1000, gen=490), what_fits=False)  # 1490: still 94

    def running(e):  # the running sequences' KV: the pool less its spare
        return e.memory_bytes.kv_cache - (e.engine_pool.share_bytes - e.engine_pool.needed_bytes)
    assert running(b) - running(a) == pytest.approx(16 * _kv_per_token(_sc()), rel=1e-6)
    assert running(c) == pytest.approx(running(b), rel=1e-9)


def test_at_most_max_num_seqs_run_at_once_and_the_batch_takes_waves():
    e = estimate(_sc(batch=600, prompt=500, gen=500), what_fits=False)
    assert e.engine_pool.concurrency == 256 and e.engine_pool.waves == 3
    one = estimate(_sc(batch=256, prompt=500, gen=500), what_fits=False)
    rest = estimate(_sc(batch=600 - 512, prompt=500, gen=500), what_fits=False)
    # two full waves and a last one of the 88 left
    assert e.time.step_s == pytest.approx(2 * one.time.step_s + rest.time.step_s, rel=1e-9)
    assert rest.time.step_s < one.time.step_s
    # the running sequences are what must fit: 600 queued need no more than 256
    assert e.engine_pool.needed_bytes == pytest.approx(one.engine_pool.needed_bytes)
    capped = estimate(_sc(batch=600, prompt=500, gen=500, max_num_seqs=64), what_fits=False)
    assert capped.engine_pool.concurrency == 64 and capped.engine_pool.waves == 10
    # the largest batch it runs at once: max_num_seqs or what the pool holds, whichever is less
    assert estimate(_sc(batch=600, prompt=500, gen=500)).max_batch_that_fits == 256
    long = estimate(_sc(batch=600, prompt=30000, gen=500))
    held = long.engine_pool.sequences_held
    assert 1 <= held < 256 and long.max_batch_that_fits == held == long.engine_pool.concurrency


def test_a_pool_too_small_for_every_sequence_runs_what_it_holds_and_the_rest_wait():
    # Llama-3.1-70B in 4-bit on one H100: 8 sequences of 30,500 tokens need ~78 GB of KV cache
    e = estimate(_sc(batch=8, prompt=30000, gen=500, model="llama-3.1-70b", weights="awq"), what_fits=False)
    pool = e.engine_pool
    assert e.fits and pool.needed_bytes > pool.share_bytes  # it starts; not all 8 run at once
    per_seq = mem.paged_context_tokens(30500, 16) * _kv_per_token(_sc(model="llama-3.1-70b"))
    assert pool.concurrency == int(pool.pool_bytes // per_seq)
    assert 1 <= pool.concurrency < 8 and pool.waves == -(-8 // pool.concurrency)
    assert e.peak_memory_bytes == pytest.approx(pool.share_bytes)
    # bf16 weights of 70B (141 GB) do not fit the share of one H100: the engine cannot start
    big = estimate(_sc(batch=8, prompt=1000, gen=500, model="llama-3.1-70b"), what_fits=False)
    assert not big.fits and big.headroom_bytes < -50 * GIB
    assert big.peak_memory_bytes > big.engine_pool.share_bytes


def test_decode_replays_cuda_graphs_so_a_single_sequence_runs_at_the_memory_roofline():
    sc = _sc(batch=1, prompt=128, gen=128)
    v = estimate(sc, what_fits=False)
    t = estimate(sc.model_copy(update={"inference": sc.inference.model_copy(update={"engine": "transformers"})}),
                 what_fits=False)
    # transformers launches every kernel from Python: batch-1 decode is host-bound
    assert t.time.decode_per_token_s > 3 * v.time.decode_per_token_s
    # the graph's step is the GPU's: reading the weights (and the small cache) at the achievable bandwidth
    dev = get_device("h100-sxm-80gb")
    a = sc.model
    read = v.memory_bytes.weights - a.vocab * a.hidden * 2  # the embedding table is looked up, not read whole
    floor = read / (dev.memory_bandwidth_Bps * dev.efficiency.memory_bandwidth_fraction)
    assert floor < v.time.decode_per_token_s < 1.15 * floor
    # the stage's compute with graphs carries no host time
    ct = cost_table_for(sc)
    from simulator.graph.ir import basis
    B = basis(1, 1, 192)
    g = timing.stage_compute(ct, sc.parallel, B, dev, "bf16", 0, False, decode_step=True, rows=1, graphs=True)
    h = timing.stage_compute(ct, sc.parallel, B, dev, "bf16", 0, False, decode_step=True, rows=1)
    assert g.forward_s < h.forward_s


def test_engine_fields_are_checked_with_their_allowed_values():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        _sc(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="engine"):
        _sc(engine="tgi")
