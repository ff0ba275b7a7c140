"""Measured residuals -> the engine's error bands (``simulator/data/error_bands.json``).

A :class:`Pair` is one measurement and fitsim's prediction of it, in the same convention, tagged with
the regime of the setup (GPUs, task, method kind as the engine names it) and its source group.  Pairs
come from the published records (:func:`pairs_from_published`) or from our own end-to-end GPU runs
(:func:`pairs_from_results`); :func:`build_bands` turns any list of them into the band file's
:class:`~simulator.uncertainty.ErrorBands`.  How the bands are derived and used:
:mod:`simulator.uncertainty`.

    python -m validate bands --records /work/shared/published/public.jsonl [--results validate/results/] \\
        --out simulator/data/error_bands.json
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from simulator.uncertainty import (
    BandCell,
    ErrorBands,
    MetricClass,
    Provenance,
    Quantiles,
    QUANTILE_LEVELS,
    RecordsSource,
    SCHEMA_VERSION,
    cell_chain,
)

from .published import MEMORY_METRICS
from .score import group_of, quantile

MIN_N = 20
"""Fewest residuals a cell needs; p5 / p95 of 20 points are already the second-smallest / -largest."""
MIN_GROUPS = 2
"""Fewest source groups a cell needs: one source's shared missing details are not a regime."""
TIME_SIGN: dict[str, int] = {
    "step_time_s": 1, "decode_time_per_token_s": 1, "other:time_per_1000_microbatch_iterations": 1,
    "tokens_per_s_per_gpu": -1, "tokens_per_s_total": -1, "samples_per_s_total": -1, "tflops_per_gpu": -1,
    "mfu": -1,
}
"""Published speed metrics as time: +1 a time, -1 a rate (time = work / rate, the work being the same)."""

SELECTION = ("published: records marked comparable whose prediction is ok, memory and speed metrics; "
             "GPU runs: end-to-end cases with status ok")


class Pair(BaseModel):
    """One measurement and fitsim's prediction of it, in the metric class's direction (time: seconds or
    1 / rate, so that measured / predicted is the ratio of times)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    id: str
    group: str
    """Source group (the record id without its number; 'e2e-<device>' for GPU runs)."""
    metric: MetricClass
    measured: float = Field(gt=0)
    predicted: float = Field(gt=0)
    n_gpus: int = Field(ge=1)
    task: Literal["train", "infer"]
    method: str
    """The engine's method kind (Scenario.method.kind)."""
    source: str
    """Path of the file the measurement came from."""


def residual(p: Pair) -> float:
    """r = ln(measured / predicted)."""
    return math.log(p.measured / p.predicted)


def robust_scale(rs: Sequence[float]) -> float:
    """1.4826 x the median absolute deviation from the median (the standard deviation for normal data)."""
    med = quantile(list(rs), 0.5)
    return 1.4826 * quantile([abs(r - med) for r in rs], 0.5)


def cell_from_residuals(key: str, rs: Sequence[float], groups: dict[str, int]) -> BandCell:
    """Quantiles, bias and scale of one cell's residuals (``key`` as 'memory/single/train/lora')."""
    parts = key.split("/") + [None] * 3
    q = Quantiles(**{name: quantile(list(rs), lvl) for name, lvl in QUANTILE_LEVELS.items()})
    return BandCell(metric=parts[0], gpus=parts[1], task=parts[2], method=parts[3], n=len(rs),
                    n_groups=len(groups), groups=dict(sorted(groups.items())), quantiles=q, bias=q.p50,
                    robust_scale=robust_scale(rs))


def cells_from_pairs(pairs: Iterable[Pair], min_n: int = MIN_N, min_groups: int = MIN_GROUPS) -> dict[str, BandCell]:
    """Every cell of the pairs' regimes with at least ``min_n`` residuals from ``min_groups`` groups."""
    rs: dict[str, list[float]] = {}
    gs: dict[str, dict[str, int]] = {}
    for p in pairs:
        r = residual(p)
        for key in cell_chain(p.metric, p.n_gpus, p.task, p.method):
            rs.setdefault(key, []).append(r)
            g = gs.setdefault(key, {})
            g[p.group] = g.get(p.group, 0) + 1
    return {k: cell_from_residuals(k, rs[k], gs[k]) for k in sorted(rs)
            if len(rs[k]) >= min_n and len(gs[k]) >= min_groups}


def build_bands(pairs: Iterable[Pair], *, sources: Sequence[RecordsSource] = (), command: str | None = None,
                min_n: int = MIN_N, min_groups: int = MIN_GROUPS) -> ErrorBands:
    """The band file's content from residual pairs of any source (published, GPU runs, or both)."""
    pairs = list(pairs)
    from .harness import git_state

    commit, dirty = git_state()
    prov = Provenance(
        sources=tuple(sources), fitsim_commit=commit, fitsim_dirty=dirty,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command or "validate.bands.build_bands(pairs)", selection=SELECTION,
    )
    return ErrorBands(schema_version=SCHEMA_VERSION, min_n=min_n, min_groups=min_groups, provenance=prov,
                      cells=cells_from_pairs(pairs, min_n, min_groups))


# ----------------------------------------------------------------------------------------- sources


def _scenario_tags(scen) -> dict:
    return {"n_gpus": scen.parallel.n_gpus, "task": scen.workload.task, "method": scen.method.kind}


def pairs_from_published(records: Iterable[dict], predictions: Iterable[dict], source: str) -> list[Pair]:
    """Pairs of the comparable records predicted ok, memory and speed metrics (speed as time).  The tags
    are those of the Scenario the record was predicted with, so they match the engine's own."""
    from .published import record_to_scenario

    by_id = {p["id"]: p for p in predictions}
    out = []
    for rec in records:
        t, pred = rec.get("target") or {}, by_id.get(rec.get("id"))
        metric = t.get("metric")
        if not t.get("comparable") or pred is None or pred.get("status") != "ok":
            continue
        if metric not in MEMORY_METRICS and metric not in TIME_SIGN:
            continue
        v, p = t.get("value"), pred.get("predicted")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(p, (int, float)) or v <= 0 or p <= 0:
            continue
        cls, sign = ("memory", 1) if metric in MEMORY_METRICS else ("time", TIME_SIGN[metric])
        measured, predicted = (float(v), float(p)) if sign > 0 else (1.0 / v, 1.0 / p)
        out.append(Pair(id=rec["id"], group=group_of(rec["id"]), metric=cls, measured=measured, predicted=predicted,
                        source=source, **_scenario_tags(record_to_scenario(rec))))
    return out


def pairs_from_results(results: Iterable, source: str | Sequence[str]) -> list[Pair]:
    """Pairs of our own end-to-end GPU runs (:class:`validate.schema.ResultsFile`), from the report's own
    comparisons (:func:`validate.report.compare_results`: each case estimated on the device profile of its
    results file): the reserved peak (the allocated one when reserved was not read) and the step time.
    ``source``: the path of each results file (or one for all)."""
    from simulator import Scenario

    from .report import compare_results

    files = list(results)
    paths = [source] * len(files) if isinstance(source, str) else list(source)
    out = []
    for rf, path in zip(files, paths):
        group = f"e2e-{rf.fingerprint.device_profile or rf.fingerprint.device_name}"
        specs = {c.case_id: c.spec for c in rf.cases}
        comps = [c for c in compare_results([(path, rf)]) if c.metric in ("reserved", "allocated", "time")]
        has_reserved = {c.case_id for c in comps if c.metric == "reserved"}
        for c in comps:
            if c.metric == "allocated" and c.case_id in has_reserved or c.measured <= 0 or c.predicted <= 0:
                continue
            tags = _scenario_tags(Scenario.model_validate(specs[c.case_id]["scenario"]))
            out.append(Pair(id=f"{c.case_id}#{c.metric}", group=group, metric="time" if c.metric == "time" else "memory",
                            source=path, measured=c.measured, predicted=c.predicted, **tags))
    return out


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def records_source(path: str | Path, kind: Literal["published", "gpu-run"], pairs: Sequence[Pair]) -> RecordsSource:
    """Provenance of one measurements file: its path, sha256 and how many pairs it gave."""
    return RecordsSource(kind=kind, path=str(path), sha256=sha256_of(path),
                         n_pairs=sum(p.source == str(path) for p in pairs))


def write_bands(bands: ErrorBands, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(bands.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return p


def format_bands(bands: ErrorBands) -> str:
    """One line per cell: n, groups, and measured / predicted at p10 / p50 / p90."""
    lines = [f"{'cell':<28} {'n':>4} {'groups':>6}  {'p10':>6} {'p50':>6} {'p90':>6}  (measured / predicted)"]
    for k, c in bands.cells.items():
        q = c.quantiles
        lines.append(f"{k:<28} {c.n:>4} {c.n_groups:>6}  {math.exp(q.p10):>6.3f} {math.exp(q.p50):>6.3f} "
                     f"{math.exp(q.p90):>6.3f}")
    return "\n".join(lines)


__all__ = ["Pair", "build_bands", "cells_from_pairs", "pairs_from_published", "pairs_from_results", "residual",
           "records_source", "write_bands", "MIN_N", "MIN_GROUPS"]
