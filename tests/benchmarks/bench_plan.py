"""Speed of simulator.plan (a script, not a test: pytest does not collect it).

    python tests/benchmarks/bench_plan.py [--model llama-3.1-8b] [--max-gpus 8] [--pareto] [--no-large]

Prints, per objective: candidates evaluated (peak memory and step time computed as arrays, or rejected
by a lower bound), how many reached a full estimate(), the search time (wall and CPU) and candidates
per second.  Two spaces: the default one (max 8 GPUs, about 40,000 candidates) and a large one (every
priced GPU x 1-64 GPUs x 6 micro-batches x 5 methods x 2 precisions x 3 optimizers x 2 checkpointing
modes x 6 shardings x tp 1-8 x pp 1-2, about 1,000,000 candidates).  The issue's target is >= 1,000,000
candidates in <= 10 s, i.e. >= 100,000 candidates/s.  On a shared machine the wall time also counts
other processes; the CPU time is this process's own.  The first search of a process also loads the
hardware profiles and traces the model's cost tables (kept for later searches, as are the times of
collectives already computed).
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
LARGE_SPACE = dict(gpu_counts=[1, 2, 4, 8, 16, 32, 64], micro_batches=[1, 2, 4, 8, 16, 32],
                   precisions=["bf16", "fp16"], optimizers=["adamw", "adamw-8bit", "sgd-momentum"],
                   sharding=["none", "zero1", "zero2", "zero3", "fsdp", "fsdp-grad-op"], tp=[1, 2, 4, 8], pp=[1, 2])


def run(name: str, model: str, tokens: float, pareto: bool, constraints: dict, space: dict | None) -> None:
    from simulator.planner import plan

    print(f"{name}: model {model}, finetune, {tokens:.3g} tokens, pareto {'complete' if pareto else 'ranking only'}")
    for objective in ("cost", "time", "gpus"):
        c0 = time.process_time()
        r = plan(model=model, task="finetune", total_tokens=tokens, constraints=constraints, objective=objective,
                 space=space, pareto=pareto)
        cpu = time.process_time() - c0
        rate = r.candidates_evaluated / r.search_time_s
        print(f"  {objective:>5}: {r.candidates_evaluated:>9,} evaluated  {r.candidates_estimated:>4,} estimated"
              f"  {r.search_time_s:6.2f} s (cpu {cpu:.2f} s)  {rate:>9,.0f} candidates/s"
              f" ({r.candidates_evaluated / cpu:,.0f} per cpu-s)  {'meets' if rate >= TARGET_PER_S else 'misses'}"
              f" the {TARGET_PER_S:,}/s target;  best: {r.best.n_gpus}x {r.best.gpu} {r.best.method} {r.best.parallel}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--max-gpus", type=int, default=8)
    ap.add_argument("--tokens", type=float, default=5e7)
    ap.add_argument("--pareto", action="store_true", help="complete Pareto front (a few more estimate() calls)")
    ap.add_argument("--no-large", action="store_true", help="only the default space")
    a = ap.parse_args()
    run(f"default space, max {a.max_gpus} GPUs", a.model, a.tokens, a.pareto, {"max_gpus": a.max_gpus}, None)
    if not a.no_large:
        run("large space, max 64 GPUs", a.model, a.tokens, a.pareto, {}, LARGE_SPACE)


if __name__ == "__main__":
    main()
