"""The results file of a validation run: one JSON document per run, versioned, strict.

A run (``python -m validate run``) measures a list of cases on one machine and writes one
:class:`ResultsFile`.  Every case carries its full specification (for end-to-end cases the
:class:`~simulator.config.Scenario` itself, dumped as JSON) so the prediction made when the report is
built is of exactly the setup that was measured.

Reading is strict: a file of another ``schema_version``, a truncated file, or one whose cases do not
match the schema is refused with :class:`ResultsError` naming the file and the problem.  Writing never
overwrites: the file is written next to its final name and renamed, and an existing name is an error.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
"""Bump when a field changes meaning or disappears; readers refuse other versions."""

Suite = Literal["micro", "e2e"]
Status = Literal["ok", "oom", "error", "skipped"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Fingerprint(_Strict):
    """What the measurements were taken on."""

    platform: Literal["cuda", "rocm", "cpu"]
    """Where the kernels ran."""
    device_name: str
    """torch.cuda.get_device_name (or the CPU model)."""
    device_count: int = Field(ge=0)
    """Accelerators visible to the process."""
    device_profile: str | None = None
    """The hwprofiles device this machine was matched to (by name / alias); predictions use it."""
    sm_count: int | None = None
    """Streaming multiprocessors (CUDA) / compute units (ROCm)."""
    memory_total_bytes: int | None = None
    """Device memory as the driver reports it."""
    sm_clock_max_mhz: int | None = None
    """Maximum SM clock (nvidia-smi clocks.max.sm)."""
    mem_clock_max_mhz: int | None = None
    """Maximum memory clock (nvidia-smi clocks.max.mem)."""
    power_limit_w: float | None = None
    """Enforced power limit (nvidia-smi power.limit)."""
    driver: str | None = None
    """GPU driver version."""
    cuda: str | None = None
    """CUDA (or HIP) runtime torch was built with."""
    cudnn: int | None = None
    """cuDNN version torch reports."""
    cpu: str | None = None
    """Host CPU model."""
    cpu_count: int | None = None
    """Logical CPUs of the host."""
    python: str
    """Python version."""
    packages: dict[str, str | None]
    """Versions of the packages whose kernels ran: torch, transformers, peft, bitsandbytes, torchao, numpy
    (None: not installed)."""
    fitsim_commit: str | None = None
    """git commit of the fitsim checkout that ran the suite (None outside a checkout)."""


class Measurement(_Strict):
    """What one case measured.  Times are medians over the repeats; samples keep every repeat."""

    allocated_peak_bytes: int | None = None
    """torch.cuda.max_memory_allocated during the measured steps, the process's baseline (allocations alive
    before the model was built) subtracted."""
    reserved_peak_bytes: int | None = None
    """torch.cuda.max_memory_reserved likewise (the caching allocator's segments)."""
    baseline_allocated_bytes: int | None = None
    """What was allocated before the case started (subtracted above)."""
    device_used_bytes: int | None = None
    """Device memory in use by the whole process at the peak as the driver sees it (nvidia-smi view), when
    it could be read."""
    time_s: float | None = Field(default=None, ge=0)
    """Median time of one repeat (a training step, a generation, one kernel call)."""
    time_samples_s: tuple[float, ...] = ()
    """Every repeat's time, in order."""
    tokens_per_s: float | None = Field(default=None, ge=0)
    """End-to-end: tokens processed (training) or generated (inference) per second at the median time."""
    flops: float | None = Field(default=None, ge=0)
    """Microbenchmarks: FLOPs of one call (2mnk for a GEMM)."""
    bytes_moved: float | None = Field(default=None, ge=0)
    """Microbenchmarks: bytes read + written by one call."""
    segment_bytes: tuple[int, ...] = ()
    """End-to-end on a GPU: sizes of the caching allocator's large-pool segments at the end of the case, largest
    first (``validate.harness.allocator_summary``); what made the reserved peak exceed the allocated one."""
    extra: dict[str, float] = {}
    """Further numbers a case records (prefill_s, decode_per_token_s, achieved GB/s ...)."""


class CaseResult(_Strict):
    """One case of a suite and what happened to it."""

    case_id: str = Field(min_length=1)
    """Stable identifier, unique within the file (e.g. 'e2e/llama-1b/lora-r16/s2048-b4-ck')."""
    suite: Suite
    """Which suite the case belongs to."""
    kind: str = Field(min_length=1)
    """Micro: gemm, sdpa, copy, rmsnorm, softmax, cross_entropy, adamw, dequant, h2d, d2h, all_reduce ...;
    end-to-end: train or infer."""
    spec: dict[str, Any]
    """Everything needed to rebuild the case: micro parameters, or {'scenario': Scenario JSON, 'warmup',
    'repeats'} for end-to-end cases."""
    status: Status
    """ok: measured; oom: the device ran out of memory (a measurement too: the engine must say it does not
    fit); error: the case failed for another reason (message); skipped: not runnable here (message)."""
    message: str | None = None
    """Why a case is oom / error / skipped."""
    measured: Measurement | None = None
    """The numbers (None unless status is 'ok'; an OOM may record the memory reached)."""


class ResultsFile(_Strict):
    """One validation run on one machine."""

    schema_version: Literal[1]
    """Version of this layout (:data:`SCHEMA_VERSION`)."""
    suite: Literal["micro", "e2e", "all"]
    """The suite that was run."""
    created_utc: str
    """When the run started, ISO 8601 UTC."""
    command: str
    """The command that reproduces this file."""
    fingerprint: Fingerprint
    """The machine."""
    cases: tuple[CaseResult, ...]
    """Every case, in the order run."""
    duration_s: float = Field(ge=0)
    """Wall time of the whole run."""
    planned_cases: int | None = Field(default=None, ge=0)
    """How many cases the run set out to measure; more than ``len(cases)`` when it ended early (the file is
    rewritten after every case, so a run cut off by a time limit leaves the cases it finished).  None in files
    written before the field existed (they are complete)."""
    stopped: Literal["budget", "interrupted"] | None = None
    """Why the run ended before its last case: 'budget' -- it did not start a case that its ``--budget-s``
    could not hold; 'interrupted' -- stopped from outside (Ctrl-C).  None: it ran to the end, or was killed
    between two rewrites (then ``planned_cases`` says how many are missing)."""

    @property
    def complete(self) -> bool:
        """Whether every planned case was run."""
        return self.planned_cases is None or len(self.cases) >= self.planned_cases


class ResultsError(ValueError):
    """A results file that cannot be read or written; the message names the file and the problem."""


def _first_errors(err: ValidationError, n: int = 3) -> str:
    parts = []
    for e in err.errors()[:n]:
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        parts.append(f"{loc}: {e['msg']}")
    more = len(err.errors()) - n
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_results(text: str, source: str = "<text>") -> ResultsFile:
    """Parse a results document; :class:`ResultsError` on truncation, another schema version or bad fields."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = "truncated (it does not end with '}')" if not text.rstrip().endswith("}") else "not valid JSON"
        raise ResultsError(f"{source}: {where} at character {e.pos} of {len(text)} ({e.msg}); "
                           "re-run the suite or restore the file") from None
    if not isinstance(data, dict):
        raise ResultsError(f"{source}: expected a JSON object with 'schema_version', got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(f"{source}: schema_version {version!r}, this fitsim reads version {SCHEMA_VERSION} "
                           "(re-run the suite with this version, or use the fitsim that wrote it)")
    try:
        results = ResultsFile.model_validate(data)
    except ValidationError as e:
        raise ResultsError(f"{source}: does not match results schema {SCHEMA_VERSION}: {_first_errors(e)}") from None
    ids = [c.case_id for c in results.cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ResultsError(f"{source}: case_id repeated: {', '.join(dup[:5])}")
    return results


def load_results(path: str | Path) -> ResultsFile:
    """Read and validate one results file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ResultsError(f"{p}: cannot read ({e.strerror})") from None
    return parse_results(text, str(p))


def results_paths(path: str | Path) -> list[Path]:
    """The ``*.json`` results files of a folder, sorted by name, or the one file named."""
    p = Path(path)
    return sorted(p.glob("*.json")) if p.is_dir() else [p]


def load_results_dir(path: str | Path) -> list[ResultsFile]:
    """Every results file under a folder (or the one file named), sorted by name."""
    return [load_results(f) for f in results_paths(path)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def results_filename(results: ResultsFile) -> str:
    """``{suite}-{device}-{YYYYmmddTHHMMSS}.json``: names sort by time and say what they hold."""
    stamp = re.sub(r"[^0-9T]", "", results.created_utc.split(".")[0])[:15]
    fp = results.fingerprint
    return f"{results.suite}-{_slug(fp.device_profile or fp.device_name)}-{stamp}.json"


def write_results(results: ResultsFile, out_dir: str | Path, own: Path | None = None) -> Path:
    """Write ``results`` into ``out_dir`` under :func:`results_filename`; never overwrites an existing file
    other than ``own``, the file this same run wrote before (a run rewrites its file after every case).  The
    text goes to a temporary file first and replaces the target in one step, so a reader -- or a run killed
    mid-write -- never sees a half-written file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / results_filename(results)
    if path.exists() and path != own:
        raise ResultsError(f"{path}: exists; results files are never overwritten (move it away or wait a second)")
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(results.model_dump_json(indent=1) + "\n")
    os.replace(tmp, path)
    return path
