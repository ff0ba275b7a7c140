"""plan(model, task, constraints, objective, space) -> PlanResult: the best setup under constraints.

How a search runs (every step keeps what :func:`simulator.estimate` would say about a setup exact):

1. The search space (:class:`SearchSpace`) is declared, defaulted from the task.  Its parts are
   validated one family at a time (method x precision x optimizer x checkpointing against the model;
   data/tensor-parallel layouts against the model and the node), so a candidate is a cross product of
   valid parts and is never validated on its own.
2. Lower bounds over all candidates as numpy arrays: per-rank memory (model states from
   :func:`simulator.sharding.model_state_bytes`, the saved activations of one micro-batch, workspaces and
   the CUDA context; the real peak only adds temporaries, allocator cache and gradients), and run time
   (FLOPs of the job over n GPUs at the dense peak of the matmul dtype; the real step only adds
   efficiency losses and communication) and from it the cost.  Candidates whose memory bound exceeds
   the usable memory, or whose time/cost bound misses the deadline/budget, are rejected here.
3. The rest are evaluated as arrays (:class:`simulator.grid.TrainGrid`): one (GPU, count, layout) at a
   time, the peak memory and the step time of every (family, micro-batch) by the functions
   ``estimate()`` itself calls, so the numbers are estimate()'s; from them throughput, run time and
   cost, and the constraints.  A number within a relative 1e-9 of a limit is settled by ``estimate()``.
4. ``estimate()`` then gives the rows of every candidate that can be in the top ``top_n`` or on the
   time-cost Pareto front (every one whose key is not behind the ``top_n``-th, or not beaten on both
   time and cost, by more than that tolerance); the ranking and the front are taken over those rows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .config.base import Strict
from .config.scenario import model_from_name
from .config.methods import Method
from .config.model import ModelArch
from .config.training import Precision

PlannedOptimizer = Literal["adamw", "adam", "sgd", "sgd-momentum", "adafactor", "lion",
                           "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit"]
from .serving import ServingMetrics

GiB = float(2**30)

Objective = Literal["cost", "time", "throughput", "gpus"]
Task = Literal["finetune", "train", "infer"]
Sharding = Literal["none", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op", "zero2-offload", "zero3-offload"]

SHARDING_PARALLEL: dict[str, dict[str, Any]] = {
    "none": {},
    "zero1": {"zero": 1},
    "zero2": {"zero": 2},
    "zero3": {"zero": 3},
    "fsdp": {"fsdp": "full_shard"},
    "fsdp-grad-op": {"fsdp": "shard_grad_op"},
    "zero2-offload": {"zero": 2, "offload_optimizer": "cpu"},
    "zero3-offload": {"zero": 3, "offload_optimizer": "cpu", "offload_params": "cpu"},
}
OFFLOAD_SHARDINGS = ("zero2-offload", "zero3-offload")
"""ZeRO-Offload / ZeRO-Infinity (host RAM): also searched on one data-parallel rank, where they still move the
optimizer step (and the parameters) to the host."""
SHARDING_LABEL = {"none": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP full_shard",
                  "fsdp-grad-op": "FSDP shard_grad_op",
                  "zero2-offload": "ZeRO-2 + CPU optimizer", "zero3-offload": "ZeRO-3 + CPU optimizer and params"}

_METHOD_LIST = TypeAdapter(list[Method])


def default_methods(task: str) -> list[dict[str, Any]]:
    """Methods searched when the space names none: full training for pre-training; for fine-tuning full,
    LoRA r in {8, 16, 64} on all linear layers and QLoRA (NF4) r=16."""
    if task == "train":
        return [{"kind": "full"}]
    return [{"kind": "full"}, *({"kind": "lora", "r": r, "targets": "all-linear"} for r in (8, 16, 64)),
            {"kind": "qlora", "r": 16, "targets": "all-linear"}]


def _priced_devices() -> list[str]:
    from hwprofiles import all_devices

    return sorted(d.name for d in all_devices() if d.price_usd_per_hour)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


class Job(Strict):
    """What has to be done: the model and the work."""

    model: ModelArch
    """Architecture or catalog name (see `fitsim models`)."""
    task: Task = "finetune"
    """finetune (methods: full, LoRA, QLoRA), train (pre-training: full only) or infer (serving)."""
    seq_len: int = Field(default=2048, ge=1)
    """Training: tokens per sequence."""
    total_tokens: float | None = Field(default=None, gt=0)
    """Training: tokens the whole run processes; none = times and costs per million tokens."""
    prompt_len: int = Field(default=512, ge=1)
    """Inference: prompt tokens per request."""
    gen_len: int = Field(default=256, ge=0)
    """Inference: generated tokens per request."""
    request_rate_per_s: float | None = Field(default=None, gt=0)
    """Inference: requests arriving per second (Poisson); sizes a fleet of replicas under continuous
    batching.  None = size one batch (max_latency_s is then the time to generate it)."""

    @field_validator("model", mode="before")
    @classmethod
    def _resolve_model(cls, v: Any) -> Any:
        return model_from_name(v)

    @model_validator(mode="after")
    def _rate_is_for_serving(self) -> "Job":
        if self.request_rate_per_s is not None and self.task != "infer":
            raise ValueError(f"request_rate_per_s applies to task 'infer', not {self.task!r}")
        return self


class SearchSpace(Strict):
    """The knobs searched; None = the task's default."""

    gpus: list[str] | None = None
    """Device profiles to consider; default: every device with a price."""
    gpu_counts: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """Total GPU counts to consider."""
    methods: list[Method] | None = None
    """Fine-tuning methods (dicts with 'kind'); default: full, LoRA r 8/16/64 all-linear, QLoRA r 16 (train: full)."""
    precisions: list[Precision] = Field(default_factory=lambda: ["bf16"])
    """Numerics to consider."""
    optimizers: list[PlannedOptimizer] = Field(default_factory=lambda: ["adamw", "adamw-8bit"])
    """Optimizers to consider (training); GaLore's run unsharded on whole weights and are estimated one setup at a
    time (``fitsim estimate``), not searched."""
    micro_batches: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Training: micro-batch sizes; inference: concurrent batch sizes."""
    checkpointing: list[Literal["none", "full", "selective"]] = Field(default_factory=lambda: ["none", "full"])
    """Activation checkpointing modes (training)."""
    sharding: list[Sharding] = Field(default_factory=lambda: ["none", "zero2", "zero3", "fsdp"])
    """Data-parallel sharding with more than one data-parallel rank (DDP, ZeRO stages, FSDP); the offload
    variants (optimizer, or optimizer and parameters, in host RAM; asked for explicitly) also on a single rank."""
    tp: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])
    """Tensor-parallel degrees (within one node)."""
    pp: list[int] = Field(default_factory=lambda: [1])
    """Pipeline-parallel degrees."""
    cp: list[int] = Field(default_factory=lambda: [1])
    """Context-parallel degrees (ring attention over the sequence; long contexts)."""
    ep: list[int] = Field(default_factory=lambda: [1])
    """Expert-parallel degrees (MoE models; EP divides dp x cp)."""
    infer_weights: list[Literal["none", "int8", "nf4", "awq", "gptq", "fp8"]] = Field(
        default_factory=lambda: ["none", "int8", "awq"])
    """Inference: weight storage formats."""

    @field_validator("gpu_counts", "micro_batches", "tp", "pp", "cp", "ep")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty list: give at least one value")
        bad = [x for x in v if x < 1]
        if bad:
            raise ValueError(f"values must be >= 1, got {bad}")
        return sorted(set(v))

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("empty list of GPUs: name at least one (see `fitsim gpus`) or leave it unset")
        from hwprofiles import get_device

        return sorted({get_device(g).name for g in v})


class Constraints(Strict):
    """Limits every chosen setup must meet."""

    max_gpus: int | None = Field(default=None, ge=1)
    """Most GPUs one setup may use; none = the largest of the space's gpu_counts."""
    budget_usd: float | None = Field(default=None, gt=0)
    """Most dollars the whole run may cost (needs the job's total_tokens); inference: most dollars per
    million generated tokens."""
    deadline_s: float | None = Field(default=None, gt=0)
    """Longest the whole run may take, seconds (needs the job's total_tokens)."""
    min_headroom_fraction: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of each GPU's memory left free at the peak."""
    gpu: str | None = None
    """Fixed device ("I have A6000s")."""
    n_gpus: int | None = Field(default=None, ge=1)
    """Fixed GPU count ("I have 4")."""
    method: str | None = None
    """Fixed method kind ("must be full fine-tuning": 'full')."""
    global_batch_tokens: int | None = Field(default=None, ge=1)
    """Training: tokens per optimizer step (micro-batch x seq_len x dp x grad_accum); none = grad_accum 1."""
    max_latency_s: float | None = Field(default=None, gt=0)
    """Inference: longest time to generate one batch (prefill + all decode steps); with a request rate,
    the p99 time from a request's arrival to its last token."""
    max_oom_probability: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Largest accepted probability that the measured peak exceeds the GPU's memory, from the engine's error
    bands (``simulator.uncertainty``); none = only the headroom rule."""
    max_ttft_s: float | None = Field(default=None, gt=0)
    """Serving (needs a request rate): p99 time to first token, queueing included, seconds."""
    max_tpot_s: float | None = Field(default=None, gt=0)
    """Serving (needs a request rate): mean time per output token, prefill interruptions included, seconds."""
    max_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Serving: most of the fleet's capacity the request rate may use (room for bursts)."""

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from hwprofiles import get_device

        return get_device(v).name

    @model_validator(mode="after")
    def _consistent(self) -> "Constraints":
        if self.n_gpus is not None and self.max_gpus is not None and self.n_gpus > self.max_gpus:
            raise ValueError(f"n_gpus={self.n_gpus} exceeds max_gpus={self.max_gpus}")
        return self


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanRow(_Result):
    """One evaluated setup (the numbers are estimate()'s for ``scenario``)."""

    scenario: dict[str, Any]
    gpu: str
    n_gpus: int
    method: str
    precision: str
    optimizer: str
    micro_batch: int
    grad_accum: int
    checkpointing: str
    parallel: str
    peak_memory_bytes: float  # what the setup must have on the device: the peak less evictable paged optimizer states
    usable_memory_bytes: float
    headroom_bytes: float
    step_time_s: float
    tokens_per_s: float
    usd_per_million_tokens: float | None
    kwh_per_million_tokens: float | None
    run_time_s: float | None = None
    run_usd: float | None = None
    run_kwh: float | None = None
    p_oom: float | None = None
    """P(the measured peak exceeds the GPU's memory) from the error bands (None: no band for the setup)."""
    serving: ServingMetrics | None = None
    """Serving plans (a request rate): replicas, concurrency, latencies, utilization and $/hour."""

    @property
    def time_key(self) -> float:
        """Run time, or seconds per million tokens without total_tokens."""
        return self.run_time_s if self.run_time_s is not None else 1e6 / self.tokens_per_s

    @property
    def cost_key(self) -> float:
        if self.run_usd is not None:
            return self.run_usd
        return self.usd_per_million_tokens if self.usd_per_million_tokens is not None else math.inf


class PlanResult(_Result):
    objective: Objective
    best: PlanRow
    ranked: list[PlanRow]
    pareto: list[PlanRow]
    """Rows on the (time, cost) Pareto front, fastest first."""
    pareto_complete: bool = True
    """False when the search was asked for the ranking only: the front is then over the setups estimated."""
    rejected_reasons: dict[str, str]
    """Per family (method on n x GPU) with no acceptable setup: the binding reason with numbers."""
    candidates_evaluated: int
    """Candidate setups evaluated: peak memory and step time computed, or rejected by a lower bound."""
    candidates_pruned: int
    """Rejected or skipped without a full estimate."""
    candidates_estimated: int
    """Full estimate() calls."""
    search_time_s: float


class PlanError(ValueError):
    """No setup meets every constraint: the message names the binding one and the closest setup."""

    def __init__(self, message: str, rejected_reasons: dict[str, str] | None = None,
                 closest: PlanRow | None = None) -> None:
        super().__init__(message)
        self.rejected_reasons = rejected_reasons or {}
        self.closest = closest


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------


def method_label(m: Any) -> str:
    kind = m.kind
    if kind in ("lora", "dora", "qlora"):
        t = m.targets if isinstance(m.targets, str) or m.targets is None else ",".join(m.targets)
        q = f" {m.quant}" if kind == "qlora" else ""
        return f"{kind}{q} r={m.r} {t or 'default targets'}"
    return kind


@dataclass
class _Fam:
    """Per (method, GPU, count) family: what kept its candidates out."""

    ok: bool = False
    mem_fail: tuple[float, float, str] | None = None  # (bytes over usable, peak, how it was known)
    budget_fail: float | None = None  # cheapest run that fits in memory
    deadline_fail: float | None = None
    oom_fail: tuple[float, str] | None = None  # (lowest P(OOM) over the limit, the reason)
    host_fail: tuple[float, str] | None = None  # (smallest host RAM need over the node's, the reason)
    invalid: str | None = None


@dataclass
class _Ctx:
    job: Job
    space: SearchSpace
    cons: Constraints
    objective: str
    top_n: int
    fams: dict[tuple[str, str, int], _Fam] = field(default_factory=dict)
    closest_state: tuple | None = None


def _fam(ctx: _Ctx, key: tuple[str, str, int]) -> _Fam:
    f = ctx.fams.get(key)
    if f is None:
        f = ctx.fams[key] = _Fam()
    return f


def _coerce(model: Any, task: Any, constraints: Any, space: Any, job_fields: dict[str, Any]
            ) -> tuple[Job, Constraints, SearchSpace]:
    if isinstance(task, Job):
        job = task
    elif isinstance(task, dict):
        job = Job.model_validate({**({"model": model} if model is not None else {}), **task})
    else:
        if model is None:
            raise ValueError("plan(): give model= (a catalog name or ModelArch) or a Job as task=")
        job = Job.model_validate({"model": model, "task": task, **job_fields})
    cons = constraints if isinstance(constraints, Constraints) else Constraints.model_validate(constraints or {})
    sp = space if isinstance(space, SearchSpace) else SearchSpace.model_validate(space or {})
    return job, cons, sp


def _row(sc: Any, e: Any, usable: float) -> PlanRow:
    w = sc.workload
    train = sc.is_training
    par = sc.parallel
    pieces = []
    matches = [k for k, v in SHARDING_PARALLEL.items() if v and all(
        (int(getattr(par, a)) if a == "zero" else getattr(par, a)) == b for a, b in v.items())]
    shard = max(matches, key=lambda k: len(SHARDING_PARALLEL[k]), default="none")  # the most specific
    if par.dp > 1:
        pieces.append(f"dp{par.dp} {SHARDING_LABEL[shard]}")
    elif shard != "none":
        pieces.append(SHARDING_LABEL[shard])  # offload on one rank, or sharding over context-parallel ranks
    if par.tp > 1:
        pieces.append(f"tp{par.tp}")
    if par.pp > 1:
        pieces.append(f"pp{par.pp}")
    if par.cp > 1:
        pieces.append(f"cp{par.cp}")
    if par.ep > 1:
        pieces.append(f"ep{par.ep}")
    return PlanRow(
        scenario=sc.model_dump(mode="json"), gpu=sc.gpu, n_gpus=par.n_gpus,
        method=method_label(sc.method) if train else f"serve weights={sc.inference.weights}",
        precision=sc.precision, optimizer=sc.optimizer.name if train else "-",
        micro_batch=w.micro_batch if train else w.batch, grad_accum=w.grad_accum if train else 1,
        checkpointing=sc.checkpointing.mode if train else "-", parallel=" ".join(pieces) or "single",
        peak_memory_bytes=e.required_memory_bytes, usable_memory_bytes=usable,
        headroom_bytes=e.device_memory_bytes - e.required_memory_bytes, step_time_s=e.time.step_s,
        tokens_per_s=e.time.tokens_per_s, usd_per_million_tokens=e.cost.usd_per_million_tokens,
        kwh_per_million_tokens=e.cost.kwh_per_million_tokens, run_time_s=e.cost.run_time_s,
        run_usd=e.cost.run_usd, run_kwh=e.cost.run_kwh, p_oom=e.uncertainty.p_oom if e.uncertainty else None,
    )


def _key(row: PlanRow, objective: str) -> tuple:
    t, c, n = row.time_key, row.cost_key, row.n_gpus
    if objective == "cost":
        return (c, t, n)
    if objective in ("time", "throughput"):
        return (t, c, n)
    return (n, c, t)


def _sort_key(row: PlanRow, objective: str) -> tuple:
    return (*_key(row, objective), json.dumps(row.scenario, sort_keys=True))


def pareto_front(rows: list[PlanRow]) -> list[PlanRow]:
    """Rows no other row beats on both run time and cost (fastest first; equal points kept once)."""
    out: list[PlanRow] = []
    best_cost = math.inf
    for r in sorted(rows, key=lambda r: (r.time_key, r.cost_key, r.n_gpus, json.dumps(r.scenario, sort_keys=True))):
        if r.cost_key < best_cost:
            out.append(r)
            best_cost = r.cost_key
    return out


def plan(model: Any = None, task: Any = "finetune", constraints: Constraints | dict | None = None,
         objective: Objective = "cost", space: SearchSpace | dict | None = None, *, top_n: int = 10,
         bound: bool = True, pareto: bool = True, **job_fields: Any) -> PlanResult:
    """The best setups for a job under constraints.

    ``task`` is 'finetune' | 'train' | 'infer' (with ``seq_len=``, ``total_tokens=``, ``prompt_len=``,
    ``gen_len=`` as keywords) or a :class:`Job` / dict.  ``bound=False`` runs ``estimate()`` on every
    candidate that passes the lower-bound screen instead of the array evaluation (the reference: same
    answer, much slower).  ``pareto=False`` estimates only the rows that can enter the ranking; the Pareto
    front is then the front of those rows (``pareto_complete`` False).  Raises :class:`PlanError`
    (a ValueError) naming the binding constraint when nothing qualifies."""
    t0 = time.perf_counter()
    if objective not in ("cost", "time", "throughput", "gpus"):
        raise ValueError(f"objective={objective!r}; allowed: cost, time, throughput, gpus")
    if top_n < 1:
        raise ValueError(f"top_n={top_n} must be >= 1")
    job, cons, sp = _coerce(model, task, constraints, space, job_fields)
    if (cons.budget_usd or cons.deadline_s) and job.total_tokens is None and job.task != "infer":
        which = "budget_usd" if cons.budget_usd else "deadline_s"
        raise ValueError(f"constraints.{which} needs the job's total_tokens (how many tokens the run processes)")
    ctx = _Ctx(job, sp, cons, objective, top_n)
    from .plan_serving import check_serving_fields, plan_serving

    check_serving_fields(job, cons)
    if job.request_rate_per_s is not None:
        return plan_serving(ctx, t0)
    if job.task == "infer":
        rows, stats = _search_infer(ctx, bound, pareto)
    else:
        rows, stats = _search_train(ctx, bound, pareto)
    reasons = _reasons(ctx)
    if not rows:
        raise _explain(ctx, stats, reasons)
    rows.sort(key=lambda r: _sort_key(r, objective))
    return PlanResult(
        objective=objective, best=rows[0], ranked=rows[:top_n], pareto=pareto_front(rows),
        pareto_complete=pareto or not bound, rejected_reasons=reasons, candidates_evaluated=stats["evaluated"],
        candidates_pruned=stats["evaluated"] - stats["estimated"], candidates_estimated=stats["estimated"],
        search_time_s=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _gpus(ctx: _Ctx) -> list[str]:
    if ctx.cons.gpu:
        return [ctx.cons.gpu]
    return ctx.space.gpus if ctx.space.gpus is not None else _priced_devices()


def _counts(ctx: _Ctx) -> list[int]:
    cap = ctx.cons.max_gpus or max(ctx.space.gpu_counts)
    counts = [n for n in ctx.space.gpu_counts if n <= cap]
    if ctx.cons.n_gpus is not None:
        counts = [ctx.cons.n_gpus]
    if not counts:
        raise ValueError(f"constraints.max_gpus={cap}: no GPU count of the space ({ctx.space.gpu_counts}) is that small")
    return counts


Layout = tuple[int, int, int, str, int, int]
"""(dp, tp, pp, sharding, cp, ep) of one candidate's GPUs."""


def layout_parallel(lay: Layout) -> dict[str, Any]:
    """The ``Scenario.parallel`` fields of a layout."""
    dp, tp, pp, s, cp, ep = lay
    return {"dp": dp, "tp": tp, "pp": pp, "cp": cp, "ep": ep, **SHARDING_PARALLEL[s]}


def _layouts(ctx: _Ctx, gpu: str, n: int) -> list[Layout]:
    """(dp, tp, pp, sharding, cp, ep) for n GPUs of one type: tp within a node, sharding only with dp x cp > 1
    (offload also on one rank), ep dividing dp x cp."""
    from .estimate import _system_named

    system = _system_named(None, gpu, n)
    per_node = system.gpus_per_node
    if n > per_node and not system.multi_node:
        return []
    out = []
    single = ["none"] + [x for x in ctx.space.sharding if x in OFFLOAD_SHARDINGS]
    for pp in ctx.space.pp:
        for tp in ctx.space.tp:
            for cp in ctx.space.cp:
                if n % (tp * pp * cp) or tp > per_node:
                    continue
                dp = n // (tp * pp * cp)
                for ep in ctx.space.ep:
                    if (dp * cp) % ep:
                        continue
                    for s in (ctx.space.sharding if dp * cp > 1 else single):
                        out.append((dp, tp, pp, s, cp, ep))
    return out


def _search_train(ctx: _Ctx, bound: bool, pareto: bool) -> tuple[list[PlanRow], dict[str, int]]:
    from hwprofiles import get_device

    from . import compute
    from . import sharding as sh
    from .config import Scenario
    from .config.parallel import Parallel
    from .estimate import _flops, _stage_activation_bytes, _system_named, cost_table_for
    from .graph.ir import basis

    job, sp, cons = ctx.job, ctx.space, ctx.cons
    seq = job.seq_len
    methods = sp.methods if sp.methods is not None else _METHOD_LIST.validate_python(default_methods(job.task))
    if cons.method:
        methods = [m for m in methods if m.kind == cons.method] or \
            _METHOD_LIST.validate_python([{"kind": cons.method}] if cons.method != "lora" and cons.method != "qlora"
                                         else [{"kind": cons.method, "r": 16, "targets": "all-linear"}])
    gpus, counts = _gpus(ctx), _counts(ctx)
    mbs = sp.micro_batches
    work = {"task": "train", "seq_len": seq, **({"total_tokens": job.total_tokens} if job.total_tokens else {})}

    # 1. method families: (method, precision, optimizer, checkpointing) valid on their own
    fams = []  # (label, base dict, ct)
    for m in methods:
        label = method_label(m)
        for prec in sp.precisions:
            for opt in sp.optimizers:
                for ck in sp.checkpointing:
                    base = {"model": job.model, "method": m.model_dump(), "precision": prec,
                            "optimizer": {"name": opt}, "checkpointing": {"mode": ck},
                            "workload": {**work, "micro_batch": mbs[0]}}
                    try:
                        sc = Scenario.model_validate(base)
                    except ValidationError as err:
                        for g in gpus:
                            for n in counts:
                                _fam(ctx, (label, g, n)).invalid = _first_error(err)
                        continue
                    fams.append((label, m, prec, opt, ck, base, sc, cost_table_for(sc)))
    # 2. layouts per (gpu, count) valid against the model
    lay_ok: dict[Layout, Parallel] = {}
    lay_bad: dict[Layout, str] = {}
    per_gpu: list[tuple[str, int, list[Layout]]] = []
    for g in gpus:
        for n in counts:
            ls = []
            for lay in _layouts(ctx, g, n):
                if lay not in lay_ok and lay not in lay_bad:
                    try:
                        par = Parallel.model_validate(layout_parallel(lay))
                        from .config.scenario import check_parallel
                        from .config.training import TrainWorkload

                        check_parallel(par, job.model, TrainWorkload(seq_len=seq), "sdpa-flash")
                        lay_ok[lay] = par
                    except (ValidationError, ValueError) as err:
                        lay_bad[lay] = _first_error(err)
                if lay in lay_ok:
                    ls.append(lay)
            if ls:
                per_gpu.append((g, n, ls))
            else:
                system = _system_named(None, g, n)
                reason = (f"{n} GPUs do not fit system {system.name!r} ({system.gpus_per_node} GPUs, no network "
                          "between nodes)" if n > system.gpus_per_node and not system.multi_node else
                          next((lay_bad[lay] for lay in _layouts(ctx, g, n) if lay in lay_bad),
                               f"no tensor/pipeline degree of the space divides {n} GPUs within a node"))
                for f in fams:
                    _fam(ctx, (f[0], g, n)).invalid = reason
    if not fams or not per_gpu:
        return [], {"evaluated": 0, "estimated": 0}

    # 3. per-family tables: model-state bytes per layout, activations and FLOPs per micro-batch
    lays = sorted(lay_ok)
    lay_idx = {lay: i for i, lay in enumerate(lays)}
    F, L, M = len(fams), len(lays), len(mbs)
    states = np.zeros((F, L))
    host = np.zeros((F, L))  # host RAM per rank (offloaded states / parameters)
    acts = np.zeros((F, L, M))
    fpt = np.zeros((F, M))
    ga = np.ones((L, M), dtype=np.int64)
    ga_ok = np.ones((L, M), dtype=bool)
    saved: dict[tuple, np.ndarray] = {}  # one micro-batch's saved activations, by what they depend on
    for i, (label, m, prec, opt, ck, base, sc, ct) in enumerate(fams):
        pr = ct.plan.precision
        s = seq + ct.plan.prompt_tokens
        B = basis(np.asarray(mbs, dtype=float), s, s + ct.plan.prefix_tokens)
        for j, lay in enumerate(lays):
            par = lay_ok[lay]
            rp = sh.rank_params(ct, par, 0)
            ms = sh.model_state_bytes(rp, par, opt, sc.optimizer.impl, sc.optimizer.beta1, pr.param_dtype,
                                      pr.compute_dtype, sh.shard_group_size(par, par.n_gpus))
            host[i, j] = ms.host_bytes
            states[i, j] = (ms.weights + ms.quant_data + ms.quant_scales + ms.trainable_weights
                            + ms.optimizer_states + ms.paged_bytes + ms.bucket_bytes)
            if par.pp == 1:
                key = (id(ct), par.tp, par.sp, par.cp, par.n_gpus == 1)
                if key not in saved:
                    saved[key] = _stage_activation_bytes(ct, par, B, 0, 1)
                acts[i, j] = saved[key]
        for k, mb in enumerate(mbs):
            sk = sc.model_copy(update={"workload": sc.workload.model_copy(update={"micro_batch": mb})})
            fpt[i, k] = _flops(sk, ct)[0].per_token
    gbt = cons.global_batch_tokens
    for j, (dp, tp, pp, s, cp, ep) in enumerate(lays):
        for k, mb in enumerate(mbs):
            if gbt is not None:
                per = mb * seq * dp
                ga_ok[j, k] = gbt % per == 0
                ga[j, k] = max(1, gbt // per)

    # 4. the candidate arrays: (gpu/count row, layout, family, micro-batch)
    G = []  # per (gpu, count): dev constants
    host_cap = []  # per (gpu, count): (GPUs, GPUs per node, host RAM bytes or inf)
    cand_gc, cand_l = [], []
    for gi, (g, n, ls) in enumerate(per_gpu):
        dev = get_device(g)
        system = _system_named(None, g, n)
        host_cap.append((n, system.gpus_per_node, sh.host_ram_bytes(system) or math.inf))
        price = system.price_usd_per_gpu_hour if (system.price_usd_per_gpu_hour and system.device == dev.name) \
            else dev.price_usd_per_hour
        fixed = dev.cublas_workspace_bytes * 2.0 + dev.cublaslt_workspace_bytes + dev.cuda_context_bytes
        peaks = [_fastest_flops(compute, dev, compute.matmul_dtype(f[7].plan.precision.compute_dtype, f[2]))
                 for f in fams]
        G.append((g, n, dev, (1.0 - cons.min_headroom_fraction) * dev.memory_total_bytes, fixed,
                  price if price else math.nan, peaks))
        for lay in ls:
            cand_gc.append(gi)
            cand_l.append(lay_idx[lay])
    cand_gc = np.asarray(cand_gc)
    cand_l = np.asarray(cand_l)
    # broadcast to (P, F, M)
    usable = np.array([x[3] for x in G])[cand_gc][:, None, None]
    fixed = np.array([x[4] for x in G])[cand_gc][:, None, None]
    nvec = np.array([x[1] for x in G], dtype=float)[cand_gc][:, None, None]
    price = np.array([x[5] for x in G])[cand_gc][:, None, None]
    peak = np.array([x[6] for x in G])[cand_gc][:, :, None]
    mem_lb = states[:, cand_l].T[:, :, None] + np.transpose(acts[:, cand_l, :], (1, 0, 2)) + fixed
    tokens = job.total_tokens or 1e6
    t_lb = tokens * fpt[None, :, :] / (nvec * peak) * (1.0 - 1e-9)
    c_lb = np.where(np.isnan(price), np.inf, t_lb * nvec * np.nan_to_num(price) / 3600.0)
    # DeepSpeed's optimizer offload runs its CPU Adam: families with another optimizer skip those layouts
    host_opt = np.array([f[3] in ("adamw", "adam") for f in fams])
    lay_off = np.array([SHARDING_PARALLEL[lay[3]].get("offload_optimizer", "none") != "none" for lay in lays])
    fam_lay_ok = ~lay_off[None, :] | host_opt[:, None]  # (F, L)
    valid = ga_ok[cand_l][:, None, :] & fam_lay_ok[:, cand_l].T[:, :, None]
    evaluated = int(valid.sum())
    hc = np.array(host_cap)[cand_gc]  # (P, 3)
    host_need = sh.node_host_bytes(host[:, cand_l].T, hc[:, :1], hc[:, 1:2])  # (P, F)
    host_ok = (host_need <= hc[:, 2:])[:, :, None]
    for p, i in np.argwhere(~host_ok[:, :, 0] & valid.any(axis=2)):
        g = G[cand_gc[p]]
        fam = _fam(ctx, (fams[i][0], g[0], g[1]))
        if fam.host_fail is None or host_need[p, i] < fam.host_fail[0]:
            fam.host_fail = (float(host_need[p, i]), f"offloaded states {host_need[p, i] / GiB:.1f} GiB > "
                             f"{hc[p, 2] / GiB:.1f} GiB host RAM of the node ({lays[cand_l[p]][3]})")
    dev_ok = (mem_lb <= usable) & valid
    mem_ok = dev_ok & host_ok
    ok = mem_ok.copy()
    if cons.budget_usd is not None:
        ok &= c_lb <= cons.budget_usd
    if cons.deadline_s is not None:
        ok &= t_lb <= cons.deadline_s

    # family bookkeeping from the bounds (reasons with numbers)
    over = np.where(valid, mem_lb - usable, np.inf).min(axis=2)  # (P, F)
    lb_over = ~dev_ok.any(axis=2) & np.isfinite(over)
    no_valid = ~valid.any(axis=2)
    for p, i in zip(*np.nonzero(lb_over | no_valid)):
        key = (fams[i][0], G[cand_gc[p]][0], G[cand_gc[p]][1])
        if lb_over[p, i]:
            k = int(np.argmin(np.where(valid[p, i], mem_lb[p, i], np.inf)))
            _note_mem(_fam(ctx, key), over[p, i], float(mem_lb[p, i, k]), float(usable[p, 0, 0]),
                      f"model states + activations of micro-batch {mbs[k]} alone are")
        elif not fam_lay_ok[i, cand_l[p]]:
            _fam(ctx, key).invalid = (f"{SHARDING_LABEL[lays[cand_l[p]][3]]} runs DeepSpeed's CPU Adam: optimizer "
                                      f"{fams[i][3]!r} has no host implementation")
        else:
            _fam(ctx, key).invalid = f"global_batch_tokens={gbt} is not a multiple of micro_batch x seq_len x dp"

    ctx.closest_state = (fams, G, lays, cand_gc, cand_l, mem_lb, usable, c_lb, t_lb, mem_ok, work, mbs, ga)
    space = _Space(fams, G, lays, lay_ok, cand_gc, cand_l, usable, nvec, price, c_lb, t_lb, ok, valid, work, mbs, ga)
    if bound:
        rows, estimated = _search_grid(ctx, space, pareto)
    else:
        rows, estimated = _estimate_each(ctx, space)
    return rows, {"evaluated": evaluated, "estimated": estimated}


@dataclass
class _Space:
    """The training candidates as (gpu/count/layout row P, family F, micro-batch M) arrays, screened."""

    fams: list
    G: list
    lays: list
    lay_ok: dict
    cand_gc: np.ndarray
    cand_l: np.ndarray
    usable: np.ndarray  # (P, 1, 1)
    nvec: np.ndarray  # (P, 1, 1) GPU counts
    price: np.ndarray  # (P, 1, 1) USD per GPU-hour, NaN without a price
    c_lb: np.ndarray
    t_lb: np.ndarray
    ok: np.ndarray  # passes the lower-bound screen (memory, budget, deadline)
    valid: np.ndarray
    work: dict
    mbs: list
    ga: np.ndarray  # (L, M) grad accumulation

    def family_key(self, p: int, i: int) -> tuple[str, str, int]:
        g = self.G[self.cand_gc[p]]
        return (self.fams[i][0], g[0], g[1])

    def scenario(self, p: int, i: int, k: int) -> Any:
        from .config import Scenario

        data = {**self.fams[i][5], "gpu": self.G[self.cand_gc[p]][0],
                "parallel": layout_parallel(self.lays[self.cand_l[p]]),
                "workload": {**self.work, "micro_batch": self.mbs[k], "grad_accum": int(self.ga[self.cand_l[p], k])}}
        return Scenario.model_validate(data)


def _estimate_each(ctx: _Ctx, sp: _Space) -> tuple[list[PlanRow], int]:
    """Reference search: estimate() every candidate that passes the lower-bound screen (memory grows with
    the micro-batch, so once a micro-batch overflows, the larger ones of that setup are skipped)."""
    from .estimate import _estimate

    cons = ctx.cons
    rows: list[PlanRow] = []
    mb_fail: dict[tuple[int, int], int] = {}
    estimated = 0
    for p, i, k in np.argwhere(sp.ok):
        p, i, k = int(p), int(i), int(k)
        if mb_fail.get((p, i), 1 << 60) <= sp.mbs[k]:
            continue  # a smaller micro-batch of this setup already overflows
        sc = sp.scenario(p, i, k)
        e = _estimate(sc, False)
        estimated += 1
        use = float(sp.usable[p, 0, 0])
        fam = _fam(ctx, sp.family_key(p, i))
        if e.required_memory_bytes > use:
            mb_fail[(p, i)] = min(mb_fail.get((p, i), 1 << 60), sp.mbs[k])
            _note_mem(fam, e.required_memory_bytes - use, e.required_memory_bytes, use, "peak")
            continue
        if _oom_too_likely(cons, e, fam):
            continue
        row = _row(sc, e, use)
        if cons.budget_usd is not None and (row.run_usd is None or row.run_usd > cons.budget_usd):
            fam.budget_fail = min(fam.budget_fail or math.inf, row.run_usd if row.run_usd is not None else math.inf)
            continue
        if cons.deadline_s is not None and row.run_time_s > cons.deadline_s:
            fam.deadline_fail = min(fam.deadline_fail or math.inf, row.run_time_s)
            continue
        fam.ok = True
        rows.append(row)
    return rows, estimated


# Relative error allowed between a number of the arrays and estimate()'s before a comparison is trusted;
# the arrays are computed by estimate()'s own functions, so they agree far closer than this.
_REL_TOL = 1e-9


def _search_grid(ctx: _Ctx, sp: _Space, pareto: bool) -> tuple[list[PlanRow], int]:
    """Memory and step time of every screened candidate as arrays (:class:`simulator.grid.TrainGrid`), the
    constraints applied to them, and estimate() for the rows that can be in the ranking (and on the
    time-cost front): every candidate whose key is not above the top_n-th one by more than the tolerance."""
    from . import cost
    from .estimate import _estimate, _system_named
    from .grid import TrainGrid

    job, cons = ctx.job, ctx.cons
    P, F, M = sp.ok.shape
    grid = TrainGrid([f[6] for f in sp.fams], sp.mbs, ctx.space.tp, list({g[2].name: g[2] for g in sp.G}.values()))
    peak = np.full((P, F, M), np.inf)
    step = np.full((P, F, M), np.inf)
    done = sp.ok.any(axis=(1, 2))
    for p in np.flatnonzero(done):
        g, n, dev = sp.G[sp.cand_gc[p]][:3]
        par = sp.lay_ok[sp.lays[sp.cand_l[p]]]
        system = _system_named(None, g, n)
        ga_p = sp.ga[sp.cand_l[p]]
        _, peak[p], spilled = grid.peak_bytes(dev, system, par, ga_p)
        step[p] = grid.step_s(dev, system, par, ga_p, spilled)

    # throughput, run time and cost as estimate() derives them from the step time
    dp = np.array([sp.lays[j][0] for j in sp.cand_l], dtype=float)[:, None, None]
    tokens = np.asarray(sp.mbs, dtype=float)[None, None, :] * job.seq_len * dp * sp.ga[sp.cand_l][:, None, :]
    has_price = ~np.isnan(sp.price)
    with np.errstate(divide="ignore", invalid="ignore"):
        if job.total_tokens:
            tkey = step * job.total_tokens / tokens
            ckey = np.where(has_price, cost.run_cost_usd(tkey, sp.nvec, np.nan_to_num(sp.price)), np.inf)
        else:
            tkey = 1e6 / (tokens / step)
            usd_step = cost.run_cost_usd(step, sp.nvec, np.nan_to_num(sp.price))
            ckey = np.where(has_price, usd_step / tokens * 1e6, np.inf)
    computed = sp.valid & done[:, None, None]

    # numbers within the tolerance of a limit: settled by estimate()
    exact: dict[tuple[int, int, int], PlanRow] = {}
    use = sp.usable
    near = np.abs(peak - use) <= _REL_TOL * use
    if cons.budget_usd is not None:
        near |= np.abs(ckey - cons.budget_usd) <= _REL_TOL * cons.budget_usd
    if cons.deadline_s is not None:
        near |= np.abs(tkey - cons.deadline_s) <= _REL_TOL * cons.deadline_s
    for p, i, k in np.argwhere(computed & near):
        sc = sp.scenario(p, i, k)
        e = _estimate(sc, False)
        row = exact[(p, i, k)] = _row(sc, e, float(use[p, 0, 0]))
        peak[p, i, k], tkey[p, i, k], ckey[p, i, k] = e.required_memory_bytes, row.time_key, row.cost_key
    fits = computed & (peak <= use)
    budget_ok = ckey <= cons.budget_usd if cons.budget_usd is not None else np.ones_like(fits)
    deadline_ok = tkey <= cons.deadline_s if cons.deadline_s is not None else np.ones_like(fits)
    oom_ok = _oom_ok_grid(ctx, sp, fits & budget_ok & deadline_ok, peak, exact)
    feasible = fits & budget_ok & deadline_ok & oom_ok
    _note_families(ctx, sp, computed, fits, budget_ok, deadline_ok, feasible, peak, tkey, ckey)

    flat = np.flatnonzero(feasible)
    if not flat.size:
        return [], len(exact)
    t = tkey.ravel()[flat]
    c = ckey.ravel()[flat]
    n = np.broadcast_to(sp.nvec, feasible.shape).ravel()[flat]
    comps, exact_kind = {"cost": ((c, t, n), (False, False, True)), "gpus": ((n, c, t), (True, False, False))}.get(
        ctx.objective, ((t, c, n), (False, False, True)))
    order = np.lexsort(comps[::-1])
    kth = order[min(ctx.top_n, len(order)) - 1]
    take = _maybe_before(comps, tuple(x[kth] for x in comps), exact_kind)
    if pareto:
        take |= _maybe_on_front(t, c)
    rows = []
    for j in flat[take]:
        p, i, k = (int(x) for x in np.unravel_index(j, feasible.shape))
        row = exact.get((p, i, k))
        if row is None:
            sc = sp.scenario(p, i, k)
            row = exact[(p, i, k)] = _row(sc, _estimate(sc, False), float(use[p, 0, 0]))
            got = (peak[p, i, k], tkey[p, i, k], ckey[p, i, k])
            if not all(_agrees(a, b) for a, b in zip(got, (row.peak_memory_bytes, row.time_key, row.cost_key))):
                raise RuntimeError(f"plan(): the array evaluation of {row.scenario} gives (peak, time, cost) {got}, "
                                   f"estimate() {(row.peak_memory_bytes, row.time_key, row.cost_key)}")
        rows.append(row)
    return rows, len(exact)


def _agrees(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= _REL_TOL * abs(b)


def _maybe_before(comps: tuple, kth: tuple, exact_kind: tuple[bool, ...]) -> np.ndarray:
    """Candidates whose key may come no later than ``kth`` (lexicographic) once the numbers carry a relative
    error up to the tolerance: a float component decides only when it differs by more than that; integer
    components and infinities are exact."""
    undecided = np.ones(len(comps[0]), dtype=bool)
    include = np.zeros_like(undecided)
    for x, k, is_int in zip(comps, kth, exact_kind):
        if is_int:
            eq, after = x == k, x > k
        else:
            eq = (x == k) & np.isinf(x)
            after = x * (1.0 - _REL_TOL) > k * (1.0 + _REL_TOL)
        include |= undecided & ~after & ~eq
        undecided &= eq
    return include | undecided


def _maybe_on_front(t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Candidates no other one beats for certain on both run time (strictly) and cost, with the tolerance."""
    t_hi, c_hi = t * (1.0 + _REL_TOL), c * (1.0 + _REL_TOL)
    order = np.argsort(t_hi, kind="stable")
    best_c = np.minimum.accumulate(c_hi[order])
    j = np.searchsorted(t_hi[order], t * (1.0 - _REL_TOL), side="left")
    cheaper = np.where(j > 0, best_c[np.maximum(j - 1, 0)], np.inf)
    return ~((j > 0) & (cheaper <= c * (1.0 - _REL_TOL)))


def _oom_ok_grid(ctx: _Ctx, sp: _Space, candidates: np.ndarray, peak: np.ndarray,
                 exact: dict[tuple[int, int, int], PlanRow]) -> np.ndarray:
    """max_oom_probability over the grid: P(OOM) of every candidate that meets the other limits, from the
    same error band and arithmetic as estimate(); values within the tolerance of the limit are settled by
    estimate().  A family whose every candidate is too likely to run out gets the reason of its least
    risky one."""
    cons = ctx.cons
    if cons.max_oom_probability is None:
        return np.ones_like(candidates)
    from .estimate import _estimate
    from .uncertainty import band_cells, oom_probability_many

    p_oom = np.full(peak.shape, np.inf)
    for p in range(peak.shape[0]):
        g = sp.G[sp.cand_gc[p]]
        dev, n = g[2], int(g[1])
        for i, fam in enumerate(sp.fams):
            at = candidates[p, i]
            if not at.any():
                continue
            cell = band_cells(n, "train", fam[1].kind)[0]
            if cell is not None:
                p_oom[p, i, at] = oom_probability_many(peak[p, i, at], dev.memory_total_bytes, cell,
                                                       dev.cuda_context_bytes)
    limit = cons.max_oom_probability
    for p, i, k in np.argwhere(candidates & (np.abs(p_oom - limit) <= _REL_TOL * limit)):
        row = exact.get((p, i, k))
        if row is None:
            sc = sp.scenario(p, i, k)
            row = exact[(p, i, k)] = _row(sc, _estimate(sc, False), float(sp.usable[p, 0, 0]))
        p_oom[p, i, k] = row.p_oom if row.p_oom is not None else math.inf
    ok = p_oom <= limit
    for p, i in np.argwhere(candidates.any(axis=2) & ~(candidates & ok).any(axis=2)):
        k = int(np.argmin(np.where(candidates[p, i], p_oom[p, i], np.inf)))
        sc = sp.scenario(p, i, k)
        _oom_too_likely(cons, _estimate(sc, False), _fam(ctx, sp.family_key(p, i)))
    return ok


def _note_families(ctx: _Ctx, sp: _Space, computed: np.ndarray, fits: np.ndarray, budget_ok: np.ndarray,
                   deadline_ok: np.ndarray, feasible: np.ndarray, peak: np.ndarray, tkey: np.ndarray,
                   ckey: np.ndarray) -> None:
    """Per family (method on n x GPU): accepted, or the closest miss of memory, budget and deadline."""
    labels = sorted({f[0] for f in sp.fams})
    label_idx = np.array([labels.index(f[0]) for f in sp.fams])
    kid = np.broadcast_to(sp.cand_gc[:, None, None] * len(labels) + label_idx[None, :, None], peak.shape).ravel()
    n_keys = len(sp.G) * len(labels)

    def per_key(ufunc, values: np.ndarray, init) -> np.ndarray:
        out = np.full(n_keys, init)
        ufunc.at(out, kid, values.ravel())
        return out

    over = np.where(computed & ~fits, peak - sp.usable, np.inf)
    ok = per_key(np.logical_or, feasible, False)
    over_min = per_key(np.minimum, over, np.inf)
    b_fail = fits & ~budget_ok
    d_fail = fits & budget_ok & ~deadline_ok
    has_b, has_d = per_key(np.logical_or, b_fail, False), per_key(np.logical_or, d_fail, False)
    b_min = per_key(np.minimum, np.where(b_fail, ckey, np.inf), np.inf)
    d_min = per_key(np.minimum, np.where(d_fail, tkey, np.inf), np.inf)
    misses = np.flatnonzero(np.isfinite(over.ravel()))
    misses = misses[np.lexsort((over.ravel()[misses], kid[misses]))]
    keys, at = np.unique(kid[misses], return_index=True)
    first = dict(zip(keys.tolist(), misses[at].tolist()))  # per family, its smallest overflow
    for q in np.flatnonzero(ok | np.isfinite(over_min) | has_b | has_d):
        g = sp.G[q // len(labels)]
        fam = _fam(ctx, (labels[q % len(labels)], g[0], g[1]))
        if ok[q]:
            fam.ok = True
        if q in first:
            p = np.unravel_index(first[q], peak.shape)[0]
            _note_mem(fam, float(over_min[q]), float(peak.ravel()[first[q]]), float(sp.usable[p, 0, 0]), "peak")
        if has_b[q]:
            fam.budget_fail = min(fam.budget_fail or math.inf, float(b_min[q]))
        if has_d[q]:
            fam.deadline_fail = min(fam.deadline_fail or math.inf, float(d_min[q]))


def _fastest_flops(compute: Any, dev: Any, dtype: str) -> float:
    """FLOP/s no op of a step beats: the dense peak at the best GEMM fraction, or a fused attention
    kernel's fraction doubled (it runs half the counted FLOPs under a causal mask)."""
    eff = dev.efficiency
    frac = max(eff.max_fraction(dtype), 2.0 * (eff.attention_fraction or 0.0))
    return compute.peak_flops(dev, dtype) * min(1.0, frac) if frac < 1.0 else compute.peak_flops(dev, dtype) * frac


def _note_mem(fam: _Fam, over: float, peak: float, usable: float, what: str) -> None:
    if fam.mem_fail is None or over < fam.mem_fail[0] - 1e-6:
        fam.mem_fail = (over, peak, f"{what} {peak / GiB:.1f} GiB > {usable / GiB:.1f} GiB usable")


def _oom_too_likely(cons: Constraints, e: Any, fam: _Fam) -> bool:
    """max_oom_probability: reject an estimate whose P(OOM) exceeds it (or that has no band to tell)."""
    if cons.max_oom_probability is None:
        return False
    u = e.uncertainty
    p = u.p_oom if u is not None else math.inf
    if p <= cons.max_oom_probability:
        return False
    if fam.oom_fail is None or p < fam.oom_fail[0]:
        why = (f"P(OOM) {p:.1%} > max_oom_probability {cons.max_oom_probability:.1%} (peak {e.peak_memory_bytes / GiB:.1f} "
               f"GiB, {u.interval.split('-')[1]} {u.peak_memory_hi_bytes / GiB:.1f} GiB of {e.device_memory_bytes / GiB:.1f} GiB; "
               f"{u.memory_n} measurements in {u.memory_cell})" if u is not None else
               "no error band for this setup: P(OOM) unknown, max_oom_probability cannot be checked")
        fam.oom_fail = (p, why)
    return True


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        return str(e.get("msg", err)).removeprefix("Value error, ")
    return str(err)


def _reasons(ctx: _Ctx) -> dict[str, str]:
    """Per family with no accepted setup, its binding reason (and the nearest count that works)."""
    ok_counts: dict[tuple[str, str], list[int]] = {}
    for (label, g, n), f in ctx.fams.items():
        if f.ok:
            ok_counts.setdefault((label, g), []).append(n)
    out = {}
    for (label, g, n), f in sorted(ctx.fams.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if f.ok:
            continue
        if f.budget_fail is not None and f.budget_fail < math.inf:
            why = f"cheapest run that fits costs ${f.budget_fail:,.2f} > budget ${ctx.cons.budget_usd:,.2f}"
        elif f.deadline_fail is not None and ctx.job.task == "infer":
            why = f"fastest batch takes {f.deadline_fail:.2f} s > max_latency_s {ctx.cons.max_latency_s:.2f} s"
        elif f.deadline_fail is not None:
            why = f"fastest run that fits takes {f.deadline_fail / 3600:.2f} h > deadline {ctx.cons.deadline_s / 3600:.2f} h"
        elif f.oom_fail is not None:
            why = f.oom_fail[1]
        elif f.mem_fail is not None:
            why = f.mem_fail[2] + (f"; with offload: {f.host_fail[1]}" if f.host_fail is not None else "")
        elif f.host_fail is not None:
            why = f.host_fail[1]
        elif f.invalid is not None:
            why = f.invalid
        else:
            continue  # every candidate was beaten by better setups: not rejected, just not chosen
        more = sorted(c for c in ok_counts.get((label, g), []) if c > n)
        if more and f.mem_fail is not None and f.budget_fail is None:
            why += f"; with {more[0]} GPUs it fits"
        out[f"{label} on {n}x {g}"] = why
    return out


def _explain(ctx: _Ctx, stats: dict[str, int], reasons: dict[str, str]) -> PlanError:
    """Which constraint leaves nothing, and the cheapest setup that meets all the others."""
    cons = ctx.cons
    if stats["evaluated"] == 0:
        detail = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
        return PlanError(f"no valid setup in the search space ({detail or 'empty space'})", reasons)
    budget = [f.budget_fail for f in ctx.fams.values() if f.budget_fail is not None]
    deadline = [f.deadline_fail for f in ctx.fams.values() if f.deadline_fail is not None]
    closest = None
    if ctx.job.task != "infer" and (cons.budget_usd or cons.deadline_s) and not budget and not deadline:
        closest = _closest_ignoring_limits(ctx)
    if budget or (closest and cons.budget_usd and (closest.run_usd or math.inf) > cons.budget_usd):
        c = min(budget) if budget else closest.run_usd
        msg = (f"constraints.budget_usd=${cons.budget_usd:,.2f} is binding: the cheapest setup that fits in memory "
               f"costs ${c:,.2f}")
        if closest:
            msg += f" ({_describe(closest)})"
        return PlanError(msg, reasons, closest)
    if deadline or closest:
        t = min(deadline) if deadline else closest.run_time_s
        msg = f"constraints.deadline_s={cons.deadline_s:,.0f} s is binding: the fastest setup that fits takes {t:,.0f} s"
        if closest:
            msg += f" ({_describe(closest)})"
        return PlanError(msg, reasons, closest)
    mems = [(f.mem_fail, k) for k, f in ctx.fams.items() if f.mem_fail is not None]
    if mems:
        (over, peak, text), (label, g, n) = min(mems, key=lambda x: x[0][0])
        cap = cons.max_gpus or max(ctx.space.gpu_counts)
        host = ctx.fams[(label, g, n)].host_fail
        offload = f"; offloaded instead: {host[1]}" if host is not None else ""
        return PlanError(
            f"no setup fits in GPU memory with {cons.min_headroom_fraction:.0%} headroom within max_gpus={cap} "
            f"(memory is binding); closest: {label} on {n}x {g}: {text}{offload}; allow more GPUs, larger GPUs or "
            "other methods", reasons)
    hosts = [(f.host_fail, k) for k, f in ctx.fams.items() if f.host_fail is not None and not f.ok]
    if hosts:
        (need, text), (label, g, n) = min(hosts, key=lambda x: x[0][0])
        return PlanError(f"no setup fits: host RAM is binding for the offloaded setups; closest: {label} on {n}x {g}: "
                         f"{text}; allow more GPUs or a node with more host RAM", reasons)
    return PlanError("no setup qualifies: " + "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:5]), reasons)


def _closest_ignoring_limits(ctx: _Ctx, cap: int = 200) -> PlanRow | None:
    """The cheapest (budget) or fastest (deadline) setup that fits in memory, budget and deadline ignored."""
    from .config import Scenario
    from .estimate import _estimate

    state = ctx.closest_state
    if state is None:
        return None
    fams, G, lays, cand_gc, cand_l, mem_lb, usable, c_lb, t_lb, mem_ok, work, mbs, ga = state
    key = c_lb if ctx.cons.budget_usd else t_lb
    idx = np.argwhere(mem_ok)
    idx = idx[np.argsort(key[mem_ok], kind="stable")]
    best = None
    for p, i, k in idx[:cap]:
        if best is not None and key[p, i, k] >= (best.run_usd if ctx.cons.budget_usd else best.run_time_s):
            break
        g = G[cand_gc[p]][0]
        f = fams[i]
        data = {**f[5], "gpu": g, "parallel": layout_parallel(lays[cand_l[p]]),
                "workload": {**work, "micro_batch": mbs[k], "grad_accum": int(ga[cand_l[p], k])}}
        sc = Scenario.model_validate(data)
        e = _estimate(sc, False)
        if e.required_memory_bytes <= usable[p, 0, 0]:
            row = _row(sc, e, float(usable[p, 0, 0]))
            if best is None or (row.run_usd if ctx.cons.budget_usd else row.run_time_s) < (
                    best.run_usd if ctx.cons.budget_usd else best.run_time_s):
                best = row
    return best


def _describe(r: PlanRow) -> str:
    return (f"{r.n_gpus}x {r.gpu}, {r.method}, {r.precision}, {r.optimizer}, micro-batch {r.micro_batch}"
            f" x grad-accum {r.grad_accum}, checkpointing {r.checkpointing}, {r.parallel}")


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def _search_infer(ctx: _Ctx, bound: bool, pareto: bool) -> tuple[list[PlanRow], dict[str, int]]:
    """Serving: GPU type, count (tensor parallel), weight format and batch; the latency target is the time
    to generate one batch.  Evaluated with estimate() per candidate (the spaces are small)."""
    from .config import Scenario
    from .estimate import _estimate, _system_named

    job, sp, cons = ctx.job, ctx.space, ctx.cons
    rows: list[PlanRow] = []
    evaluated = estimated = 0
    from hwprofiles import get_device

    for g in _gpus(ctx):
        dev = get_device(g)
        for n in _counts(ctx):
            per_node = _system_named(None, g, n).gpus_per_node
            for wq in sp.infer_weights:
                key = (f"serve weights={wq}", g, n)
                fam = _fam(ctx, key)
                use = (1.0 - cons.min_headroom_fraction) * dev.memory_total_bytes
                for b in sp.micro_batches:  # memory grows with the batch: stop at the first overflow
                    evaluated += 1
                    if n > per_node:
                        fam.invalid = f"tp={n} spans nodes ({per_node} GPUs per node)"
                        break
                    data = {"model": job.model, "gpu": g, "workload": {"task": "infer", "batch": b,
                            "prompt_len": job.prompt_len, "gen_len": job.gen_len},
                            "inference": {"weights": wq}, "precision": sp.precisions[0], "parallel": {"tp": n}}
                    try:
                        sc = Scenario.model_validate(data)
                    except ValidationError as err:
                        fam.invalid = _first_error(err)
                        break
                    e = _estimate(sc, False)
                    estimated += 1
                    if e.required_memory_bytes > use:
                        _note_mem(fam, e.required_memory_bytes - use, e.required_memory_bytes, use, "peak")
                        break
                    if _oom_too_likely(cons, e, fam):
                        break
                    if cons.max_latency_s is not None and e.time.step_s > cons.max_latency_s:
                        fam.deadline_fail = min(fam.deadline_fail or math.inf, e.time.step_s)
                        continue
                    row = _row(sc, e, use)
                    if cons.budget_usd is not None and (row.usd_per_million_tokens or math.inf) > cons.budget_usd:
                        fam.budget_fail = min(fam.budget_fail or math.inf, row.usd_per_million_tokens or math.inf)
                        continue
                    fam.ok = True
                    rows.append(row)
    return rows, {"evaluated": evaluated, "estimated": estimated}
