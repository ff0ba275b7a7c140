"""The validation harness on CPU: results schema, suite runner, end-to-end grid, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simulator import estimate  # noqa: E402
from validate.e2e import (  # noqa: E402
    PREFILL_POSITIONS,
    case_from_spec,
    cpu_grid,
    gpu_grid,
    measured_scenario,
)
from validate.report import compare_results, format_report, report_html, summarize  # noqa: E402
from validate.run import coverage_order, measure_case, run_suite, shard_of, spread_order  # noqa: E402
from validate.schema import (  # noqa: E402
    SCHEMA_VERSION,
    CaseResult,
    Fingerprint,
    Measurement,
    ResultsError,
    ResultsFile,
    load_results,
    parse_results,
    write_results,
)
from validate.score import score, score_slices  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HAS_BNB = True
try:
    import bitsandbytes  # noqa: F401
except ImportError:
    HAS_BNB = False


def _fp(platform: str = "cuda", profile: str | None = "h100-sxm-80gb") -> Fingerprint:
    return Fingerprint(platform=platform, device_name="NVIDIA H100 80GB HBM3", device_count=1, device_profile=profile,
                       python="3.11", packages={"torch": "2.13.0"})


def _results(cases: list[CaseResult], fp: Fingerprint | None = None) -> ResultsFile:
    return ResultsFile(schema_version=SCHEMA_VERSION, suite="e2e", created_utc="2026-11-23T10:00:00+00:00",
                       command="python -m validate run --suite e2e", fingerprint=fp or _fp(), cases=tuple(cases),
                       duration_s=1.0)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------


def test_results_round_trip_and_never_overwrite(tmp_path):
    res = _results([CaseResult(case_id="a", suite="e2e", kind="train", spec={}, status="skipped", message="x")])
    path = write_results(res, tmp_path)
    assert path.name == "e2e-h100-sxm-80gb-20261123T100000.json"
    assert load_results(path) == res
    before = path.read_text()
    with pytest.raises(ResultsError, match="never overwritten"):
        write_results(res, tmp_path)
    assert path.read_text() == before
    assert not list(tmp_path.glob("*.partial"))


def test_truncated_and_other_version_are_refused(tmp_path):
    res = _results([CaseResult(case_id="a", suite="e2e", kind="train", spec={}, status="ok",
                               measured=Measurement(time_s=1.0))])
    text = res.model_dump_json()
    with pytest.raises(ResultsError, match="truncated"):
        parse_results(text[: len(text) // 2], "f.json")
    other = json.loads(text) | {"schema_version": 2}
    with pytest.raises(ResultsError, match="schema_version 2, this fitsim reads version 1"):
        parse_results(json.dumps(other), "f.json")
    bad = json.loads(text)
    bad["cases"][0]["status"] = "exploded"
    with pytest.raises(ResultsError, match=r"cases\.0\.status"):
        parse_results(json.dumps(bad), "f.json")
    dup = json.loads(text)
    dup["cases"] = dup["cases"] * 2
    with pytest.raises(ResultsError, match="case_id repeated: a"):
        parse_results(json.dumps(dup), "f.json")


# ---------------------------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------------------------


def test_gpu_grid_covers_the_issue_and_every_case_estimates():
    grid = gpu_grid()
    assert len(grid) >= 60
    assert len({c.case_id for c in grid}) == len(grid)
    methods = {c.scenario.method.kind for c in grid}
    assert {"full", "lora", "qlora", "dora", "prefix"} <= methods
    train = [c.scenario for c in grid if c.kind == "train"]
    assert {s.precision for s in train} >= {"bf16", "bf16-amp"}
    assert {s.optimizer.name for s in train} >= {"adamw", "adamw-8bit"}
    assert {s.checkpointing.mode for s in train} == {"none", "full", "selective"}
    assert any(s.model.moe is not None for s in train)
    params = {estimate(s).n_params for s in train}
    assert min(params) < 0.6e9 and max(params) > 7.5e9
    infer = [c.scenario for c in grid if c.kind == "infer"]
    assert sorted({s.workload.batch for s in infer if s.model.name == "llama-3.1-8b"}) == [1, 4, 16, 64]
    assert {s.inference.weights for s in infer} == {"none", "int8", "nf4"}
    verdicts = [estimate(s).fits for s in (c.scenario for c in grid)]
    assert not all(verdicts) and sum(verdicts) >= 55  # a few cases are there to run out of memory


def test_spec_rebuilds_the_same_scenario():
    for c in gpu_grid()[:5] + cpu_grid():
        again = case_from_spec(c.case_id, json.loads(json.dumps(c.spec())))
        assert again == c


def test_shards_partition_the_grid():
    grid = gpu_grid()
    parts = [shard_of(grid, (i, 3)) for i in (1, 2, 3)]
    assert sorted(c.case_id for p in parts for c in p) == sorted(c.case_id for c in grid)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------------------------------------
# runner on CPU
# ---------------------------------------------------------------------------------------------


def test_cpu_suite_runs_and_writes_a_readable_file(tmp_path):
    res, path = run_suite("e2e", device="cpu", scale="cpu", out_dir=tmp_path, argv=["run", "--suite", "e2e"])
    assert load_results(path) == res
    by = {c.case_id: c for c in res.cases}
    assert len(by) == len(cpu_grid())
    for c in res.cases:
        if "sdpa-mem-efficient" in c.case_id:
            assert c.status == "skipped" and "only on CUDA" in c.message
        elif ("qlora" in c.case_id or "nf4" in c.case_id or "8bit" in c.case_id) and not HAS_BNB:
            assert c.status == "skipped" and "bitsandbytes" in c.message
        else:
            assert c.status == "ok", (c.case_id, c.message)
            m = c.measured
            assert m.time_s > 0 and len(m.time_samples_s) == c.spec["repeats"]
            assert m.allocated_peak_bytes is None  # no CPU peak statistics
            sc = case_from_spec(c.case_id, c.spec).scenario
            wl = sc.workload
            if c.kind == "train":
                assert m.tokens_per_s == pytest.approx(wl.micro_batch * wl.seq_len / m.time_s)
            else:
                assert m.tokens_per_s == pytest.approx(wl.batch * wl.gen_len / m.time_s)
                assert 0 < m.extra["prefill_s"] and m.extra["decode_per_token_s"] >= 0
                assert m.extra[PREFILL_POSITIONS] == 1.0  # the prefill keeps the last position's logits, as generate
    assert res.fingerprint.platform == "cpu" and res.fingerprint.packages["torch"].startswith("2.")
    assert res.command == "python -m validate run --suite e2e"


class _FakeRun:
    """Stands in for the measurements: each case takes ``case_s`` on a fake clock; ``on_case(i)`` runs first."""

    def __init__(self, monkeypatch, case_s: float, on_case=None):
        import validate.run as run_mod

        self.now, self.n, self.case_s, self.on_case = 0.0, 0, case_s, on_case
        monkeypatch.setattr(run_mod.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(run_mod, "measure_case", self.measure)

    def measure(self, case, device):
        self.n += 1
        if self.on_case is not None:
            self.on_case(self.n)
        self.now += self.case_s
        return CaseResult(case_id=case.case_id, suite=case.suite, kind=case.kind, spec={}, status="ok",
                          measured=Measurement(time_s=0.01))


def test_a_time_budget_stops_before_a_case_it_cannot_hold(monkeypatch, tmp_path):
    grid = coverage_order(cpu_grid())
    assert len(grid) >= 4
    _FakeRun(monkeypatch, case_s=10.0)
    # 0 s: the first case always starts; 10 s: 10 + 10 <= 25 starts the second; 20 s: 20 + 10 > 25 stops
    res, path = run_suite("e2e", device="cpu", scale="cpu", out_dir=tmp_path, budget_s=25.0,
                          argv=["run", "--suite", "e2e", "--budget-s", "25"])
    assert [c.case_id for c in res.cases] == [c.case_id for c in grid[:2]]
    assert (res.stopped, res.planned_cases, res.complete) == ("budget", len(grid), False)
    assert load_results(path) == res and res.duration_s == 20.0
    text = format_report([(path.name, res)], [])
    assert f"2 cases (2 ok); stopped by its time budget after 2 of {len(grid)} planned" in text
    assert list(tmp_path.iterdir()) == [path]  # one file, rewritten in place; no temporary left


def test_coverage_order_spans_every_kind_and_range_early():
    from types import SimpleNamespace as C

    cases = [C(kind="gemm", n=i) for i in range(8)] + [C(kind="copy", n=i) for i in range(3)]
    order = [(c.kind, c.n) for c in coverage_order(cases)]
    assert order == [("gemm", 0), ("copy", 0), ("gemm", 4), ("copy", 2), ("gemm", 2), ("copy", 1),
                     ("gemm", 6), ("gemm", 1), ("gemm", 5), ("gemm", 3), ("gemm", 7)]
    assert coverage_order([]) == []
    for n in (1, 2, 5, 167):
        assert sorted(spread_order(n)) == list(range(n))
    first = spread_order(167)[:16]  # the first 16 of a 167-case grid reach across it
    assert min(first) == 0 and max(first) >= 150 and max(b - a for a, b in zip(sorted(first), sorted(first)[1:])) <= 16


def test_a_run_killed_between_cases_leaves_what_it_measured(monkeypatch, tmp_path):
    grid = cpu_grid()
    seen = []

    def check_the_file(n):  # what a kill just before case n would leave on disk
        files = list(tmp_path.glob("*.json"))
        seen.append(len(load_results(files[0]).cases) if files else 0)
        if n == 3:
            raise KeyboardInterrupt

    _FakeRun(monkeypatch, case_s=1.0, on_case=check_the_file)
    res, path = run_suite("e2e", device="cpu", scale="cpu", out_dir=tmp_path)
    assert seen == [0, 1, 2]
    assert (len(res.cases), res.stopped, res.planned_cases) == (2, "interrupted", len(grid))
    killed = res.model_copy(update={"stopped": None})
    assert "the run did not finish after 2 of" in format_report([("f.json", killed)], [])
    assert load_results(path) == res


def test_budget_is_checked(tmp_path):
    out = subprocess.run([sys.executable, "-m", "validate", "run", "--suite", "e2e", "--device", "cpu", "--scale",
                          "cpu", "--out", str(tmp_path), "--budget-s", "0"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "--budget-s '0': expected a positive number of seconds" in out.stderr
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="budget_s=-1: allowed a positive number"):
        run_suite("e2e", device="cpu", scale="cpu", out_dir=None, budget_s=-1)


def test_an_oom_is_recorded_and_the_suite_goes_on(monkeypatch):
    import validate.e2e as e2e

    def boom(case, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(e2e, "run_e2e", boom)
    r = measure_case(cpu_grid()[0], "cpu")
    assert r.status == "oom" and "Tried to allocate 2.00 GiB" in r.message and r.measured is None

    def fails(case, device):
        raise ValueError("bad shape")

    monkeypatch.setattr(e2e, "run_e2e", fails)
    r = measure_case(cpu_grid()[0], "cpu")
    assert r.status == "error" and r.message == "ValueError: bad shape"


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _synthetic_gpu_file() -> tuple[ResultsFile, dict[str, float]]:
    """Measurements placed at known ratios of the engine's own predictions (the report's arithmetic is
    under test here, not the engine)."""
    grid = {c.case_id: c for c in gpu_grid()}
    lora = grid["e2e/train/llama-3.2-1b/lora-r16/bf16/s2048-b4"]
    gen = grid["e2e/infer/llama-3.1-8b/none/bf16/p512-g128-b16"]
    oom = grid["e2e/train/llama-3.1-8b/full/bf16-amp/s2048-b1-ck"]
    el, eg = estimate(lora.scenario), estimate(gen.scenario)
    cases = [
        CaseResult(case_id=lora.case_id, suite="e2e", kind="train", spec=lora.spec(), status="ok",
                   measured=Measurement(allocated_peak_bytes=round(el.peak_allocated_bytes / 1.10),
                                        reserved_peak_bytes=round(el.peak_reserved_bytes / 0.95),
                                        time_s=el.time.step_s / 1.25)),
        CaseResult(case_id=gen.case_id, suite="e2e", kind="infer", spec=gen.spec(), status="ok",
                   measured=Measurement(allocated_peak_bytes=round(eg.peak_allocated_bytes / 0.98),
                                        reserved_peak_bytes=round(eg.peak_reserved_bytes / 1.02),
                                        time_s=eg.time.step_s / 0.80,
                                        extra={"prefill_s": eg.time.prefill_s / 1.5, PREFILL_POSITIONS: 1.0,
                                               "decode_per_token_s": eg.time.decode_per_token_s / 0.9})),
        CaseResult(case_id=oom.case_id, suite="e2e", kind="train", spec=oom.spec(), status="oom",
                   message="CUDA out of memory"),
    ]
    return _results(cases), {"allocated": [0.10, -0.02], "reserved": [-0.05, 0.02], "time": [0.25, -0.20]}


def test_report_errors_are_the_known_ratios():
    res, expected = _synthetic_gpu_file()
    comps = compare_results([("synthetic.json", res)])
    summary = summarize(comps)["e2e"]
    for metric, errs in expected.items():
        s = summary[metric]
        assert s["n"] == 2
        assert s["median_abs_err"] == pytest.approx(sum(abs(e) for e in errs) / 2, rel=1e-6)
        assert s["max_abs_err"] == pytest.approx(max(abs(e) for e in errs), rel=1e-6)
    assert summary["prefill"]["median_abs_err"] == pytest.approx(0.5, rel=1e-6)
    assert summary["decode_per_token"]["median_err"] == pytest.approx(-0.1, rel=1e-6)
    assert summary["fits"] == {"n": 3, "accuracy": 1.0}  # the OOM case: the engine said it does not fit
    text = format_report([("synthetic.json", res)], comps)
    assert "reproduce: python -m validate run --suite e2e" in text
    assert "Worst" in text and "over-predicted" in text and "largest terms" in text
    assert "tokens_per" not in text  # throughputs are not time terms
    page = report_html(comps, text)
    assert page.count("plotly-graph-div") == 5 and "e2e: allocated" in page
    # published records scored beside the runs: the group table and the per-target slices
    recs = [{"id": "src-001", "n_gpus": 1, "target": {"metric": "peak_memory_per_gpu_GB", "value": 10.0, "comparable": True}},
            {"id": "src-002", "n_gpus": 8, "target": {"metric": "step_time_s", "value": 2.0, "comparable": True}}]
    preds = [{"id": "src-001", "predicted": 12.0, "unit": "GiB", "status": "ok", "reason": None},
             {"id": "src-002", "predicted": 2.1, "unit": "s", "status": "ok", "reason": None}]
    stats = {"n": 1, "median_abs_err": 0.2, "p90_abs_err": 0.2, "max_abs_err": 0.2, "median_err": 0.2}
    published = ({"memory": stats}, score(recs, preds), score_slices(recs, preds))
    text = format_report([("synthetic.json", res)], comps, published)
    assert "By target" in text
    rows = {line.split()[1]: line.split()[-1] for line in text.splitlines()
            if line.startswith("src ") and line.split()[1] in ("memory", "speed")}
    assert rows == {"memory": "NO", "speed": "yes"}  # 20 % against 10 %; 5 % against 15 %


def test_older_generation_results_are_predicted_with_every_prefill_logit():
    """A generation measured before the harness recorded its prefill's logit positions timed a plain forward
    (every position's logits): its peak and prefill are predicted for prefill_logits='all', its whole
    generation and decode for the case itself."""
    gen = {c.case_id: c for c in gpu_grid()}["e2e/infer/llama-3.1-8b/none/bf16/p512-g128-b64"]
    wl = gen.scenario.workload
    every_sc = gen.scenario.model_copy(update={"workload": wl.model_copy(update={"prefill_logits": "all"})})
    last, every = estimate(gen.scenario), estimate(every_sc)
    # the 64 x 512 prompt positions' bf16 logits and normed hidden states are live at the head (weights: 15 GiB)
    head = 64 * 512 * (4096 + 128256) * 2
    assert every.peak_allocated_bytes - 15.0 * 2**30 > head > last.peak_allocated_bytes - 15.0 * 2**30
    old = Measurement(allocated_peak_bytes=round(every.peak_allocated_bytes),
                      reserved_peak_bytes=round(every.peak_reserved_bytes), time_s=last.time.step_s,
                      extra={"prefill_s": every.time.prefill_s, "decode_per_token_s": last.time.decode_per_token_s})
    new = old.model_copy(update={"extra": {**old.extra, PREFILL_POSITIONS: 1.0}})
    assert measured_scenario(gen, old).workload.prefill_logits == "all"
    assert measured_scenario(gen, new) is gen.scenario and wl.prefill_logits == "last"
    res = _results([CaseResult(case_id=gen.case_id, suite="e2e", kind="infer", spec=gen.spec(), status="ok",
                               measured=old)])
    errs = {c.metric: c.error for c in compare_results([("old.json", res)])}
    assert errs == {"fits": 0.0, "allocated": pytest.approx(0.0, abs=1e-9), "reserved": pytest.approx(0.0, abs=1e-9),
                    "time": 0.0, "prefill": 0.0, "decode_per_token": 0.0}


def test_report_cli_json_and_bad_file(tmp_path):
    res, _ = _synthetic_gpu_file()
    path = write_results(res, tmp_path)
    out = subprocess.run([sys.executable, "-m", "validate", "report", str(path), "--json", "--html",
                          str(tmp_path / "r.html")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary["e2e"]["allocated"]) >= {"n", "median_abs_err", "p90_abs_err"}
    assert (tmp_path / "r.html").stat().st_size > 100_000
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text()[:200])
    out = subprocess.run([sys.executable, "-m", "validate", "report", str(bad)], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 2 and "truncated" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("only", ["e2e/infer/qwen2.5-0.5b/none/bf16/p512-g128-b1",
                                  "e2e/train/qwen2.5-0.5b/full/bf16-amp/s1024-b8-adamw-fused"])
def test_gpu_case_records_memory_and_is_compared(only):
    """On a GPU: one small case of the grid measures allocated <= reserved peaks and a time, and the report
    compares memory, time and the fits verdict."""
    res, _ = run_suite("e2e", device="cuda", scale="gpu", out_dir=None, only=only)
    (case,) = res.cases
    assert case.status == "ok", case.message
    m = case.measured
    assert 0 < m.allocated_peak_bytes <= m.reserved_peak_bytes and m.time_s > 0
    metrics = {c.metric for c in compare_results([("run", res)])}
    assert {"allocated", "reserved", "time", "fits"} <= metrics


def test_dry_run_prices_a_gpu_run_with_the_engine(capsys):
    """--dry-run measures nothing: each case gets the engine's verdict and time on the profile, and the total
    says whether a shard fits a command's time limit before a GPU is rented."""
    from validate.__main__ import main
    from validate.run import dry_run, predicted_seconds

    rows, total = dry_run("e2e", scale="gpu", device_profile="h100-sxm-80gb", shard=(1, 3))
    assert len(rows) == len(shard_of(gpu_grid(), (1, 3)))
    assert total == pytest.approx(sum(t for _, fits, t in rows if fits))
    case = next(c for c in gpu_grid() if c.case_id == "e2e/train/llama-3.1-8b/full/bf16-amp/s2048-b1-ck")
    fits, seconds = predicted_seconds(case, "h100-sxm-80gb")
    e = estimate(case.scenario)
    assert not fits and seconds == pytest.approx((case.warmup + case.repeats) * e.time.step_s)
    assert main(["run", "--suite", "e2e", "--dry-run", "--only", "llama-3.1-8b/full/bf16-amp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OOM ") and "1 cases on h100-sxm-80gb" in out and "1 predicted to run out of memory" in out


def test_allocator_summary_reads_the_counters_and_lists_the_large_segments():
    """``torch.cuda.memory_stats()`` keys and ``torch.cuda.memory_snapshot()`` segments (the layout torch
    documents: one dict per segment with ``total_size`` and ``segment_type``) become the measurement's
    counters and its large-pool segment sizes, largest first, the ones past the cap summed."""
    from validate.harness import MAX_SEGMENTS, allocator_summary

    stats = {"num_device_alloc": 7, "num_alloc_retries": 1, "segment.all.peak": 9,
             "inactive_split_bytes.all.peak": 3 << 20}
    mib = 1 << 20
    snapshot = ([{"total_size": 2 * mib, "segment_type": "small"}] * 3
                + [{"total_size": (k + 1) * 20 * mib, "segment_type": "large"} for k in range(MAX_SEGMENTS + 2)])
    counters, sizes = allocator_summary(stats, snapshot)
    assert counters == {
        "allocator_device_mallocs": 7.0, "allocator_alloc_retries": 1.0, "allocator_segments_peak": 9.0,
        "allocator_inactive_split_peak_bytes": float(3 << 20), "allocator_large_segments": float(MAX_SEGMENTS + 2),
        "allocator_small_segment_bytes": float(6 * mib), "allocator_unlisted_segment_bytes": float(3 * 20 * mib),
    }
    assert sizes[0] == (MAX_SEGMENTS + 2) * 20 * mib and len(sizes) == MAX_SEGMENTS
    assert list(sizes) == sorted(sizes, reverse=True) and sizes[-1] == 3 * 20 * mib
    # an empty allocator (nothing ran) gives zeros, not an error
    assert allocator_summary({}, []) == ({k: 0.0 for k in counters}, ())
