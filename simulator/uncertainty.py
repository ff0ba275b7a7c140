"""Error bands on peak memory and step time, and the probability of running out of memory.

Derivation
----------
The bands measure fitsim's own error; they never change a prediction.

1. Residuals.  Every measurement that fitsim predicts -- today the comparable records of the published
   measurements (``/work/shared/published/public.jsonl``, predicted by ``python -m validate published``),
   later also our own end-to-end GPU runs (``validate/results/*.json``) -- gives a pair (measured,
   predicted) in the same convention: allocated vs allocated, reserved vs reserved, device total vs
   device total, per GPU or summed over the GPUs.  The residual is the log-ratio
   ``r = ln(measured / predicted)``; ``r = 0.10`` means the engine read 10% low.  Throughput metrics
   (tokens/s, samples/s, TFLOP/s, MFU) are turned into time first: at a fixed amount of work time is
   the inverse of throughput, so ``r_time = ln(predicted_throughput / measured_throughput)``.

2. Cells.  The residuals are split by metric class (``memory``, ``time``) and then, one level at a
   time, by the regimes where the error differs: single vs multi-GPU, training vs inference, method
   kind.  A cell is kept only with at least ``min_n`` residuals from at least ``min_groups`` source
   groups (the record id without its number), so that one paper's idiosyncrasy does not become a
   band.  A setup uses the most specific cell that exists (``memory/single/train/qlora`` ->
   ``memory/single/train`` -> ``memory/single`` -> ``memory``).

3. Per cell: ``n``, the empirical quantiles p5, p10, p25, p50, p75, p90, p95 of r (linear
   interpolation between order statistics, numpy's default), the bias (the median r) and a robust
   scale (1.4826 x the median absolute deviation, the standard deviation for normal residuals).

4. Bands.  The p10-p90 band of a prediction ``x`` is ``[x e^p10, x e^p90]``: 80% of the measured
   setups of the cell landed in it.  It is not centred on ``x`` when the engine is biased in that
   regime.  A fixed part the residuals do not describe (the CUDA context, a device-profile constant)
   is added outside the scaling.

5. P(OOM).  ``P(measured > usable) = P(r > ln(usable / predicted)) = 1 - F(ln(usable / predicted))``
   with ``F`` the distribution of r in the cell: piecewise linear through the seven stored quantiles
   (so ``F(p10) = 0.10`` and ``F(p50) = 0.5`` exactly), with exponential tails beyond p5 and p95 whose
   rate matches the drop of probability between p90 and p95 (p10 and p5): the tail halves every
   ``p95 - p90``.  It is continuous, monotone in the usable memory, and never exactly 0 or 1 away from
   the data, which a raw empirical CDF of 20-150 points would be.

Assumption and limits
---------------------
The residual distribution of the measured setups is assumed to transfer to a new setup of the same
cell.  That holds as far as the new setup resembles them: the published records are mostly 2023-2024
Hugging Face / PEFT / litgpt / torchtitan / Megatron runs on A100 / H100-class GPUs, many of them
from one source (the Qwen fine-tuning tables), and their residuals are not independent (one source's
missing details shift all its records alike).  ``n`` counts records, not independent sources; the
cell's ``groups`` says where they come from.  The bands include the error of the records' own
ambiguity (unstated batch, framework defaults, GB vs GiB), which our own GPU runs do not have.  A
setup far outside the records (a new GPU, a 16k-GPU job, an exotic method) gets the band of its
pooled cell, which is then a rough guide, not a guarantee.  The band file is a snapshot of the engine
at its ``fitsim_commit``: when the engine changes, rebuild it (``python -m validate bands``).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from hwprofiles import diskcache

from ._code import ENGINE_CODE
from .config.base import Strict
from .results import Uncertainty

BANDS_PATH = Path(__file__).resolve().parent / "data" / "error_bands.json"
"""The band file the engine reads (built by ``python -m validate bands``)."""

SCHEMA_VERSION = 1
"""Version of the band file's layout; readers refuse another."""

QUANTILE_LEVELS: dict[str, float] = {"p5": 0.05, "p10": 0.10, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p90": 0.90,
                                     "p95": 0.95}
"""The quantiles of r stored per cell (name -> probability level)."""

INTERVALS: dict[str, tuple[str, str]] = {"p10-p90": ("p10", "p90"), "p5-p95": ("p5", "p95")}
"""Bands that can be read off the stored quantiles."""

DEFAULT_INTERVAL = "p10-p90"
"""The band the engine reports (80% of the measured setups inside)."""

MetricClass = Literal["memory", "time"]
GpuRegime = Literal["single", "multi"]
Interval = Literal["p10-p90", "p5-p95"]

_MIN_TAIL_SCALE = 1e-3
"""Smallest tail scale of r (0.1%): a cell whose outer quantiles tie gets a near-step tail, not a 0/0."""


class BandFileError(ValueError):
    """A band file that cannot be read or does not match the schema; the message names the file."""


class _BandModel(Strict):
    # reading the attribute docstrings back from the source would triple the import time of this module;
    # nothing shows them as help.  The validators are built on first use: a band file that comes from the disk
    # cache is never validated again (13 ms of the import)
    model_config = ConfigDict(use_attribute_docstrings=False, defer_build=True)


class Quantiles(_BandModel):
    """Empirical quantiles of r = ln(measured / predicted)."""

    p5: float
    p10: float
    p25: float
    p50: float
    p75: float
    p90: float
    p95: float

    @model_validator(mode="after")
    def _ordered(self) -> "Quantiles":
        vals = [getattr(self, k) for k in QUANTILE_LEVELS]
        if any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"quantiles must not decrease from p5 to p95, got {vals}")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"quantiles must be finite, got {vals}")
        return self


class BandCell(_BandModel):
    """The residuals of one regime."""

    metric: MetricClass
    """memory: peak memory in its measured convention; time: step time (throughput turned into time)."""
    gpus: GpuRegime | None = None
    """single: one GPU; multi: more than one; None: both pooled."""
    task: Literal["train", "infer"] | None = None
    """None: both pooled."""
    method: str | None = None
    """Method kind as the engine names it (full, lora, qlora, ..., 'inference'); None: pooled."""
    n: int = Field(ge=1)
    """Residuals in the cell."""
    n_groups: int = Field(ge=1)
    """Source groups they come from."""
    groups: dict[str, int]
    """Residuals per source group."""
    quantiles: Quantiles
    """Empirical quantiles of r."""
    bias: float
    """Median r: ln of the typical measured / predicted ratio (0.10: the engine reads about 10% low)."""
    robust_scale: float = Field(ge=0.0)
    """1.4826 x median |r - median r| (equals the standard deviation for normal residuals)."""

    @property
    def key(self) -> str:
        return cell_key(self.metric, self.gpus, self.task, self.method)

    @model_validator(mode="after")
    def _consistent(self) -> "BandCell":
        if self.gpus is None and (self.task is not None or self.method is not None) or (
                self.task is None and self.method is not None):
            raise ValueError("a cell narrows metric -> gpus -> task -> method in that order")
        if sum(self.groups.values()) != self.n or len(self.groups) != self.n_groups:
            raise ValueError(f"groups {self.groups} do not add up to n={self.n}, n_groups={self.n_groups}")
        if abs(self.bias - self.quantiles.p50) > 1e-9:
            raise ValueError(f"bias {self.bias} must equal the median r (p50 = {self.quantiles.p50})")
        return self


class RecordsSource(_BandModel):
    """A file of measurements the residuals came from."""

    kind: Literal["published", "gpu-run"]
    """Published records (JSONL) or a results file of our own end-to-end GPU runs."""
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    n_pairs: int = Field(ge=0)
    """Residual pairs taken from it."""


class Provenance(_BandModel):
    """Where the bands come from and how to rebuild them."""

    sources: tuple[RecordsSource, ...]
    """The records (published JSONL) and results files (end-to-end GPU runs) used."""
    fitsim_commit: str | None
    """git commit of the engine that made the predictions (None outside a checkout)."""
    fitsim_dirty: bool = False
    """The checkout had uncommitted changes to tracked files."""
    created_utc: str
    """When the file was built, ISO 8601 UTC."""
    command: str
    """The command that rebuilds this file."""
    residual: str = "r = ln(measured / predicted); throughput metrics as time: ln(predicted / measured)"
    """How a residual is defined."""
    selection: str
    """Which measurements were used."""


class ErrorBands(_BandModel):
    """The band file: per-cell residual quantiles and their provenance."""

    schema_version: Literal[1]
    min_n: int = Field(ge=1)
    """Fewest residuals a cell needs to be kept."""
    min_groups: int = Field(ge=1)
    """Fewest source groups a cell needs to be kept."""
    provenance: Provenance
    cells: dict[str, BandCell]
    """Cell key ('memory/single/train/lora') -> cell."""

    @model_validator(mode="after")
    def _keys(self) -> "ErrorBands":
        for k, c in self.cells.items():
            if k != c.key:
                raise ValueError(f"cell {k!r} holds the residuals of {c.key!r}")
            if c.n < self.min_n or c.n_groups < self.min_groups:
                raise ValueError(f"cell {k!r}: n={c.n} from {c.n_groups} groups is below min_n={self.min_n} / "
                                 f"min_groups={self.min_groups}")
        return self


# ------------------------------------------------------------------------------------------ cells


def cell_key(metric: str, gpus: str | None = None, task: str | None = None, method: str | None = None) -> str:
    """'memory', 'memory/single', 'memory/single/train', 'memory/single/train/lora'."""
    return "/".join(p for p in (metric, gpus, task, method) if p is not None)


def gpu_regime(n_gpus: int) -> GpuRegime:
    return "single" if n_gpus <= 1 else "multi"


def method_tag(task: str, method_kind: str) -> str:
    """The method level of a cell: the method kind for training, 'inference' for serving."""
    return "inference" if task == "infer" else method_kind


def cell_chain(metric: str, n_gpus: int, task: str, method_kind: str) -> tuple[str, ...]:
    """Cell keys of a setup, most specific first."""
    g = gpu_regime(n_gpus)
    m = method_tag(task, method_kind)
    return (cell_key(metric, g, task, m), cell_key(metric, g, task), cell_key(metric, g), cell_key(metric))


def cell_for(bands: ErrorBands, metric: str, n_gpus: int, task: str, method_kind: str) -> BandCell | None:
    """The most specific cell of the setup that the band file holds (None: not even the pooled one)."""
    for k in cell_chain(metric, n_gpus, task, method_kind):
        c = bands.cells.get(k)
        if c is not None:
            return c
    return None


# ------------------------------------------------------------------------------- distribution of r


def _knots(cell: BandCell) -> tuple[list[float], list[float]]:
    q = cell.quantiles
    return [getattr(q, k) for k in QUANTILE_LEVELS], list(QUANTILE_LEVELS.values())


def _tail_scale(inner: float, outer: float) -> float:
    """Scale of an exponential tail that halves the probability between the p90 and p95 knots (or p10, p5)."""
    return max(abs(outer - inner) / math.log(2.0), _MIN_TAIL_SCALE)


def residual_cdf(r: float, cell: BandCell) -> float:
    """P(residual <= r) in the cell: linear through the stored quantiles, exponential tails beyond p5 / p95."""
    xs, ps = _knots(cell)
    if r > xs[-1]:
        return 1.0 - (1.0 - ps[-1]) * math.exp(-(r - xs[-1]) / _tail_scale(xs[-2], xs[-1]))
    if r < xs[0]:
        return ps[0] * math.exp((r - xs[0]) / _tail_scale(xs[1], xs[0]))
    i = bisect.bisect_right(xs, r) - 1  # xs[i] <= r < xs[i+1]; at a tie, the highest knot of the tie
    if i >= len(xs) - 1:
        return ps[-1]
    x0, x1 = xs[i], xs[i + 1]
    return ps[i] + (ps[i + 1] - ps[i]) * (r - x0) / (x1 - x0)


def ratio_quantile(cell: BandCell, name: str) -> float:
    """measured / predicted at a stored quantile ('p10' -> e^p10)."""
    if name not in QUANTILE_LEVELS:
        raise ValueError(f"quantile {name!r} is not stored; choose one of {', '.join(QUANTILE_LEVELS)}")
    return math.exp(getattr(cell.quantiles, name))


# ------------------------------------------------------------------------------------------ bands


def band(predicted: float, cell: BandCell, interval: Interval = DEFAULT_INTERVAL, fixed: float = 0.0
         ) -> tuple[float, float]:
    """(lo, hi) of a prediction: ``fixed + (predicted - fixed) e^q`` at the interval's two quantiles."""
    if interval not in INTERVALS:
        raise ValueError(f"interval {interval!r}: choose one of {', '.join(INTERVALS)}")
    lo_q, hi_q = INTERVALS[interval]
    scaled = predicted - fixed
    return fixed + scaled * ratio_quantile(cell, lo_q), fixed + scaled * ratio_quantile(cell, hi_q)


def memory_band_bytes(predicted_bytes: float, cell: BandCell, interval: Interval = DEFAULT_INTERVAL,
                      fixed_bytes: float = 0.0) -> tuple[float, float]:
    """p10-p90 (default) or p5-p95 band of a peak-memory prediction; ``fixed_bytes`` (the CUDA context) is
    part of the prediction but not scaled."""
    return band(predicted_bytes, cell, interval, fixed_bytes)


def time_band_s(predicted_s: float, cell: BandCell, interval: Interval = DEFAULT_INTERVAL) -> tuple[float, float]:
    """p10-p90 (default) or p5-p95 band of a step-time prediction."""
    return band(predicted_s, cell, interval)


def oom_probability(predicted_peak_bytes: float, usable_bytes: float, cell: BandCell, fixed_bytes: float = 0.0
                    ) -> float:
    """P(measured peak > usable): ``1 - F(ln((usable - fixed) / (predicted - fixed)))`` with F of
    :func:`residual_cdf`.  Nothing usable: 1; nothing predicted beyond the fixed part: 0 if it fits."""
    scaled, room = predicted_peak_bytes - fixed_bytes, usable_bytes - fixed_bytes
    if room <= 0.0:
        return 1.0
    if scaled <= 0.0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - residual_cdf(math.log(room / scaled), cell)))


def oom_probability_many(predicted_peak_bytes, usable_bytes, cell: BandCell, fixed_bytes=0.0):
    """:func:`oom_probability` element by element over arrays (the same arithmetic per element)."""
    import numpy as np

    f = np.vectorize(lambda p, u, x: oom_probability(float(p), float(u), cell, float(x)), otypes=[float])
    return f(predicted_peak_bytes, usable_bytes, fixed_bytes)


# ----------------------------------------------------------------------------------- the band file


def parse_bands(text: str, source: str = "<text>") -> ErrorBands:
    """Validate a band document; :class:`BandFileError` naming the source and the first problems."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BandFileError(f"{source}: not valid JSON at character {e.pos} ({e.msg}); rebuild it with "
                            "`python -m validate bands`") from None
    if not isinstance(data, dict):
        raise BandFileError(f"{source}: expected a JSON object with 'schema_version', got {type(data).__name__}")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BandFileError(f"{source}: schema_version {data.get('schema_version')!r}, this fitsim reads "
                            f"{SCHEMA_VERSION}; rebuild it with `python -m validate bands`")
    try:
        return ErrorBands.model_validate(data)
    except ValidationError as e:
        parts = [f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()[:3]]
        raise BandFileError(f"{source}: does not match the band schema {SCHEMA_VERSION}: {'; '.join(parts)}") from None


@functools.cache
def load_bands(path: str | None = None) -> ErrorBands:
    """The band file (default :data:`BANDS_PATH`), read once per path."""
    p = Path(path) if path is not None else BANDS_PATH
    return diskcache.load_or_build("bands", "", lambda: _read_bands(p), code=ENGINE_CODE, sources=(p,))


def _read_bands(p: Path) -> ErrorBands:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise BandFileError(f"{p}: cannot read the band file ({e.strerror}); rebuild it with "
                            "`python -m validate bands`") from None
    return parse_bands(text, str(p))


@functools.cache
def default_bands() -> ErrorBands | None:
    """The engine's band file, or None before one has been built (the estimate then carries no bands)."""
    if not BANDS_PATH.exists():
        return None
    return load_bands()


def _describe_sources(bands: ErrorBands) -> str:
    label = {"published": "published", "gpu-run": "own GPU-run"}
    return " and ".join(dict.fromkeys(label[s.kind] for s in bands.provenance.sources)) or "no"


def _lookup(b: ErrorBands, regime_gpus: int, task: str, method_kind: str
            ) -> tuple[BandCell | None, BandCell | None, str]:
    return (cell_for(b, "memory", regime_gpus, task, method_kind), cell_for(b, "time", regime_gpus, task, method_kind),
            f"{_describe_sources(b)} measurements")


@functools.lru_cache(maxsize=256)
def _default_lookup(regime_gpus: int, task: str, method_kind: str) -> tuple[BandCell | None, BandCell | None, str]:
    b = default_bands()
    return _lookup(b, regime_gpus, task, method_kind) if b is not None else (None, None, "")


def band_cells(n_gpus: int, task: str, method_kind: str, bands: ErrorBands | None = None
               ) -> tuple[BandCell | None, BandCell | None, str]:
    """(memory cell, time cell, what the residuals come from) for a setup: its GPU regime (one or several),
    task and method; ``bands`` defaults to the engine's band file, whose lookups are cached."""
    regime = 1 if n_gpus <= 1 else 2
    return (_lookup(bands, regime, task, method_kind) if bands is not None
            else _default_lookup(regime, task, method_kind))


def uncertainty(peak_bytes: float, fixed_bytes: float, device_bytes: float, step_s: float | None, n_gpus: int,
                task: str, method_kind: str, bands: ErrorBands | None = None,
                interval: Interval = DEFAULT_INTERVAL) -> Uncertainty | None:
    """The bands and P(OOM) of one estimate (None without a band file or a memory cell for the setup);
    ``bands`` defaults to the engine's band file, whose cell lookups are cached."""
    mc, tc, basis = band_cells(n_gpus, task, method_kind, bands)
    if mc is None:
        return None
    lo, hi = memory_band_bytes(peak_bytes, mc, interval, fixed_bytes)
    t_lo = t_hi = None
    if step_s is None:
        tc = None
    elif tc is not None:
        t_lo, t_hi = time_band_s(step_s, tc, interval)
    return Uncertainty(
        interval=interval, peak_memory_lo_bytes=lo, peak_memory_hi_bytes=hi,
        p_oom=oom_probability(peak_bytes, device_bytes, mc, fixed_bytes),
        memory_cell=mc.key, memory_n=mc.n, memory_bias_ratio=math.exp(mc.bias),
        step_time_lo_s=t_lo, step_time_hi_s=t_hi, time_cell=tc.key if tc else None, time_n=tc.n if tc else None,
        time_bias_ratio=math.exp(tc.bias) if tc else None, basis=basis,
    )
