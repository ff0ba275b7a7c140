"""Money and energy from time: one small function per quantity, prices and power from the profiles."""

from __future__ import annotations

HOUR_S = 3600.0
J_PER_KWH = 3.6e6


def run_cost_usd(time_s: float, n_gpus: int, usd_per_gpu_hour: float) -> float:
    """On-demand cost of holding ``n_gpus`` for ``time_s``."""
    return time_s / HOUR_S * n_gpus * usd_per_gpu_hour


def energy_kwh(time_s: float, n_gpus: int, watts_per_gpu: float) -> float:
    """Energy at the given power per GPU (node power shared per GPU where the system states it, host
    included; else the board power limit -- an upper bound for the GPU alone)."""
    return time_s * n_gpus * watts_per_gpu / J_PER_KWH


def per_million_tokens(value: float, tokens: float) -> float:
    """``value`` (dollars, kWh, seconds) spent per step, scaled to one million tokens."""
    return value / tokens * 1e6 if tokens > 0 else float("inf")
