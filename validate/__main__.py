"""``python -m validate <command>``.

  published --records FILE --out FILE            predict every published record (one JSON line each)
  score --records FILE --predictions FILE [--json] [--worst N]
                                                 per-group coverage, median/p90 relative error, fits accuracy
  bands --records FILE [--results DIR] [--out FILE] [--min-n N] [--min-groups N]
                                                 error bands from the residuals (simulator/data/error_bands.json)

(``run`` / ``report`` for real GPU measurements come later as further subcommands.)
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
    from .score import format_table, score, worst

    records = load_jsonl(args.records)
    preds = load_jsonl(args.predictions)
    table = score(records, preds)
    bad = worst(records, preds, n=args.worst)
    if args.json:
        print(json.dumps({"groups": table, "worst": bad}, indent=2))
        return 0
    print(format_table(table))
    if bad:
        print(f"\nworst {len(bad)} (comparable, numeric):")
        for w in bad:
            print(f"  {w['id']:<22} {w['metric']:<24} measured {w['measured']:>9} predicted {w['predicted']:>9.3f} "
                  f"{w['unit'] or '':<4} ({w['measured_how']})  err {100 * w['rel_err']:.0f}%")
    return 0


def _cmd_bands(args: argparse.Namespace) -> int:
    from simulator.uncertainty import BANDS_PATH

    from .bands import build_bands, format_bands, pairs_from_published, pairs_from_results, records_source, write_bands
    from .published import load_jsonl, predict_records

    records = load_jsonl(args.records)
    pairs = pairs_from_published(records, predict_records(records), str(args.records))
    sources = [records_source(args.records, "published", pairs)]
    if args.results:
        from pathlib import Path

        from .schema import load_results

        p = Path(args.results)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        gpu = pairs_from_results([load_results(f) for f in files], [str(f) for f in files])
        pairs += gpu
        sources += [records_source(f, "gpu-run", gpu) for f in files]
    out = args.out or str(BANDS_PATH)
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

    pb = sub.add_parser("bands", help="error bands of peak memory and step time from the measured residuals")
    pb.add_argument("--records", required=True, help="published records JSONL (predicted here)")
    pb.add_argument("--results", default=None, help="folder (or one file) of end-to-end GPU results JSON")
    pb.add_argument("--out", default=None, help="band file to write (default: the engine's simulator/data/error_bands.json)")
    pb.add_argument("--min-n", type=int, default=None, help="fewest residuals per cell (default 20)")
    pb.add_argument("--min-groups", type=int, default=None, help="fewest source groups per cell (default 2)")
    pb.set_defaults(func=_cmd_bands)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
