"""Fit a device's efficiencies from a micro-suite results file and write them into its profile YAML.

``python -m validate calibrate --results FILE [--device NAME] [--write]``: the measured micro cases
(:mod:`validate.micro`) give each field of :class:`hwprofiles.schema.Efficiency`:

* ``memory_bandwidth_fraction`` — median over the copy kernels of >= 64 MiB of achieved bytes/s / HBM peak;
* ``matmul_max_fraction`` — 90th percentile of achieved FLOP/s / dense peak over the large (>= 1e12 FLOPs,
  else the largest quarter) compute-bound 16-bit GEMMs;
* ``matmul_curve`` — achieved fraction of the compute-bound 16-bit GEMMs as a function of FLOPs per GEMM:
  a least-squares fit (relative residuals) of a curve piecewise linear in log10(FLOPs) with a point at every
  whole decade of the measured range (5-9 points for the GPU grid), made non-decreasing (pool-adjacent-
  violators) and divided by ``matmul_max_fraction``.  A GEMM is compute-bound when streaming its bytes at
  the fitted bandwidth takes less than half its measured time (decode GEMVs are not);
* ``matmul_max_fraction_fp8`` — as ``matmul_max_fraction`` over the fp8 GEMMs, against the fp8 peak;
* ``attention_fraction`` and ``attention_curve`` — per sequence length, the median over the flash
  forward+backward 16-bit SDPA cases of the FLOPs the kernel performs (halved under a causal mask, as
  ``simulator.compute.attention_time_s`` runs them) per second / dense 16-bit peak, made non-decreasing in
  length: the longest length's value is the fraction, each length's over it the curve;
* ``host_transfer_fraction`` — median over the pinned h2d and d2h copies of >= 64 MiB of achieved bytes/s /
  the host link figure of the device's one-GPU system (at most 1);
* ``gptq_torch_dequant_fraction`` — median over the gptq dequant cases (AutoGPTQ's PyTorch dequantization, the
  bytes the engine counts for it) of achieved bytes/s / the fitted streaming rate (at most 1);
* ``bnb_optimizer_fraction`` — median over the bnb-8bit adamw cases (bitsandbytes' ``AdamW8bit`` step) of the
  bytes the engine counts for it / (measured time - the step's per-tensor host time the engine adds after each
  kernel) / the fitted streaming rate (at most 1).

The profile's ``memory_total_bytes`` takes the fingerprint's ``total_memory`` (what CUDA reports to PyTorch on
the measured GPU itself) when the results were measured on the profile's own device.

A field without measurements keeps its value and its citation.  Each fitted field is cited with the
results file, its date and the machine's fingerprint (GPU, driver, torch, CUDA).  Only micro results are
fitted: end-to-end measurements are for scoring the engine, never for fitting it.

``--write`` rewrites only the ``efficiency:`` block, the ``memory_total_bytes`` line and the ``sources`` lines
of the fitted fields; every other line (comments included) stays as it was, and the new file must validate as
a :class:`Device`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from hwprofiles import Device
from hwprofiles.schema import GIGA, MATMUL_FRACTION_LIMIT, Efficiency

from .micro import MicroCase
from .schema import Measurement, ResultsFile

Rows = list[tuple[MicroCase, Measurement]]
"""The measured micro cases of a results file."""
Curve = tuple[tuple[float, float], ...]

MIN_STREAM_BYTES = 64 * 2**20
"""Copies (and transfers) at least this large measure the streaming bandwidth, not the launch latency."""
LARGE_GEMM_FLOPS = 1e12
"""GEMMs at least this large give the max fraction (fallback: the largest quarter of those measured)."""
MAX_FRACTION_QUANTILE = 0.9
COMPUTE_BOUND_SHARE = 0.5
"""A GEMM whose bytes at the fitted bandwidth take less than this share of its time is compute-bound."""
MAX_CURVE_POINTS = 9
MIN_CURVE_FRACTION = 1e-4
"""Curve points are clipped to [this, 1]: the schema wants fractions in (0, 1]."""
MIN_KNOT_WEIGHT = 0.5
"""A curve point needs this much interpolation weight from the measured GEMMs around it."""
SIXTEEN_BIT = ("bf16", "fp16")
CURVE_COMMENT = "# [flops_per_gemm, fraction of matmul_max_fraction]"
ATTENTION_CURVE_COMMENT = "# [tokens per sequence, fraction of attention_fraction]"


class CalibrationError(ValueError):
    """A results file that cannot calibrate the device asked for; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# which device, which measurements
# ---------------------------------------------------------------------------------------------


def check_fittable(results: ResultsFile, source: str = "results") -> None:
    """Refuse end-to-end and CPU results: only micro measurements on a GPU calibrate a GPU profile."""
    if results.suite == "e2e":
        raise CalibrationError(f"{source}: an end-to-end results file (suite 'e2e'); calibration fits only the "
                               "micro suite (end-to-end results score the engine, they are never fitted): run "
                               "'python -m validate run --suite micro' and calibrate from that file")
    if results.fingerprint.platform == "cpu":
        raise CalibrationError(f"{source}: measured on a CPU ({results.fingerprint.device_name}); a GPU profile "
                               "is calibrated from the micro suite run on that GPU (--device cuda --scale gpu)")


def resolve_device_name(results: ResultsFile, device: str | None, source: str = "results") -> tuple[str, str | None]:
    """The profile to calibrate: ``device`` when given, else the one the fingerprint names or matches.
    Returns (canonical name, a warning when ``device`` differs from the fingerprint's profile)."""
    from hwprofiles.registry import UnknownNameError, get_device

    from .harness import match_device_profile

    fp = results.fingerprint
    matched = fp.device_profile or match_device_profile(fp.device_name)
    if device is None:
        if matched is None:
            raise CalibrationError(f"{source}: the fingerprint's GPU {fp.device_name!r} matches no hwprofiles device "
                                   "(by name or alias); pass --device NAME to say which profile to calibrate")
        return get_device(matched).name, None
    try:
        name = get_device(device).name
    except UnknownNameError as e:
        raise CalibrationError(f"--device {device!r}: {e}") from None
    warning = None
    if matched is not None and get_device(matched).name != name:
        warning = f"the results were taken on {fp.device_name!r} (profile {matched!r}), calibrating {name!r} as asked"
    return name, warning


def micro_measurements(results: ResultsFile) -> Rows:
    """(MicroCase, Measurement) of every micro case measured ok, in file order."""
    return [(MicroCase.from_spec(c.kind, c.spec), c.measured) for c in results.cases
            if c.suite == "micro" and c.status == "ok" and c.measured is not None and c.measured.time_s]


def provenance(results: ResultsFile, source_name: str | None) -> str:
    """Where the fitted numbers come from: file, date, GPU, driver, torch, CUDA."""
    fp = results.fingerprint
    parts = [f"results {source_name}" if source_name else "a micro results file", results.created_utc[:10],
             fp.device_name, f"driver {fp.driver or '?'}", f"torch {fp.packages.get('torch') or '?'}",
             f"CUDA {fp.cuda or '?'}"]
    return "python -m validate calibrate from " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# fitting (pure)
# ---------------------------------------------------------------------------------------------


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [m for m, _, n in blocks for _ in range(n)]


def _hat_basis(log_x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """(points, knots) weights of piecewise-linear interpolation in log10(FLOPs), clamped outside (as
    ``Efficiency.matmul_fraction`` interpolates its curve)."""
    eye = np.eye(len(knots))
    return np.stack([np.interp(log_x, knots, eye[j]) for j in range(len(knots))], axis=1)


def _relative_least_squares(basis: np.ndarray, y: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Knot values ``v`` minimising the residuals relative to the fitted curve, sum(((B v - y) / B v)^2),
    by reweighted least squares.  Relative to the fit rather than to the measurement: a measurement far
    below the curve (an odd shape, a slow outlier) then weighs at most as much as one on it."""
    v, *_ = np.linalg.lstsq(basis, y, rcond=None)
    for _ in range(iterations):
        scale = np.maximum(basis @ v, 1e-3 * y)
        v, *_ = np.linalg.lstsq(basis / scale[:, None], y / scale, rcond=None)
    return v


def fit_log_curve(flops: list[float], fractions: list[float]) -> list[tuple[float, float]]:
    """Points (FLOPs, fraction) at whole decades of a curve piecewise linear in log10(FLOPs) fitted to the
    measurements by least squares on residuals relative to the curve, then made non-decreasing.  Decades with too little
    data near them are left out; at most :data:`MAX_CURVE_POINTS` points (every other decade beyond)."""
    log_x = np.log10(np.asarray(flops, dtype=float))
    y = np.asarray(fractions, dtype=float)
    lo, hi = math.floor(log_x.min()), math.ceil(log_x.max())
    step = 1
    while (hi - lo) // step + 1 > MAX_CURVE_POINTS:
        step += 1
    knots = np.arange(lo, hi + 1, step, dtype=float)
    while True:
        basis = _hat_basis(log_x, knots)
        support = basis.sum(axis=0)
        keep = support >= MIN_KNOT_WEIGHT
        if keep.sum() < 2:
            return []
        if keep.all():
            break
        knots = knots[keep]
    values = _relative_least_squares(basis, y)
    values = isotonic([float(v) for v in values], [float(s) for s in support])
    return [(float(10.0**k), v) for k, v in zip(knots, values)]


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=float), q))


def _large(rows: list[tuple[float, float]]) -> list[float]:
    """Fractions of the large GEMMs among (flops, fraction) rows."""
    large = [f for x, f in rows if x >= LARGE_GEMM_FLOPS]
    if len(large) >= 3:
        return large
    ordered = sorted(rows)
    return [f for _, f in ordered[-max(1, len(ordered) // 4):]]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _kind_medians(rows: Rows, kinds: tuple[str, ...], peak_Bps: float) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    for kind in kinds:
        # bitsandbytes' 8-bit step is not a streaming kernel: it has a field of its own (fit_bnb_optimizer)
        fr = [m.bytes_moved / m.time_s / peak_Bps for c, m in rows if c.kind == kind and m.bytes_moved
              and m.bytes_moved >= MIN_STREAM_BYTES and getattr(c.params, "impl", None) != "bnb-8bit"]
        if fr:
            out[kind] = (float(np.median(fr)), len(fr))
    return out


def fit_memory_bandwidth(rows: Rows, dev: Device) -> tuple[float, str] | None:
    """Median achieved / peak bandwidth of the large copies; the other memory-bound kinds are reported."""
    peak = dev.memory_bandwidth_Bps
    med = _kind_medians(rows, ("copy", "rmsnorm", "layernorm", "softmax", "cross_entropy", "adamw", "dequant"), peak)
    if "copy" not in med:
        return None
    value, n = med["copy"]
    others = "; ".join(f"{k} {_fmt(v)} ({c})" for k, (v, c) in med.items() if k != "copy")
    text = (f"median achieved/peak ({dev.hbm_bandwidth_GBps:g} GB/s) bandwidth of {n} copy kernels of >= 64 MiB: "
            f"{_fmt(value)}" + (f"; not fitted, same measure for {others}" if others else ""))
    return min(value, 1.0), text


def _gemm_rows(rows: Rows, dev: Device, dtypes: tuple[str, ...], mem_fraction: float) -> list[tuple[float, float]]:
    """(flops, achieved fraction of the dtype's peak) of the compute-bound GEMMs of ``dtypes``."""
    from simulator.compute import peak_flops

    bw = dev.memory_bandwidth_Bps * mem_fraction
    out = []
    for c, m in rows:
        if c.kind != "gemm" or c.params.dtype not in dtypes or not m.flops:
            continue
        if m.bytes_moved / bw >= COMPUTE_BOUND_SHARE * m.time_s:
            continue
        out.append((m.flops, m.flops / m.time_s / peak_flops(dev, c.params.dtype)))
    return out


def fit_matmul(rows: Rows, dev: Device, mem_fraction: float) -> tuple[float, Curve, str, str] | None:
    """(max fraction, curve, citation of the max, citation of the curve) from the 16-bit GEMMs."""
    gemms = _gemm_rows(rows, dev, SIXTEEN_BIT, mem_fraction)
    if len(gemms) < 2:
        return None
    large = _large(gemms)
    max_fraction = min(MATMUL_FRACTION_LIMIT, _quantile(large, MAX_FRACTION_QUANTILE))
    points = fit_log_curve([x for x, _ in gemms], [f for _, f in gemms])
    if len(points) < 2:
        return None
    curve = tuple((x, min(1.0, max(MIN_CURVE_FRACTION, v / max_fraction))) for x, v in points)
    lo, hi = min(x for x, _ in gemms), max(x for x, _ in gemms)
    max_text = (f"90th percentile of achieved/dense peak over {len(large)} large compute-bound 16-bit GEMMs "
                f"(torch.mm): {_fmt(max_fraction)}")
    curve_text = (f"fitted to {len(gemms)} compute-bound 16-bit GEMMs of {lo:.2g}-{hi:.2g} FLOPs (torch.mm): "
                  "least squares on relative residuals, piecewise linear in log10(FLOPs) with points at whole "
                  "decades, made non-decreasing, divided by matmul_max_fraction")
    return max_fraction, curve, max_text, curve_text


def fit_matmul_fp8(rows: Rows, dev: Device, mem_fraction: float) -> tuple[float, str] | None:
    """90th percentile of achieved / fp8 peak over the large fp8 GEMMs."""
    if dev.peak_tflops.fp8 is None:
        return None
    gemms = _gemm_rows(rows, dev, ("fp8",), mem_fraction)
    if not gemms:
        return None
    large = _large(gemms)
    value = min(MATMUL_FRACTION_LIMIT, _quantile(large, MAX_FRACTION_QUANTILE))
    return value, (f"90th percentile of achieved/dense fp8 peak over {len(large)} large fp8 GEMMs "
                   f"(torch._scaled_mm, e4m3, per-tensor scales, fast accumulation): {_fmt(value)}")


def _sdpa_fractions(rows: Rows, dev: Device, backend: str) -> dict[int, list[float]]:
    """Per sequence length, the achieved FLOP/s / dense 16-bit peak of the forward+backward 16-bit SDPA cases
    of ``backend``."""
    from simulator.compute import peak_flops

    by_seq: dict[int, list[float]] = {}
    for c, m in rows:
        if (c.kind == "sdpa" and c.params.backend == backend and c.params.backward and c.params.dtype in SIXTEEN_BIT
                and m.flops):
            by_seq.setdefault(c.params.seq, []).append(m.flops / m.time_s / peak_flops(dev, c.params.dtype))
    return by_seq


def fit_attention(rows: Rows, dev: Device) -> tuple[float, Curve | None, str, str] | None:
    """The fused kernel's long-sequence fraction and its curve over sequence length: per length, the median
    over the flash forward+backward 16-bit SDPA cases of performed FLOP/s / dense 16-bit peak, made
    non-decreasing (pool adjacent violators); the plateau is the last point, the curve each point over it
    (None from cases of one length)."""
    by_seq = _sdpa_fractions(rows, dev, "flash")
    if not by_seq:
        return None
    seqs = sorted(by_seq)
    medians = isotonic([float(np.median(by_seq[s])) for s in seqs], [len(by_seq[s]) for s in seqs])
    plateau = min(1.0, medians[-1])
    n = sum(len(v) for v in by_seq.values())
    everything = [f for v in by_seq.values() for f in v]
    text = (f"flash SDPA forward+backward cases (16-bit, FLOPs as FlashAttention counts them, halved when causal): "
            f"median achieved/dense 16-bit peak at the longest length ({seqs[-1]} tokens, after making the medians "
            f"non-decreasing in length) {_fmt(plateau)} over {n} cases (range {_fmt(min(everything))}-"
            f"{_fmt(max(everything))})")
    if len(seqs) < 2:
        return plateau, None, text, ""
    curve = tuple((float(s), min(1.0, m / medians[-1])) for s, m in zip(seqs, medians))
    curve_text = ("median per length over the same cases / the longest length's: "
                  + ", ".join(f"{s}: {_fmt(r)}" for s, r in curve))
    return plateau, curve, text, curve_text


KERNELS_COMMENT = "# [tokens per sequence, speed relative to FlashAttention-2]"


def fit_mem_efficient(rows: Rows, dev: Device) -> tuple[Curve, str] | None:
    """SDPA's memory-efficient kernel relative to its flash kernel: per length, the median achieved FLOP/s of
    the efficient forward+backward 16-bit cases over the flash ones' (None without both at two lengths)."""
    rate = {backend: _sdpa_fractions(rows, dev, backend) for backend in ("flash", "efficient")}
    seqs = sorted(set(rate["flash"]) & set(rate["efficient"]))
    if len(seqs) < 2:
        return None
    curve = tuple((float(s), float(np.median(rate["efficient"][s]) / np.median(rate["flash"][s]))) for s in seqs)
    n = sum(len(rate["efficient"][s]) for s in seqs)
    return curve, ("efficient SDPA forward+backward cases (16-bit) over the flash ones of the same lengths, median "
                   f"achieved FLOP/s per length ({n} cases): " + ", ".join(f"{int(s)}: {_fmt(r)}" for s, r in curve))


def fit_host_transfer(rows: Rows, dev: Device) -> tuple[float, str] | None:
    """Median achieved bandwidth of large pinned copies / the host link figure of the one-GPU system."""
    from hwprofiles.registry import system_for

    rates = [m.bytes_moved / m.time_s for c, m in rows if c.kind in ("h2d", "d2h") and c.params.pinned
             and c.params.size_bytes >= MIN_STREAM_BYTES]
    if not rates:
        return None
    link_GBps = system_for(dev.name, 1).host.host_to_gpu_bandwidth_GBps
    measured_GBps = float(np.median(rates)) / GIGA
    value = min(1.0, measured_GBps / link_GBps)
    capped = " (capped at 1: the link figure is below the measurement)" if measured_GBps > link_GBps else ""
    return value, (f"median pinned h2d/d2h bandwidth over {len(rates)} copies of >= 64 MiB: {measured_GBps:.1f} GB/s "
                   f"/ host link {link_GBps:g} GB/s = {_fmt(value)}{capped}")


def _share_of_streaming(rates: list[float], dev: Device, mem_fraction: float, what: str) -> tuple[float, str] | None:
    """Median of ``rates`` (bytes/s) / the streaming rate, at most 1, and its citation (``what``: the cases)."""
    if not rates:
        return None
    median, stream = float(np.median(rates)), dev.memory_bandwidth_Bps * mem_fraction
    value = min(1.0, median / stream)
    return value, (f"median bandwidth of {len(rates)} {what}: {median / GIGA:.0f} GB/s / streaming {stream / GIGA:.0f} "
                   f"GB/s = {_fmt(value)}")


def fit_bnb_optimizer(rows: Rows, dev: Device, mem_fraction: float) -> tuple[float, str] | None:
    """Median achieved bandwidth of bitsandbytes' 8-bit AdamW kernels (the step's time less its per-tensor host
    time) / the streaming rate."""
    from .micro import bnb_step_host_s

    kernels = [(m.bytes_moved, m.time_s - bnb_step_host_s(c.params)) for c, m in rows
               if c.kind == "adamw" and c.params.impl == "bnb-8bit" and m.bytes_moved]
    return _share_of_streaming([b / t for b, t in kernels if t > 0], dev, mem_fraction,
                               "bitsandbytes AdamW8bit steps, less their per-tensor host time")


def fit_gptq_dequant(rows: Rows, dev: Device, mem_fraction: float) -> tuple[float, str] | None:
    """Median achieved bandwidth of AutoGPTQ's PyTorch dequantization / the streaming rate."""
    rates = [m.bytes_moved / m.time_s for c, m in rows if c.kind == "dequant" and c.params.quant == "gptq"
             and m.bytes_moved]
    return _share_of_streaming(rates, dev, mem_fraction, "gptq PyTorch dequantizations")


def fit_efficiency(results: ResultsFile, device: Device, source_name: str | None = None
                   ) -> tuple[Efficiency, dict[str, str]]:
    """The device's efficiencies fitted from the micro cases of ``results`` and the citation of each fitted
    field (keyed ``efficiency.<field>``); fields without measurements keep their values."""
    check_fittable(results, source_name or "results")
    rows = micro_measurements(results)
    if not rows:
        raise CalibrationError(f"{source_name or 'results'}: no micro case was measured ok; nothing to fit")
    old = device.efficiency
    new: dict[str, object] = {}
    text: dict[str, str] = {}
    mem = fit_memory_bandwidth(rows, device)
    if mem is not None:
        new["memory_bandwidth_fraction"], text["memory_bandwidth_fraction"] = mem
    mem_fraction = new.get("memory_bandwidth_fraction", old.memory_bandwidth_fraction)
    mm = fit_matmul(rows, device, mem_fraction)
    if mm is not None:
        new["matmul_max_fraction"], new["matmul_curve"], text["matmul_max_fraction"], text["matmul_curve"] = mm
    att = fit_attention(rows, device)
    if att is not None:
        new["attention_fraction"], curve, text["attention_fraction"], curve_text = att
        if curve is not None:
            new["attention_curve"], text["attention_curve"] = curve, curve_text
    for field, fit in (("matmul_max_fraction_fp8", fit_matmul_fp8(rows, device, mem_fraction)),
                       ("host_transfer_fraction", fit_host_transfer(rows, device)),
                       ("gptq_torch_dequant_fraction", fit_gptq_dequant(rows, device, mem_fraction)),
                       ("bnb_optimizer_fraction", fit_bnb_optimizer(rows, device, mem_fraction))):
        if fit is not None:
            new[field], text[field] = fit
    eff_kernel = fit_mem_efficient(rows, device)
    if eff_kernel is not None:  # the other kernels (FlashAttention 1 / 3) are not in the micro suite: kept
        new["attention_kernels"] = {**old.attention_kernels, "mem_efficient": eff_kernel[0]}
        text["attention_kernels.mem_efficient"] = eff_kernel[1]
    where = provenance(results, source_name)
    rounded = {k: _round(v) for k, v in new.items()}
    eff = Efficiency.model_validate({**old.model_dump(), **rounded})
    return eff, {f"efficiency.{k}": f"{v}; {where}" for k, v in text.items()}


def _round(value):
    if isinstance(value, dict):  # kernel curves: the lengths are exact, the ratios rounded
        return {k: tuple((x, _round(r)) for x, r in v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_round(v) for v in value)
    return float(f"{value:.4g}")


# ---------------------------------------------------------------------------------------------
# the table and the YAML
# ---------------------------------------------------------------------------------------------


def _show(value: float | None) -> str:
    return "null" if value is None else f"{value:.4g}"


def format_diff(old: Efficiency, new: Efficiency, sources: dict[str, str]) -> str:
    """old -> new for every field of the efficiency block, curve point by point."""
    lines = [f"{'field':<28} {'old':>12} {'new':>12}  fitted"]
    for field in type(old).model_fields:
        a, b = getattr(old, field), getattr(new, field)
        fitted = "yes" if f"efficiency.{field}" in sources else "kept"
        if field == "matmul_curve":
            lines.append(f"{field:<28} {'':>12} {'':>12}  {fitted}")
            old_at = dict(a)
            for x, v in b:
                was = old.matmul_fraction(x) / old.matmul_max_fraction
                mark = "" if x in old_at else " (interpolated)"
                lines.append(f"  {x:<26.3g} {was:>12.4g} {v:>12.4g}{mark}")
            continue
        if field == "attention_curve":
            lines.append(f"{field:<28} {'':>12} {'':>12}  {fitted}")
            for x, v in b or ():
                was = (old.attention_fraction_at(x) / old.attention_fraction) if old.attention_fraction else math.nan
                lines.append(f"  {int(x):<26} {was:>12.4g} {v:>12.4g}")
            continue
        if field == "attention_kernels":
            for kernel, curve in b.items():
                done = "yes" if f"efficiency.{field}.{kernel}" in sources else "kept"
                lines.append(f"{field + '.' + kernel:<28} {'':>12} {'':>12}  {done}")
                for x, v in curve:
                    lines.append(f"  {int(x):<26} {old.attention_kernel_ratio(kernel, x):>12.4g} {v:>12.4g}")
            continue
        lines.append(f"{field:<28} {_show(a):>12} {_show(b):>12}  {fitted}")
    return "\n".join(lines)


def yaml_float(x: float) -> str:
    """A float PyYAML reads back as a float: four significant digits, always a '.' in the mantissa and a
    signed exponent (``1.0e+7``, ``0.8033``)."""
    s = f"{x:.4g}"
    mantissa, _, exponent = s.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + (f"e{exponent[0]}{int(exponent[1:])}" if exponent else "")


def render_efficiency_block(eff: Efficiency) -> list[str]:
    """The ``efficiency:`` block as the profiles write it (optional fields left out when null)."""
    out = ["efficiency:"]
    for field in type(eff).model_fields:
        value = getattr(eff, field)
        if field == "matmul_curve":
            out.append(f"  matmul_curve:  {CURVE_COMMENT}")
            out += [f"    - [{yaml_float(x)}, {yaml_float(v)}]" for x, v in value]
        elif field == "attention_curve" and value is not None:
            out.append(f"  attention_curve:  {ATTENTION_CURVE_COMMENT}")
            out += [f"    - [{int(x)}, {yaml_float(v)}]" for x, v in value]
        elif field == "attention_kernels":
            if value:
                out.append(f"  attention_kernels:  {KERNELS_COMMENT}")
                for kernel, curve in value.items():
                    out.append(f"    {kernel}:")
                    out += [f"      - [{int(x)}, {yaml_float(v)}]" for x, v in curve]
        elif value is None:
            if field == "matmul_max_fraction_fp8":
                out.append(f"  {field}: null")
        else:
            out.append(f"  {field}: {yaml_float(value)}")
    return out


def _block_end(lines: list[str], start: int) -> int:
    """Index after the last line of the top-level block opened at ``start`` (trailing blank lines excluded)."""
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t"):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return end


def _top_level(lines: list[str], key: str, where: str) -> int:
    hits = [i for i, ln in enumerate(lines) if re.match(rf"{key}:(\s|$)", ln)]
    if len(hits) != 1:
        raise CalibrationError(f"{where}: expected one top-level '{key}:' line, found {len(hits)}")
    return hits[0]


def fit_memory_total(results: ResultsFile, source_name: str | None = None) -> tuple[int, str] | None:
    """(bytes, citation) of the GPU's ``total_memory`` as the results' fingerprint read it, or None."""
    fp = results.fingerprint
    if not fp.memory_total_bytes:
        return None
    mib = fp.memory_total_bytes / 2**20
    return fp.memory_total_bytes, (
        f"torch.cuda.get_device_properties().total_memory (cudaMemGetInfo's total: what the CUDA context and the "
        f"caching allocator share) measured on {fp.device_name}: {fp.memory_total_bytes:,} B = {mib:,.1f} MiB; "
        f"{provenance(results, source_name)}")


def rewrite_efficiency_yaml(text: str, eff: Efficiency, sources: dict[str, str], where: str = "profile",
                            memory_total_bytes: int | None = None) -> str:
    """``text`` with its ``efficiency:`` block replaced by ``eff`` (and its ``memory_total_bytes`` line by the
    measured value when given) and the ``sources`` lines of ``sources`` replaced (or added after the other
    ``efficiency.`` citations); every other line unchanged.  The result must validate as a :class:`Device`."""
    import yaml

    lines = text.splitlines()
    start = _top_level(lines, "efficiency", where)
    lines[start:_block_end(lines, start)] = render_efficiency_block(eff)
    if memory_total_bytes is not None:
        lines[_top_level(lines, "memory_total_bytes", where)] = f"memory_total_bytes: {memory_total_bytes}"
    src = _top_level(lines, "sources", where)
    end = _block_end(lines, src)
    for key, cite in sources.items():
        entry = f"  {key}: {json.dumps(cite, ensure_ascii=False)}"
        hit = [i for i in range(src + 1, end) if lines[i].startswith(f"  {key}:")]
        if hit:
            lines[hit[0]] = entry
            continue
        ours = [i for i in range(src + 1, end) if lines[i].startswith("  efficiency.")]
        at = (ours[-1] + 1) if ours else end
        lines.insert(at, entry)
        end += 1
    out = "\n".join(lines) + ("\n" if text.endswith("\n") else "")
    try:
        Device.model_validate(yaml.safe_load(out))
    except Exception as e:  # noqa: BLE001 - any failure means the file must not be written
        raise CalibrationError(f"{where}: the rewritten profile does not validate: {e}") from None
    return out


def calibrate(results_path: str | Path, device: str | None = None, yaml_path: str | Path | None = None,
              write: bool = False) -> tuple[str, Path | None]:
    """Fit the device of ``results_path`` (or ``device``) and report old -> new; with ``write``, rewrite its
    profile (``yaml_path``, default the catalog file).  Returns (report, path written or None)."""
    from hwprofiles.registry import DEVICES_DIR, get_device, load_device_file

    from .schema import load_results

    path = Path(results_path)
    results = load_results(path)
    check_fittable(results, str(path))
    name, warning = resolve_device_name(results, device, str(path))
    target = Path(yaml_path) if yaml_path is not None else DEVICES_DIR / f"{name}.yaml"
    dev = load_device_file(target) if yaml_path is not None else get_device(name)
    if dev.name != name:
        raise CalibrationError(f"{target}: profile {dev.name!r}, but the results calibrate {name!r} "
                               "(pass --device to choose)")
    eff, sources = fit_efficiency(results, dev, path.name)
    report = [f"calibrating {name} from {path.name} ({results.fingerprint.device_name})"]
    if warning:
        report.append(f"warning: {warning}")
    report.append(format_diff(dev.efficiency, eff, sources))
    # the card's memory is a reading, not a fit: taken only from the profile's own GPU
    memory = None if warning else fit_memory_total(results, path.name)
    if memory is not None:
        report.append(f"{'memory_total_bytes':<28} {dev.memory_total_bytes:>12} {memory[0]:>12}  measured")
        sources = {**sources, "memory_total_bytes": memory[1]}
    written = None
    if write:
        target.write_text(rewrite_efficiency_yaml(target.read_text(), eff, sources, str(target),
                                                  memory[0] if memory is not None else None))
        written = target
        report.append(f"wrote {target}")
    else:
        report.append(f"dry run: --write rewrites the efficiency block of {target}")
    return "\n".join(report), written
