"""``python -m validate run``: measure a suite's cases on this machine and write one results file.

Each case is measured in the same process, one after the other; a case that runs out of memory is
recorded with status 'oom' (a measurement: the engine must have said it does not fit), one that cannot
run here (a kernel or package this machine lacks) as 'skipped' with the reason, any other failure as
'error' with its message — and the suite goes on.  The file is written under a new name
(:func:`validate.schema.write_results`) after the first case and rewritten after every later one, so a run
cut off by a time limit keeps what it measured (``planned_cases`` says how much is missing).  With a time
budget (``--budget-s``) the cases run in :func:`coverage_order`, and the run does not start a case that the
budget cannot hold -- judged by the longest case of the same kind so far -- and records ``stopped: budget``.

Suites:

* ``micro`` — the kernels the engine models (:mod:`validate.micro`);
* ``e2e`` — real transformers + peft training steps and generations of :class:`~simulator.config.Scenario`
  cases (:mod:`validate.e2e`);
* ``all`` — both.

``--scale gpu`` is the full grid for one data-centre GPU (≤ 20 min on an H100); ``--scale cpu`` is a tiny
grid with the same code path, for CI and machines without a GPU.
"""

from __future__ import annotations

import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from .schema import SCHEMA_VERSION, CaseResult, Measurement, ResultsFile, write_results

Scale = Literal["gpu", "cpu"]


class Skip(Exception):
    """Raised by a case that cannot run on this machine (missing package, kernel or device feature)."""


def cases_for(suite: str, scale: Scale) -> list[Any]:
    """The cases of ``suite`` ('micro', 'e2e' or 'all') at ``scale``."""
    out: list[Any] = []
    if suite in ("micro", "all"):
        from .micro import micro_cases

        out += micro_cases(scale)
    if suite in ("e2e", "all"):
        from .e2e import e2e_cases

        out += e2e_cases(scale)
    if not out:
        raise ValueError(f"suite={suite!r}: allowed 'micro', 'e2e', 'all'")
    return out


def _runner(case: Any) -> Callable[[Any, str], Measurement]:
    if case.suite == "micro":
        from .micro import run_micro

        return run_micro
    from .e2e import run_e2e

    return run_e2e


def measure_case(case: Any, device: str) -> CaseResult:
    """Run one case and return its result; never raises for a case that fails."""
    from .harness import free_device_memory, is_oom

    base = dict(case_id=case.case_id, suite=case.suite, kind=case.kind, spec=case.spec())
    try:
        m = _runner(case)(case, device)
        return CaseResult(**base, status="ok", measured=m)
    except (Skip, NotImplementedError) as e:
        return CaseResult(**base, status="skipped", message=str(e))
    except Exception as e:  # noqa: BLE001 - a failed case is data, the suite goes on
        if is_oom(e):
            return CaseResult(**base, status="oom", message=str(e).splitlines()[0][:500])
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return CaseResult(**base, status="error", message=tb[:1000])
    finally:
        free_device_memory(device)


def shard_of(cases: list[Any], shard: tuple[int, int] | None) -> list[Any]:
    """The ``i``-th of ``n`` interleaved parts (cases i-1, i-1+n, ...): parts of similar cost, so a grid that
    outlasts one command's time limit runs as n commands."""
    if shard is None:
        return cases
    i, n = shard
    return cases[i - 1::n]


def spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order (0, 4, 2, 6, 1, 5, 3, 7 for 8): every prefix is spread evenly over the
    range, so the first few cases of a grid sorted by size span all its sizes."""
    bits = max(1, (n - 1).bit_length())
    return sorted(range(n), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))


def coverage_order(cases: list[Any]) -> list[Any]:
    """``cases`` reordered so that every prefix spans each kind and each kind's range: within a kind in
    :func:`spread_order`, the kinds taking turns.  A run cut short by its budget then still calibrates every
    curve, only more coarsely."""
    by_kind: dict[str, list[Any]] = {}
    for c in cases:
        by_kind.setdefault(c.kind, []).append(c)
    queues = [[group[i] for i in spread_order(len(group))] for group in by_kind.values()]
    out: list[Any] = []
    for i in range(max(map(len, queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def expected_case_s(kind: str, wall_s_by_kind: dict[str, float]) -> float:
    """Wall time to expect of the next case of ``kind``: the longest case of that kind so far, else the longest
    of any kind, else 0 (nothing measured yet: the first case always starts)."""
    if kind in wall_s_by_kind:
        return wall_s_by_kind[kind]
    return max(wall_s_by_kind.values(), default=0.0)


def budget_allows(elapsed_s: float, expected_s: float, budget_s: float | None) -> bool:
    """Whether a case expected to take ``expected_s`` still ends within ``budget_s`` (None: no budget)."""
    return budget_s is None or elapsed_s + expected_s <= budget_s


def run_suite(suite: str, *, device: str, scale: Scale, out_dir: str | Path | None, only: str | None = None,
              shard: tuple[int, int] | None = None, profile: str | None = None, argv: Iterable[str] | None = None,
              progress: Callable[[str], None] | None = None, budget_s: float | None = None,
              ) -> tuple[ResultsFile, Path | None]:
    """Measure every case of ``suite`` (those whose id contains ``only``) within ``budget_s`` seconds of wall
    time (None: no limit); write the results file into ``out_dir`` after every case (None: do not write).
    Returns the results and the path written.  Ctrl-C ends the run with ``stopped: interrupted`` and the
    cases measured so far."""
    from .harness import fingerprint

    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"budget_s={budget_s}: allowed a positive number of seconds (or none)")
    fp = fingerprint(device, profile=profile)
    cases = shard_of([c for c in cases_for(suite, scale) if only is None or only in c.case_id], shard)
    if not cases:
        raise ValueError(f"--only {only!r} / --shard {shard} leaves no case of suite {suite!r} at scale {scale!r}")
    if budget_s is not None:
        cases = coverage_order(cases)
    started = datetime.now(timezone.utc)
    command = "python -m validate " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    results: list[CaseResult] = []
    wall_s_by_kind: dict[str, float] = {}
    stopped = None
    path: Path | None = None

    def save() -> ResultsFile:
        nonlocal path
        res = ResultsFile(schema_version=SCHEMA_VERSION, suite=suite, created_utc=started.isoformat(),
                          command=command, fingerprint=fp, cases=tuple(results),
                          duration_s=time.perf_counter() - t0, planned_cases=len(cases), stopped=stopped)
        if out_dir is not None:
            path = write_results(res, out_dir, own=path)
        return res

    try:
        for i, case in enumerate(cases, 1):
            if not budget_allows(time.perf_counter() - t0, expected_case_s(case.kind, wall_s_by_kind), budget_s):
                stopped = "budget"
                if progress is not None:
                    progress(f"budget of {budget_s:.0f} s reached: {len(cases) - i + 1} of {len(cases)} cases not run")
                break
            c0 = time.perf_counter()
            r = measure_case(case, device)
            wall_s_by_kind[case.kind] = max(wall_s_by_kind.get(case.kind, 0.0), time.perf_counter() - c0)
            results.append(r)
            if i < len(cases):
                save()
            if progress is not None:
                t = r.measured.time_s if r.measured and r.measured.time_s is not None else None
                what = f"{t * 1e3:.3f} ms" if t is not None else (r.message or "")[:80]
                progress(f"[{i}/{len(cases)}] {r.status:<7} {r.case_id}  {what}")
    except KeyboardInterrupt:
        stopped = "interrupted"
    return save(), path


def predicted_seconds(case: Any, device_profile: str) -> tuple[bool, float]:
    """(the engine's fits verdict, the engine's time for the case's warm-up and timed repeats) on
    ``device_profile``: what a run of the case should cost, before a GPU is rented.  Microbenchmarks: the
    predicted kernel time over the repeats a 50 ms budget takes."""
    if case.suite == "micro":
        from .micro import predict_micro

        try:
            t = predict_micro(case.spec(), case.kind, device_profile)
        except NotImplementedError:
            return True, 0.0
        return True, max(0.05, 10 * t)
    from simulator import estimate

    sc = case.scenario.model_copy(update={"gpu": device_profile})
    e = estimate(sc, what_fits=False)
    runs = case.warmup + case.repeats
    extra = case.repeats * e.time.prefill_s if case.kind == "infer" else 0.0  # the prefill timed on its own
    return e.fits, runs * e.time.step_s + extra


def dry_run(suite: str, *, scale: Scale, device_profile: str, only: str | None = None,
            shard: tuple[int, int] | None = None) -> tuple[list[tuple[str, bool, float]], float]:
    """Every case the run would measure with the engine's verdict and time, and their total seconds (kernel
    time only: building the models and the host's own work come on top)."""
    cases = shard_of([c for c in cases_for(suite, scale) if only is None or only in c.case_id], shard)
    rows = [(c.case_id, *predicted_seconds(c, device_profile)) for c in cases]
    return rows, sum(t for _, fits, t in rows if fits)

