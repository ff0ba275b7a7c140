"""``python -m validate report``: predicted vs measured for every measured case, and the error summary.

For each results file (:mod:`validate.schema`) and each case in it:

* **e2e** — the case's ``Scenario`` is estimated on the device profile the results file's fingerprint
  names (``--device`` overrides), and compared metric by metric: ``allocated`` (max_memory_allocated
  vs the engine's ``peak_allocated_bytes``), ``reserved`` (max_memory_reserved vs
  ``peak_reserved_bytes``), ``time`` (a training step or a whole generation vs ``time.step_s``), and for
  generations ``prefill`` and ``decode_per_token`` (the peaks and the prefill of a generation measured
  before the harness recorded its prefill's logit positions are predicted for a prefill that keeps every
  position's logits, as that harness's separately timed forward did: :func:`validate.e2e.measured_scenario`).
  A case that ran out of memory scores the engine's
  ``fits`` verdict (it must say the setup does not fit), as does every case that ran.
* **micro** — the kernel's predicted time from the engine's roofline (:func:`validate.micro.predict_micro`).

Errors are signed fractions ``(predicted - measured) / measured``; the summary gives per suite and metric
``n``, the median and p90 of ``|error|``, the largest, and the median signed error (the bias).  Published
measurements (``--published``) are scored with :mod:`validate.score` and summarised by metric class.
Memory is compared only on a GPU (torch keeps no CPU peak statistics) and time only where the results
file's device has a profile.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from .schema import CaseResult, ResultsFile
from .score import quantile

__all__ = ["Comparison", "compare_results", "summarize", "diagnose", "format_report", "report_html", "MEMORY_METRICS"]

MEMORY_METRICS = ("allocated", "reserved")


class Comparison(BaseModel):
    """One predicted-vs-measured pair."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    suite: str
    case_id: str
    metric: str
    """allocated, reserved, time, prefill, decode_per_token (e2e); time (micro); fits (both)."""
    measured: float
    predicted: float
    unit: str
    """'bytes', 's', or 'bool' for the fits verdict (1 = fits)."""
    source: str
    """The results file (or published records file) the measurement came from."""
    device: str | None
    """Device profile the prediction used."""
    diagnosis: str = ""

    @property
    def error(self) -> float:
        """Signed relative error (predicted - measured) / measured; for fits 0 (right) or 1 (wrong)."""
        if self.unit == "bool":
            return float(self.predicted != self.measured)
        return (self.predicted - self.measured) / self.measured if self.measured else math.inf


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def _estimate(scenario: Any, device: str | None):
    from simulator import estimate

    if device is not None and device != scenario.gpu:
        scenario = scenario.model_copy(update={"gpu": device})
    return estimate(scenario)


def diagnose(metric: str, measured: float, predicted: float, e: Any) -> str:
    """Where to look when a case misses: the side of the error and the engine's largest terms."""
    side = "over" if predicted > measured else "under"
    if metric in MEMORY_METRICS:
        cats = sorted(e.memory_bytes.model_dump().items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in cats if v)
        gap = (predicted - measured) / 2**30
        return f"{side}-predicted by {abs(gap):.2f} GiB at the {e.peak_phase} peak; largest terms: {terms}"
    if metric in ("time", "prefill", "decode_per_token") and e.time is not None:
        t = e.time.model_dump()
        parts = {k: v for k, v in t.items()
                 if k.endswith("_s") and not k.startswith("tokens_per") and k not in ("step_s", "decode_per_token_s") and v}
        top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        terms = ", ".join(f"{k[:-2]} {v * 1e3:.1f} ms" for k, v in top)
        return f"{side}-predicted ({predicted / measured:.2f}x); largest terms: {terms}; MFU {t['mfu'] * 100:.0f}%"
    return f"{side}-predicted"


def _e2e_comparisons(res: ResultsFile, case: CaseResult, source: str, device: str | None) -> list[Comparison]:
    from .e2e import case_from_spec, measured_scenario

    c = case_from_spec(case.case_id, case.spec)
    try:
        e = _estimate(c.scenario, device)
        measured_sc = measured_scenario(c, case.measured)
        # the peak and the separately timed prefill of an older generation include a plain forward's logits
        e_peak = e if measured_sc is c.scenario else _estimate(measured_sc, device)
    except Exception as err:  # noqa: BLE001 - a scenario the engine refuses is reported, not fatal
        return [Comparison(suite="e2e", case_id=case.case_id, metric="fits", measured=float(case.status == "ok"),
                           predicted=-1.0, unit="bool", source=source, device=device,
                           diagnosis=f"engine refused the scenario: {str(err).splitlines()[0][:200]}")]
    base = dict(suite="e2e", case_id=case.case_id, source=source, device=device)
    out = []
    on_gpu = res.fingerprint.platform != "cpu"
    if on_gpu and case.status in ("ok", "oom"):
        out.append(Comparison(**base, metric="fits", measured=float(case.status == "ok"),
                              predicted=float(e_peak.fits),
                              unit="bool", diagnosis=f"engine: peak {e_peak.peak_memory_bytes / 2**30:.2f} GiB of "
                                                     f"{e_peak.device_memory_bytes / 2**30:.2f} GiB"))
    m = case.measured
    if case.status != "ok" or m is None:
        return out
    pairs: list[tuple[str, float | None, float | None, str, Any]] = []
    if on_gpu:
        pairs += [("allocated", m.allocated_peak_bytes, e_peak.peak_allocated_bytes, "bytes", e_peak),
                  ("reserved", m.reserved_peak_bytes, e_peak.peak_reserved_bytes, "bytes", e_peak)]
    if device is not None and e.time is not None:
        pairs.append(("time", m.time_s, e.time.step_s, "s", e))
        if c.kind == "infer":
            pairs += [("prefill", m.extra.get("prefill_s"), e_peak.time.prefill_s, "s", e_peak),
                      ("decode_per_token", m.extra.get("decode_per_token_s"), e.time.decode_per_token_s, "s", e)]
    for metric, meas, pred, unit, est in pairs:
        if meas is None or pred is None or meas <= 0:
            continue
        out.append(Comparison(**base, metric=metric, measured=float(meas), predicted=float(pred), unit=unit,
                              diagnosis=diagnose(metric, float(meas), float(pred), est)))
    return out


def _micro_comparisons(case: CaseResult, source: str, device: str | None) -> list[Comparison]:
    m = case.measured
    if case.status != "ok" or m is None or m.time_s is None or device is None:
        return []
    from .micro import predict_micro

    try:
        pred = predict_micro(case.spec, case.kind, device)
    except NotImplementedError:
        return []
    return [Comparison(suite="micro", case_id=case.case_id, metric="time", measured=m.time_s, predicted=float(pred),
                       unit="s", source=source, device=device,
                       diagnosis=f"{'over' if pred > m.time_s else 'under'}-predicted ({pred / m.time_s:.2f}x)")]


def compare_results(files: Iterable[tuple[str, ResultsFile]], device: str | None = None) -> list[Comparison]:
    """Every comparison of every case of every (name, results) pair; ``device`` overrides the profile the
    fingerprints name (needed for a GPU no profile claims)."""
    out: list[Comparison] = []
    for source, res in files:
        dev = device or res.fingerprint.device_profile
        for case in res.cases:
            if case.suite == "e2e":
                out += _e2e_comparisons(res, case, source, dev)
            else:
                out += _micro_comparisons(case, source, dev)
    return out


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _stats(errors: list[float]) -> dict[str, Any]:
    a = [abs(x) for x in errors]
    return {"n": len(errors), "median_abs_err": quantile(a, 0.5), "p90_abs_err": quantile(a, 0.9),
            "max_abs_err": max(a) if a else None, "median_err": quantile(errors, 0.5)}


def summarize(comparisons: Iterable[Comparison]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{suite: {metric: {"n", "median_abs_err", "p90_abs_err", "max_abs_err", "median_err"}}}`` with
    errors as fractions; for ``fits``: ``n`` and ``accuracy`` (share of right verdicts)."""
    groups: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        groups[(c.suite, c.metric)].append(c)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (suite, metric), cs in sorted(groups.items()):
        if metric == "fits":
            valid = [c for c in cs if c.predicted >= 0]
            out[suite][metric] = {"n": len(valid),
                                  "accuracy": (sum(c.predicted == c.measured for c in valid) / len(valid)) if valid
                                  else None}
        else:
            out[suite][metric] = _stats([c.error for c in cs])
    return dict(out)


def published_summary(records_path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[tuple, Any]]:
    """Published records scored: ``{class: stats}`` over the comparable, predicted records (class
    ``memory`` for the memory metrics, ``time`` for times and throughputs, ``fits``), the per-group
    table of :func:`validate.score.score` and the per-target slices of :func:`validate.score.score_slices`."""
    from .published import load_jsonl, predict_records
    from .score import metric_kind, record_error, score, score_slices

    records = load_jsonl(records_path)
    preds = predict_records(records)
    by_id = {p["id"]: p for p in preds}
    errs: dict[str, list[float]] = defaultdict(list)
    fits: list[bool] = []
    for r in records:
        if not r["target"].get("comparable"):
            continue
        p = by_id.get(r["id"])
        e = record_error(r, p) if p else None
        if e is None:
            continue
        if e[0] == "fits":
            fits.append(bool(e[1]))
            continue
        cls = "time" if metric_kind(r["target"]["metric"]) == "speed" else "memory"
        sign = 1.0 if p["predicted"] >= r["target"]["value"] else -1.0
        errs[cls].append(sign * e[1])
    out = {k: _stats(v) for k, v in sorted(errs.items())}
    if fits:
        out["fits"] = {"n": len(fits), "accuracy": sum(fits) / len(fits)}
    return out, score(records, preds), score_slices(records, preds)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _val(x: float, unit: str) -> str:
    if unit == "bytes":
        return f"{x / 2**30:.3f} GiB"
    if unit == "s":
        if x < 1e-3:
            return f"{x * 1e6:.2f} us"
        return f"{x * 1e3:.3f} ms" if x < 1 else f"{x:.3f} s"
    return "fits" if x == 1 else ("OOM" if x == 0 else "n/a")


def format_summary(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = [f"{'suite':<10} {'metric':<17} {'n':>5} {'median':>8} {'p90':>8} {'max':>8} {'bias':>8}"]
    for suite, metrics in summary.items():
        for metric, s in metrics.items():
            if "accuracy" in s:
                lines.append(f"{suite:<10} {metric:<17} {s['n']:>5} {'accuracy ' + _pct(s['accuracy']):>35}")
            else:
                lines.append(f"{suite:<10} {metric:<17} {s['n']:>5} {_pct(s['median_abs_err']):>8} "
                             f"{_pct(s['p90_abs_err']):>8} {_pct(s['max_abs_err']):>8} {_pct(s['median_err']):>8}")
    return lines


def worst(comparisons: Iterable[Comparison], n: int = 10) -> list[Comparison]:
    """The ``n`` largest |errors| over the numeric metrics, then the wrong fits verdicts."""
    cs = list(comparisons)
    wrong = [c for c in cs if c.unit == "bool" and c.error]
    numeric = sorted((c for c in cs if c.unit != "bool"), key=lambda c: -abs(c.error))
    return (numeric[:n] + wrong)[: n + len(wrong)]


def _ending(res: ResultsFile) -> str:
    """How a run that measured fewer cases than it planned ended ('' for a complete run)."""
    if res.complete:
        return ""
    why = {"budget": "stopped by its time budget", "interrupted": "interrupted"}.get(
        res.stopped or "", "the run did not finish")
    return f"; {why} after {len(res.cases)} of {res.planned_cases} planned"


def format_report(files: list[tuple[str, ResultsFile]], comparisons: list[Comparison],
                  published: tuple[dict, dict, dict] | None = None, n_worst: int = 10) -> str:
    """The plain-text report: machines, per-suite summary, the worst cases with a diagnosis, every
    comparison, the published scores, and the commands that reproduce each results file."""
    lines = ["fitsim validation report", ""]
    for name, res in files:
        fp = res.fingerprint
        pk = ", ".join(f"{k} {v}" for k, v in fp.packages.items() if v)
        status = defaultdict(int)
        for c in res.cases:
            status[c.status] += 1
        lines.append(f"{name}: {res.suite} suite, {len(res.cases)} cases "
                     f"({', '.join(f'{v} {k}' for k, v in sorted(status.items()))}){_ending(res)}, "
                     f"{res.created_utc[:19]} UTC")
        lines.append(f"  on {fp.device_name} x{fp.device_count} (profile {fp.device_profile or 'none'}), driver "
                     f"{fp.driver or '-'}, CUDA {fp.cuda or '-'}; {pk}")
        lines.append(f"  reproduce: {res.command}")
    summary = summarize(comparisons)
    lines += ["", "Predicted vs measured (|error| = |predicted - measured| / measured; bias = median signed error)"]
    lines += format_summary(summary) if summary else ["  nothing comparable (CPU runs compare no memory; is the "
                                                      "device profile known?)"]
    bad = worst(comparisons, n_worst)
    if bad:
        lines += ["", f"Worst {len(bad)}"]
        for c in bad:
            err = "wrong verdict" if c.unit == "bool" else f"{100 * c.error:+.1f}%"
            lines.append(f"  {c.case_id} [{c.metric}] measured {_val(c.measured, c.unit)}, predicted "
                         f"{_val(c.predicted, c.unit)} ({err}): {c.diagnosis}")
    if published is not None:
        pub, table, slices = published
        lines += ["", "Published measurements (comparable records)"]
        lines += format_summary({"published": pub})
        from .score import format_slices, format_table

        lines += ["", format_table(table), "", "By target (memory and speed apart, one GPU apart from several)",
                  format_slices(slices)]
    lines += ["", "Every comparison"]
    for c in comparisons:
        err = ("right" if not c.error else "WRONG") if c.unit == "bool" else f"{100 * c.error:+.1f}%"
        lines.append(f"  {c.case_id:<64} {c.metric:<17} {_val(c.measured, c.unit):>14} {_val(c.predicted, c.unit):>14}"
                     f" {err:>8}")
    return "\n".join(lines)


def report_html(comparisons: list[Comparison], text: str) -> str:
    """A self-contained HTML page: one log-log scatter of predicted vs measured per (suite, metric), with
    the y = x line and ±10 % guides, then the text report."""
    import plotly.graph_objects as go

    groups: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        if c.unit != "bool":
            groups[(c.suite, c.metric)].append(c)
    parts = []
    first = True
    for (suite, metric), cs in sorted(groups.items()):
        scale = 2**30 if cs[0].unit == "bytes" else 1.0
        unit = "GiB" if cs[0].unit == "bytes" else "s"
        xs = [c.measured / scale for c in cs]
        ys = [c.predicted / scale for c in cs]
        lo, hi = min(xs + ys), max(xs + ys)
        fig = go.Figure()
        fig.add_scatter(x=xs, y=ys, mode="markers", name="cases", text=[f"{c.case_id}<br>{100 * c.error:+.1f}%"
                                                                        for c in cs], hoverinfo="text")
        for f, dash, name in ((1.0, "solid", "y = x"), (1.1, "dot", "+10%"), (0.9, "dot", "-10%")):
            fig.add_scatter(x=[lo, hi], y=[lo * f, hi * f], mode="lines", line={"dash": dash, "width": 1}, name=name)
        fig.update_layout(title=f"{suite}: {metric}", xaxis_title=f"measured ({unit})",
                          yaxis_title=f"predicted ({unit})", xaxis_type="log", yaxis_type="log", height=480,
                          width=640)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first))
        first = False
    body = "\n".join(parts) + f"\n<pre>{html.escape(text)}</pre>"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>fitsim validation</title></head><body>{body}</body></html>"
