"""Plan: the best setup for a job under constraints (``simulator.planner.plan``), the ranked setups, the
time-cost Pareto front, the families ruled out with their reasons, and each setup one click from the
Estimate page."""

from __future__ import annotations

import json
from typing import Any, get_args

import streamlit as st

from app import figures, knobs, loaders, views, widgets
from simulator.plan_cli import parse_tokens
from simulator.planner import Constraints, Job, Objective, PlanError, SearchSpace, default_methods, method_label
from simulator.report import fmt_seconds
from simulator.units import to_gib

P = "p."  # widget keys of this page
REQUEST = P + "__request"  # the request of the last press of "Plan"
ESTIMATE_PAGE = "app_pages/estimate.py"
ESTIMATE_PARAM = "s"

TASKS = tuple(get_args(Job.model_fields["task"].annotation))
OBJECTIVES = tuple(get_args(Objective))
COUNTS = tuple(SearchSpace.model_fields["gpu_counts"].default_factory())
DEFAULT_MAX_GPUS = 4
DEFAULT_TOKENS = "100M"
# the default space (two GPU types, up to 4 of them) answers in a few seconds on two cores; every priced
# device, or more GPUs, takes longer
DEFAULT_GPUS = ("h100-sxm-80gb", "rtx-4090-24gb")

COLUMNS = {
    "step (s)": st.column_config.NumberColumn(format="%.4g"),
    "tokens/s": st.column_config.NumberColumn(format="%d"),
    "peak / GPU (GiB)": st.column_config.NumberColumn(format="%.2f"),
    "headroom (GiB)": st.column_config.NumberColumn(format="%.2f"),
    "run cost ($)": st.column_config.NumberColumn(format="$%.2f"),
    "$ / M tokens": st.column_config.NumberColumn(format="$%.4g"),
}


def method_options(task: str) -> dict[str, dict[str, Any]]:
    """Label -> method dict of the methods searched by default for ``task``."""
    from pydantic import TypeAdapter

    from simulator.config.methods import Method

    adapter = TypeAdapter(Method)
    return {method_label(adapter.validate_python(m)): m for m in default_methods(task)}


def _help(model: type, name: str) -> str:
    return model.model_fields[name].description or ""


def inputs() -> dict[str, Any] | str:
    """The widgets; the plan request, or an error line."""
    models = loaders.model_names()
    devices = loaders.device_names()
    c = st.columns(4)
    model = c[0].selectbox("model", models, index=models.index(knobs.DEFAULT_MODEL)
                           if knobs.DEFAULT_MODEL in models else 0, key=P + "model", help=_help(Job, "model"))
    task = c[1].radio("task", TASKS, key=P + "task", horizontal=True, help=_help(Job, "task"))
    objective = c[2].selectbox("objective", OBJECTIVES, key=P + "objective",
                               help="What the ranking minimises: run cost, run time, the same for throughput, "
                                    "or the number of GPUs (ties broken by cost, then time).")
    max_gpus = c[3].selectbox("max GPUs", COUNTS, index=COUNTS.index(DEFAULT_MAX_GPUS) if DEFAULT_MAX_GPUS in COUNTS
                              else 0, key=P + "max_gpus", help=_help(Constraints, "max_gpus"))
    c = st.columns(4)
    job: dict[str, Any] = {"model": model, "task": task}
    cons: dict[str, Any] = {"max_gpus": max_gpus}
    space: dict[str, Any] = {"gpu_counts": [n for n in COUNTS if n <= max_gpus]}
    if task != "infer":
        tokens = c[0].text_input("total tokens", DEFAULT_TOKENS, key=P + "tokens",
                                 help=_help(Job, "total_tokens") + " E.g. 50M, 1.5B; empty: per million tokens.")
        job["seq_len"] = c[1].number_input("sequence length", min_value=1, value=Job.model_fields["seq_len"].default,
                                           step=256, key=P + "seq_len", help=_help(Job, "seq_len"))
        if tokens.strip():
            try:
                job["total_tokens"] = parse_tokens(tokens)
            except Exception as err:
                return widgets.one_line(err)
        budget = c[2].number_input("budget ($)", min_value=0.01, value=None, key=P + "budget",
                                   help=_help(Constraints, "budget_usd"))
        hours = c[3].number_input("deadline (hours)", min_value=0.001, value=None, key=P + "deadline",
                                  help=_help(Constraints, "deadline_s"))
        if hours is not None:
            cons["deadline_s"] = hours * 3600.0
    else:
        job["prompt_len"] = c[0].number_input("prompt length", min_value=1,
                                              value=Job.model_fields["prompt_len"].default, key=P + "prompt_len",
                                              help=_help(Job, "prompt_len"))
        job["gen_len"] = c[1].number_input("generated tokens", min_value=0, value=Job.model_fields["gen_len"].default,
                                           key=P + "gen_len", help=_help(Job, "gen_len"))
        budget = c[2].number_input("budget ($ / M tokens)", min_value=0.0001, value=None, key=P + "budget_infer",
                                   help=_help(Constraints, "budget_usd"))
        latency = c[3].number_input("max latency (s)", min_value=0.001, value=None, key=P + "latency",
                                    help=_help(Constraints, "max_latency_s"))
        if latency is not None:
            cons["max_latency_s"] = latency
        c = st.columns(4)
        rate = c[0].number_input("request rate (req/s)", min_value=0.001, value=None, key=P + "rate",
                                 help=_help(Job, "request_rate_per_s") + " Empty: size one batch (no fleet).")
        ttft = c[1].number_input("max TTFT p99 (s)", min_value=0.001, value=None, key=P + "ttft",
                                 help=_help(Constraints, "max_ttft_s"))
        tpot = c[2].number_input("max TPOT (ms)", min_value=0.01, value=None, key=P + "tpot",
                                 help=_help(Constraints, "max_tpot_s"))
        if rate is not None:
            job["request_rate_per_s"] = rate
            if ttft is not None:
                cons["max_ttft_s"] = ttft
            if tpot is not None:
                cons["max_tpot_s"] = tpot / 1e3
        elif ttft is not None or tpot is not None:
            return "TTFT and TPOT targets apply to a fleet: give a request rate as well"
    if budget is not None:
        cons["budget_usd"] = budget
    c = st.columns([2, 2, 1])
    gpus = c[0].multiselect("GPU types", devices, default=[g for g in DEFAULT_GPUS if g in devices], key=P + "gpus",
                            help=_help(SearchSpace, "gpus") + " Empty: every device with a price (slower).")
    if gpus:
        space["gpus"] = gpus
    if task != "infer":
        options = method_options(task)
        chosen = c[1].multiselect("methods", list(options), default=list(options), key=P + "methods." + task,
                                  help=_help(SearchSpace, "methods") + " Empty: the default ones.")
        if chosen:
            space["methods"] = [options[m] for m in chosen]
        modes = list(get_args(get_args(SearchSpace.model_fields["checkpointing"].annotation)[0]))
        ck = st.multiselect("checkpointing", modes, default=SearchSpace.model_fields["checkpointing"].default_factory(),
                            key=P + "checkpointing", help=_help(SearchSpace, "checkpointing")
                            + " selective: torchtitan's per-op policy. Empty: the default ones.")
        if ck:
            space["checkpointing"] = ck
    top_n = c[2].number_input("rows", min_value=1, max_value=100, value=10, key=P + "top_n",
                              help="Setups in the ranked table.")
    pareto = st.checkbox("complete Pareto front (slower)", key=P + "pareto",
                         help="Without it, setups that cannot enter the ranking are skipped, and the front is "
                              "the front of the setups estimated.")
    return {"job": job, "constraints": cons, "space": space, "objective": objective, "top_n": int(top_n),
            "pareto": pareto}


def row_table(rows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rows, 1):
        out.append({
            "#": i, "GPUs": f"{r.n_gpus}x {r.gpu}", "method": r.method, "precision": r.precision,
            "optimizer": r.optimizer, "micro-batch x accum": f"{r.micro_batch} x {r.grad_accum}",
            "checkpointing": r.checkpointing, "parallel": r.parallel,
            "peak / GPU (GiB)": to_gib(r.peak_memory_bytes), "headroom (GiB)": to_gib(r.headroom_bytes),
            "step (s)": r.step_time_s, "tokens/s": r.tokens_per_s,
            "run time": None if r.run_time_s is None else fmt_seconds(r.run_time_s),
            "run cost ($)": r.run_usd, "$ / M tokens": r.usd_per_million_tokens,
        })
    return out


def serving_table(rows: list[Any]) -> list[dict[str, Any]]:
    """Serving fleets: one row per (GPU, GPUs per replica, weights) with its best batch."""
    out = []
    for i, r in enumerate(rows, 1):
        s = r.serving
        out.append({
            "#": i, "GPU": r.gpu, "weights": s.weights, "replicas x GPUs": f"{s.replicas} x {s.gpus_per_replica}",
            "batch": s.batch, "TTFT p99 (ms)": 1e3 * s.ttft_p99_s, "TPOT mean (ms)": 1e3 * s.tpot_mean_s,
            "latency p99 (s)": s.latency_p99_s, "utilization": f"{100 * s.utilization:.0f}%",
            "$ / hour": s.usd_per_hour, "$ / M output tokens": s.usd_per_million_output_tokens,
            "peak / GPU (GiB)": to_gib(s.peak_memory_bytes_per_gpu), "batch limit": s.batch_limit,
        })
    return out


def best_fleet(r: Any) -> None:
    s = r.serving
    st.subheader("Best fleet")
    st.success(f"**{s.replicas} x {s.gpus_per_replica} {r.gpu}** ({s.weights} weights), {s.batch} sequences per "
               f"replica, for {s.request_rate_per_s:g} requests/s")
    row = st.columns(4)
    row[0].metric("TTFT p99", fmt_seconds(s.ttft_p99_s), border=True, help="Queueing included.")
    row[1].metric("TPOT mean", fmt_seconds(s.tpot_mean_s), border=True, help="Prefill interruptions included.")
    row[2].metric("Utilization", f"{100 * s.utilization:.0f}%", border=True)
    row[3].metric("$ / hour", views.usd(s.usd_per_hour), border=True)


def reasons_table(reasons: dict[str, str]) -> list[dict[str, str]]:
    return [{"family": k, "ruled out because": v} for k, v in reasons.items()]


def link_param(scenario: dict[str, Any]) -> str:
    """The Estimate page's URL text of a planned scenario (the catalog model by its name)."""
    data = dict(scenario)
    m = data.get("model")
    if isinstance(m, dict) and m.get("name") in loaders.model_names() and \
            json.loads(loaders.arch_json(m["name"])) == m:
        data["model"] = m["name"]
    return knobs.to_param(data)


def best_setup(r: Any) -> None:
    st.subheader("Best setup")
    st.success(f"**{r.n_gpus}x {r.gpu}**, {r.method}, {r.precision}, optimizer {r.optimizer}, micro-batch "
               f"{r.micro_batch} x grad-accum {r.grad_accum}, checkpointing {r.checkpointing}, {r.parallel}")
    row = st.columns(4)
    row[0].metric("Setup", f"{r.n_gpus}x {r.gpu}", border=True)
    row[1].metric("Peak memory", views.gib(r.peak_memory_bytes), border=True,
                  help=f"Per GPU; {views.gib(r.usable_memory_bytes)} usable, headroom {views.gib(r.headroom_bytes)}.")
    row[2].metric("Step time", fmt_seconds(r.step_time_s), border=True)
    row[3].metric("Tokens/s", views.tokens_per_s(r.tokens_per_s), border=True)
    row = st.columns(4)
    if r.run_time_s is not None:
        row[0].metric("Run time", fmt_seconds(r.run_time_s), border=True)
        row[1].metric("Run cost", views.usd(r.run_usd), border=True)
        row[2].metric("Run energy", views.kwh(r.run_kwh), border=True)
    else:
        row[0].metric("$ per million tokens", views.usd(r.usd_per_million_tokens), border=True)
        row[1].metric("kWh per million tokens", views.kwh(r.kwh_per_million_tokens), border=True)


def open_row(ranked: list[Any]) -> None:
    labels = [f"#{i} {r.n_gpus}x {r.gpu}, {r.method}, {r.parallel}" for i, r in enumerate(ranked, 1)]
    c = st.columns([3, 1], vertical_alignment="bottom")
    pick = c[0].selectbox("open a setup on the Estimate page", range(len(ranked)), format_func=labels.__getitem__,
                          key=P + "open_row")
    if c[1].button("Open on Estimate", key=P + "open"):
        st.switch_page(ESTIMATE_PAGE, query_params={ESTIMATE_PARAM: link_param(ranked[pick].scenario)})


def show(request: dict[str, Any]) -> None:
    try:
        res = loaders.run_plan(json.dumps(request, sort_keys=True))
    except PlanError as err:
        st.error(f"No setup qualifies: {widgets.one_line(err)}")
        if err.rejected_reasons:
            st.subheader("Ruled out")
            st.dataframe(reasons_table(err.rejected_reasons), hide_index=True, key="plan.rejected")
        return
    except Exception as err:  # contradictory or incomplete constraints: one line, never a traceback
        st.error(f"The plan failed: {widgets.one_line(err)}")
        return
    if res.best.serving is not None:
        best_fleet(res.best)
        st.caption(f"{res.candidates_evaluated:,} candidates screened, {res.candidates_estimated:,} estimated in "
                   f"{res.search_time_s:.2f} s.")
        st.subheader("Ranked fleets")
        st.dataframe(serving_table(res.ranked), hide_index=True, key="plan.fleets")
        if res.rejected_reasons:
            st.subheader("Ruled out")
            st.dataframe(reasons_table(res.rejected_reasons), hide_index=True, key="plan.rejected")
        return
    best_setup(res.best)
    st.caption(f"{res.candidates_evaluated:,} candidates screened, {res.candidates_estimated:,} estimated in "
               f"{res.search_time_s:.2f} s.")
    st.subheader("Ranked setups")
    st.dataframe(row_table(res.ranked), hide_index=True, key="plan.ranked", column_config=COLUMNS)
    open_row(res.ranked)
    st.subheader("Time against cost")
    if not res.pareto_complete:
        st.caption("The front is over the setups estimated; tick 'complete Pareto front' for the full one.")
    st.caption("Click a point to open that setup on the Estimate page.")
    event = st.plotly_chart(figures.plan_front(res.ranked, res.pareto, res.best), key="fig.plan",
                            config=views.CHART_CONFIG, on_select="rerun", selection_mode="points")
    clicked = figures.plan_point_row(event, figures.plan_front_traces(res.ranked, res.pareto, res.best))
    if clicked is not None:
        st.switch_page(ESTIMATE_PAGE, query_params={ESTIMATE_PARAM: link_param(clicked.scenario)})
    st.subheader("Pareto front")
    st.dataframe(row_table(res.pareto), hide_index=True, key="plan.pareto", column_config=COLUMNS)
    if res.rejected_reasons:
        st.subheader("Ruled out")
        st.dataframe(reasons_table(res.rejected_reasons), hide_index=True, key="plan.rejected")


def main() -> None:
    st.title("Plan a setup")
    request = inputs()
    if isinstance(request, str):
        st.error(request)
        return
    if st.button("Plan", type="primary", key=P + "run"):
        st.session_state[REQUEST] = request
    done = st.session_state.get(REQUEST)
    if done is None:
        st.info("Set the job and the limits, then press **Plan**.")
        return
    if done != request:
        st.caption("The inputs changed since the last plan: press **Plan** to search again.")
    show(done)


main()
