"""``python -m validate <command>``.

  published --records FILE --out FILE            predict every published record (one JSON line each)
  score --records FILE --predictions FILE [--json] [--worst N]
                                                 per-group coverage, median/p90 relative error, fits accuracy

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

    pc = sub.add_parser("calibrate", help="fit a device's efficiency curves from a micro results file")
    pc.add_argument("--results", required=True, help="results JSON of 'python -m validate run --suite micro'")
    pc.add_argument("--device", help="hwprofiles device to calibrate (default: the one the fingerprint matches)")
    pc.add_argument("--yaml", help="device YAML to rewrite (default: hwprofiles/devices/<device>.yaml)")
    pc.add_argument("--write", action="store_true", help="rewrite the efficiency block (default: print old -> new)")
    pc.set_defaults(func=_cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
