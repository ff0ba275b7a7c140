"""Byte sizes of dtypes, binary/decimal units and formatting.

One table for every dtype the engine knows.  Sub-byte types are fractions
(int4 = 0.5 B) -- never integer division (``4 // 8 == 0`` is the classic bug).
"""

from __future__ import annotations

from typing import Literal

Dtype = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "uint8", "int4", "nf4", "fp4", "int32", "int64", "bool"]

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "tf32": 4.0,  # stored as fp32; tf32 is a compute mode
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "uint8": 1.0,
    "bool": 1.0,
    "int4": 0.5,
    "nf4": 0.5,
    "fp4": 0.5,
    "int32": 4.0,
    "int64": 8.0,
}

KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 10**9
MB = 10**6


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype`` (fractions for sub-byte types)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_BYTES)}") from None


def to_gib(n_bytes: float) -> float:
    return n_bytes / GiB


def fmt_bytes(n_bytes: float) -> str:
    """Human readable binary size: '1.50 GiB', '512.0 MiB'."""
    n = float(n_bytes)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n:.0f} B"


def fmt_count(n: float) -> str:
    """1.23B, 45.6M, 7.0K."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def fmt_flops(n: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def last_true(ok, lo: int, hi: int) -> int:
    """Largest x in [lo, hi) with ``ok(x)``, by bisection, given ``ok(lo)`` and not ``ok(hi)`` for a property
    that, once lost, stays lost as x grows (memory and time only grow with a batch or a length)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo

