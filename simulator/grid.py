"""Peak memory and step time of many training setups at once.

``plan()`` groups its candidates by (GPU type, GPU count, parallel layout): within a group the device,
the system and the layout are one, and the families (method, precision, optimizer, checkpointing) times
the micro-batches form a grid.  What does not depend on the micro-batch is computed once per family and
layout by the engine's own functions (:func:`simulator.estimate.rank_bytes`,
:func:`simulator.timing.rank_state`); the operators' times once per (cost table, device) over every
tensor-parallel degree and micro-batch (:func:`simulator.compute.part_time` on arrays); the phases'
bytes, the allocator's overhead, the collectives, the pipeline and the step by the functions
``estimate()`` calls (:func:`simulator.estimate.train_phase_bytes`,
:func:`simulator.estimate.peak_of_phases`, :func:`simulator.timing.step_time`), on arrays.  The numbers
are therefore ``estimate()``'s, element for element.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from hwprofiles import Device

from . import compute
from . import sharding as sh
from . import timing
from .config import Scenario
from .estimate import (MicroBytes, RankBytes, allocator_limit_bytes, cost_table_for, device_bytes, micro_bytes,
                       peak_of_phases, rank_bytes, train_phase_bytes)
from .graph.ir import basis


def _stack(items: list, cls: type, shape: tuple[int, ...]) -> Any:
    """A dataclass of arrays, one row per item, from a list of instances of ``cls`` (numbers or arrays of
    ``shape``); a field that is a number in every item becomes a column (items, 1, ...)."""
    out = {}
    for f in fields(cls):
        vals = [getattr(x, f.name) for x in items]
        if any(isinstance(v, np.ndarray) for v in vals):
            out[f.name] = np.stack([np.broadcast_to(np.asarray(v, dtype=float), shape) for v in vals])
        else:
            out[f.name] = np.array(vals, dtype=float).reshape((len(vals),) + (1,) * len(shape))
    return cls(**out)


class TrainGrid:
    """Training setups of ``families`` (scenarios that differ in method, precision, optimizer or
    checkpointing; their micro-batch, layout and GPU are ignored) over ``micro_batches``, for the tensor-
    parallel degrees ``tp_degrees`` on ``devices``.  :meth:`peak_bytes` and :meth:`step_s` give one
    (device, system, layout)'s (families, micro-batches) grid."""

    def __init__(self, families: list[Scenario], micro_batches: list[int], tp_degrees: list[int],
                 devices: list[Device]) -> None:
        if any(sc.host_sync_per_block for sc in families):
            raise ValueError("host_sync_per_block: the planner's arrays assume launches overlap the GPU; "
                             "estimate() models the per-block wait")
        self.families = families
        self.cts = [cost_table_for(sc) for sc in families]
        keys: dict[int, int] = {}
        self.table_of = [keys.setdefault(id(ct), len(keys)) for ct in self.cts]
        self.tables = [None] * len(keys)
        self.table_family = [0] * len(keys)
        for i, c in enumerate(self.table_of):
            if self.tables[c] is None:
                self.tables[c], self.table_family[c] = self.cts[i], i
        self.mbs = np.asarray(micro_batches, dtype=float)
        self.tps = list(tp_degrees)
        self.devices = compute.Devices(devices)  # axis -3 of (device, tp, micro-batch) arrays
        self.device_index = {d.name: i for i, d in enumerate(devices)}
        self._cache: dict[tuple, Any] = {}

    # ---- per cost table -------------------------------------------------------------------

    def _basis(self, c: int, mbs: np.ndarray) -> tuple:
        ct, sc = self.tables[c], self.families[self.table_family[c]]
        s = sc.workload.seq_len + ct.plan.prompt_tokens
        return basis(mbs, s, s + ct.plan.prefix_tokens)

    def _cached(self, key: tuple, make) -> Any:
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = make()
        return hit

    def _part_times(self, c: int, cp: int) -> list:
        """Each part's times over (device, tensor-parallel degree, micro-batch)."""
        def make() -> list:
            ct, sc = self.tables[c], self.families[self.table_family[c]]
            dtype = compute.matmul_dtype(ct.plan.precision.compute_dtype, sc.precision)
            fused = ct.plan.attention not in ("eager", "sdpa-math")
            B = self._basis(c, self.mbs[None, None, :])
            tp = np.asarray(self.tps)[None, :, None]
            kernel = compute.attention_kernel(ct.plan)
            return [compute.part_time(part, B, self.devices, dtype, tp, cp, True, fused, attn_kernel=kernel)
                    for part in compute.op_arrays(ct)]
        return self._cached(("parts", c, cp), make)

    def _stage_tables(self, cp: int, pp: int, stage: int, fetch_threshold: int | None,
                      fetch_waits: bool = True) -> tuple[np.ndarray, int]:
        """A stage's compute per (cost table, field, device, tensor-parallel degree, micro-batch), and its blocks
        (``fetch_threshold``: ZeRO-3's persistence threshold when its per-module fetches cost host time;
        ``fetch_waits``: :func:`timing.zero3_fetch_waits`)."""
        def make() -> tuple[np.ndarray, int]:
            out = np.empty((len(self.tables), 4, len(self.devices.devices), len(self.tps), len(self.mbs)))
            n_blocks = 0
            for c, ct in enumerate(self.tables):
                counts = timing.part_counts(ct, pp, stage)
                n_blocks = len(sh.stage_layer_ranges(ct.n_blocks, pp)[stage])
                s = timing.combine_parts(self._part_times(c, cp), counts, n_blocks, True,
                                         timing.fetch_host_times(ct, fetch_threshold), fetch_waits)
                for j, f in enumerate(("forward_s", "backward_s", "recompute_s", "attention_s")):
                    out[c, j] = getattr(s, f)
            return out, n_blocks
        return self._cached(("stage tables", cp, pp, stage, fetch_threshold, fetch_waits), make)

    def _stage_compute(self, dev: Device, par, stage: int) -> timing.StageCompute:
        """A stage's compute per (family, micro-batch) for one device and layout."""
        def make() -> timing.StageCompute:
            tables, n_blocks = self._stage_tables(par.cp, par.pp, stage, timing.zero3_fetch_threshold(par),
                                                  timing.zero3_fetch_waits(par))
            rows = tables[self.table_of, :, self.device_index[dev.name], self.tps.index(par.tp)]
            return timing.StageCompute(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], n_blocks)
        key = ("stage", dev.name, par.tp, par.cp, par.pp, stage, timing.zero3_fetch_threshold(par),
               timing.zero3_fetch_waits(par))
        return self._cached(key, make)

    # ---- per layout -----------------------------------------------------------------------

    def _rank_bytes(self, par, stage: int, n_shard: int) -> RankBytes:
        def make() -> RankBytes:
            items = [rank_bytes(ct, par, sc.optimizer, stage, n_shard)[0] for ct, sc in zip(self.cts, self.families)]
            return _stack(items, RankBytes, (1,))
        return self._cached(("rank_bytes", par, stage, n_shard), make)

    def _micro_bytes(self, par, stage: int) -> MicroBytes:
        # what micro_bytes reads of the layout: the activation split, the stages, one GPU or more
        def make() -> MicroBytes:
            per_table = [micro_bytes(ct, par, self._basis(c, self.mbs), stage, self.families[self.table_family[c]].loss)
                         for c, ct in enumerate(self.tables)]
            return _stack([per_table[c] for c in self.table_of], MicroBytes, (len(self.mbs),))
        return self._cached(("micro_bytes", par.tp, par.sp, par.cp, par.pp, par.n_gpus == 1, stage), make)

    def _rank_state(self, par, stage: int) -> timing.RankState:
        # what rank_state reads of the layout: the placement (rank_params), DeepSpeed or not, FSDP's fp32 reduce
        def make() -> timing.RankState:
            items = [timing.rank_state(ct, par, stage, sc.optimizer) for ct, sc in zip(self.cts, self.families)]
            return _stack(items, timing.RankState, (1,))
        return self._cached(("rank_state", par.tp, par.ep, par.pp, par.stage3_param_persistence_threshold,
                             par.deepspeed, par.fsdp1_mixed_units, sh.fsdp_policy_set(par), stage), make)

    def _step_model(self) -> timing.StepModel:
        def make() -> timing.StepModel:
            ms = [timing.step_model(ct) for ct in self.cts]
            m0 = ms[0]
            return timing.StepModel(np.array([m.compute_bytes for m in ms], dtype=float)[:, None],
                                    np.array([m.tp_collectives for m in ms], dtype=float)[:, None],
                                    m0.hidden, m0.kv_heads, m0.d_head, m0.moe_top_k)
        return self._cached(("step_model",), make)

    def _micro_tokens(self) -> np.ndarray:
        return self._cached(("tokens",), lambda: np.stack([self._basis(c, self.mbs)[0] for c in self.table_of]))

    # ---- one (device, system, layout) -----------------------------------------------------

    def peak_bytes(self, dev: Device, system, par, grad_accum: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(device total, bytes that must fit, paged bytes spilled to the host) of the rank of the stage whose bytes
        that must fit are the most (the first of equals, as ``estimate``), each (families, micro-batches);
        ``grad_accum`` per micro-batch."""
        ga = np.asarray(grad_accum)[None, :]
        n_shard = sh.shard_group_size(par, system.gpus_per_node if par.fsdp == "hybrid_shard" else par.n_gpus)
        ws = dev.cublas_workspace_bytes * 2.0 + dev.cublaslt_workspace_bytes
        peak = spill = need = None
        for stage in sh.stages_to_check(par.pp):
            rb = self._rank_bytes(par, stage, n_shard)
            phases, transients, held = train_phase_bytes(rb, self._micro_bytes(par, stage),
                                                         sh.in_flight_microbatches(par, stage, ga), ga, ws)
            _, allocated, over = peak_of_phases(phases, transients, self.families[0].expandable_segments,
                                                held["stranded"], allocator_limit_bytes(dev, rb.paged_working))
            total, needed, spilled = device_bytes(np.asarray(allocated + over), rb.paged, rb.paged_working, dev)
            if need is None:
                peak, spill, need = total, spilled, needed
            else:
                later = needed > need
                peak, spill, need = (np.where(later, total, peak), np.where(later, spilled, spill),
                                     np.maximum(need, needed))
        return peak, need, spill

    def step_s(self, dev: Device, system, par, grad_accum: np.ndarray, paged_spilled=0.0) -> np.ndarray:
        """Seconds per optimizer step, (families, micro-batches); ``paged_spilled``: the paged bytes that migrate
        each step (:meth:`peak_bytes`)."""
        ga = np.asarray(grad_accum)[None, :]
        stages = {st: self._stage_compute(dev, par, st) for st in sh.stages_to_check(par.pp)}
        ranks = {st: self._rank_state(par, st) for st in stages}
        t = timing.step_time(stages, ranks, self._step_model(), par, dev, system, ga, self._micro_tokens(),
                             paged_spilled)
        return np.broadcast_to(t.step_s, (len(self.families), len(self.mbs)))
