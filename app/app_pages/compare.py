"""Compare: two to four scenarios side by side, key numbers with deltas against the first, grouped bars."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import figures, knobs, loaders, views, widgets
from simulator import Estimate
from simulator.units import fmt_count, fmt_flops, to_gib

PARAM = "c"  # URL parameter holding the scenarios as a compact JSON list
N_KEY, URL_KEY = "c.n", "c.__url"
SIZES = (2, 3, 4)
ESTIMATE_PREFIX = "e."

# What each column starts from, over the Estimate page's scenario: full vs LoRA vs QLoRA (training),
# unquantized vs int8 vs AWQ weights (inference).
PRESETS = {
    knobs.TRAIN: ({}, {"method.kind": "lora", "method.targets": "all-linear"},
                  {"method.kind": "qlora", "method.targets": "all-linear"},
                  {"method.kind": "qlora", "method.targets": "all-linear", "checkpointing.mode": "full"}),
    knobs.INFER: ({}, {"inference.weights": "int8"}, {"inference.weights": "awq"}, {"inference.kv_dtype": "fp8"}),
}


COLUMN_HELP = {
    "step time (s)": st.column_config.NumberColumn(
        format="%.4g", help="One optimizer step (training) or one batch's generation (inference), slowest rank."),
    "tokens/s": st.column_config.NumberColumn(help="All GPUs together."),
    "$ / M tokens": st.column_config.NumberColumn(
        format="$%.4g", help="Dollars per million tokens at the profile's GPU-hour price (empty: no price)."),
    "largest batch": st.column_config.NumberColumn(
        help="Largest micro-batch (training) or batch (inference) that fits, every other knob held."),
    "largest length": st.column_config.NumberColumn(
        help="Largest sequence length (training) or prompt length (inference) that fits, every other knob held."),
}


def prefix(i: int) -> str:
    return f"c{i}."


def sync_from_url() -> list[str]:
    text = st.query_params.get(PARAM)
    if text is None or text == st.session_state.get(URL_KEY):
        return []
    states, problems = knobs.list_from_param(text)
    states = states[: max(SIZES)]
    for i, s in enumerate(states):
        widgets.set_state(prefix(i), s)
    if states:
        st.session_state[N_KEY] = min(max(len(states), min(SIZES)), max(SIZES))
    st.session_state[URL_KEY] = text
    return problems


def start_state(i: int) -> dict[str, Any]:
    base = st.session_state.get(ESTIMATE_PREFIX + widgets.STATE) or knobs.default_state()
    presets = PRESETS.get(base["task"], PRESETS[knobs.TRAIN])
    return {**base, **presets[i % len(presets)]}


def delta(v: float, first: float | None, unit: str = "") -> str:
    """'+1.25 GiB (+4.0%)' against the first scenario; empty when there is none."""
    if first is None:
        return ""
    d = v - first
    pct = f" ({100 * d / first:+.1f}%)" if first else ""
    return f"{d:+.2f}{unit}{pct}"


def table_rows(inputs: list[widgets.ScenarioInput], estimates: list[Estimate | None]) -> list[dict[str, Any]]:
    first = estimates[0]
    rows = []
    for i, (inp, e) in enumerate(zip(inputs, estimates), 1):
        row: dict[str, Any] = {"#": i, "scenario": inp.label}
        if e is None:
            row["fits"] = "invalid"
            rows.append(row)
            continue
        row.update({
            "fits": "yes" if e.fits else "no",
            "peak (GiB)": round(to_gib(e.peak_memory_bytes), 2),
            "Δ peak vs #1": delta(to_gib(e.peak_memory_bytes), None if first is None else to_gib(first.peak_memory_bytes),
                                  " GiB"),
            "headroom (GiB)": round(to_gib(e.headroom_bytes), 2),
            "peak phase": e.peak_phase,
            "parameters": fmt_count(e.n_params),
            "trainable": f"{fmt_count(e.n_trainable_params)} ({views.share(e.n_trainable_params, e.n_params)})",
            "FLOPs / token": fmt_flops(e.flops.per_token),
            "Δ FLOPs / token vs #1": delta(e.flops.per_token / 1e9, None if first is None else first.flops.per_token / 1e9,
                                           " GFLOP"),
            "largest batch": e.max_batch_that_fits,
            "largest length": e.max_seq_len_that_fits,
            "GPUs": e.n_gpus,
            "step time (s)": None if e.time is None else e.time.step_s,
            "Δ step time vs #1": "" if e.time is None else delta(
                e.time.step_s, None if first is None or first.time is None else first.time.step_s, " s"),
            "tokens/s": None if e.time is None else round(e.time.tokens_per_s),
            "tokens/s per GPU": None if e.time is None else round(e.time.tokens_per_s_per_gpu),
            "$ / M tokens": None if e.cost is None else e.cost.usd_per_million_tokens,
        })
        rows.append(row)
    return rows


def main() -> None:
    problems = sync_from_url()
    st.title("Compare scenarios")
    if problems:
        st.error("The link's scenarios have problems (the rest was loaded): " + "; ".join(problems))
    if N_KEY not in st.session_state:
        st.session_state[N_KEY] = 3
    n = st.radio("scenarios", SIZES, key=N_KEY, horizontal=True,
                 help="Each column is one scenario; the first one is the reference for the deltas.")
    results = st.container()
    st.divider()
    cols = st.columns(n)
    inputs: list[widgets.ScenarioInput] = []
    for i in range(n):
        widgets.state(prefix(i), start_state(i))
        with cols[i]:
            st.subheader(f"#{i + 1}")
        inp = widgets.scenario_form(prefix(i), cols[i], upload=False)
        if inp.error:
            cols[i].error(f"Invalid scenario: {inp.error}")
        inputs.append(inp)
    text = knobs.list_to_param(inp.data for inp in inputs)
    if st.query_params.get(PARAM) != text:
        st.query_params[PARAM] = text
    st.session_state[URL_KEY] = text

    estimates: list[Estimate | None] = []
    for i, inp in enumerate(inputs):
        e = None
        if inp.scenario is not None:
            try:
                e = loaders.run_estimate(inp.scenario.model_dump_json())
            except Exception as err:  # one line per failed column
                cols[i].error(f"The estimate failed: {widgets.one_line(err)}")
        estimates.append(e)

    with results:
        st.dataframe(table_rows(inputs, estimates), hide_index=True, key="cmp.table", column_config=COLUMN_HELP)
        valid = [(f"#{i} {inp.label}", e) for i, (inp, e) in enumerate(zip(inputs, estimates), 1) if e is not None]
        if valid:
            views.chart(figures.comparison_bars([e for _, e in valid], [label for label, _ in valid]), "fig.compare")


main()
