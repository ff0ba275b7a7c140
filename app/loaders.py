"""Everything the pages read from the catalogs, the engine and the published records, under ``st.cache_data``.

The functions take and return plain data (names, JSON text, pydantic results), so their cache keys are
cheap to hash and their results safe to share between sessions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import streamlit as st

import hwprofiles
import simulator
from simulator import Estimate, Scenario
from simulator.config import ModelArch
from simulator.units import GiB

REPO = Path(__file__).resolve().parents[1]

PUBLISHED_ENV = "FITSIM_PUBLISHED"
"""Environment variable naming the published-records JSONL (default: ``../shared/published/public.jsonl``
beside the repository, where ``validate`` and its tests look)."""


@st.cache_data(show_spinner=False)
def model_names() -> list[str]:
    return simulator.list_models()


@st.cache_data(show_spinner=False)
def device_names() -> list[str]:
    return hwprofiles.list_devices()


@st.cache_data(show_spinner=False)
def system_names(gpu: str | None = None) -> list[str]:
    """The catalog systems, or those whose GPUs are ``gpu``'s kind (a system holds one kind)."""
    if gpu is None:
        return hwprofiles.list_systems()
    try:
        return hwprofiles.systems_of(gpu)
    except hwprofiles.UnknownNameError:
        return hwprofiles.list_systems()


@st.cache_data(show_spinner=False)
def device(name: str) -> hwprofiles.Device:
    return hwprofiles.get_device(name)


@st.cache_data(show_spinner=False)
def device_labels() -> dict[str, str]:
    """Device name -> 'name (79.6 GiB)', the memory the driver reports."""
    return {d.name: f"{d.name} ({d.memory_total_bytes / GiB:.1f} GiB)" for d in hwprofiles.all_devices()}


@st.cache_data(show_spinner=False)
def device_rows() -> list[dict[str, Any]]:
    """One row per device profile for the Hardware page (values as the profile states them)."""
    rows = []
    for d in hwprofiles.all_devices():
        p = d.peak_tflops
        rows.append({
            "device": d.name,
            "product": d.display_name,
            "memory (GiB, as CUDA reports it)": round(d.memory_total_bytes / GiB, 1),
            "memory (GB, marketed)": d.memory_capacity_GB,
            "bandwidth (GB/s)": d.hbm_bandwidth_GBps,
            "fp32 TFLOPS": p.fp32,
            "tf32 TFLOPS": p.tf32,
            "bf16 TFLOPS": p.bf16,
            "fp16 TFLOPS": p.fp16,
            "fp8 TFLOPS": p.fp8,
            "int8 TOPS": p.int8,
            "TDP (W)": d.tdp_W,
            "$ / hour": d.price_usd_per_hour,
            "price source": d.price_source,
            "price date": d.price_date,
        })
    return rows


@st.cache_data(show_spinner=False)
def system_rows() -> list[dict[str, Any]]:
    """One row per node profile for the Hardware page (values as the profile states them)."""
    rows = []
    for x in hwprofiles.all_systems():
        net = x.inter_node
        rows.append({
            "system": x.name,
            "product": x.display_name,
            "device": x.device,
            "GPUs / node": x.gpus_per_node,
            "intra-node": x.intra_node.kind,
            "intra-node GB/s per GPU": x.intra_node.bandwidth_GBps,
            "peak busbw (GB/s)": x.intra_node.peak_busbw_GBps,
            "network": "-" if net is None else f"{net.nics_per_node} x {net.nic_bandwidth_Gbps:g} Gb/s {net.technology}",
            "host RAM (GB)": x.host.host_ram_GB,
            "NVMe (GB/s)": x.host.nvme_bandwidth_GBps,
            "$ / GPU-hour": x.price_usd_per_gpu_hour,
            "node power (W)": x.node_power_W,
        })
    return rows


@st.cache_data(show_spinner=False)
def target_names(model_json: str) -> list[str]:
    """Module names PEFT can adapt in this architecture (leaf names first), for the target pickers."""
    from simulator.graph.build import target_names as names

    arch = ModelArch.model_validate_json(model_json)
    return sorted(names(arch, embeddings=True), key=lambda n: ("." in n, n))


@st.cache_data(show_spinner=False)
def arch_json(name: str) -> str:
    return simulator.get_model(name).model_dump_json()


@st.cache_data(show_spinner=False, max_entries=512)
def run_estimate(scenario_json: str) -> Estimate:
    """The estimate of a validated scenario (its JSON is the cache key)."""
    return simulator.estimate(Scenario.model_validate_json(scenario_json))


# -------------------------------------------------------------------------------------- validation


def published_path() -> Path:
    env = os.environ.get(PUBLISHED_ENV)
    return Path(env) if env else REPO.parent / "shared" / "published" / "public.jsonl"


@st.cache_data(show_spinner="Predicting the published records ...")
def published(path: str, mtime: float) -> dict[str, Any]:
    """Records, predictions, per-group scores and the worst errors for the JSONL at ``path``
    (``mtime`` is part of the key, so an updated file is read again)."""
    from validate.published import load_jsonl, predict_records
    from validate.score import score, worst

    records = load_jsonl(path)
    predictions = predict_records(records)
    return {"records": records, "predictions": predictions, "scores": score(records, predictions),
            "worst": worst(records, predictions, n=10)}


RESULTS_ENV = "FITSIM_RESULTS"


def results_dir() -> Path:
    """validate/results/ of this checkout, or the folder ``$FITSIM_RESULTS`` names."""
    import validate

    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return Path(validate.__file__).resolve().parent / "results"


def result_files() -> list[Path]:
    """GPU measurement results stored under ``validate/results/`` (JSON files), newest first."""
    d = results_dir()
    if not d.is_dir():
        return []
    return sorted(d.rglob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)


def read_result(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"error": f"cannot read {path.name}: {err}"}


@st.cache_data(show_spinner="Predicting the measured cases ...", max_entries=16)
def compared_results(paths: tuple[str, ...], mtimes: tuple[float, ...]) -> dict[str, Any]:
    """Every results file under ``paths`` read with the results schema and compared with the engine
    (:func:`validate.report.compare_results`): ``{"files", "errors", "comparisons", "summary"}``; a file that
    does not read (another schema version, truncated) is listed under ``errors`` with the reason."""
    from validate.report import compare_results, summarize
    from validate.schema import ResultsError, load_results

    files, errors = [], []
    for p in paths:
        try:
            files.append((Path(p).name, load_results(p)))
        except ResultsError as err:
            errors.append(str(err))
    comps = compare_results(files)
    return {"files": [(n, r.fingerprint.model_dump(), r.command, len(r.cases)) for n, r in files], "errors": errors,
            "comparisons": [c.model_dump() for c in comps], "summary": summarize(comps)}


# -------------------------------------------------------------------------------------------- plan


@st.cache_data(show_spinner="Searching setups ...", max_entries=64)
def run_plan(request_json: str) -> Any:
    """``simulator.planner.plan`` for a request ``{"job", "constraints", "space", "objective", "top_n",
    "pareto"}`` (its JSON is the cache key); raises ``PlanError`` / ``ValueError`` as the planner does."""
    from simulator.planner import plan

    r = json.loads(request_json)
    return plan(task=r["job"], constraints=r["constraints"], objective=r["objective"], space=r["space"],
                top_n=r["top_n"], pareto=r["pareto"])
