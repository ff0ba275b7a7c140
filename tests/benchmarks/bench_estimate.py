"""Speed of the estimator against the spec's targets (a script, not a test: pytest does not collect it).

    python tests/benchmarks/bench_estimate.py [--calls 1000] [--procs 5] [--profile]

Prints
  (a) ``import simulator`` in a fresh interpreter, and whether torch got imported (it must not);
  (b) the cold ``estimate()`` of llama-3.1-8b QLoRA: the first call in a new process, with the disk cache
      (hwprofiles.diskcache, in a temporary folder) that an earlier process left -- validated profiles and
      the compiled cost table -- and with the cache off (YAML parsing and validation, trace and compile);
  (c) the cached ``estimate(what_fits=False)``: the same Scenario object N times, and varied
      micro_batch / seq_len (pre-built Scenario objects, and dicts that are validated on each call);
  (d) the same with ``what_fits=True`` (largest batch / length by bisection).
Targets (spec): import <= 0.5 s, cold <= 10 ms, cached <= 1 ms median.
When the cached path misses its target (or with --profile) it prints the cProfile hot spots.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pathlib
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_IMPORT_S = 0.5
TARGET_COLD_S = 0.010
TARGET_CACHED_S = 0.001

SCENARIO = {
    "model": "llama-3.1-8b",
    "gpu": "h100-sxm-80gb",
    "workload": {"task": "train", "micro_batch": 4, "seq_len": 2048},
    "method": {"kind": "qlora", "r": 16, "targets": "all-linear"},
    "checkpointing": {"mode": "full"},
}

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import simulator
t1 = time.perf_counter()
torch_loaded = "torch" in sys.modules
heavy = sorted(m for m in ("torch", "transformers", "peft", "streamlit", "plotly", "pandas", "scipy") if m in sys.modules)
scenario = json.loads(sys.argv[1])
t2 = time.perf_counter()
e = simulator.estimate(scenario, what_fits=False)
t3 = time.perf_counter()
e = simulator.estimate(scenario, what_fits=False)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "torch": torch_loaded, "heavy": heavy, "cold_s": t3 - t2, "second_s": t4 - t3}))
"""


def fresh_process_runs(n: int, cache_dir: str) -> list[dict]:
    # as an installed package runs: with its bytecode cached (pip writes the .pyc files on install), so the
    # children may write it (PYTHONDONTWRITEBYTECODE dropped) and a first, unmeasured run does -- and fills
    # the disk cache ``cache_dir`` ("off": none)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["FITSIM_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SCENARIO)], cwd=REPO, env=env,
                   capture_output=True, text=True, check=True)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(SCENARIO)], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d["process_s"] = time.perf_counter() - t
        out.append(d)
    return out


def per_call(fn, calls: int) -> list[float]:
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def fmt(s: float) -> str:
    return f"{s * 1e3:8.3f} ms"


def row(label: str, times: list[float], target: float | None = None) -> bool:
    med = statistics.median(times)
    p90 = sorted(times)[int(0.9 * (len(times) - 1))]
    ok = target is None or med <= target
    tgt = f"  target {fmt(target).strip()}: {'OK' if ok else 'MISSED'}" if target else ""
    print(f"  {label:<58} median {fmt(med)}  p90 {fmt(p90)}  min {fmt(min(times))}{tgt}")
    return ok


def profile(label: str, fn, calls: int, top: int = 18) -> None:
    pr = cProfile.Profile()
    pr.enable()
    for i in range(calls):
        fn(i)
    pr.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).strip_dirs().sort_stats(key).print_stats(top)
        text = s.getvalue()
        start = text.find("   ncalls")
        print(f"\n--- cProfile: {label}, {calls} calls, top {top} by {key} ---")
        print(text[start:].rstrip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000, help="calls per cached measurement")
    ap.add_argument("--procs", type=int, default=5, help="fresh processes for import / cold timings")
    ap.add_argument("--profile", action="store_true", help="always print the cProfile hot spots")
    args = ap.parse_args()

    print(f"python {sys.version.split()[0]} on {os.cpu_count()} CPUs; repo {REPO}")

    # (a) + (b): fresh interpreters
    with tempfile.TemporaryDirectory(prefix="fitsim-bench-cache-") as cache_dir:
        runs = fresh_process_runs(args.procs, cache_dir)
    uncached = fresh_process_runs(args.procs, "off")
    print(f"\n(a) import simulator, fresh process (x{args.procs})")
    ok_import = row("import simulator", [r["import_s"] for r in runs], TARGET_IMPORT_S)
    print(f"  torch imported: {any(r['torch'] for r in runs)}; heavy modules loaded: {sorted({m for r in runs for m in r['heavy']}) or 'none'}")
    print(f"  whole child process (interpreter start + import + 2 estimates): median {fmt(statistics.median(r['process_s'] for r in runs))}")
    print(f"\n(b) cold estimate(), llama-3.1-8b QLoRA, first call in a new process (x{args.procs})")
    ok_cold = row("first estimate(dict, what_fits=False)", [r["cold_s"] for r in runs], TARGET_COLD_S)
    row("the same with the disk cache off", [r["cold_s"] for r in uncached])
    row("second estimate(dict) in that process", [r["second_s"] for r in runs])

    from simulator import Scenario, estimate

    sc = Scenario.model_validate(SCENARIO)
    estimate(sc, what_fits=True)  # warm every cache
    sizes = [(mb, s) for mb in (1, 2, 3, 4, 6, 8, 12, 16) for s in (128, 256, 512, 1024, 2048, 4096, 8192)]
    dicts = [{**SCENARIO, "workload": {"task": "train", "micro_batch": mb, "seq_len": s}} for mb, s in sizes]
    scs = [Scenario.model_validate(d) for d in dicts]
    for s in scs:
        estimate(s, what_fits=True)

    cases = {
        "same Scenario object": lambda i: estimate(sc, what_fits=False),
        "varied micro_batch/seq_len, Scenario objects": lambda i: estimate(scs[i % len(scs)], what_fits=False),
        "varied micro_batch/seq_len, dicts (validated per call)": lambda i: estimate(dicts[i % len(dicts)], what_fits=False),
    }
    print(f"\n(c) cached estimate(what_fits=False), {args.calls} calls each")
    ok_cached = {k: row(k, per_call(fn, args.calls), TARGET_CACHED_S) for k, fn in cases.items()}

    wf_cases = {
        "same Scenario object": lambda i: estimate(sc, what_fits=True),
        "varied micro_batch/seq_len, Scenario objects": lambda i: estimate(scs[i % len(scs)], what_fits=True),
        "varied micro_batch/seq_len, dicts (validated per call)": lambda i: estimate(dicts[i % len(dicts)], what_fits=True),
    }
    print(f"\n(d) cached estimate(what_fits=True), {args.calls} calls each (no target in the spec)")
    for k, fn in wf_cases.items():
        row(k, per_call(fn, args.calls))
    e = estimate(sc, what_fits=True)
    print(f"  (this scenario: fits={e.fits}, max_batch={e.max_batch_that_fits}, max_seq_len={e.max_seq_len_that_fits}, "
          f"{len(e.suggestions)} suggestions)")

    missed = [k for k, ok in ok_cached.items() if not ok]
    if missed or args.profile:
        n = min(args.calls, 500)
        profile("cached estimate(same Scenario, what_fits=False)", cases["same Scenario object"], n)
        profile("cached estimate(dicts, what_fits=False)", cases["varied micro_batch/seq_len, dicts (validated per call)"], n)
        profile("cached estimate(same Scenario, what_fits=True)", wf_cases["same Scenario object"], max(50, n // 10))

    print("\nsummary: import {} / cold {} / cached {}".format(
        "OK" if ok_import else "MISSED", "OK" if ok_cold else "MISSED",
        "OK" if not missed else f"MISSED ({', '.join(missed)})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
