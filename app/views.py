"""Pieces of pages that show an Estimate: verdict, key numbers, figures, downloads (streamlit)."""

from __future__ import annotations

from typing import Any

import streamlit as st
import yaml

from app import exports, figures
from app import knobs as K
from simulator import Estimate, Scenario, report
from simulator.report import fmt_seconds
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
    pool = e.engine_pool
    if pool is not None and e.fits:  # a serving engine fills its share with its KV pool
        st.success(f"**Fits** in the engine's {gib(pool.share_bytes)}: its KV pool holds {pool.pool_tokens:,} tokens, "
                   f"{pool.concurrency} sequences at once" + (f" in {pool.waves} waves" if pool.waves > 1 else "")
                   + f" ({where}).")
        return
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
    st.markdown("**Suggested changes** (those that fit, least disruptive first; then the closest to fitting):\n"
                + "\n".join(lines))


def key_numbers(e: Estimate) -> None:
    train = e.task == K.TRAIN
    row1 = st.columns(4)
    stage = f" on the ranks of pipeline stage {e.peak_stage}" if len(e.stage_peak_bytes) > 1 else ""
    row1[0].metric("Peak memory", gib(e.peak_memory_bytes), border=True,
                   help=f"Per GPU{stage}. Device total at the peak: reserved {gib(e.peak_reserved_bytes)} + CUDA context "
                        f"(what nvidia-smi shows); allocated {gib(e.peak_allocated_bytes)}.")
    row1[1].metric("Peak phase", e.peak_phase, border=True, help="The phase of the step where memory peaks.")
    row1[2].metric("Parameters", fmt_count(e.n_params), border=True)
    row1[3].metric("Trainable", fmt_count(e.n_trainable_params), border=True,
                   delta=f"{share(e.n_trainable_params, e.n_params)} of the parameters", delta_color="off",
                   delta_arrow="off")
    row2 = st.columns(4)
    row2[0].metric("FLOPs per step" if train else "FLOPs per generation", fmt_flops(e.flops.per_step), border=True,
                   help=f"{fmt_count(e.tokens_per_step)} tokens" + (f"; forward {fmt_flops(e.flops.forward)}, backward "
                        f"{fmt_flops(e.flops.backward)}, recompute {fmt_flops(e.flops.recompute)}" if train else "")
                        + f"; counted with causal attention in full, the kernels run {fmt_flops(e.flops.executed_per_step)}")
    row2[1].metric("FLOPs per token", fmt_flops(e.flops.per_token), border=True)
    none = "none fits"
    row2[2].metric("Largest micro-batch" if train else "Largest batch",
                   none if e.max_batch_that_fits is None else str(e.max_batch_that_fits), border=True,
                   help="The largest value that fits with every other knob held.")
    row2[3].metric("Largest sequence length" if train else "Largest prompt length",
                   none if e.max_seq_len_that_fits is None else str(e.max_seq_len_that_fits), border=True,
                   help="The largest value that fits with every other knob held.")


def usd(x: float | None) -> str:
    return "no price" if x is None else f"${x:,.4g}"


def kwh(x: float | None) -> str:
    return "-" if x is None else f"{x:,.4g} kWh"


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def tokens_per_s(x: float) -> str:
    return f"{x:,.0f}"


def ranks(e: Estimate, sc: Scenario) -> None:
    """The layout (GPUs, system) and what one rank keeps outside the GPU."""
    cols = st.columns(4)
    cols[0].metric("GPUs", str(e.n_gpus), border=True, help=report.parallel_line(sc))
    cols[1].metric("System", e.system or "-", border=True, help=Scenario.model_fields["system"].description)
    cols[2].metric("Model state per GPU", gib(e.model_state_bytes), border=True,
                   help="Weights (incl. quantized and scales) + gradients + optimizer states on one rank.")
    outside = [("Host RAM per rank", e.host_memory_bytes, "Offloaded optimizer states / parameters in host memory."),
               ("NVMe per rank", e.nvme_bytes, "Offloaded to NVMe.")]
    outside = [m for m in outside if m[1]]
    if outside:
        label, v, text = outside[0]
        cols[3].metric(label, gib(v), border=True, help=text)
    for label, v, text in outside[1:]:
        st.columns(4)[0].metric(label, gib(v), border=True, help=text)


def time_and_cost(e: Estimate) -> None:
    """Step time, throughput, MFU, $ and kWh per million tokens, the whole run when its tokens are set,
    and the time-breakdown figure."""
    t, c = e.time, e.cost
    if t is None:
        return
    st.subheader("Time and cost")
    train = e.task == K.TRAIN
    row = st.columns(4)
    row[0].metric("Step time", fmt_seconds(t.step_s), border=True,
                  help="One optimizer step on the slowest rank." if train else
                       f"One batch: prefill {fmt_seconds(t.prefill_s)} + decode ({fmt_seconds(t.decode_per_token_s)} per token).")
    row[1].metric("Tokens/s", tokens_per_s(t.tokens_per_s), border=True, help="All GPUs together.")
    row[2].metric("Tokens/s per GPU", tokens_per_s(t.tokens_per_s_per_gpu), border=True)
    row[3].metric("MFU", percent(t.mfu), border=True,
                  help=f"Model FLOPs utilisation of the dense peak of the matmul dtype; HFU (the FLOPs the kernels "
                       f"run: recompute in, causal attention's masked half out) {percent(t.hfu)}.")
    if c is not None:
        row = st.columns(4)
        row[0].metric("$ per million tokens", usd(c.usd_per_million_tokens), border=True,
                      help=None if c.usd_per_gpu_hour is None else f"At ${c.usd_per_gpu_hour:.2f} per GPU-hour.")
        row[1].metric("kWh per million tokens", kwh(c.kwh_per_million_tokens), border=True,
                      help=f"{c.watts_per_gpu:.0f} W per GPU." if c.watts_per_gpu else c.power_source)
        if c.run_tokens:
            row[2].metric("Run time", fmt_seconds(c.run_time_s or 0.0), border=True,
                          help=f"{fmt_count(c.run_tokens)} tokens.")
            row[3].metric("Run cost", usd(c.run_usd), border=True, help=f"Energy: {kwh(c.run_kwh)}.")
            st.columns(4)[0].metric("Run energy", kwh(c.run_kwh), border=True)
        st.caption(f"Price: {c.price_source or 'no price in the profiles for this GPU'} · Power: {c.power_source}")
    chart(figures.time_breakdown(e), "fig.time")


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
    if len(e.stage_peak_bytes) > 1:
        chart(figures.stage_peaks(e), "fig.stages")
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
    ranks(estimate, sc)
    messages(estimate)
    estimate_figures(estimate)
    time_and_cost(estimate)
    downloads(estimate, sc)
