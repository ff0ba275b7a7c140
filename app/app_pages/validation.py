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


def results() -> None:
    st.subheader("GPU measurements")
    files = loaders.result_files()
    if not files:
        st.info(f"No GPU measurement results under {loaders.results_dir()} yet.")
        return
    st.dataframe([{"file": str(p.relative_to(loaders.results_dir())), "bytes": p.stat().st_size} for p in files],
                 hide_index=True, key="val.results")
    chosen = st.selectbox("show", files, format_func=lambda p: p.name, key="val.result")
    st.json(loaders.read_result(chosen), expanded=False)


def main() -> None:
    st.title("Validation")
    published()
    results()


main()
