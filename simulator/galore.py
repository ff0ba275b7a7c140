"""GaLore on a cost table: which trainable weights are projected, and the optimizer states and step
transients of the whole set (per-matrix formulas in :mod:`simulator.memory`)."""

from __future__ import annotations

import functools
import re
from collections import Counter

from . import memory as mem
from .config.training import GALORE_BASE, GaLore
from .graph.compile import CostTable, LinearWeight

CONV1D_FAMILIES = frozenset({"gpt2"})
"""Families whose block projections are transformers' ``Conv1D``, not ``nn.Linear`` (GPT-2's c_attn, c_proj, c_fc):
transformers' GaLore setup and the GaLore repo both take ``nn.Linear`` modules only."""


def target_matches(targets: tuple[str, ...], module: str) -> bool:
    """transformers' ``check_target_module_exists`` for a list: the exact name, a substring of it, or a regex that
    matches it whole."""
    for t in targets:
        if t == module or t in module:
            return True
        try:
            if re.fullmatch(t, module):
                return True
        except re.error:
            continue
    return False


def _layer_names(path: str, layers: tuple[int, ...]) -> list[str]:
    """The module path of each repetition of a block weight traced in its first layer."""
    if not layers:
        return [path]
    first = f".{layers[0]}."
    if first not in path:
        return [path] * len(layers)
    return [path.replace(first, f".{i}.", 1) for i in layers]


@functools.lru_cache(maxsize=512)
def _projected(linears: tuple[LinearWeight, ...], targets: tuple[str, ...], conv1d: bool) -> tuple[tuple, ...]:
    out: Counter[tuple[int, str, tuple[int, ...]]] = Counter()
    for path, shape, dtype, layers in linears:
        if conv1d and layers:
            continue
        hits = sum(1 for name in _layer_names(path, layers) if target_matches(targets, name))
        if hits:
            out[(shape[0] * shape[1], dtype, shape)] += hits
    return tuple((n, d, s, c) for (n, d, s), c in out.items())


def projected_groups(ct: CostTable, cfg: GaLore) -> list[mem.TensorGroup]:
    """(numel, dtype, shape, count) of the trainable weights GaLore projects."""
    return list(_projected(ct.trainable_linears, tuple(cfg.targets), ct.arch.family in CONV1D_FAMILIES))


def unprojected_groups(groups: list[mem.TensorGroup], projected: list[mem.TensorGroup]) -> list[mem.TensorGroup]:
    """``groups`` less the projected tensors."""
    left = Counter({(n, d, s): c for n, d, s, c in groups})
    for n, d, s, c in projected:
        left[(n, d, s)] -= c
    return [(n, d, s, c) for (n, d, s), c in left.items() if c > 0]


def galore_state_bytes(groups: list[mem.TensorGroup], projected: list[mem.TensorGroup], name: str, cfg: GaLore,
                       beta1: bool = True) -> float:
    """Optimizer states of a GaLore optimizer over ``groups`` (all trainable tensors of the rank), ``projected``
    among them: the base optimizer's states of the projected gradients' low-rank shapes plus the projectors for
    those, its full states for the rest (:func:`simulator.memory.galore_matrix_state_bytes` per weight)."""
    base = GALORE_BASE[name]
    low = []
    for _, d, s, c in projected:
        a, b = mem.galore_low_rank_shape(s, cfg.rank, cfg.proj_type)
        low.append((a * b, d, (a, b), c))
    projectors = sum(mem.galore_projector_bytes(s, cfg.rank, cfg.proj_type, mem.galore_svd_dtype(base, d), d) * c
                     for _, d, s, c in projected)
    return mem.optimizer_state_bytes(unprojected_groups(groups, projected) + low, base, beta1) + projectors


def galore_step_transient_bytes(groups: list[mem.TensorGroup], projected: list[mem.TensorGroup], name: str,
                                cfg: GaLore) -> float:
    """Largest single-parameter transient of a GaLore step (every GaLore optimizer walks its parameters one at a
    time), the first step's projector refresh included."""
    base = GALORE_BASE[name]
    rest = unprojected_groups(groups, projected)
    mats = [mem.galore_matrix_step_bytes(s, d, base, cfg.rank, cfg.proj_type) for _, d, s, _ in projected]
    others = [mem.galore_other_step_bytes(n, d, base) for n, d, _, _ in rest]
    return max(mats + others, default=0.0)
