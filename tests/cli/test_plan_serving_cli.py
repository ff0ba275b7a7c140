"""`fitsim plan --task infer --rate ...`: the serving plan as JSON and as tables, one-line errors."""

from __future__ import annotations

import json

from simulator.cli import main
from simulator.planner import plan

SERVE = ["plan", "--model", "llama-3.1-8b", "--task", "infer", "--rate", "20", "--prompt-len", "1024",
         "--gen-len", "256", "--max-ttft", "0.5", "--max-tpot", "0.05"]
SMALL = ["--gpu", "l4-24gb", "--gpu", "h100-sxm-80gb", "--tp", "1,2"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *argv: str) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_json_matches_the_library_and_reports_the_search(capsys):
    rc, out, err = run(capsys, *SERVE, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["candidates_evaluated"] > 0 and d["search_time_s"] > 0
    res = plan(model="llama-3.1-8b", task="infer", request_rate_per_s=20, prompt_len=1024, gen_len=256,
               constraints={"max_ttft_s": 0.5, "max_tpot_s": 0.05})
    s, b = d["best"]["serving"], res.best.serving
    for k in ("replicas", "gpus_per_replica", "weights", "batch", "usd_per_hour", "ttft_p99_s", "tpot_mean_s",
              "utilization", "usd_per_million_output_tokens", "peak_memory_bytes_per_gpu"):
        assert s[k] == getattr(b, k)
    assert d["best"]["gpu"] == res.best.gpu
    assert s["ttft_p99_s"] <= 0.5 and s["tpot_mean_s"] <= 0.05 and s["request_rate_per_s"] == 20
    assert d["rejected_reasons"]


def test_table_shows_the_fleet_and_the_ruled_out(capsys):
    rc, out, err = run(capsys, *SERVE, *SMALL)
    assert rc == 0 and err == ""
    assert out.startswith("best (cost) for 20 requests/s: ")
    for part in ("replicas x tp", "TTFT p99", "TPOT mean", "util", "$/hour", "$/M out tok", "headroom",
                 "latency-cost Pareto front:", "ruled out:", "weights none on 1x l4-24gb", "candidates screened"):
        assert part in out
    res = plan(model="llama-3.1-8b", task="infer", request_rate_per_s=20, prompt_len=1024, gen_len=256,
               constraints={"max_ttft_s": 0.5, "max_tpot_s": 0.05},
               space={"gpus": ["l4-24gb", "h100-sxm-80gb"], "tp": [1, 2]})
    assert f"${res.best.serving.usd_per_hour:,.2f}" in out.splitlines()[0]


def test_bad_rate_and_targets_are_one_line_errors(capsys):
    assert "request_rate_per_s" in one_line_error(capsys, *SERVE[:6], "0", *SERVE[7:])
    line = one_line_error(capsys, "plan", "--model", "llama-3.1-8b", "--task", "infer", "--max-tpot", "0.05")
    assert "max_tpot_s needs job.request_rate_per_s" in line
    line = one_line_error(capsys, *SERVE[:-2], "--max-tpot", "0.001", *SMALL)
    assert "constraints.max_tpot_s=1 ms is binding" in line and "cheapest setup meeting every other" in line
    assert "--tp '1,x'" in one_line_error(capsys, *SERVE, "--tp", "1,x")


def test_training_plan_searches_the_checkpointing_modes_asked(capsys):
    """--checkpointing picks the modes the training search tries; an unknown one is a one-line error."""
    argv = ["plan", "--model", "llama-3.2-1b", "--task", "train", "--tokens", "1e8", "--gpu", "l4-24gb",
            "--max-gpus", "2", "--json"]
    rc, out, err = run(capsys, *argv, "--checkpointing", "selective")
    assert rc == 0, err
    d = json.loads(out)
    assert {r["checkpointing"] for r in d["ranked"]} == {"selective"}
    line = one_line_error(capsys, *argv, "--checkpointing", "none,partial")
    assert "checkpointing" in line and "'selective'" in line
