"""Compile a traced model into a CostTable: a handful of symbolic sums, cheap to evaluate.

Built once per (model, method, precision, attention, checkpointing, loss) and cached; an
estimate for any (micro-batch, seq len) is then a few dot products.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field


from ..config.model import ModelArch
from .build import ModelTrace, is_moe_router, names_of, trace_model
from .ir import ZERO, Param, Poly, Trace
from .transforms import Plan


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one storage kind, summed (numel and bytes)."""

    numel: int = 0
    nbytes: float = 0.0
    scale_bytes: float = 0.0


@dataclass(frozen=True)
class ParamRow:
    """One parameter tensor of the model (a block's tensor stands for every layer of its variant):
    what sharding needs to place and split it."""

    path: str
    numel: int
    storage_bytes: float  # incl. quantization scales
    scale_bytes: float
    quantized: bool
    trainable: bool
    dtype: str
    shape: tuple[int, ...]
    where: str  # "pre" (embeddings), "block" or "post" (final norm, head)
    layers: tuple[int, ...]  # block indices this tensor exists in (one entry for pre/post)
    tp_split: bool  # split over tensor-parallel ranks (Megatron column/row, vocab-parallel embedding)
    expert: bool  # an MoE expert weight (split over expert-parallel ranks)


@dataclass
class CostTable:
    arch: ModelArch
    plan: Plan
    n_params: int  # unique parameter elements (tied counted once)
    n_trainable: int
    frozen_dense_bytes: float  # frozen weights stored densely
    quant_data_bytes: float  # quantized weights (packed data)
    quant_scale_bytes: float  # their scales / zeros / g_idx
    trainable_bytes: float  # trainable parameter storage
    trainable_groups: list[tuple[int, str, tuple[int, ...], int]]  # (numel, dtype, shape, count) of trainable tensors
    n_trainable_tensors: int
    largest_trainable_bytes: float
    saved: Poly  # activation bytes saved for backward at the end of forward (checkpointing applied)
    saved_by_layer: dict[str, Poly]  # block / top-level module -> saved bytes (checkpointing applied)
    saved_by_module: dict[str, Poly]  # module path -> saved bytes (no checkpointing; representative layers)
    max_layer_saved: Poly  # largest single block's full saved set (recomputed in backward when checkpointed)
    fwd_flops: Poly
    bwd_flops: Poly
    recompute_flops: Poly
    fwd_bytes: Poly  # bytes moved by matmul-like ops in forward (roofline)
    max_dequant_bytes: float  # largest transient dequantised weight
    other_transient_bytes: Poly  # other op temporaries (DoRA weight norms ...)
    logits_numel: Poly
    logits_dtype: str
    loss_dtype: str  # dtype cross-entropy runs in (fp32 after HF's upcast)
    loss_upcast_copy: bool  # the fp32 logits copy is a separate storage
    loss_shift_dtype: str  # dtype of the shifted contiguous logits copy (loss "upcast-shift")
    block_io: Poly  # bytes of one block's input/output hidden state
    param_rows: tuple[ParamRow, ...] = ()
    block_saved_tp: tuple[tuple[tuple[int, ...], Poly, Poly], ...] = ()  # per variant: (layers, TP-replicated, TP-split) saved bytes per layer, checkpointing applied
    pre_saved: Poly = ZERO  # embeddings' saved bytes
    post_saved: Poly = ZERO  # final norm / head / loss saved bytes
    shared_saved: Poly = ZERO  # tensors every block uses, saved once (RoPE cos/sin, prefix states)
    checkpoint_cast_cache: tuple[tuple[tuple[int, ...], float], ...] = ()  # per checkpointed variant: (layers, bytes per layer) of autocast's cached weight copies
    n_blocks: int = 0
    trainable_linears: tuple[LinearWeight, ...] = ()  # trainable dense nn.Linear weights (GaLore's candidates)
    trace: ModelTrace | None = field(repr=False, default=None)
    _graph: object = field(repr=False, default=None)

    def at(self, poly: Poly, b: tuple[float, ...]) -> float:
        return poly.at(b)

    @property
    def graph(self):
        """The operator graph (networkx.DiGraph, module paths as nodes), built on first use."""
        if self._graph is None and self.trace is not None:
            self._graph = _graph(self.trace)
        return self._graph


def _params(traces: list[tuple[Trace, int]]) -> list[tuple[Param, int]]:
    out = []
    for tr, count in traces:
        for p in tr.params:
            out.append((p, count))
    return out


def sac_saved_ops(tr: Trace, plan: Plan) -> tuple[frozenset[int], tuple[int, ...]]:
    """What torchtitan's per-op selective checkpointing keeps of one block's forward
    (``torchtitan/distributed/activation_checkpoint.py`` ``SelectiveAC``): the outputs of the ops its policy
    marks MUST_SAVE -- the compute-intensive ones (``torch._functorch.partitioners.get_default_op_list``: mm,
    addmm, bmm, ``_scaled_mm``, the flash / memory-efficient attention kernels) -- except every second mm,
    counted in forward order (the 2nd, 4th, ...), which is recomputed like every other op.  torchao's float8
    linears run ``_scaled_mm``, kept whatever the count; an MoE router's gate is always recomputed
    (``force_recompute_mm_shapes_by_fqns``).  Returns (indices of the kept ops in ``tr.ops``, ids of the tensors
    they return); empty unless the plan checkpoints selectively."""
    if not plan.selective_checkpoints:
        return frozenset(), ()
    kept: list[int] = []
    ids: list[int] = []
    n_mm = 0
    for i, op in enumerate(tr.ops):
        if not op.aten:
            continue
        if op.aten == "attention" and not op.outputs:
            raise ValueError(f"checkpointing.mode='selective': {op.module} computes attention with explicit "
                             "matmuls, which the selective policy is not modelled for; use checkpointing.mode 'full'")
        if is_moe_router(plan.arch, op.module):
            continue  # the router: recomputed, not counted
        if op.aten == "mm" and not (plan.float8_linears and op.op == "linear"):
            n_mm += 1
            if n_mm % 2 == 0:
                continue
        kept.append(i)
        ids.extend(op.outputs)
    return frozenset(kept), tuple(dict.fromkeys(ids))


def recomputed_ops(tr: Trace, plan: Plan, global_ids: set[int]) -> list[int]:
    """Indices of the ops of a checkpointed block's trace that its backward reruns.  Full checkpointing
    (non-reentrant, ``torch.utils.checkpoint`` early stop on) stops once the last saved tensor is rebuilt, so
    ops after it (Llama's down_proj) are not rerun; a reentrant checkpoint reruns the whole forward; torchtitan's
    selective wrapper passes ``early_stop=False`` and reruns every op whose output it did not keep."""
    if plan.selective_checkpoints:
        kept, _ = sac_saved_ops(tr, plan)
        return [i for i in range(len(tr.ops)) if i not in kept]
    if plan.reentrant_checkpoints:
        return list(range(len(tr.ops)))
    last = max((tid for _, tid in tr.saves if tid not in global_ids), default=-1)
    return [i for i, op in enumerate(tr.ops) if op.watermark <= last]


def _sac_kept(v, mt: ModelTrace, global_ids: set[int]) -> list[int]:
    """Ids of the op outputs a selective checkpoint of variant ``v`` keeps beside its input (none otherwise)."""
    _, ids = sac_saved_ops(v.trace, mt.plan)
    return [i for i in ids if i not in global_ids and i != v.input.id]


def _saved_bytes(mt: ModelTrace) -> tuple[Poly, dict[str, Poly], dict[str, Poly], Poly]:
    """Saved-for-backward bytes: each storage once model-wide; block-local storages x count.

    Shared tensors (RoPE cos/sin, prefix states, input ids) are charged once, to the module and
    block that saves them first -- the attribution a saved-tensor hook sees.
    """
    all_t = mt.tensors
    global_ids = {t.id for t in mt.globals_}
    global_seen: set[int] = set()
    by_layer: dict[str, Poly] = defaultdict(lambda: ZERO)
    by_module: dict[str, Poly] = defaultdict(lambda: ZERO)
    max_layer = ZERO
    layers_prefix = mt.layers_prefix

    def sums(tr: Trace, record: bool) -> tuple[Poly, Poly]:
        """(local bytes per instance, newly seen shared bytes)."""
        seen: set[int] = set()
        loc = glob = ZERO
        for mod, tid in tr.saves:
            nb = all_t[tid].nbytes
            if tid in global_ids:
                if tid not in global_seen:
                    global_seen.add(tid)
                    glob = glob + nb
                    by_module[mod] = by_module[mod] + nb
                continue
            if tid in seen:
                continue
            seen.add(tid)
            loc = loc + nb
            if record:
                by_module[mod] = by_module[mod] + nb
        return loc, glob

    total = ZERO
    for name, tr in (("embeddings", mt.pre),):
        loc, glob = sums(tr, True)
        by_layer[name] = loc + glob
        total = total + loc + glob

    def block_name(decoder: bool, i: int) -> str:
        return f"decoder.block.{i}" if decoder else f"{layers_prefix}.{i}"

    def name_of(v, i: int) -> str:
        """A variant's block (T5's encoder final norm is traced as a variant of its own)."""
        return block_name(v.key[-1], i) if isinstance(v.key[-1], bool) else "encoder.final_layer_norm"

    # a shared tensor a checkpoint keeps is charged to the first checkpointed block that takes it
    ckpt_blocks = sorted((v.key[-1] is True, i) for v in mt.variants if v.checkpointed for i in v.layers)
    late: dict[str, Poly] = defaultdict(lambda: ZERO)
    for v in mt.variants:
        full, glob = sums(v.trace, True)
        n = len(v.layers)
        ckpt = v.checkpointed
        # a checkpoint keeps only the block's tensor inputs alive (hidden state + the shared tensors), and
        # under the selective policy the outputs of the ops it saves
        sac = _sac_kept(v, mt, global_ids) if ckpt else []
        sac_bytes = sum((all_t[i].nbytes for i in sac), ZERO)
        rerun = full  # the recompute's own saved set, less what the selective checkpoint already holds
        if sac:
            in_saves = {tid for _, tid in v.trace.saves}
            rerun = full + sum((all_t[i].nbytes for i in sac if i in in_saves), ZERO) * -1.0
        if rerun.c > max_layer.c:
            max_layer = rerun
        kept = v.input.nbytes + sac_bytes if ckpt else full
        if ckpt and mt.plan.offload_checkpoints:
            kept = ZERO  # copied to host memory; one block's input comes back for its recompute
        if ckpt:
            for g in mt.checkpoint_inputs:
                if g.id in global_seen:
                    continue
                dec, first = mt.checkpoint_from.get(g.id, (False, 0))
                taker = next(((d, i) for d, i in ckpt_blocks if d == dec and i >= first), None)
                if taker is None:  # no checkpointed block takes it
                    continue
                global_seen.add(g.id)
                late[block_name(*taker)] += g.nbytes
                total = total + g.nbytes
        for j, i in enumerate(v.layers):
            by_layer[name_of(v, i)] = kept + (glob if j == 0 else ZERO)
        total = total + kept * n + glob
    for name, nb in late.items():
        by_layer[name] = by_layer[name] + nb
    loc, glob = sums(mt.post, True)
    by_layer["head"] = loc + glob
    total = total + loc + glob
    return total, dict(by_layer), dict(by_module), max_layer


def _checkpoint_cast_cache(mt: ModelTrace) -> tuple[tuple[tuple[int, ...], float], ...]:
    """Per checkpointed block variant: bytes of autocast's cached copies of its trainable fp32 weights.

    A checkpointed block keeps none of its tensors, but torch.autocast caches the lower-precision copy of
    every leaf weight that requires grad (``cached_cast`` in autocast_mode.cpp, grad mode not consulted)
    until the outermost autocast region exits -- the end of the forward and loss."""
    out = []
    for v in mt.variants:
        if v.checkpointed:
            nb = sum(t.nbytes.c[-1] for t in v.trace.tensors if t.autocast_cached)
            if nb:
                out.append((tuple(v.layers), nb))
    return tuple(out)


def _graph(mt: ModelTrace):
    """Module graph: nodes are module paths (containment edges 'contains', data order edges 'next')."""
    import networkx as nx  # only when the graph is asked for: keeps `import simulator` light

    g = nx.DiGraph()
    order: list[str] = []
    traces = [mt.pre] + [v.trace for v in mt.variants] + [mt.post]
    for tr in traces:
        for op in tr.ops:
            if op.module not in g:
                g.add_node(op.module, fwd_flops=ZERO, bwd_flops=ZERO, params=0, kind=op.op)
                order.append(op.module)
            node = g.nodes[op.module]
            node["fwd_flops"] = node["fwd_flops"] + op.fwd_flops
            node["bwd_flops"] = node["bwd_flops"] + op.bwd_flops
        for p in tr.params:
            mod = p.path.rsplit(".", 1)[0]
            if mod not in g:
                g.add_node(mod, fwd_flops=ZERO, bwd_flops=ZERO, params=0, kind="params")
                order.append(mod)
            g.nodes[mod]["params"] += p.numel
    for a, b in zip(order, order[1:]):
        g.add_edge(a, b, kind="next")
    for node in list(g.nodes):
        parts = node.split(".")
        for k in range(1, len(parts)):
            parent, child = ".".join(parts[:k]), ".".join(parts[: k + 1])
            g.add_edge(parent, child, kind="contains") if not g.has_edge(parent, child) else None
    return g


# ---- tensor-parallel placement (Megatron-LM: column-parallel q/k/v/gate/up, row-parallel o/down,
# vocab-parallel embedding and head; norms and row-parallel biases replicated) ----


def _row_parallel_leaves(mt: ModelTrace) -> frozenset[str]:
    n = names_of(mt.arch)
    return frozenset({n.o.rsplit(".", 1)[-1], n.down.rsplit(".", 1)[-1], "wo", "o"})


def _tp_split(p: Param, where: str, mt: ModelTrace, row_leaves: frozenset[str], linears: set[str]) -> bool:
    mod = p.path.rsplit(".", 1)[0] if p.path.endswith((".weight", ".bias")) else p.path
    ndim = len(p.shape) if p.shape else 1
    if ".lora_" in mod:  # A is split on row-parallel layers (input dim), B on column-parallel ones (output dim)
        base = mod.split(".lora_", 1)[0].rsplit(".", 1)[-1]
        return (".lora_A" in mod or ".lora_embedding_A" in mod) == (base in row_leaves)
    if where != "block":
        n = names_of(mt.arch)
        return ndim >= 2 and not (n.pos_embed and mod.startswith(n.pos_embed))
    if ndim >= 2:
        return not is_moe_router(mt.arch, mod)  # the MoE router stays whole
    # a bias of a column-parallel linear is split with its output features; other vectors stay whole
    return p.path.endswith(".bias") and mod in linears and mod.rsplit(".", 1)[-1] not in row_leaves


def _param_rows(mt: ModelTrace) -> tuple[ParamRow, ...]:
    row_leaves = _row_parallel_leaves(mt)
    rows: list[ParamRow] = []
    parts = [("pre", mt.pre, (0,)), ("post", mt.post, (0,))] + [("block", v.trace, tuple(v.layers)) for v in mt.variants]
    for where, tr, layers in parts:
        linears = {p.path.rsplit(".", 1)[0] for p in tr.params if len(p.shape) >= 2}
        for p in tr.params:
            if p.tied_to is not None:
                continue
            rows.append(ParamRow(
                path=p.path, numel=p.numel, storage_bytes=p.storage_bytes, scale_bytes=p.scale_bytes,
                quantized=p.storage != "dense", trainable=p.trainable and p.storage == "dense", dtype=p.dtype,
                shape=p.shape, where=where, layers=layers, tp_split=_tp_split(p, where, mt, row_leaves, linears),
                expert=".experts." in p.path or p.path.endswith(".experts"),
            ))
    return tuple(rows)


def _tp_replicated(t, module: str, mt: ModelTrace, row_leaves: frozenset[str], core: str) -> bool:
    """A saved tensor that every TP rank holds whole (Korthikanti et al. 2022, section 4.2: the
    norm inputs/outputs, residual dropout masks and the inputs of the column-parallel linears are
    hidden-sized and outside the split regions); sequence parallelism splits them too."""
    c = t.numel.c
    if c[2] or c[5] or c[0] != mt.arch.hidden:
        return False
    leaf = module.rsplit(".", 1)[-1]
    return leaf not in row_leaves and not module.endswith(core)


def _block_saved_tp(mt: ModelTrace) -> tuple[tuple[tuple[int, ...], Poly, Poly], ...]:
    row_leaves = _row_parallel_leaves(mt)
    core = names_of(mt.arch).attn_core
    global_ids = {t.id for t in mt.globals_}
    out = []
    for v in mt.variants:
        if v.checkpointed:  # the checkpoint keeps the block input: hidden-sized, replicated
            kept = ZERO if mt.plan.offload_checkpoints else v.input.nbytes
            split = ZERO
            for tid in _sac_kept(v, mt, global_ids):  # selective: the kept op outputs
                t = mt.tensors[tid]
                # a row-parallel product is whole-sized on every rank (partial sums before the all-reduce); the
                # column-parallel products and the attention output are split over the heads / columns
                if t.module.rsplit(".", 1)[-1] in row_leaves:
                    kept = kept + t.nbytes
                else:
                    split = split + t.nbytes
            out.append((tuple(v.layers), kept, split))
            continue
        seen: set[int] = set()
        rep = split = ZERO
        for mod, tid in v.trace.saves:
            if tid in global_ids or tid in seen:
                continue
            seen.add(tid)
            t = mt.tensors[tid]
            if _tp_replicated(t, mod, mt, row_leaves, core):
                rep = rep + t.nbytes
            else:
                split = split + t.nbytes
        out.append((tuple(v.layers), rep, split))
    return tuple(out)


def _shared_saved(total: Poly, by_layer: dict[str, Poly], block_tp) -> Poly:
    """Saved bytes charged once model-wide (shared tensors), i.e. the total less the per-block, embedding and head parts."""
    blocks = ZERO
    for layers, rep, split in block_tp:
        blocks = blocks + (rep + split) * len(layers)
    return total + (blocks + by_layer.get("embeddings", ZERO) + by_layer.get("head", ZERO)) * -1.0


LinearWeight = tuple[str, tuple[int, ...], str, tuple[int, ...]]
"""(module path as traced, (out, in) shape, dtype, block layers it repeats over: () outside the blocks)."""


def _trainable_linears(mt: ModelTrace) -> tuple[LinearWeight, ...]:
    parts = [(mt.pre, ()), (mt.post, ())] + [(v.trace, tuple(v.layers)) for v in mt.variants]
    return tuple((p.path.removesuffix(".weight"), p.shape, p.dtype, layers)
                 for tr, layers in parts for p in tr.params
                 if p.linear and p.trainable and p.tied_to is None and len(p.shape) == 2)


def compile_trace(mt: ModelTrace) -> CostTable:
    traces = [(mt.pre, 1), (mt.post, 1)] + [(v.trace, len(v.layers)) for v in mt.variants]
    n_params = n_tr = 0
    frozen = qdata = qscale = trb = 0.0
    tr_groups: Counter[tuple[int, str, tuple[int, ...]]] = Counter()
    max_tr = 0.0
    for p, count in _params(traces):
        if p.tied_to is not None:
            continue
        n_params += 0 if p.buffer else p.numel * count
        if p.storage != "dense":
            qdata += (p.storage_bytes - p.scale_bytes) * count
            qscale += p.scale_bytes * count
        elif p.trainable:
            n_tr += p.numel * count
            trb += p.storage_bytes * count
            tr_groups[(p.numel, p.dtype, p.shape)] += count
            max_tr = max(max_tr, p.storage_bytes)
        else:
            frozen += p.storage_bytes * count
    saved, by_layer, by_module, max_layer = _saved_bytes(mt)
    block_tp = _block_saved_tp(mt)
    fwd = bwd = rec = fbytes = ZERO
    max_deq = 0.0
    other = ZERO
    for tr, count in traces:
        for op in tr.ops:
            fwd = fwd + op.fwd_flops * count
            bwd = bwd + op.bwd_flops * count
            fbytes = fbytes + op.fwd_bytes * count
        for mod, nb in tr.transients:
            if not any(nb.c[:-1]):
                max_deq = max(max_deq, nb.c[-1])
            else:
                other = other + nb
    global_ids = {t.id for t in mt.globals_}
    for v in mt.variants:
        if v.checkpointed:
            for i in recomputed_ops(v.trace, mt.plan, global_ids):
                rec = rec + v.trace.ops[i].fwd_flops * len(v.layers)
    logits = mt.logits
    return CostTable(
        arch=mt.arch, plan=mt.plan, n_params=n_params, n_trainable=n_tr, frozen_dense_bytes=frozen,
        quant_data_bytes=qdata, quant_scale_bytes=qscale, trainable_bytes=trb,
        trainable_groups=[(n, d, s, c) for (n, d, s), c in tr_groups.items()],
        n_trainable_tensors=sum(tr_groups.values()), largest_trainable_bytes=max_tr, saved=saved, saved_by_layer=by_layer,
        saved_by_module=by_module, max_layer_saved=max_layer, fwd_flops=fwd, bwd_flops=bwd, recompute_flops=rec,
        fwd_bytes=fbytes, max_dequant_bytes=max_deq, other_transient_bytes=other,
        logits_numel=logits.numel, logits_dtype=logits.dtype, loss_dtype=mt.loss_dtype,
        loss_upcast_copy=mt.loss_upcast_copy, loss_shift_dtype=mt.loss_shift_dtype, block_io=mt.variants[0].input.nbytes,  # the residual stream in its own dtype (fp32 under AMP)
        param_rows=_param_rows(mt), block_saved_tp=block_tp,
        pre_saved=by_layer.get("embeddings", ZERO), post_saved=by_layer.get("head", ZERO),
        n_blocks=sum(len(v.layers) for v in mt.variants), shared_saved=_shared_saved(saved, by_layer, block_tp),
        checkpoint_cast_cache=_checkpoint_cast_cache(mt), trainable_linears=_trainable_linears(mt), trace=mt,
    )


@functools.lru_cache(maxsize=256)
def cost_table(arch: ModelArch, plan: Plan, loss: str = "upcast") -> CostTable:
    """Trace + compile, cached per (model, plan, loss)."""
    return compile_trace(trace_model(arch, plan, loss))
