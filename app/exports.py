"""Downloads of the Estimate page: the scenario as YAML, the result as JSON and as CSV (pure functions)."""

from __future__ import annotations

import csv
import io
import json

from simulator import Estimate, Scenario
from simulator.results import CATEGORIES


def scenario_yaml(sc: Scenario) -> str:
    """The validated scenario, every field explicit (``fitsim estimate scenario.yaml`` reads it back)."""
    return sc.to_yaml()


def estimate_json(e: Estimate, sc: Scenario) -> str:
    """What ``fitsim estimate --json`` prints: the Estimate with the validated scenario under 'scenario'."""
    return json.dumps({**e.model_dump(mode="json"), "scenario": sc.model_dump(mode="json")}, indent=2)


def estimate_rows(e: Estimate) -> list[tuple[str, str, object, str]]:
    """(section, quantity, value, unit) rows: the verdict, the peak, bytes per category, allocated bytes per
    phase, FLOPs, what fits, the suggestions and the saved activations per module."""
    rows: list[tuple[str, str, object, str]] = [
        ("summary", "model", e.model, ""),
        ("summary", "gpu", e.gpu, ""),
        ("summary", "task", e.task, ""),
        ("summary", "method", e.method, ""),
        ("summary", "fits", e.fits, ""),
        ("summary", "peak_memory", e.peak_memory_bytes, "bytes"),
        ("summary", "peak_reserved", e.peak_reserved_bytes, "bytes"),
        ("summary", "peak_allocated", e.peak_allocated_bytes, "bytes"),
        ("summary", "peak_phase", e.peak_phase, ""),
        ("summary", "device_memory", e.device_memory_bytes, "bytes"),
        ("summary", "headroom", e.headroom_bytes, "bytes"),
        ("summary", "n_params", e.n_params, "parameters"),
        ("summary", "n_trainable_params", e.n_trainable_params, "parameters"),
        ("summary", "tokens_per_step", e.tokens_per_step, "tokens"),
        ("summary", "max_batch_that_fits", e.max_batch_that_fits, "sequences"),
        ("summary", "max_seq_len_that_fits", e.max_seq_len_that_fits, "tokens"),
    ]
    rows += [("memory_at_peak", c, getattr(e.memory_bytes, c), "bytes") for c in CATEGORIES]
    rows += [("phase_allocated", p, v, "bytes") for p, v in e.phase_allocated_bytes.items()]
    rows += [("flops", k, v, "FLOP") for k, v in e.flops.model_dump().items()]
    rows += [("suggestion", s.change, s.peak_memory_bytes, "bytes" if s.fits else "bytes (does not fit)")
             for s in e.suggestions]
    rows += [("activations_by_layer", k, v, "bytes") for k, v in e.activations_by_layer.items()]
    rows += [("warning", w, "", "") for w in e.warnings]
    rows += [("note", n, "", "") for n in e.notes]
    return rows


def estimate_csv(e: Estimate) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "quantity", "value", "unit"])
    for section, key, value, unit in estimate_rows(e):
        w.writerow([section, key, "" if value is None else value, unit])
    return buf.getvalue()
