"""Serving a request stream under continuous batching: latency, throughput, replicas and cost from
the engine's inference estimate of one batch.

The replica model (one replica = ``tp`` GPUs running one copy of the model):

* **Iteration-level scheduling** (Orca, Yu et al., OSDI 2022; vLLM, Kwon et al., SOSP 2023): a replica
  runs up to ``batch`` sequences at once.  Every decode iteration emits one token for each running
  sequence and takes the estimate's ``decode_per_token_s`` at that batch (time per output token, TPOT);
  a finished sequence frees its slot at the next iteration and a waiting request takes it.  Sizing
  every slot for the final context ``prompt_len + gen_len`` (what ``estimate`` counts as the decode KV
  cache) means no running sequence is ever preempted for KV blocks.
* **Capacity**: a request holds its slot for its share of a batched prefill and ``gen_len`` decode
  iterations, so at full concurrency a slot turns over every ``prefill_s(batch) + gen_len * tpot(batch)``
  seconds and a replica completes ``batch / (prefill_s(batch) + gen_len * tpot(batch))`` requests/s.
* **Prefill interrupts decoding** (the "generation stalls" of Sarathi-Serve, Agrawal et al., OSDI 2024):
  while a new prompt is prefilled the running sequences wait.  A replica at ``rate`` requests/s spends
  the share ``rate * prefill_s(batch) / batch`` of its time prefilling, so a running sequence sees a
  mean time between tokens of ``tpot / (1 - that share)``.
* **Queueing**: with the same prompt and output length for every request, a slot's service time is
  deterministic; Poisson arrivals spread over ``replicas * batch`` slots form an M/D/c queue.  Its
  wait is taken as half the M/M/c (Erlang C) wait: the Allen-Cunneen approximation scales the M/M/c
  wait by ``(c_a^2 + c_s^2) / 2`` = 1/2 for Poisson arrivals and deterministic service, exact for one
  server (Pollaczek-Khinchine: the M/D/1 wait is half the M/M/1 wait).  The M/M/c tail
  ``P(W > t) = C * exp(-(c - a) t / S)`` gives the quantiles, halved the same way.
* **Time to first token** = queueing wait + the decode iteration in progress when the request is
  admitted (half of one on average, a whole one at the tail) + the prefill of its one prompt.

Every function is pure: numbers in, numbers out.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict

HOUR_S = 3600.0
TAIL_QUANTILE = 0.99
"""The tail the TTFT and latency targets are checked at (p99)."""


def slot_time_s(prefill_batch_s: float, tpot_s: float, gen_len: int) -> float:
    """Seconds one request holds a slot at full concurrency: its batch's prefill and ``gen_len`` decode
    iterations (the deterministic service time of the M/D/c queue)."""
    return prefill_batch_s + gen_len * tpot_s


def replica_capacity_per_s(batch: int, prefill_batch_s: float, tpot_s: float, gen_len: int) -> float:
    """Requests per second one replica completes with every one of ``batch`` slots busy."""
    return batch / slot_time_s(prefill_batch_s, tpot_s, gen_len)


def utilization(rate_per_s: float, replicas: np.ndarray | int, capacity_per_replica_per_s: float) -> np.ndarray | float:
    """Share of the fleet's capacity the request rate uses (the M/D/c server utilization)."""
    return rate_per_s / (replicas * capacity_per_replica_per_s)


def prefill_share(rate_per_replica_per_s: np.ndarray | float, prefill_batch_s: float, batch: int) -> np.ndarray | float:
    """Share of a replica's time spent prefilling new prompts (batched ``batch`` at a time)."""
    return rate_per_replica_per_s * prefill_batch_s / batch


def mean_tpot_s(tpot_s: float, prefill_share_: np.ndarray | float) -> np.ndarray | float:
    """Mean time between two tokens of a running sequence, decode iterations paused by prefills
    (infinite once prefills take all of the replica's time)."""
    share = np.asarray(prefill_share_, dtype=float)
    out = np.where(share < 1.0, tpot_s / np.maximum(1.0 - share, 1e-300), math.inf)
    return float(out) if out.ndim == 0 else out


def erlang_c(servers: np.ndarray | int, offered_erlangs: float) -> np.ndarray:
    """Probability that an arrival waits in an M/M/c queue with ``servers`` servers and offered load
    ``a = rate * service_s`` (Erlang C; 1 when ``servers <= a``).

    Computed from Erlang B = Poisson(a) pmf(c) / cdf(c) in log space; terms more than 40 standard
    deviations below the mean are left out (relative error below 1e-300), and a ``c`` that far above
    the mean waits with probability 0."""
    c = np.atleast_1d(np.asarray(servers, dtype=np.int64))
    a = float(offered_erlangs)
    out = np.ones(c.shape)
    if a <= 0.0:
        return np.where(c > 0, 0.0, 1.0)
    spread = 40.0 * math.sqrt(a) + 40.0
    k_lo = max(0, int(a - spread))
    k_hi = int(min(int(c.max()), a + spread))
    ok = c > a
    if k_hi >= k_lo and ok.any():
        k = np.arange(k_lo + 1, k_hi + 1, dtype=float)
        first = k_lo * math.log(a) - a - math.lgamma(k_lo + 1.0)
        # log pmf(k) = log pmf(k - 1) + log(a / k)
        log_pmf = first + np.concatenate(([0.0], np.cumsum(math.log(a) - np.log(k))))
        log_cdf = np.logaddexp.accumulate(log_pmf)
        cc = np.clip(c, k_lo, k_hi)
        erlang_b = np.exp(log_pmf[cc - k_lo] - log_cdf[cc - k_lo])
        erlang_b = np.where(c > k_hi, 0.0, erlang_b)
        cf = c.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            prob = cf * erlang_b / (cf - a * (1.0 - erlang_b))
        out = np.where(ok, np.clip(prob, 0.0, 1.0), 1.0)
    return out


def mdc_wait_mean_s(servers: np.ndarray | int, offered_erlangs: float, service_s: float) -> np.ndarray:
    """Mean queueing wait of M/D/c: half the M/M/c wait ``C * S / (c - a)`` (Allen-Cunneen)."""
    c = np.atleast_1d(np.asarray(servers, dtype=float))
    prob = erlang_c(servers, offered_erlangs)
    with np.errstate(divide="ignore"):
        return np.where(c > offered_erlangs, 0.5 * prob * service_s / (c - offered_erlangs), math.inf)


def mdc_wait_quantile_s(servers: np.ndarray | int, offered_erlangs: float, service_s: float,
                        quantile: float) -> np.ndarray:
    """Queueing wait not exceeded by ``quantile`` of requests: the M/M/c tail
    ``P(W > t) = C * exp(-(c - a) t / S)`` solved for t, halved like the mean (0 when fewer than
    ``1 - quantile`` of arrivals wait at all)."""
    c = np.atleast_1d(np.asarray(servers, dtype=float))
    prob = erlang_c(servers, offered_erlangs)
    tail = 1.0 - quantile
    with np.errstate(divide="ignore", invalid="ignore"):
        t = 0.5 * service_s / (c - offered_erlangs) * np.log(np.maximum(prob, tail) / tail)
    return np.where(c > offered_erlangs, t, math.inf)


def ttft_s(wait_s: np.ndarray | float, tpot_s: float, prefill_one_s: float, *, tail: bool) -> np.ndarray | float:
    """Time to first token: queueing wait, then the decode iteration in progress (half of one on
    average, a whole one at the tail), then the prefill of the request's prompt."""
    return wait_s + (1.0 if tail else 0.5) * tpot_s + prefill_one_s


def kv_cache_bytes_per_sequence(kv_cache_bytes: float, batch: int) -> float:
    """KV cache one running sequence holds at its final context (per GPU)."""
    return kv_cache_bytes / batch


def max_concurrency(usable_bytes: float, fixed_bytes: float, per_sequence_bytes: float) -> int:
    """Most sequences whose memory fits beside the fixed part (weights, workspaces, context):
    ``floor((usable - fixed) / per_sequence)``; 0 when not even one does."""
    if per_sequence_bytes <= 0.0:
        return 0 if fixed_bytes > usable_bytes else 1 << 30
    return max(0, math.floor((usable_bytes - fixed_bytes) / per_sequence_bytes))


def usd_per_hour(replicas: int, gpus_per_replica: int, usd_per_gpu_hour: float) -> float:
    """On-demand price of the whole fleet."""
    return replicas * gpus_per_replica * usd_per_gpu_hour


def usd_per_million_tokens(usd_per_hour_: float, tokens_per_s: float) -> float:
    """Dollars per million tokens at a steady token rate."""
    return usd_per_hour_ / (tokens_per_s * HOUR_S) * 1e6 if tokens_per_s > 0 else math.inf


def kwh_per_million_tokens(gpus: int, watts_per_gpu: float, tokens_per_s: float) -> float:
    """Energy per million tokens at a steady token rate."""
    return gpus * watts_per_gpu / 1000.0 / (tokens_per_s * HOUR_S) * 1e6 if tokens_per_s > 0 else math.inf


# ---------------------------------------------------------------------------------------------
# One fleet: the replicas a rate needs and what it then delivers
# ---------------------------------------------------------------------------------------------


class ServingLimits(BaseModel):
    """Targets a fleet must meet (None = no target)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_ttft_s: float | None = None
    max_tpot_s: float | None = None
    max_latency_s: float | None = None
    max_utilization: float = 1.0
    max_replicas: int | None = None


class ServingPoint(BaseModel):
    """What a fleet of ``replicas`` replicas at concurrency ``batch`` delivers at ``rate_per_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate_per_s: float
    replicas: int
    batch: int
    capacity_per_replica_per_s: float
    utilization: float
    tpot_s: float
    """Decode iteration at full concurrency (the estimate's decode_per_token_s)."""
    tpot_mean_s: float
    """Mean time between tokens with the prefill interruptions at this rate."""
    queue_wait_mean_s: float
    queue_wait_tail_s: float
    ttft_mean_s: float
    ttft_tail_s: float
    latency_tail_s: float
    """Tail time to first token + gen_len x mean time between tokens."""


class ServingMetrics(BaseModel):
    """A serving row of the planner: the fleet and what it delivers at the request rate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_rate_per_s: float
    replicas: int
    gpus_per_replica: int
    """Tensor-parallel degree of one replica."""
    weights: str
    batch: int
    """Most sequences one replica runs at once (vLLM's max_num_seqs)."""
    max_batch_fits: int
    """Most sequences whose KV cache fits beside the weights on one replica."""
    batch_limit: str
    """Why a larger batch was not taken."""
    kv_cache_bytes_per_sequence: float
    """Per GPU, at the final context prompt_len + gen_len."""
    prefill_one_s: float
    """Prefill of one prompt."""
    prefill_batch_s: float
    """Prefill of ``batch`` prompts together."""
    tpot_s: float
    tpot_mean_s: float
    ttft_mean_s: float
    ttft_p99_s: float
    queue_wait_mean_s: float
    queue_wait_p99_s: float
    latency_p99_s: float
    """p99 time to first token + gen_len x mean time per output token."""
    capacity_per_replica_per_s: float
    capacity_per_s: float
    utilization: float
    usd_per_hour: float | None
    usd_per_million_output_tokens: float | None
    usd_per_million_tokens: float | None
    """Prompt and output tokens together."""
    peak_memory_bytes_per_gpu: float
    usable_memory_bytes_per_gpu: float


def serving_point(rate_per_s: float, replicas: np.ndarray | int, batch: int, prefill_one_s: float,
                  prefill_batch_s: float, tpot_s: float, gen_len: int, quantile: float = TAIL_QUANTILE) -> dict[str, np.ndarray]:
    """Every serving quantity for each replica count in ``replicas`` (arrays, one entry per count)."""
    r = np.atleast_1d(np.asarray(replicas, dtype=np.int64))
    service = slot_time_s(prefill_batch_s, tpot_s, gen_len)
    cap = replica_capacity_per_s(batch, prefill_batch_s, tpot_s, gen_len)
    util = utilization(rate_per_s, r, cap)
    tpot_mean = mean_tpot_s(tpot_s, prefill_share(rate_per_s / r, prefill_batch_s, batch))
    offered = rate_per_s * service
    servers = r * batch
    wait_mean = mdc_wait_mean_s(servers, offered, service)
    wait_tail = mdc_wait_quantile_s(servers, offered, service, quantile)
    ttft_mean = ttft_s(wait_mean, tpot_s, prefill_one_s, tail=False)
    ttft_tail = ttft_s(wait_tail, tpot_s, prefill_one_s, tail=True)
    latency = ttft_tail + gen_len * tpot_mean
    return dict(replicas=r, capacity=np.full(r.shape, cap), utilization=util, tpot_mean=tpot_mean,
                wait_mean=wait_mean, wait_tail=wait_tail, ttft_mean=ttft_mean, ttft_tail=ttft_tail, latency=latency)


def replicas_needed(rate_per_s: float, batch: int, prefill_one_s: float, prefill_batch_s: float, tpot_s: float,
                    gen_len: int, limits: ServingLimits) -> tuple[ServingPoint | None, str | None, str | None]:
    """The fewest replicas meeting every limit: (point, None, None), or (None, field, reason with numbers)
    naming the first limit no replica count within ``max_replicas`` meets.

    Utilization, mean TPOT, queueing wait and latency all fall as replicas are added, so the first
    count that meets them all is the cheapest; the floors no count can beat (one decode iteration,
    one prompt's prefill) are checked first."""
    if limits.max_tpot_s is not None and gen_len > 0 and tpot_s > limits.max_tpot_s:
        return None, "max_tpot_s", (f"TPOT {tpot_s * 1e3:.1f} ms > {limits.max_tpot_s * 1e3:.1f} ms target at batch "
                                    f"{batch}")
    floor_ttft = float(ttft_s(0.0, tpot_s, prefill_one_s, tail=True))
    if limits.max_ttft_s is not None and floor_ttft > limits.max_ttft_s:
        return None, "max_ttft_s", (f"TTFT {floor_ttft:.3g} s without any queueing (prefill of one prompt "
                                    f"{prefill_one_s:.3g} s + one decode step {tpot_s * 1e3:.1f} ms) > "
                                    f"{limits.max_ttft_s:.3g} s target")
    floor_latency = floor_ttft + gen_len * tpot_s
    if limits.max_latency_s is not None and floor_latency > limits.max_latency_s:
        return None, "max_latency_s", (f"latency {floor_latency:.3g} s without any queueing > "
                                       f"{limits.max_latency_s:.3g} s target at batch {batch}")
    cap = replica_capacity_per_s(batch, prefill_batch_s, tpot_s, gen_len)
    r_lo = max(1, math.ceil(rate_per_s / (cap * limits.max_utilization) - 1e-12))
    hi = limits.max_replicas if limits.max_replicas is not None else max(r_lo, 1) * 64 + 1024
    if r_lo > hi:
        return None, "max_gpus", (f"needs {r_lo} replicas for {rate_per_s:g} requests/s at "
                                  f"{limits.max_utilization:.0%} utilization (one replica serves {cap:.3g}/s at "
                                  f"batch {batch}) > {hi} allowed")
    r = np.arange(r_lo, hi + 1)
    p = serving_point(rate_per_s, r, batch, prefill_one_s, prefill_batch_s, tpot_s, gen_len, TAIL_QUANTILE)
    ok = p["utilization"] <= limits.max_utilization + 1e-12
    if limits.max_tpot_s is not None and gen_len > 0:
        ok &= p["tpot_mean"] <= limits.max_tpot_s
    if limits.max_ttft_s is not None:
        ok &= p["ttft_tail"] <= limits.max_ttft_s
    if limits.max_latency_s is not None:
        ok &= p["latency"] <= limits.max_latency_s
    if not ok.any():
        last = {k: float(v[-1]) for k, v in p.items()}
        if limits.max_tpot_s is not None and gen_len > 0 and last["tpot_mean"] > limits.max_tpot_s:
            field, what = "max_tpot_s", (f"mean TPOT with prefill interruptions {last['tpot_mean'] * 1e3:.1f} ms > "
                                         f"{limits.max_tpot_s * 1e3:.1f} ms target")
        elif limits.max_ttft_s is not None and last["ttft_tail"] > limits.max_ttft_s:
            field, what = "max_ttft_s", f"p99 TTFT {last['ttft_tail']:.3g} s > {limits.max_ttft_s:.3g} s target"
        else:
            field, what = "max_latency_s", f"p99 latency {last['latency']:.3g} s > {limits.max_latency_s:.3g} s target"
        if limits.max_replicas is not None:
            return None, "max_gpus", f"{what} at batch {batch} even with {hi} replicas (the most allowed)"
        return None, field, f"{what} at batch {batch}"
    i = int(np.argmax(ok))
    return ServingPoint(
        rate_per_s=rate_per_s, replicas=int(r[i]), batch=batch, capacity_per_replica_per_s=cap,
        utilization=float(p["utilization"][i]), tpot_s=tpot_s, tpot_mean_s=float(p["tpot_mean"][i]),
        queue_wait_mean_s=float(p["wait_mean"][i]), queue_wait_tail_s=float(p["wait_tail"][i]),
        ttft_mean_s=float(p["ttft_mean"][i]), ttft_tail_s=float(p["ttft_tail"][i]), latency_tail_s=float(p["latency"][i]),
    ), None, None
