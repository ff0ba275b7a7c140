"""Measurement primitives shared by the suites: the machine's fingerprint, timing and peak memory.

* :func:`fingerprint` — GPU name and count, SMs, memory, clocks, driver, CUDA, package versions, and
  the hwprofiles device the GPU matches (by name or alias), so a results file says what it was taken on.
* :func:`time_repeats_s` — warm-up calls, then each repeat timed on its own: CUDA events around the call
  on a GPU (what the GPU spent, without host jitter after the launch), ``perf_counter`` plus a
  synchronisation on CPU.
* :class:`PeakMemory` — empties the allocator cache, resets the peak statistics and records the baseline
  (what is allocated before the case), then reads ``max_memory_allocated`` / ``max_memory_reserved`` and
  subtracts the baseline; with it, what the caching allocator did (:func:`allocator_summary`: cudaMalloc
  calls, retries, segments and their sizes).  On CPU it records nothing (torch keeps no CPU peak statistics).
* :func:`is_oom` — an out-of-memory error of any allocator, recorded as data rather than a failure.

torch is imported inside the functions: ``validate.harness`` imports without it.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .schema import Fingerprint

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "numpy", "flash-attn")
"""Packages whose versions a fingerprint records (their kernels run in the suites)."""


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None where it is missing."""
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_state() -> tuple[str | None, bool]:
    """(HEAD commit of this checkout, whether tracked files differ from it); (None, False) outside a git
    checkout or without git."""
    root = str(Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, dirty


def fitsim_commit() -> str | None:
    """The git commit of this checkout (None outside a git checkout or without git)."""
    return git_state()[0]


def match_device_profile(device_name: str) -> str | None:
    """The hwprofiles device whose name or alias is ``device_name`` (e.g. 'NVIDIA H100 80GB HBM3' ->
    'h100-sxm-80gb'); None when no profile claims it exactly."""
    from hwprofiles.registry import UnknownNameError, get_device

    try:
        return get_device(device_name).name
    except UnknownNameError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(fields: str) -> list[str] | None:
    """One GPU's values for ``--query-gpu=fields`` (the first GPU), None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]


def _num(text: str | None, cast: Callable[[str], Any]) -> Any:
    try:
        return cast(text) if text not in (None, "", "[N/A]", "N/A") else None
    except ValueError:
        return None


def fingerprint(device: str = "cuda", profile: str | None = None) -> Fingerprint:
    """What this process measures on: ``device`` 'cuda' (the first GPU) or 'cpu'.  ``profile`` overrides
    the hwprofiles device matched from the GPU's name."""
    import torch

    common = dict(python=platform.python_version(), packages=package_versions(), fitsim_commit=fitsim_commit(),
                  cpu=_cpu_model(), cpu_count=os.cpu_count())
    if device == "cpu":
        return Fingerprint(platform="cpu", device_name=_cpu_model(), device_count=0, device_profile=profile,
                           **common)
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no GPU (torch.cuda.is_available() is False); "
                           "run with --device cpu for the CPU path")
    props = torch.cuda.get_device_properties(0)
    smi = _nvidia_smi("driver_version,clocks.max.sm,clocks.max.mem,power.limit") or [None] * 4
    return Fingerprint(
        platform="rocm" if getattr(torch.version, "hip", None) else "cuda",
        device_name=props.name,
        device_count=torch.cuda.device_count(),
        device_profile=profile or match_device_profile(props.name),
        sm_count=props.multi_processor_count,
        memory_total_bytes=props.total_memory,
        sm_clock_max_mhz=_num(smi[1], int),
        mem_clock_max_mhz=_num(smi[2], int),
        power_limit_w=_num(smi[3], float),
        driver=smi[0],
        cuda=torch.version.cuda or getattr(torch.version, "hip", None),
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **common,
    )


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def time_repeats_s(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed on its own; seconds."""
    import torch

    for _ in range(warmup):
        fn()
    synchronize(device)
    out: list[float] = []
    if device == "cpu":
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def median_s(samples: list[float]) -> float:
    """Median of the timed repeats."""
    return statistics.median(samples)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.allocated_peak_bytes`` / ``pm.reserved_peak_bytes``
    (peaks during the block minus the allocated / reserved baseline at its start; None on CPU).

    Entering frees what Python no longer references and empties the caching allocator, so the reserved
    peak is that of the block alone."""

    def __init__(self, device: str):
        self.device = device
        self.baseline_allocated_bytes: int | None = None
        self.baseline_reserved_bytes: int | None = None
        self.allocated_peak_bytes: int | None = None
        self.reserved_peak_bytes: int | None = None
        self.allocator: dict[str, float] = {}
        self.segment_bytes: tuple[int, ...] = ()

    def __enter__(self) -> "PeakMemory":
        if self.device == "cpu":
            return self
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.baseline_allocated_bytes = torch.cuda.memory_allocated()
        self.baseline_reserved_bytes = torch.cuda.memory_reserved()
        return self

    def restart(self) -> None:
        """Start the peak over (after building the model): frees cached blocks of the set-up and resets the
        peak statistics to what is allocated now; the baseline stays that of :meth:`__enter__`."""
        if self.device == "cpu":
            return
        import torch

        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def read(self) -> None:
        """Record the peaks so far (also called on exit, and before an OOM's clean-up)."""
        if self.device == "cpu":
            return
        import torch

        torch.cuda.synchronize()
        self.allocated_peak_bytes = torch.cuda.max_memory_allocated() - self.baseline_allocated_bytes
        self.reserved_peak_bytes = torch.cuda.max_memory_reserved() - self.baseline_reserved_bytes
        self.allocator, self.segment_bytes = allocator_summary(torch.cuda.memory_stats(),
                                                               torch.cuda.memory_snapshot())

    def __exit__(self, *exc: object) -> None:
        try:
            self.read()
        except Exception:  # the device may be unusable after an error; the exception in flight is what matters
            pass


# the largest segments a measurement keeps (all of them on the grid's cases, a few dozen)
MAX_SEGMENTS = 64


def allocator_summary(stats: dict[str, Any], snapshot: list[dict[str, Any]]) -> tuple[dict[str, float], tuple[int, ...]]:
    """What the caching allocator did since the last reset, from ``torch.cuda.memory_stats()`` and
    ``torch.cuda.memory_snapshot()``: (counters for ``Measurement.extra``, the large-pool segment sizes
    largest first).  Nothing is freed to the driver during a case, so the segments left at its end are every
    segment it created: their sizes say which requests could not reuse a cached block."""
    counters = {
        "allocator_device_mallocs": float(stats.get("num_device_alloc", 0)),
        "allocator_alloc_retries": float(stats.get("num_alloc_retries", 0)),
        "allocator_segments_peak": float(stats.get("segment.all.peak", 0)),
        "allocator_inactive_split_peak_bytes": float(stats.get("inactive_split_bytes.all.peak", 0)),
    }
    large = sorted((int(seg["total_size"]) for seg in snapshot if seg.get("segment_type") == "large"), reverse=True)
    small = [int(seg["total_size"]) for seg in snapshot if seg.get("segment_type") != "large"]
    counters["allocator_large_segments"] = float(len(large))
    counters["allocator_small_segment_bytes"] = float(sum(small))
    counters["allocator_unlisted_segment_bytes"] = float(sum(large[MAX_SEGMENTS:]))
    return counters, tuple(large[:MAX_SEGMENTS])


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error of the CUDA / ROCm caching allocator (or an allocation that the
    host could not satisfy)."""
    try:
        import torch

        if isinstance(err, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(err).lower()
    return isinstance(err, (MemoryError, RuntimeError)) and ("out of memory" in text or "cuda error: out of memory"
                                                            in text)


def free_device_memory(device: str) -> None:
    """Drop cached blocks after a case so the next one starts from an empty allocator."""
    gc.collect()
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
