"""Score predictions against published records: per source group and overall.

Group = the record id without its trailing ``-NNN`` ("qwen1-ft-037" -> "qwen1-ft").
Per group: n records, n comparable, n ok (a comparable record predicted with status ok), coverage = ok /
comparable, and on the ok comparable records: median and p90 of |predicted - value| / value for numeric
metrics, accuracy for ``fits``.  Non-comparable records are scored only in the ``*_all`` columns
(``n_ok_all``, ``median_all``) so that their errors never mix into the headline numbers.

:func:`score_slices` cuts each group the way the accuracy targets are stated: memory and speed apart, one GPU
apart from several, each slice against its target (:data:`TARGETS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

_SUFFIX = re.compile(r"-\d+$")


def group_of(record_id: str) -> str:
    return _SUFFIX.sub("", record_id)


TARGETS: dict[tuple[str, str], tuple[float, float | None]] = {
    ("memory", "1 GPU"): (0.10, 0.25),
    ("memory", "multi-GPU"): (0.10, None),
    ("speed", "1 GPU"): (0.15, None),
    ("speed", "multi-GPU"): (0.15, None),
}
"""(kind, scope) -> (median |error| target, p90 target or None): single-GPU memory median <= 10 % and p90 <= 25 %;
multi-GPU memory median <= 10 %; throughput, MFU and step time median <= 15 % (the engine's accuracy targets)."""


def metric_kind(metric: str) -> str:
    """'memory' (peak or total GPU memory), 'fits' (a fit verdict), 'host' (host memory) or 'speed' (time,
    throughput, TFLOP/s, MFU)."""
    m = metric.lower()
    if m == "fits":
        return "fits"
    if "cpu_memory" in m:
        return "host"
    return "memory" if "memory" in m else "speed"


def record_scope(rec: dict) -> str:
    """'1 GPU' or 'multi-GPU'."""
    return "multi-GPU" if int(rec.get("n_gpus") or 1) > 1 else "1 GPU"


def quantile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default 'linear' method); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def record_error(rec: dict, pred: dict) -> tuple[str, float | bool] | None:
    """("rel", |p - v| / v) for a numeric metric, ("fits", correct) for fits; None if not scorable."""
    if pred is None or pred.get("status") != "ok":
        return None
    v, p = rec["target"].get("value"), pred.get("predicted")
    if rec["target"].get("metric") == "fits":
        if not isinstance(v, bool) or not isinstance(p, bool):
            return None
        return "fits", p == v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(p, (int, float)) or v == 0:
        return None
    return "rel", abs(p - v) / abs(v)


def _row(pairs: list[tuple[dict, dict | None]]) -> dict[str, Any]:
    comp = [(r, p) for r, p in pairs if r["target"].get("comparable")]
    ok = [(r, p) for r, p in comp if p is not None and p.get("status") == "ok"]
    ok_all = [(r, p) for r, p in pairs if p is not None and p.get("status") == "ok"]

    def errs(rows):
        rel, fit = [], []
        for r, p in rows:
            e = record_error(r, p)
            if e is None:
                continue
            (rel if e[0] == "rel" else fit).append(e[1])
        return rel, fit

    rel, fit = errs(ok)
    rel_all, _ = errs(ok_all)
    return {
        "n": len(pairs),
        "n_comparable": len(comp),
        "n_ok": len(ok),
        "coverage": (len(ok) / len(comp)) if comp else None,
        "n_numeric": len(rel),
        "median": quantile(rel, 0.5),
        "p90": quantile(rel, 0.9),
        "n_fits": len(fit),
        "fits_accuracy": (sum(fit) / len(fit)) if fit else None,
        "n_ok_all": len(ok_all),
        "median_all": quantile(rel_all, 0.5),
    }


def score(records: Iterable[dict], predictions: Iterable[dict]) -> dict[str, dict[str, Any]]:
    """{group: row} plus "all"; rows as documented in the module docstring."""
    recs = list(records)
    by_id = {p["id"]: p for p in predictions}
    groups: dict[str, list[tuple[dict, dict | None]]] = {}
    for r in recs:
        groups.setdefault(group_of(r["id"]), []).append((r, by_id.get(r["id"])))
    out = {g: _row(pairs) for g, pairs in sorted(groups.items())}
    out["all"] = _row([(r, by_id.get(r["id"])) for r in recs])
    return out


def score_slices(records: Iterable[dict], predictions: Iterable[dict]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """{(group, kind, scope): row} over the comparable records of each (memory | speed) x (1 GPU | multi-GPU)
    slice, with ``target_median`` / ``target_p90`` and ``meets`` (None where the slice has no numeric error)."""
    by_id = {p["id"]: p for p in predictions}
    slices: dict[tuple[str, str, str], list[tuple[dict, dict | None]]] = {}
    for r in records:
        kind = metric_kind(str(r["target"].get("metric", "")))
        if kind not in ("memory", "speed") or not r["target"].get("comparable"):
            continue
        slices.setdefault((group_of(r["id"]), kind, record_scope(r)), []).append((r, by_id.get(r["id"])))
    out = {}
    for key, pairs in sorted(slices.items()):
        row = _row(pairs)
        med_t, p90_t = TARGETS[key[1:]]
        meets = None
        if row["median"] is not None:
            meets = row["median"] <= med_t and (p90_t is None or row["p90"] <= p90_t)
        out[key] = {**row, "target_median": med_t, "target_p90": p90_t, "meets": meets}
    return out


def format_slices(table: dict[tuple[str, str, str], dict[str, Any]]) -> str:
    head = ["group", "kind", "scope", "ok/comp", "median", "p90", "target", "meets"]
    lines = []
    for (g, kind, scope), r in table.items():
        target = f"<={100 * r['target_median']:.0f}%" + (f", p90<={100 * r['target_p90']:.0f}%" if r["target_p90"] else "")
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "NO")
        lines.append([g, kind, scope, f"{r['n_ok']}/{r['n_comparable']}", _fmt(r["median"], True), _fmt(r["p90"], True),
                      target, meets])
    return _render(head, lines, n_left=3)


def _render(head: list[str], lines: list[list[str]], n_left: int = 1) -> str:
    """A plain-text table: a header, a rule, the rows; the first ``n_left`` columns left-aligned, the rest right."""
    widths = [max([len(h), *(len(l[i]) for l in lines)]) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i < n_left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def worst(records: Iterable[dict], predictions: Iterable[dict], n: int = 10, comparable_only: bool = True) -> list[dict]:
    """The n largest relative errors (numeric metrics), with predicted and measured values."""
    by_id = {p["id"]: p for p in predictions}
    rows = []
    for r in records:
        if comparable_only and not r["target"].get("comparable"):
            continue
        p = by_id.get(r["id"])
        e = record_error(r, p) if p else None
        if e is None or e[0] != "rel":
            continue
        rows.append({"id": r["id"], "metric": r["target"]["metric"], "measured": r["target"]["value"],
                     "predicted": p["predicted"], "unit": p.get("unit"), "rel_err": e[1],
                     "measured_how": r["target"].get("measured_how")})
    rows.sort(key=lambda x: -x["rel_err"])
    return rows[:n]


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return str(x)


def format_table(table: dict[str, dict[str, Any]]) -> str:
    head = ["group", "n", "comp", "ok", "coverage", "median", "p90", "fits acc", "ok(all)", "median(all)"]
    lines = []
    for g, r in table.items():
        lines.append([g, _fmt(r["n"]), _fmt(r["n_comparable"]), _fmt(r["n_ok"]), _fmt(r["coverage"], True),
                      _fmt(r["median"], True), _fmt(r["p90"], True),
                      (f"{100 * r['fits_accuracy']:.0f}% ({r['n_fits']})" if r["fits_accuracy"] is not None else "-"),
                      _fmt(r["n_ok_all"]), _fmt(r["median_all"], True)])
    return _render(head, lines)
