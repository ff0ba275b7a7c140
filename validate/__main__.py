"""``python -m validate <command>``.

  published --records FILE --out FILE            predict every published record (one JSON line each)
  score --records FILE --predictions FILE [--json] [--worst N]
                                                 per-group coverage, median/p90 relative error, fits accuracy
  bands --records FILE [--results DIR] [--out FILE] [--min-n N] [--min-groups N]
                                                 error bands from the residuals (simulator/data/error_bands.json)

  run --suite micro|e2e|all [--device cuda|cpu] [--scale gpu|cpu] [--out DIR] [--only TEXT] [--shard I/N]
      [--dry-run [--profile NAME]]               measure on this machine; one results file per run (dry run:
                                                 the engine's verdict and time per case, no GPU needed)
  report [RESULTS ...] [--published FILE] [--html FILE] [--json] [--device NAME]
                                                 predicted vs measured, per-suite errors, worst cases
  calibrate --results FILE [--device NAME] [--yaml PATH] [--write]
                                                 fit a device's efficiency curves from a micro results file
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_published(args: argparse.Namespace) -> int:
    from .published import load_jsonl, predict_records, write_jsonl

    records = load_jsonl(args.records)
    preds = predict_records(records)
    write_jsonl(preds, args.out)
    n_ok = sum(p["status"] == "ok" for p in preds)
    print(f"{len(preds)} records -> {args.out}: {n_ok} ok, {len(preds) - n_ok} unsupported", file=sys.stderr)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .published import load_jsonl
    from .score import format_slices, format_table, score, score_slices, worst

    records = load_jsonl(args.records)
    preds = load_jsonl(args.predictions)
    table = score(records, preds)
    slices = score_slices(records, preds)
    bad = worst(records, preds, n=args.worst)
    if args.json:
        print(json.dumps({"groups": table, "slices": [{"group": g, "kind": k, "scope": sc, **row}
                                                       for (g, k, sc), row in slices.items()],
                          "worst": bad}, indent=2))
        return 0
    print(format_table(table))
    print("\nby target (comparable records; memory and speed apart, one GPU apart from several):")
    print(format_slices(slices))
    if bad:
        print(f"\nworst {len(bad)} (comparable, numeric):")
        for w in bad:
            print(f"  {w['id']:<22} {w['metric']:<24} measured {w['measured']:>9} predicted {w['predicted']:>9.3f} "
                  f"{w['unit'] or '':<4} ({w['measured_how']})  err {100 * w['rel_err']:.0f}%")
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/3") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/3")
    return i, n


def _positive_s(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--budget-s {text!r}: expected a positive number of seconds, e.g. 540")
    return v


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import run_suite
    from .schema import ResultsError

    argv = ["run", "--suite", args.suite, "--device", args.device, "--scale", args.scale, "--out", args.out]
    argv += ["--only", args.only] if args.only else []
    argv += ["--shard", f"{args.shard[0]}/{args.shard[1]}"] if args.shard else []
    argv += ["--profile", args.profile] if args.profile else []
    argv += ["--budget-s", f"{args.budget_s:g}"] if args.budget_s is not None else []
    if args.dry_run:
        from .run import dry_run

        profile = args.profile or "h100-sxm-80gb"
        try:
            rows, total = dry_run(args.suite, scale=args.scale, device_profile=profile, only=args.only, shard=args.shard)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for cid, fits, t in rows:
            print(f"{'fits' if fits else 'OOM ':<5} {t:8.2f} s  {cid}")
        n_oom = sum(not fits for _, fits, _ in rows)
        print(f"{len(rows)} cases on {profile}: {total:.0f} s of predicted GPU time ({n_oom} predicted to run out of "
              "memory); model builds and host work come on top")
        return 0
    try:
        res, path = run_suite(args.suite, device=args.device, scale=args.scale, out_dir=args.out, only=args.only,
                              shard=args.shard, profile=args.profile, argv=argv, budget_s=args.budget_s,
                              progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_ok = sum(c.status == "ok" for c in res.cases)
    ended = "" if res.stopped is None else f" of {res.planned_cases} planned (stopped: {res.stopped})"
    print(f"{len(res.cases)} cases ({n_ok} ok){ended} in {res.duration_s:.0f} s -> {path}")
    return 130 if res.stopped == "interrupted" else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import compare_results, format_report, published_summary, report_html, summarize
    from .schema import ResultsError, load_results, results_paths

    paths: list[Path] = []
    default = Path(__file__).resolve().parent / "results"
    for q in [Path(p) for p in args.results] or [default]:
        if q == default and not q.exists():
            continue  # no measurements committed yet: the report holds the published scores alone
        paths += results_paths(q)
    try:
        files = [(p.name, load_results(p)) for p in paths]
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    comps = compare_results(files, device=args.device)
    pub = published_summary(args.published) if args.published else None
    if args.json:
        out = summarize(comps)
        if pub is not None:
            out["published"] = pub[0]
        print(json.dumps(out, indent=2))
    else:
        text = format_report(files, comps, pub, n_worst=args.worst)
        print(text)
    if args.html:
        text = format_report(files, comps, pub, n_worst=args.worst)
        Path(args.html).write_text(report_html(comps, text))
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def _cmd_bands(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator.uncertainty import BANDS_PATH

    from .bands import build_bands, format_bands, pairs_from_published, pairs_from_results, records_source, write_bands
    from .published import load_jsonl, predict_records

    records = load_jsonl(args.records)
    pairs = pairs_from_published(records, predict_records(records), str(args.records))
    sources = [records_source(args.records, "published", pairs)]
    if args.results:
        from .schema import ResultsError, load_results, results_paths

        files = results_paths(args.results)
        try:
            loaded = [load_results(f) for f in files]
        except ResultsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        gpu = pairs_from_results(loaded, [str(f) for f in files])
        pairs += gpu
        sources += [records_source(f, "gpu-run", gpu) for f in files]
    out = args.out or str(BANDS_PATH)
    try:  # the command is recorded in the file: name paths inside the checkout relative to it
        out = str(Path(out).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    command = " ".join(["python -m validate bands", f"--records {args.records}",
                        *([f"--results {args.results}"] if args.results else []), f"--out {out}",
                        *([f"--min-n {args.min_n}"] if args.min_n is not None else []),
                        *([f"--min-groups {args.min_groups}"] if args.min_groups is not None else [])])
    kw = {k: v for k, v in (("min_n", args.min_n), ("min_groups", args.min_groups)) if v is not None}
    bands = build_bands(pairs, sources=sources, command=command, **kw)
    write_bands(bands, out)
    print(format_bands(bands))
    print(f"{len(pairs)} residual pairs -> {len(bands.cells)} cells -> {out}", file=sys.stderr)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrationError, calibrate
    from .schema import ResultsError

    try:
        report, _ = calibrate(args.results, device=args.device, yaml_path=args.yaml, write=args.write)
    except (CalibrationError, ResultsError) as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validate", description="Compare fitsim with measurements.")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("published", help="predict published records (README: /work/shared/published)")
    pp.add_argument("--records", required=True, help="records JSONL (e.g. public.jsonl)")
    pp.add_argument("--out", required=True, help="predictions JSONL to write")
    pp.set_defaults(func=_cmd_published)

    ps = sub.add_parser("score", help="score predictions against the records, per source group")
    ps.add_argument("--records", required=True)
    ps.add_argument("--predictions", required=True)
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--worst", type=int, default=10, help="list the N largest relative errors")
    ps.set_defaults(func=_cmd_score)

    pr = sub.add_parser("run", help="measure a suite on this machine and write one results file")
    pr.add_argument("--suite", choices=("micro", "e2e", "all"), required=True)
    pr.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the kernels run (default cuda)")
    pr.add_argument("--scale", choices=("gpu", "cpu"), default=None,
                    help="grid: 'gpu' (full, one data-centre GPU) or 'cpu' (tiny); default follows --device")
    pr.add_argument("--out", default="validate/results", help="folder for the results file (default validate/results)")
    pr.add_argument("--only", default=None, help="run only the cases whose id contains this text")
    pr.add_argument("--shard", type=_shard, default=None, help="run the I-th of N equal parts of the grid (I/N)")
    pr.add_argument("--budget-s", type=_positive_s, default=None,
                    help="wall-time budget: start no case the budget cannot hold (judged by the longest case of "
                         "its kind so far); the file keeps what was measured")
    pr.add_argument("--profile", default=None, help="hwprofiles device to record when the GPU's name matches none "
                                                    "(with --dry-run: the device to predict for, default h100-sxm-80gb)")
    pr.add_argument("--dry-run", action="store_true",
                    help="measure nothing: print each case's predicted fit and GPU time and the total (plan a GPU run)")
    pr.set_defaults(func=_cmd_run)

    pt = sub.add_parser("report", help="predicted vs measured for results files, and the error summary")
    pt.add_argument("results", nargs="*", help="results files or folders (default validate/results)")
    pt.add_argument("--published", default=None, help="also score a published records JSONL")
    pt.add_argument("--html", default=None, help="write the plotly scatter plots and the report to this HTML file")
    pt.add_argument("--json", action="store_true", help="print {suite: {metric: {n, median_abs_err, p90_abs_err}}}")
    pt.add_argument("--device", default=None, help="device profile for the predictions (default: the fingerprint's)")
    pt.add_argument("--worst", type=int, default=10, help="list the N largest errors")
    pt.set_defaults(func=_cmd_report)

    pb = sub.add_parser("bands", help="error bands of peak memory and step time from the measured residuals")
    pb.add_argument("--records", required=True, help="published records JSONL (predicted here)")
    pb.add_argument("--results", default=None, help="folder (or one file) of end-to-end GPU results JSON")
    pb.add_argument("--out", default=None, help="band file to write (default: the engine's simulator/data/error_bands.json)")
    pb.add_argument("--min-n", type=int, default=None, help="fewest residuals per cell (default 20)")
    pb.add_argument("--min-groups", type=int, default=None, help="fewest source groups per cell (default 2)")
    pb.set_defaults(func=_cmd_bands)

    pc = sub.add_parser("calibrate", help="fit a device's efficiency curves from a micro results file")
    pc.add_argument("--results", required=True, help="results JSON of 'python -m validate run --suite micro'")
    pc.add_argument("--device", help="hwprofiles device to calibrate (default: the one the fingerprint matches)")
    pc.add_argument("--yaml", help="device YAML to rewrite (default: hwprofiles/devices/<device>.yaml)")
    pc.add_argument("--write", action="store_true", help="rewrite the efficiency block (default: print old -> new)")
    pc.set_defaults(func=_cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "run" and args.scale is None:
        args.scale = "gpu" if args.device == "cuda" else "cpu"
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
