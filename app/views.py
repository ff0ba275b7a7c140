"""Pieces of pages that show an Estimate: verdict, key numbers, figures, downloads (streamlit)."""

from __future__ import annotations

from typing import Any

import streamlit as st
import yaml

from app import exports, figures
from app import knobs as K
from simulator import Estimate, Scenario, report
from simulator.units import fmt_count, fmt_flops, to_gib

CHART_CONFIG = {"displaylogo": False}


def gib(n_bytes: float) -> str:
    return f"{to_gib(n_bytes):.2f} GiB"


def share(part: float, whole: float) -> str:
    if not whole:
        return "-"
    x = 100.0 * part / whole
    return f"{x:.2g}%" if 0 < x < 1 else f"{x:.1f}%"


def chart(fig: Any, key: str) -> None:
    st.plotly_chart(fig, key=key, config=CHART_CONFIG)


def verdict(e: Estimate) -> None:
    """The fits / does-not-fit banner with the margin, and what to change when it does not fit."""
    where = f"peak {gib(e.peak_memory_bytes)} of {gib(e.device_memory_bytes)} on {e.gpu}, during {e.peak_phase}"
    if e.fits:
        st.success(f"**Fits** with {gib(e.headroom_bytes)} headroom ({where}).")
        return
    st.error(f"**Does not fit**: short by {gib(-e.headroom_bytes)} ({where}).")
    suggestions(e)


def suggestions(e: Estimate) -> None:
    if not e.suggestions:
        st.info("No single change that was tried lowers the peak enough.")
        return
    lines = [f"- {s.change}: peak {gib(s.peak_memory_bytes)}, {'fits' if s.fits else 'still does not fit'}"
             for s in e.suggestions]
    st.markdown("**Suggested changes** (lowest peak first):\n" + "\n".join(lines))


def key_numbers(e: Estimate) -> None:
    train = e.task == K.TRAIN
    row1 = st.columns(4)
    row1[0].metric("Peak memory", gib(e.peak_memory_bytes), border=True,
                   help=f"Device total at the peak: reserved {gib(e.peak_reserved_bytes)} + CUDA context "
                        f"(what nvidia-smi shows); allocated {gib(e.peak_allocated_bytes)}.")
    row1[1].metric("Peak phase", e.peak_phase, border=True, help="The phase of the step where memory peaks.")
    row1[2].metric("Parameters", fmt_count(e.n_params), border=True)
    row1[3].metric("Trainable", fmt_count(e.n_trainable_params), border=True,
                   delta=f"{share(e.n_trainable_params, e.n_params)} of the parameters", delta_color="off",
                   delta_arrow="off")
    row2 = st.columns(4)
    row2[0].metric("FLOPs per step" if train else "FLOPs per generation", fmt_flops(e.flops.per_step), border=True,
                   help=f"{fmt_count(e.tokens_per_step)} tokens" + (f"; forward {fmt_flops(e.flops.forward)}, backward "
                        f"{fmt_flops(e.flops.backward)}, recompute {fmt_flops(e.flops.recompute)}" if train else ""))
    row2[1].metric("FLOPs per token", fmt_flops(e.flops.per_token), border=True)
    none = "none fits"
    row2[2].metric("Largest micro-batch" if train else "Largest batch",
                   none if e.max_batch_that_fits is None else str(e.max_batch_that_fits), border=True,
                   help="The largest value that fits with every other knob held.")
    row2[3].metric("Largest sequence length" if train else "Largest prompt length",
                   none if e.max_seq_len_that_fits is None else str(e.max_seq_len_that_fits), border=True,
                   help="The largest value that fits with every other knob held.")


def messages(e: Estimate) -> None:
    for w in e.warnings:
        st.warning(w)
    for n in e.notes:
        st.caption(n)


def estimate_figures(e: Estimate) -> None:
    left, right = st.columns(2)
    with left:
        chart(figures.memory_breakdown(e), "fig.breakdown")
    with right:
        chart(figures.memory_timeline(e), "fig.timeline")
    if any(e.activations_by_layer.values()):
        chart(figures.activations_by_layer(e), "fig.activations")


def downloads(e: Estimate, sc: Scenario) -> None:
    cols = st.columns(3)
    cols[0].download_button("Scenario (YAML)", exports.scenario_yaml(sc), file_name="scenario.yaml",
                            mime="application/yaml", key="dl.yaml", on_click="ignore")
    cols[1].download_button("Result (JSON)", exports.estimate_json(e, sc), file_name="estimate.json",
                            mime="application/json", key="dl.json", on_click="ignore")
    cols[2].download_button("Result (CSV)", exports.estimate_csv(e), file_name="estimate.csv",
                            mime="text/csv", key="dl.csv", on_click="ignore")


def scenario_summary(e: Estimate, sc: Scenario, data: dict[str, Any]) -> None:
    st.caption(f"{e.model}, method {report.method_text(e, sc)} · {report.workload_line(sc)} · {report.runtime_line(sc)}")
    with st.expander("This scenario as YAML (the page's URL holds it too: copy the URL to share it)"):
        st.code(yaml.safe_dump(K.compact(data), sort_keys=False), language="yaml")


def estimate_page(sc: Scenario, data: dict[str, Any], estimate: Estimate) -> None:
    scenario_summary(estimate, sc, data)
    verdict(estimate)
    key_numbers(estimate)
    messages(estimate)
    estimate_figures(estimate)
    downloads(estimate, sc)
