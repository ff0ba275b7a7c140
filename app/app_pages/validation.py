"""Validation: published measurements predicted and scored per source group, and stored GPU results."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import figures, loaders, views

PATH_KEY = "val.path"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def score_rows(scores: dict[str, dict]) -> list[dict[str, object]]:
    return [{"group": g, "records": r["n"], "comparable": r["n_comparable"], "predicted": r["n_ok"],
             "coverage": pct(r["coverage"]), "median |error|": pct(r["median"]), "p90 |error|": pct(r["p90"]),
             "fits accuracy": "-" if r["fits_accuracy"] is None else f"{100 * r['fits_accuracy']:.0f}% ({r['n_fits']})",
             "predicted (all)": r["n_ok_all"], "median |error| (all)": pct(r["median_all"])}
            for g, r in scores.items()]


def published() -> None:
    st.subheader("Published measurements")
    default = str(loaders.published_path())
    if PATH_KEY not in st.session_state:
        st.session_state[PATH_KEY] = default
    path = Path(st.text_input("records (JSONL)", key=PATH_KEY,
                              help=f"Published records (default {default}; set {loaders.PUBLISHED_ENV} to change it)."))
    if not path.is_file():
        st.info(f"No published records at {path}: nothing to score. They live in shared/published/public.jsonl "
                "beside the repository.")
        return
    res = loaders.published(str(path), path.stat().st_mtime)
    st.caption("Each record is turned into a scenario and predicted (validate/published.py), then scored per source "
               "group (validate/score.py): coverage and errors over the comparable records; '(all)' includes the rest.")
    st.dataframe(score_rows(res["scores"]), hide_index=True, key="val.scores")
    views.chart(figures.predicted_vs_measured(res["records"], res["predictions"]), "fig.scatter")
    if res["worst"]:
        with st.expander(f"The {len(res['worst'])} largest errors (comparable records)"):
            st.dataframe(res["worst"], hide_index=True, key="val.worst")


def summary_rows(summary: dict[str, dict[str, dict]]) -> list[dict[str, object]]:
    rows = []
    for suite, metrics in summary.items():
        for metric, r in metrics.items():
            if "accuracy" in r:
                rows.append({"suite": suite, "metric": metric, "n": r["n"], "fits accuracy": pct(r["accuracy"])})
            else:
                rows.append({"suite": suite, "metric": metric, "n": r["n"], "median |error|": pct(r["median_abs_err"]),
                             "p90 |error|": pct(r["p90_abs_err"]), "max |error|": pct(r["max_abs_err"]),
                             "bias": pct(r["median_err"])})
    return rows


def results() -> None:
    st.subheader("GPU measurements")
    files = loaders.result_files()
    if not files:
        st.info(f"No GPU measurement results under {loaders.results_dir()} yet: `python -m validate run` on a GPU "
                "writes them (validate/device/run.sh on a machine without a registry).")
        return
    res = loaders.compared_results(tuple(map(str, files)), tuple(p.stat().st_mtime for p in files))
    for err in res["errors"]:
        st.warning(err)
    st.dataframe([{"file": n, "device": fp["device_name"], "profile": fp["device_profile"], "driver": fp["driver"],
                   "torch": fp["packages"].get("torch"), "cases": k, "reproduce": cmd}
                  for n, fp, cmd, k in res["files"]], hide_index=True, key="val.results")
    st.caption("Each case is the same Scenario the engine estimates, predicted on the device profile its file names "
               "(validate/report.py); |error| = |predicted - measured| / measured, bias = median signed error.")
    st.dataframe(summary_rows(res["summary"]), hide_index=True, key="val.summary")
    metrics = sorted({c["metric"] for c in res["comparisons"] if c["unit"] != "bool"})
    if metrics:
        metric = st.selectbox("metric", metrics, key="val.metric")
        views.chart(figures.gpu_measured_vs_predicted(res["comparisons"], metric), "fig.gpu")
        worst = sorted((c for c in res["comparisons"] if c["metric"] == metric),
                       key=lambda c: -abs(c["predicted"] - c["measured"]) / c["measured"])[:10]
        with st.expander(f"The {len(worst)} largest errors ({metric})"):
            st.dataframe([{"case": c["case_id"], "measured": c["measured"], "predicted": c["predicted"],
                           "diagnosis": c["diagnosis"]} for c in worst], hide_index=True, key="val.gpu_worst")


def main() -> None:
    st.title("Validation")
    published()
    results()


main()
