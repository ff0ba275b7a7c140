"""Compile a traced model into a CostTable: a handful of symbolic sums, cheap to evaluate.

Built once per (model, method, precision, attention, checkpointing, loss) and cached; an
estimate for any (micro-batch, seq len) is then a few dot products.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field


from ..config.model import ModelArch
from .build import ModelTrace, trace_model
from .ir import ZERO, Param, Poly, Trace
from .transforms import Plan


@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one storage kind, summed (numel and bytes)."""

    numel: int = 0
    nbytes: float = 0.0
    scale_bytes: float = 0.0


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
    block_io: Poly  # bytes of one block's input/output hidden state
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
    for v in mt.variants:
        full, glob = sums(v.trace, True)
        n = len(v.layers)
        if full.c > max_layer.c:
            max_layer = full
        ckpt = v.checkpointed
        # a checkpoint keeps only the block's tensor inputs alive (hidden state + the shared tensors)
        kept = v.input.nbytes if ckpt else full
        if ckpt and mt.plan.offload_checkpoints:
            kept = ZERO  # copied to host memory; one block's input comes back for its recompute
        if ckpt:
            for g in mt.checkpoint_inputs:
                if g.id not in global_seen:
                    global_seen.add(g.id)
                    glob = glob + g.nbytes
        for j, i in enumerate(v.layers):
            name = f"{layers_prefix}.{i}" if v.key[-1] is False else f"decoder.block.{i}"
            by_layer[name] = kept + (glob if j == 0 else ZERO)
        total = total + kept * n + glob
    loc, glob = sums(mt.post, True)
    by_layer["head"] = loc + glob
    total = total + loc + glob
    return total, dict(by_layer), dict(by_module), max_layer


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


def compile_trace(mt: ModelTrace) -> CostTable:
    traces = [(mt.pre, 1), (mt.post, 1)] + [(v.trace, len(v.layers)) for v in mt.variants]
    n_params = n_tr = 0
    frozen = qdata = qscale = trb = 0.0
    tr_groups: Counter[tuple[int, str, tuple[int, ...]]] = Counter()
    max_tr = 0.0
    for p, count in _params(traces):
        if p.tied_to is not None:
            continue
        n_params += p.numel * count
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
            # non-reentrant checkpointing stops recomputing once the last saved tensor is rebuilt
            # (torch.utils.checkpoint early stop): ops after it (Llama's down_proj) are not rerun
            last = max((tid for _, tid in v.trace.saves if tid not in global_ids), default=-1)
            for op in v.trace.ops:
                if op.watermark <= last:
                    rec = rec + op.fwd_flops * len(v.layers)
    logits = mt.logits
    return CostTable(
        arch=mt.arch, plan=mt.plan, n_params=n_params, n_trainable=n_tr, frozen_dense_bytes=frozen,
        quant_data_bytes=qdata, quant_scale_bytes=qscale, trainable_bytes=trb,
        trainable_groups=[(n, d, s, c) for (n, d, s), c in tr_groups.items()],
        n_trainable_tensors=sum(tr_groups.values()), largest_trainable_bytes=max_tr, saved=saved, saved_by_layer=by_layer,
        saved_by_module=by_module, max_layer_saved=max_layer, fwd_flops=fwd, bwd_flops=bwd, recompute_flops=rec,
        fwd_bytes=fbytes, max_dequant_bytes=max_deq, other_transient_bytes=other,
        logits_numel=logits.numel, logits_dtype=logits.dtype, loss_dtype=mt.loss_dtype,
        loss_upcast_copy=mt.loss_upcast_copy, block_io=mt.variants[0].input.nbytes,  # the residual stream in its own dtype (fp32 under AMP)
        trace=mt,
    )


@functools.lru_cache(maxsize=256)
def cost_table(arch: ModelArch, plan: Plan, loss: str = "upcast") -> CostTable:
    """Trace + compile, cached per (model, plan, loss)."""
    return compile_trace(trace_model(arch, plan, loss))
