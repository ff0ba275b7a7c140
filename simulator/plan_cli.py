"""`fitsim plan`: the best setups for a job under constraints, as a ranked table or JSON.

``add_plan_parser(subparsers)`` registers the sub-command; ``cmd_plan(args)`` runs it.  Errors (an
unknown GPU, contradictory constraints, nothing that qualifies) are raised as ValueError and printed
as one line by ``fitsim``'s main.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from .report import table

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_tokens(text: str) -> float:
    """'50M' -> 5e7, '1.5B' -> 1.5e9, '2e6' -> 2e6."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 50M, 1.5B, 2e6)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="pick the best setup under constraints",
        description="Search GPU types and counts, methods, optimizers, micro-batches, checkpointing and "
                    "sharding for the setup that best meets an objective under the constraints.  With --task infer "
                    "--rate, size a serving fleet instead: GPU type, GPUs per replica, replicas, weight format and "
                    "concurrency under --max-ttft / --max-tpot / --max-latency-s.")
    p.add_argument("--model", required=True, help="catalog model name (see `fitsim models`)")
    p.add_argument("--task", choices=["finetune", "train", "infer"], default="finetune",
                   help="finetune (full, LoRA, QLoRA), train (pre-training) or infer (serving)")
    p.add_argument("--tokens", type=parse_tokens, default=None,
                   help="tokens the whole run processes (50M, 1.5B); needed for --budget-usd / --deadline-h")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length")
    p.add_argument("--prompt-len", type=int, default=512, help="inference: prompt tokens")
    p.add_argument("--gen-len", type=int, default=256, help="inference: generated tokens")
    p.add_argument("--max-gpus", type=int, default=None, help="most GPUs one setup may use")
    p.add_argument("--n-gpus", type=int, default=None, help="fixed GPU count")
    p.add_argument("--budget-usd", type=float, default=None, help="most dollars the run may cost (inference: per million generated tokens)")
    p.add_argument("--deadline-h", type=float, default=None, help="longest the run may take, hours")
    p.add_argument("--max-latency-s", type=float, default=None,
                   help="inference: longest time to generate one batch; with --rate, p99 request latency")
    p.add_argument("--rate", type=float, default=None,
                   help="inference: requests per second to serve (sizes replicas under continuous batching)")
    p.add_argument("--max-ttft", type=float, default=None, help="serving: p99 time to first token, seconds")
    p.add_argument("--max-tpot", type=float, default=None, help="serving: mean time per output token, seconds")
    p.add_argument("--max-utilization", type=float, default=None,
                   help="serving: most of the fleet's capacity the rate may use (default 0.9)")
    p.add_argument("--tp", default=None, help="comma-separated tensor-parallel degrees (serving: GPUs per replica)")
    p.add_argument("--pp", default=None, help="comma-separated pipeline-parallel degrees (default 1)")
    p.add_argument("--cp", default=None, help="comma-separated context-parallel degrees (default 1; long contexts)")
    p.add_argument("--ep", default=None, help="comma-separated expert-parallel degrees (default 1; MoE models)")
    p.add_argument("--sharding", default=None,
                   help="comma-separated data-parallel sharding to search: none, zero1, zero2, zero3, fsdp, fsdp-grad-op, "
                        "zero2-offload, zero3-offload (default none,zero2,zero3,fsdp; the offload ones also on 1 GPU)")
    p.add_argument("--checkpointing", default=None,
                   help="comma-separated activation checkpointing modes to search: none, full, selective "
                        "(torchtitan's per-op policy) (default none,full)")
    p.add_argument("--headroom", type=float, default=0.05, help="share of GPU memory left free (default 0.05)")
    p.add_argument("--max-oom-prob", type=float, default=None, dest="max_oom_probability",
                   help="largest accepted probability of running out of memory, from the error bands (e.g. 0.05)")
    p.add_argument("--global-batch-tokens", type=int, default=None, help="tokens per optimizer step")
    p.add_argument("--objective", choices=["cost", "time", "throughput", "gpus"], default="cost")
    p.add_argument("--gpu", action="append", default=None, help="GPU type to consider (repeatable)")
    p.add_argument("--method", default=None, help="fixed method kind (full, lora, qlora, ...)")
    p.add_argument("--gpu-counts", default=None, help="comma-separated GPU counts to search (default 1,2,4,...,64)")
    p.add_argument("--top", type=int, default=10, help="rows in the ranked table")
    p.add_argument("--pareto", action="store_true", help="compute the complete time-cost Pareto front (slower)")
    p.add_argument("--json", action="store_true", help="print JSON (with candidates_evaluated and search_time_s)")
    p.set_defaults(func=cmd_plan)
    return p


def _inputs(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    job = {"model": args.model, "task": args.task, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len}
    if args.rate is not None:
        job["request_rate_per_s"] = args.rate
    if args.tokens is not None:
        job["total_tokens"] = args.tokens
    cons: dict[str, Any] = {"min_headroom_fraction": args.headroom}
    for k in ("max_gpus", "n_gpus", "budget_usd", "max_latency_s", "global_batch_tokens", "method",
              "max_oom_probability"):
        if getattr(args, k) is not None:
            cons[k] = getattr(args, k)
    for flag, k in (("max_ttft", "max_ttft_s"), ("max_tpot", "max_tpot_s"), ("max_utilization", "max_utilization")):
        if getattr(args, flag) is not None:
            cons[k] = getattr(args, flag)
    if args.deadline_h is not None:
        cons["deadline_s"] = args.deadline_h * 3600.0
    space: dict[str, Any] = {}
    if args.gpu:
        if len(args.gpu) == 1:
            cons["gpu"] = args.gpu[0]
        else:
            space["gpus"] = args.gpu
    if args.gpu_counts:
        try:
            space["gpu_counts"] = [int(x) for x in args.gpu_counts.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--gpu-counts {args.gpu_counts!r}: give integers separated by commas") from None
    for flag in ("tp", "pp", "cp", "ep"):
        text = getattr(args, flag)
        if text:
            try:
                space[flag] = [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--{flag} {text!r}: give integers separated by commas") from None
    if args.sharding:
        space["sharding"] = [x.strip() for x in args.sharding.split(",") if x.strip()]
    if args.checkpointing:
        space["checkpointing"] = [x.strip() for x in args.checkpointing.split(",") if x.strip()]
    return job, cons, space


def _hours(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def _kwh_cell(r: Any) -> str:
    """The run's energy, else the energy per million tokens, else '-' (no power figure in the profiles)."""
    if r.run_kwh is not None:
        return f"{r.run_kwh:.2f}"
    return "-" if r.kwh_per_million_tokens is None else f"{r.kwh_per_million_tokens:.3f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def render_serving(result: Any) -> str:
    """A serving plan: the fleet per family, the latency-cost front and the rejected families."""
    from .plan_serving import describe
    from .units import fmt_bytes

    head = ["#", "GPU", "replicas x tp", "weights", "batch", "TTFT p99", "TPOT mean", "latency p99", "util", "$/hour",
            "$/M out tok", "peak/GPU", "headroom"]

    def line(i: str, r: Any) -> list[str]:
        s = r.serving
        return [i, r.gpu, f"{s.replicas} x tp{s.gpus_per_replica}", s.weights, str(s.batch), _ms(s.ttft_p99_s),
                _ms(s.tpot_mean_s), _ms(s.latency_p99_s), f"{s.utilization:.0%}", _money(s.usd_per_hour),
                "-" if s.usd_per_million_output_tokens is None else f"${s.usd_per_million_output_tokens:,.3f}",
                fmt_bytes(r.peak_memory_bytes), fmt_bytes(r.usable_memory_bytes - r.peak_memory_bytes)]

    b = result.best
    s = b.serving
    out = [f"best ({result.objective}) for {s.request_rate_per_s:g} requests/s: {describe(b)}",
           f"  batch: {s.batch_limit}",
           f"  capacity {s.capacity_per_s:.3g} requests/s ({s.capacity_per_replica_per_s:.3g} per replica); "
           f"TTFT mean {_ms(s.ttft_mean_s)}, p99 {_ms(s.ttft_p99_s)}; decode step {_ms(s.tpot_s)}, "
           f"KV cache {fmt_bytes(s.kv_cache_bytes_per_sequence)} per sequence per GPU (fits {s.max_batch_fits})",
           "", "ranked (best batch per GPU, GPUs per replica and weight format):"]
    align = "rllllrrrrrrrr"
    out += table([head] + [line(str(i + 1), r) for i, r in enumerate(result.ranked)], align)
    out += ["", "latency-cost Pareto front:"]
    out += table([head] + [line("*", r) for r in result.pareto], align)
    return "\n".join(out + _rejected_and_search(result))


def _rejected_and_search(result: Any) -> list[str]:
    """The ruled-out families with their reasons, and how many candidates the search took in how long."""
    out: list[str] = []
    if result.rejected_reasons:
        out += ["", "ruled out:"]
        out += table([[k, v] for k, v in result.rejected_reasons.items()], "ll")
    return out + ["", f"{result.candidates_evaluated:,} candidates screened, {result.candidates_estimated:,} "
                      f"estimated in {result.search_time_s:.2f} s"]


def render_plan(result: Any) -> str:
    """The ranked table, the Pareto front and the rejected families as plain text."""
    from .units import fmt_bytes

    if result.best.serving is not None:
        return render_serving(result)

    head = ["#", "GPU", "method", "prec", "optimizer", "mb x ga", "ckpt", "parallel", "peak/GPU", "headroom",
            "step", "tok/s", "time", "cost", "kWh"]

    def line(i: str, r: Any) -> list[str]:
        return [i, f"{r.n_gpus}x {r.gpu}", r.method, r.precision, r.optimizer, f"{r.micro_batch}x{r.grad_accum}",
                r.checkpointing, r.parallel, fmt_bytes(r.peak_memory_bytes), fmt_bytes(r.headroom_bytes),
                f"{r.step_time_s:.3g} s", f"{r.tokens_per_s:,.0f}", _hours(r.run_time_s),
                _money(r.run_usd if r.run_usd is not None else r.usd_per_million_tokens),
                _kwh_cell(r)]

    b = result.best
    out = [f"best ({result.objective}): {b.n_gpus}x {b.gpu}, {b.method}, {b.parallel}"]
    if b.run_time_s is None:
        out.append("(no --tokens: cost and kWh are per million tokens)")
    out += ["", "ranked:"]
    out += table([head] + [line(str(i + 1), r) for i, r in enumerate(result.ranked)], "rllllrlrrrrrrrr")
    out += ["", "time-cost Pareto front" + ("" if result.pareto_complete else " (over the setups estimated)") + ":"]
    out += table([head] + [line("*", r) for r in result.pareto], "rllllrlrrrrrrrr")
    return "\n".join(out + _rejected_and_search(result))


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import plan

    job, cons, space = _inputs(args)
    res = plan(task=job, constraints=cons, objective=args.objective, space=space, top_n=args.top,
               pareto=args.pareto)
    if args.json:
        print(json.dumps(res.model_dump(mode="json"), indent=2))
    else:
        print(render_plan(res))
    return 0
