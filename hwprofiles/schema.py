"""The schema of one device profile (``hwprofiles/devices/<name>.yaml``).

Hardware is data: every number lives in a YAML file next to a citation in ``sources``; this module
holds only structure, unit conversions and checks.  Conventions:

* units are in field names (``_GB`` decimal gigabytes as vendors market them, ``_bytes``, ``_GBps``
  = 10^9 B/s per direction, ``_W``, ``_tflops`` = 10^12 FLOP/s);
* every FLOP figure is **dense** (no 2:4 structured sparsity, which vendors quote at 2x);
* a profile describes one *software-visible* device, i.e. one ``torch.device("cuda", i)``
  (an MI250X module is two such devices, see ``devices_per_package``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._docstrings import DescribedFields

TERA = 10**12
"""TFLOPS -> FLOP/s."""
GIGA = 10**9
"""GB/s -> B/s."""
GIB = 1024**3
"""Bytes in a GiB."""

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"]
DTYPES: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")

Vendor = Literal["nvidia", "amd"]
Architecture = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell", "cdna2", "cdna3"]
AMD_ARCHITECTURES: frozenset[str] = frozenset({"cdna2", "cdna3"})
FormFactor = Literal["sxm", "pcie", "oam", "superchip"]
MemoryType = Literal["HBM2", "HBM2e", "HBM3", "HBM3e", "GDDR6", "GDDR6X", "GDDR7"]

PRICE_FIELD = "price_usd_per_hour"
"""The one numeric field whose citation is ``price_source`` instead of a ``sources`` entry."""


class _Strict(BaseModel):
    # validators built on first use: profiles that come from the disk cache are never validated again (15 ms of the
    # import)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, ignored_types=(DescribedFields,), defer_build=True)

    model_fields = DescribedFields()  # attribute docstrings as descriptions, parsed on first read


def _as_tuples(value: Any) -> Any:
    """YAML gives lists; the frozen models store tuples so that nothing inside them can change."""
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


class PeakTflops(_Strict):
    """Dense peak throughput per dtype in TFLOPS (TOPS for int8); ``null`` where the device has no such path."""

    fp32: float = Field(gt=0)
    """Non-tensor FP32 rate (CUDA cores / AMD vector units), dense TFLOPS."""
    tf32: float | None = Field(gt=0)
    """TF32 tensor-core rate (AMD: XF32/TF32 matrix), dense TFLOPS; null where there is no TF32 path (Volta, Turing, CDNA2)."""
    bf16: float | None = Field(gt=0)
    """BF16 tensor-core rate, dense TFLOPS; GeForce cards: the FP32-accumulate rate; null where bf16 has no tensor path (Volta, Turing)."""
    fp16: float = Field(gt=0)
    """FP16 tensor-core rate, dense TFLOPS; GeForce cards: the FP32-accumulate rate (half the FP16-accumulate figure)."""
    fp8: float | None = Field(gt=0)
    """FP8 tensor-core rate, dense TFLOPS (GeForce: FP32 accumulate); null where unsupported (pre-Ada, CDNA2)."""
    int8: float | None = Field(gt=0)
    """INT8 tensor-core rate, dense TOPS; null where no INT8 tensor path was found in the sources."""


def interp_clamped(x: float, xs: tuple[float, ...], ys: tuple[float, ...]) -> float:
    """Piecewise-linear interpolation of (xs, ys) at x, clamped to the end values (numpy.interp for one value)."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def _on_log_curve(x, curve: tuple[tuple[float, ...], tuple[float, ...]], base: int):
    """A curve stored as (log_base x, y) points, at ``x`` (scalar or array; below 1 read as 1): piecewise
    linear in log_base(x), clamped outside; a scalar without numpy (one call in an estimate's hot path)."""
    xs, ys = curve
    if isinstance(x, int | float):
        return interp_clamped((math.log10 if base == 10 else math.log2)(max(x, 1.0)), xs, ys)
    import numpy as np  # lazy: profiles load without numpy

    return np.interp((np.log10 if base == 10 else np.log2)(np.maximum(x, 1.0)), xs, ys)


AttentionKernel = Literal["flash1", "mem_efficient", "flash3"]
"""Fused attention kernels whose speed a device profile gives relative to FlashAttention-2."""


MATMUL_FRACTION_LIMIT = 1.25
"""Largest measured GEMM throughput / datasheet peak a profile may state: datasheet peaks assume the rated boost
clock, which GeForce boards exceed under load (RTX 5090: 239 of 209.5 TFLOPS bf16, rtx-5090-32gb.yaml)."""


class Efficiency(_Strict):
    """Achievable fractions of the peaks, used by the roofline (Calculon's ``gflops_efficiency`` / ``MB_efficiency``)."""

    matmul_max_fraction: float = Field(gt=0, le=MATMUL_FRACTION_LIMIT)
    """Best measured GEMM throughput / dense bf16 peak (large, well-shaped GEMMs).  Above 1 where the card sustains
    a boost clock above the one its datasheet peak is quoted at (GeForce boards)."""
    matmul_max_fraction_fp8: float | None = Field(gt=0, le=MATMUL_FRACTION_LIMIT)
    """Best measured FP8 GEMM throughput / dense fp8 peak; null = use ``matmul_max_fraction``."""
    matmul_curve: tuple[tuple[float, float], ...] = Field(min_length=2)
    """[flops_per_gemm, fraction of the max fraction] points, flops strictly increasing, fraction non-decreasing in (0, 1]; interpolated in log10(flops), clamped outside."""
    memory_bandwidth_fraction: float = Field(gt=0, le=1)
    """Achieved / peak memory bandwidth for streaming (memory-bound) kernels."""
    attention_fraction: float | None = Field(default=None, gt=0, le=1)
    """Fraction of the dense 16-bit peak a fused (flash / SDPA) attention kernel reaches on the FLOPs it
    performs (FlashAttention's count: causal halved, backward 2.5x the forward) at long sequences;
    null = the GEMM curve."""
    attention_curve: tuple[tuple[float, float], ...] | None = Field(default=None, min_length=2)
    """[tokens per sequence, fraction of ``attention_fraction``] points of the fused kernel (forward +
    backward, causal), tokens strictly increasing, fraction non-decreasing in (0, 1]; interpolated in
    log2(tokens), clamped outside; null = ``attention_fraction`` at every length."""
    attention_kernels: dict[AttentionKernel, tuple[tuple[float, float], ...]] = Field(default_factory=dict)
    """Speed of the other fused attention kernels relative to FlashAttention-2 (``attention_fraction`` x
    ``attention_curve``) on the same sequences: [tokens per sequence, speed ratio] points, tokens strictly
    increasing, interpolated in log2(tokens), clamped outside.  flash1 (FlashAttention 1) and mem_efficient
    (xformers' / SDPA's cutlass memory-efficient kernel) are forward + backward figures; flash3
    (FlashAttention-3, Hopper) is the forward's.  A kernel without a figure runs at FlashAttention-2's speed."""
    gptq_torch_dequant_fraction: float | None = Field(default=None, gt=0, le=1)
    """Rate at which AutoGPTQ's PyTorch dequantization (the path GPTQ fine-tuning takes) moves its bytes /
    the streaming rate (``memory_bandwidth_fraction``), from the micro suite's gptq dequant cases
    (``python -m validate calibrate``); null = the engine's default
    (``simulator.compute.GPTQ_TORCH_DEQUANT_BANDWIDTH_FRACTION``, fitted on published Q-LoRA steps)."""
    bnb_optimizer_fraction: float | None = Field(default=None, gt=0, le=1)
    """Rate at which bitsandbytes' 8-bit blockwise optimizer kernel (``AdamW8bit``: one 256-element block per
    thread block, each dequantizing, updating and requantizing both states) moves its bytes / the streaming rate
    (``memory_bandwidth_fraction``), from the micro suite's bnb-8bit adamw cases net of the step's per-tensor host
    time (``python -m validate calibrate``); null = the streaming rate."""
    host_transfer_fraction: float | None = Field(default=None, gt=0, le=1)
    """Measured pinned host<->device copy bandwidth for large copies / the host link figure of the device's
    one-GPU system (``host.host_to_gpu_bandwidth_GBps``), from the micro suite's h2d/d2h cases
    (``python -m validate calibrate``); null = the link figure as is."""

    @field_validator("matmul_curve", "attention_curve", mode="before")
    @classmethod
    def _curve_as_tuples(cls, value: Any) -> Any:
        return _as_tuples(value)

    @field_validator("attention_kernels", mode="before")
    @classmethod
    def _kernel_curves_as_tuples(cls, value: Any) -> Any:
        return {k: _as_tuples(v) for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("attention_kernels")
    @classmethod
    def _kernel_curves_valid(cls, curves: dict) -> dict:
        for kernel, curve in curves.items():
            xs = [x for x, _ in curve]
            if len(curve) < 2 or xs[0] <= 0 or any(b <= a for a, b in zip(xs, xs[1:])):
                raise ValueError(f"attention_kernels.{kernel}: at least two points with tokens positive and strictly "
                                 f"increasing, got {xs}")
            if any(not r > 0 for _, r in curve):
                raise ValueError(f"attention_kernels.{kernel}: speed ratios must be positive, got {[r for _, r in curve]}")
        return curves

    @field_validator("matmul_curve", "attention_curve")
    @classmethod
    def _curve_is_monotone(cls, curve: tuple[tuple[float, float], ...] | None, info: Any
                           ) -> tuple[tuple[float, float], ...] | None:
        if curve is None:
            return None
        xs = [x for x, _ in curve]
        fractions = [r for _, r in curve]
        what = "flops" if info.field_name == "matmul_curve" else "tokens"
        if xs[0] <= 0 or any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError(f"{info.field_name} {what} must be positive and strictly increasing, got {xs}")
        if any(not 0 < r <= 1 for r in fractions) or any(b < a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"{info.field_name} fractions must be in (0, 1] and non-decreasing, got {fractions}")
        return curve

    def max_fraction(self, dtype: str = "bf16") -> float:
        """Best achievable fraction of the dense peak of ``dtype``."""
        if dtype == "fp8" and self.matmul_max_fraction_fp8 is not None:
            return self.matmul_max_fraction_fp8
        return self.matmul_max_fraction

    @functools.cached_property
    def log_matmul_curve(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The curve as (log10 flops, fraction) tuples, computed once per profile."""
        return tuple(math.log10(f) for f, _ in self.matmul_curve), tuple(r for _, r in self.matmul_curve)

    def matmul_fraction(self, flops_per_gemm, dtype: str = "bf16"):
        """Achievable fraction of peak for a GEMM of ``flops_per_gemm`` FLOPs (scalar or array): the curve
        interpolated in log10(flops), clamped outside, times :meth:`max_fraction`."""
        out = _on_log_curve(flops_per_gemm, self.log_matmul_curve, 10) * self.max_fraction(dtype)
        if isinstance(flops_per_gemm, int | float):
            return out
        import numpy as np  # lazy: profiles load without numpy

        return float(out) if np.ndim(out) == 0 else out

    @functools.cached_property
    def _log_attention_curve(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The attention curve as (log2 tokens, fraction) tuples, computed once per profile."""
        if self.attention_curve is None:
            return None
        return tuple(math.log2(t) for t, _ in self.attention_curve), tuple(r for _, r in self.attention_curve)

    @functools.cached_property
    def _log_kernel_curves(self) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
        return {k: (tuple(math.log2(t) for t, _ in c), tuple(r for _, r in c)) for k, c in self.attention_kernels.items()}

    def attention_kernel_ratio(self, kernel: str, tokens, backward: bool = False):
        """Speed of ``kernel`` relative to FlashAttention-2 on sequences of ``tokens`` (scalar or array; the
        long-sequence end when None): 1 for flash2 and for a kernel without a figure, and for flash3's backward
        (its figure is the forward's)."""
        curve = self._log_kernel_curves.get(kernel)
        if curve is None or (backward and kernel == "flash3"):
            return 1.0
        if tokens is None:
            return curve[1][-1]
        return _on_log_curve(tokens, curve, 2)

    def attention_fraction_at(self, tokens):
        """Fraction of the dense 16-bit peak the fused attention kernel reaches on sequences of ``tokens``
        (scalar or array): :attr:`attention_fraction` times the curve interpolated in log2(tokens); None
        without an attention figure."""
        frac = self.attention_fraction
        curve = self._log_attention_curve
        if frac is None or curve is None or tokens is None:
            return frac
        return frac * _on_log_curve(tokens, curve, 2)


class _Profile(_Strict):
    """What a device and a system profile share: aliases read from YAML lists, and citations keyed by field path,
    with the price cited by ``price_source``.  Subclasses name their price field in ``_price_field``."""

    _price_field: ClassVar[str]

    @field_validator("aliases", mode="before", check_fields=False)
    @classmethod
    def _aliases_as_tuple(cls, value: Any) -> Any:
        return _as_tuples(value)

    def citation(self, path: str) -> str | None:
        """The citation of the field at ``path`` (``price_source`` for the price)."""
        if path == self._price_field and self.price_source:
            return self.price_source
        return self.sources.get(path)


class Device(_Profile):
    """One software-visible accelerator: memory, peaks, links, runtime overheads, efficiencies, price, citations."""

    _price_field: ClassVar[str] = PRICE_FIELD

    name: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    """Canonical lowercase name; equals the YAML file stem (``h100-sxm-80gb``)."""
    display_name: str = Field(min_length=1)
    """Human-readable product name."""
    vendor: Vendor
    """Vendor."""
    architecture: Architecture
    """GPU architecture generation."""
    compute_capability: str = Field(pattern=r"^(\d+\.\d+|gfx[0-9a-f]+)$")
    """CUDA compute capability (``"9.0"``) or the AMD gfx target (``"gfx942"``)."""
    form_factor: FormFactor
    """Board form factor: sxm, pcie, oam (AMD OAM module) or superchip (Grace-Blackwell board)."""
    devices_per_package: int = Field(ge=1)
    """Software-visible devices in one physical package (MI250X: 2 GCDs); every figure here is per visible device."""
    aliases: tuple[str, ...] = ()
    """Other names that resolve to this device (published-record names such as ``H100-SXM-80GB``)."""
    memory_type: MemoryType
    """Device memory technology."""
    memory_capacity_GB: float = Field(gt=0)
    """Marketed memory capacity in (vendor) GB, per visible device."""
    memory_total_bytes: int = Field(gt=0)
    """Total memory CUDA reports to PyTorch (``torch.cuda.get_device_properties().total_memory``, cudaMemGetInfo's
    total), bytes: what the CUDA context, the caching allocator and the libraries share.  nvidia-smi's
    ``memory.total`` can be larger (H100 SXM: 81,559 against 81,079.5 MiB; T4 with ECC on: 15,360 against 15,102)."""
    hbm_bandwidth_GBps: float = Field(gt=0)
    """Peak device-memory bandwidth (HBM or GDDR), GB/s."""
    peak_tflops: PeakTflops
    """Dense peak throughput per dtype."""
    tdp_W: float | None = Field(gt=0)
    """Board power limit (TDP/TBP), W; null if not found."""
    pcie_gen: int | None = Field(ge=1, le=6)
    """PCIe generation of the host link; null when the host link is not PCIe (GB200: NVLink-C2C)."""
    pcie_bandwidth_GBps: float | None = Field(gt=0)
    """Host PCIe x16 bandwidth per direction, GB/s."""
    interconnect: str = Field(min_length=1)
    """GPU-to-GPU link name (``NVLink4``, ``xGMI``, ``PCIe`` when there is no dedicated link)."""
    interconnect_bandwidth_GBps: float | None = Field(gt=0)
    """GPU-to-GPU bandwidth per direction per GPU, GB/s; null if none/unknown."""
    cuda_context_bytes: int = Field(ge=0)
    """Device memory taken by the CUDA/HIP context and loaded kernels, outside PyTorch's allocator, bytes."""
    cublas_workspace_bytes: int = Field(ge=0)
    """cuBLAS/hipBLAS workspace per (handle, stream), allocated through PyTorch's caching allocator and never freed, bytes."""
    cublaslt_workspace_bytes: int = Field(ge=0)
    """Extra cuBLASLt workspace beyond the cuBLAS one, bytes (0 with the unified workspace of recent PyTorch)."""
    efficiency: Efficiency
    """Achievable fractions of the peaks."""
    price_usd_per_hour: float | None = Field(gt=0)
    """On-demand price per device-hour, USD; null if no price was collected."""
    price_source: str | None
    """Where the price comes from (provider, listing); its citation."""
    price_date: str | None
    """When the price was read (``2026-03``) or a phrase saying it is not known."""
    sources: dict[str, str]
    """Citation per numeric field, keyed by field path (``hbm_bandwidth_GBps``, ``peak_tflops.bf16``)."""

    @model_validator(mode="after")
    def _consistent(self) -> Device:
        _check_vendor(self)
        _check_memory(self)
        _check_pcie(self)
        _check_price(self)
        _check_sources(self)
        return self

    # ---- helpers (pure, derived from the fields) ----

    def peak_flops(self, dtype: str) -> float:
        """Dense peak of ``dtype`` in FLOP/s (ops/s for int8); ValueError naming the allowed dtypes."""
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for peak_flops; allowed: {', '.join(DTYPES)}")
        tflops = getattr(self.peak_tflops, dtype)
        if tflops is None:
            raise ValueError(
                f"{self.name} has no {dtype} tensor path (peak_tflops.{dtype} is null); "
                f"supported: {', '.join(self.supported_dtypes)}"
            )
        return tflops * TERA

    @property
    def supported_dtypes(self) -> tuple[str, ...]:
        """Dtypes with a peak figure on this device."""
        return tuple(d for d in DTYPES if getattr(self.peak_tflops, d) is not None)

    @property
    def memory_bandwidth_Bps(self) -> float:
        """Peak device-memory bandwidth, B/s."""
        return self.hbm_bandwidth_GBps * GIGA

    @property
    def supports_fp8(self) -> bool:
        """True when the device has FP8 tensor cores."""
        return self.peak_tflops.fp8 is not None

    @property
    def supports_bf16(self) -> bool:
        """True when bf16 runs on tensor cores (False on Volta/Turing, where it is emulated or unsupported)."""
        return self.peak_tflops.bf16 is not None


# ---- validation pieces (each one rule, each error quotes the numbers) ----


def field_paths(model: BaseModel, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every field of ``model`` and its sub-models (``peak_tflops.bf16``)."""
    for field in type(model).__pydantic_fields__:  # not model_fields: no docstring parse in a validator
        value = getattr(model, field)
        if isinstance(value, BaseModel):
            yield from field_paths(value, f"{prefix}{field}.")
        elif isinstance(value, dict) and value and all(isinstance(v, tuple) for v in value.values()):
            # a mapping of curves (``efficiency.attention_kernels``): each entry is a field of its own
            yield from (f"{prefix}{field}.{key}" for key in value)
        else:
            yield f"{prefix}{field}"


def _is_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return isinstance(value, tuple) and bool(value) and all(_is_numeric(v) for v in value)


def _value_at(model: BaseModel, path: str) -> Any:
    value: Any = model
    for part in path.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def numeric_field_paths(model: BaseModel) -> list[str]:
    """Paths of the fields holding a number (or a curve of numbers) that is set (not null)."""
    return [p for p in field_paths(model) if p != "sources" and _is_numeric(_value_at(model, p))]


def _check_sources(device: Device) -> None:
    known = set(field_paths(device)) - {"sources"}
    unknown = sorted(set(device.sources) - known)
    if unknown:
        raise ValueError(f"sources has keys that name no field: {', '.join(unknown)}")
    empty = sorted(k for k, v in device.sources.items() if not v.strip())
    if empty:
        raise ValueError(f"sources has empty citations for: {', '.join(empty)}")
    missing = [p for p in numeric_field_paths(device) if not device.citation(p)]
    if missing:
        raise ValueError(f"numeric field(s) without a source: {', '.join(missing)} (add sources['<field path>'])")


def _check_vendor(device: Device) -> None:
    expected = "amd" if device.architecture in AMD_ARCHITECTURES else "nvidia"
    if device.vendor != expected:
        raise ValueError(f"architecture={device.architecture!r} is {expected}, not vendor={device.vendor!r}")


def _check_memory(device: Device) -> None:
    ceiling = device.memory_capacity_GB * GIB
    if device.memory_total_bytes > ceiling:
        raise ValueError(
            f"memory_total_bytes={device.memory_total_bytes} exceeds memory_capacity_GB={device.memory_capacity_GB} "
            f"read as GiB ({ceiling:.0f} B)"
        )


def _check_pcie(device: Device) -> None:
    if (device.pcie_gen is None) != (device.pcie_bandwidth_GBps is None):
        raise ValueError(
            f"pcie_gen={device.pcie_gen} and pcie_bandwidth_GBps={device.pcie_bandwidth_GBps} must be both set or both null"
        )


def _check_price(model: BaseModel, price_field: str = PRICE_FIELD) -> None:
    """The price, its source and its date come together or not at all."""
    names = (price_field, "price_source", "price_date")
    values = [getattr(model, n) for n in names]
    if any(v is not None for v in values) and not all(v is not None for v in values):
        raise ValueError(f"{', '.join(names[:2])} and {names[2]} must be all set or all null, got "
                         + ", ".join(repr(v) for v in values))


# =============================================================================================
# Systems: one node type (``hwprofiles/systems/<name>.yaml``)
# =============================================================================================
#
# A system is the unit that communication and cost are computed on: a node of ``gpus_per_node``
# devices of one kind, its GPU-to-GPU fabric, its network to other nodes (or none), its host
# (RAM, CPU, host link, NVMe) and its price and power.  GB200 NVL72 is one 72-GPU NVLink domain.
# Conventions as for devices: units in field names, ``_GBps`` = 10^9 B/s per direction,
# ``_Gbps`` = 10^9 bit/s (network line rates are marketed in bits), every number cited.

IntraNodeKind = Literal["nvswitch", "nvlink-p2p", "nvlink-bridge", "pcie", "xgmi"]
"""GPU-to-GPU fabric inside a node: NVSwitch (all-to-all NVLink), direct NVLink links (V100 hybrid
cube-mesh), an NVLink bridge between a pair of cards, PCIe (P2P or through host memory), AMD xGMI mesh."""

InterNodeTechnology = Literal["infiniband-edr", "infiniband-hdr", "infiniband-ndr", "roce", "efa", "ethernet"]
"""Network between nodes: InfiniBand HDR (200 Gb/s) / NDR (400 Gb/s), RoCE, AWS EFA, plain TCP Ethernet."""

HostLink = Literal["pcie", "nvlink-c2c"]
"""Host<->GPU link: PCIe, or NVLink-C2C on Grace superchips."""

SYSTEM_PRICE_FIELD = "price_usd_per_gpu_hour"
"""The one numeric field of a system whose citation is ``price_source`` instead of a ``sources`` entry."""


def _check_busbw_curve(curve: tuple[tuple[float, float], ...], field: str) -> None:
    """Sizes strictly increasing, busbw positive and non-decreasing, and the implied time
    ``S / busbw(S)`` non-decreasing (a bigger message never finishes sooner): busbw may not grow
    faster than the message size between two points."""
    sizes = [s for s, _ in curve]
    busbw = [b for _, b in curve]
    if sizes[0] <= 0 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"{field} message sizes must be positive and strictly increasing, got {sizes}")
    if busbw[0] <= 0 or any(b < a for a, b in zip(busbw, busbw[1:])):
        raise ValueError(f"{field} busbw must be positive and non-decreasing, got {busbw}")
    for (s1, b1), (s2, b2) in zip(curve, curve[1:]):
        if b2 / b1 > s2 / s1:
            raise ValueError(
                f"{field}: busbw grows from {b1} to {b2} GB/s while the size grows from {s1:g} to {s2:g} B, "
                f"so the larger message would finish sooner ({s2 / b2:g} < {s1 / b1:g} ns)"
            )


class IntraNodeFabric(_Strict):
    """The GPU-to-GPU fabric inside one node, with its measured NCCL efficiency."""

    kind: IntraNodeKind
    """Fabric topology: nvswitch, nvlink-p2p, nvlink-bridge, pcie or xgmi."""
    bandwidth_GBps: float = Field(gt=0)
    """Line rate per GPU per direction, GB/s (NVLink4: 450; the '900 GB/s' is bidirectional)."""
    latency_us: float = Field(gt=0)
    """Latency of one algorithm step (one hop of a ring or tree) of an NCCL/RCCL collective, microseconds."""
    busbw_curve: tuple[tuple[float, float], ...] = Field(min_length=2)
    """[message_bytes, achieved all-reduce busbw GB/s] at ``gpus_per_node`` ranks, nccl-tests conventions
    (default algorithm, NVLink SHARP where present); interpolated in log-log, clamped outside."""
    ring_busbw_GBps: float | None = Field(gt=0)
    """Large-message busbw of ring-based operations (all-gather, reduce-scatter, all-to-all, p2p) where it is
    below the all-reduce peak (NVLink SHARP all-reduce exceeds the wire rate); null = the curve's peak."""

    @field_validator("busbw_curve", mode="before")
    @classmethod
    def _curve_as_tuples(cls, value: Any) -> Any:
        return _as_tuples(value)

    @model_validator(mode="after")
    def _consistent(self) -> IntraNodeFabric:
        _check_busbw_curve(self.busbw_curve, "busbw_curve")
        if self.ring_busbw_GBps is not None and self.ring_busbw_GBps > self.peak_busbw_GBps:
            raise ValueError(
                f"ring_busbw_GBps={self.ring_busbw_GBps} exceeds the busbw_curve peak {self.peak_busbw_GBps} GB/s"
            )
        return self

    @property
    def peak_busbw_GBps(self) -> float:
        """Highest all-reduce busbw of the curve, GB/s."""
        return max(b for _, b in self.busbw_curve)

    @property
    def ring_fraction(self) -> float:
        """Ring-based operations' busbw / all-reduce busbw (1 without NVLink SHARP)."""
        return 1.0 if self.ring_busbw_GBps is None else self.ring_busbw_GBps / self.peak_busbw_GBps


class InterNodeFabric(_Strict):
    """The network between nodes: the node's NICs, their line rate and the fraction NCCL achieves."""

    technology: InterNodeTechnology
    """Network technology."""
    nics_per_node: int = Field(ge=1)
    """Compute-fabric NICs per node (storage/management NICs excluded)."""
    nic_bandwidth_Gbps: float = Field(gt=0)
    """Line rate of one NIC per direction, Gb/s (10^9 bit/s)."""
    latency_us: float = Field(gt=0)
    """Latency of one algorithm step across the network (NIC, switch, NCCL proxy), microseconds."""
    achieved_fraction: float = Field(gt=0, le=1)
    """nccl-tests busbw per NIC / NIC line rate for large messages."""

    @property
    def nic_achieved_Bps(self) -> float:
        """Achieved bandwidth of one NIC, B/s."""
        return self.nic_bandwidth_Gbps * GIGA / 8 * self.achieved_fraction

    @property
    def node_achieved_Bps(self) -> float:
        """Achieved bandwidth of all the node's NICs together, B/s."""
        return self.nics_per_node * self.nic_achieved_Bps


class HostSpec(_Strict):
    """The host side of a node: memory, CPU, host<->GPU link, local NVMe."""

    host_ram_GB: float | None = Field(gt=0)
    """Host DRAM of the node, GB; null if unknown."""
    cpu_cores: int | None = Field(ge=1)
    """Physical CPU cores of the node (cloud vCPUs / 2 where SMT is on); null if unknown."""
    link: HostLink
    """Host<->GPU link type."""
    pcie_gen: int | None = Field(ge=1, le=6)
    """PCIe generation of the host<->GPU link; null when the link is not PCIe."""
    host_to_gpu_bandwidth_GBps: float = Field(gt=0)
    """Host<->GPU bandwidth per GPU per direction, GB/s (each GPU has its own link)."""
    nvme_capacity_TB: float | None = Field(gt=0)
    """Local NVMe capacity usable for offload, TB; null when unknown or absent."""
    nvme_bandwidth_GBps: float | None = Field(gt=0)
    """Aggregate sequential NVMe bandwidth of the node, GB/s; null when the system has no NVMe figure for offload."""
    cpu_adam_params_per_s: float | None = Field(default=None, gt=0)
    """DeepSpeed CPU-Adam update throughput of the host, parameters/s; left out when no citable figure exists."""

    @model_validator(mode="after")
    def _consistent(self) -> HostSpec:
        if (self.link == "pcie") != (self.pcie_gen is not None):
            raise ValueError(f"link={self.link!r} and pcie_gen={self.pcie_gen}: pcie_gen is set exactly when the link is PCIe")
        return self


class System(_Profile):
    """One node type: ``gpus_per_node`` devices, intra- and inter-node fabric, host, price, power, citations."""

    _price_field: ClassVar[str] = SYSTEM_PRICE_FIELD

    name: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    """Canonical lowercase name; equals the YAML file stem (``dgx-h100``)."""
    display_name: str = Field(min_length=1)
    """Human-readable system name."""
    aliases: tuple[str, ...] = ()
    """Other names that resolve to this system (``DGX H100``, ``8xH100``)."""
    device: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$")
    """Canonical name of the device profile (``hwprofiles/devices/<device>.yaml``)."""
    gpus_per_node: int = Field(ge=1)
    """Devices in one node (one NVLink domain for NVL72: 72)."""
    intra_node: IntraNodeFabric
    """GPU-to-GPU fabric inside the node."""
    inter_node: InterNodeFabric | None
    """Network between nodes; null for single-node-only systems (workstations)."""
    host: HostSpec
    """Host memory, CPU, host link and NVMe."""
    price_usd_per_gpu_hour: float | None = Field(gt=0)
    """On-demand price per GPU-hour, USD; null if no price was collected."""
    price_source: str | None
    """Where the price comes from (provider, listing); its citation."""
    price_date: str | None
    """When the price was read (``2026-03``) or a phrase saying it is not known."""
    node_power_W: float | None = Field(gt=0)
    """Maximum power of the whole node including host, W (for kWh); null if not found."""
    derived: bool = False
    """True for a system synthesised from a device profile and the defaults, not read from the catalog."""
    notes: str | None = None
    """Caveats: what the figures assume, what could not be verified."""
    sources: dict[str, str]
    """Citation per numeric field, keyed by field path (``intra_node.busbw_curve``, ``host.host_ram_GB``)."""

    @model_validator(mode="after")
    def _consistent(self) -> System:
        _check_price(self, SYSTEM_PRICE_FIELD)
        _check_sources(self)  # type: ignore[arg-type]  # duck-typed: sources + citation()
        return self

    @property
    def multi_node(self) -> bool:
        """True when nodes of this system can be joined over a network."""
        return self.inter_node is not None

    @property
    def node_power_per_gpu_W(self) -> float | None:
        """Node power shared out per GPU (host included), W; null without a node figure."""
        return None if self.node_power_W is None else self.node_power_W / self.gpus_per_node

    @property
    def price_usd_per_node_hour(self) -> float | None:
        """On-demand price of the whole node per hour, USD."""
        return None if self.price_usd_per_gpu_hour is None else self.price_usd_per_gpu_hour * self.gpus_per_node


class SystemDefaults(_Strict):
    """Figures used to synthesise a system for a device that has no catalog system
    (``hwprofiles/systems/_defaults.yaml``)."""

    max_gpus_per_node: int = Field(ge=1)
    """GPUs per synthesised node; a larger request spans several such nodes."""
    fabric_by_interconnect: dict[str, IntraNodeKind]
    """Device ``interconnect`` value -> intra-node fabric kind."""
    fallback_fabric: IntraNodeKind
    """Fabric kind for an interconnect value not in the table."""
    fabric_max_gpus: dict[IntraNodeKind, int]
    """Largest node a fabric kind joins (an NVLink bridge pairs two cards); beyond it the node falls back to PCIe."""
    busbw_fraction: dict[IntraNodeKind, float]
    """Large-message busbw / line rate per fabric kind."""
    step_latency_us: dict[IntraNodeKind, float]
    """Per-step collective latency per fabric kind, microseconds."""
    curve_sizes_bytes: tuple[float, ...] = Field(min_length=2)
    """Message sizes of a synthesised busbw curve, bytes."""
    host_to_gpu_bandwidth_GBps: float = Field(gt=0)
    """Host<->GPU bandwidth per direction for a device whose profile has no PCIe figure, GB/s."""
    inter_node: InterNodeFabric
    """The network of a synthesised node."""
    sources: dict[str, str]
    """Citation per field path."""

    @field_validator("curve_sizes_bytes", mode="before")
    @classmethod
    def _sizes_as_tuple(cls, value: Any) -> Any:
        return _as_tuples(value)

    @model_validator(mode="after")
    def _consistent(self) -> SystemDefaults:
        for field in ("busbw_fraction", "step_latency_us"):
            table = getattr(self, field)
            missing = sorted(set(IntraNodeKind.__args__) - set(table))  # type: ignore[attr-defined]
            if missing:
                raise ValueError(f"{field} has no entry for fabric kind(s): {', '.join(missing)}")
            bad = {k: v for k, v in table.items() if v <= 0 or (field == "busbw_fraction" and v > 1)}
            if bad:
                raise ValueError(f"{field} values must be positive (fractions at most 1), got {bad}")
        known = set(field_paths(self)) - {"sources"}
        unknown = sorted(set(self.sources) - known)
        if unknown:
            raise ValueError(f"sources has keys that name no field: {', '.join(unknown)}")
        needed = set(numeric_field_paths(self)) | {"fabric_max_gpus", "busbw_fraction", "step_latency_us"}
        missing = sorted(p for p in needed if not self.sources.get(p, "").strip())
        if missing:
            raise ValueError(f"field(s) without a source: {', '.join(missing)} (add sources['<field path>'])")
        return self
