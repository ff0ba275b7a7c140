"""The committed GPU measurements (``validate/results/``) against the engine: the issue's memory targets
hold on every end-to-end results file measured on a GPU, and the engine's fits verdict is right for every
case.  A new results file that breaks them fails here until the engine is mended."""

from __future__ import annotations

from pathlib import Path

import pytest

from validate.report import compare_results, summarize
from validate.schema import load_results, results_paths

RESULTS = Path(__file__).resolve().parents[2] / "validate" / "results"
GPU_E2E = [p for p in results_paths(RESULTS) if p.name.startswith("e2e-")]


@pytest.mark.skipif(not GPU_E2E, reason="no end-to-end GPU results committed")
@pytest.mark.parametrize("path", GPU_E2E, ids=lambda p: p.name)
def test_allocated_peak_meets_the_target_on_committed_gpu_results(path):
    res = load_results(path)
    assert res.fingerprint.platform == "cuda"
    summary = summarize(compare_results([(path.name, res)]))["e2e"]
    assert summary["allocated"]["n"] >= 20
    assert summary["allocated"]["median_abs_err"] <= 0.02
    assert summary["allocated"]["p90_abs_err"] <= 0.05
    assert summary["fits"]["accuracy"] == 1.0
