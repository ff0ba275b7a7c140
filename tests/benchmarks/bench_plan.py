"""Speed of simulator.plan (a script, not a test: pytest does not collect it).

    python tests/benchmarks/bench_plan.py [--model llama-3.1-8b] [--max-gpus 8] [--pareto]

Prints, per objective: candidates screened with the vectorized lower bounds, how many were pruned or
skipped, how many reached a full estimate(), the search time and candidates/s (screened / time).
The issue's target is >= 100,000 candidates/s.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_PER_S = 100_000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--max-gpus", type=int, default=8)
    ap.add_argument("--tokens", type=float, default=5e7)
    ap.add_argument("--pareto", action="store_true", help="complete Pareto front (fewer candidates skipped)")
    a = ap.parse_args()
    from simulator.planner import plan

    print(f"model {a.model}, finetune, max {a.max_gpus} GPUs, {a.tokens:.3g} tokens, default space,"
          f" pareto {'complete' if a.pareto else 'ranking only'}")
    for objective in ("cost", "time", "gpus"):
        t0 = time.perf_counter()
        r = plan(model=a.model, task="finetune", total_tokens=a.tokens, constraints={"max_gpus": a.max_gpus},
                 objective=objective, pareto=a.pareto)
        wall = time.perf_counter() - t0
        rate = r.candidates_evaluated / r.search_time_s
        print(f"  {objective:>5}: {r.candidates_evaluated:>8,} screened  {r.candidates_pruned:>8,} pruned/skipped"
              f"  {r.candidates_estimated:>6,} estimated  {r.search_time_s:6.2f} s (wall {wall:.2f} s)"
              f"  {rate:>9,.0f} candidates/s  {'meets' if rate >= TARGET_PER_S else 'misses'} the "
              f"{TARGET_PER_S:,}/s target;  best: {r.best.n_gpus}x {r.best.gpu} {r.best.method} {r.best.parallel}")


if __name__ == "__main__":
    main()
