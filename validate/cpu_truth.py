"""Exact CPU ground truth for one training step of a :class:`~simulator.config.Scenario`.

``measure(scenario)`` builds the real model (``validate.torch_models.build_model``), runs one
forward with labels, one backward and one ``optimizer.step()`` on CPU, and counts:

* parameters (numel and bytes, tied weights once) and buffers;
* the bytes autograd keeps for the backward (``saved_tensors_hooks``), per module path;
* gradient bytes and optimizer-state bytes;
* forward / backward FLOPs (``FlopCounterMode``), in total and per module.

Every byte count is a count of *storages* (``untyped_storage()``), each once: a view saved twice, or
a tensor saved by two ops, costs its storage once, exactly as it does on a device.

Module paths are the plain HF ``named_modules`` paths of the un-wrapped model
(see ``validate.torch_models.module_paths``): ``model.layers.0.self_attn.q_proj``,
``model.layers.0.self_attn.q_proj.lora_A``, ``lm_head``; ``""`` is code that runs in the top-level
forward outside every submodule (the loss, PEFT's prompt concatenation).
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simulator.config import Optimizer, Scenario, TrainWorkload
from simulator.config.training import GALORE_BASE

from .torch_models import SAC_STORAGES, backward_context, block_paths, build_model, forward_context, module_paths, unwrap

__all__ = ["Truth", "measure", "make_optimizer", "train_batch", "layer_of", "EXTRA_FLOP_FORMULAS", "StepTraffic",
           "optimizer_step_traffic", "mezo_step", "mezo_perturb", "mezo_update", "mezo_update_traffic"]


class Truth(BaseModel):
    """What one CPU training step of a scenario really holds and computes."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    total_params: int
    """Parameter elements, every parameter once (tied embeddings once; PEFT's frozen base included)."""
    trainable_params: int
    """Elements of the parameters with ``requires_grad``."""
    param_bytes: int
    """Bytes of all parameter storages (each storage once)."""
    trainable_param_bytes: int
    """Bytes of the trainable parameters' storages."""
    buffer_bytes: int
    """Bytes of registered buffers that are not parameters (rotary ``inv_freq``, BERT ``position_ids`` ...)."""

    saved_bytes_by_module: dict[str, int]
    """Bytes autograd keeps for the backward, by the innermost module running when each storage was first
    saved; parameter and buffer storages excluded.  Under activation checkpointing, what a checkpointed
    block keeps is its call's tensor inputs (positional and keyword), attributed to the block's path."""
    saved_bytes_by_layer: dict[str, int]
    """``saved_bytes_by_module`` summed per block (``model.layers.3``, ``transformer.h.0``,
    ``encoder.block.1`` ...); modules outside every block keep their own path."""
    saved_bytes_by_dtype: dict[str, int]
    """``saved_bytes_by_module`` split by the dtype of the tensor that first saved each storage."""
    saved_bytes_total: int
    """Sum of ``saved_bytes_by_module``."""
    checkpointed_layers: tuple[str, ...]
    """Block paths whose forward ran inside ``torch.utils.checkpoint`` (non-reentrant)."""

    quant_state_bytes: int = 0
    """Bytes of the bitsandbytes ``QuantState`` tensors of 4-bit weights (absmax, code tables, nested
    state and offset), each storage once; they are not parameters."""
    grad_bytes: int
    """Bytes of the ``.grad`` storages of the trainable parameters after one backward."""
    optimizer_state_bytes: int
    """Bytes of every tensor in ``optimizer.state`` after one step (each storage once), including
    torch Adam/AdamW's per-parameter ``step`` (a 0-dim float32 tensor, 4 B each, on CPU)."""
    optimizer_state_bytes_by_key: dict[str, int]
    """``optimizer_state_bytes`` by state key (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``,
    ``exp_avg_sq_row`` ...)."""

    forward_flops: int
    """FLOPs of the training forward (``FlopCounterMode``: matmuls, convolutions, attention kernels;
    elementwise ops count 0)."""
    backward_flops: int
    """FLOPs of ``loss.backward()`` (``FlopCounterMode``), *including* ``recompute_flops``."""
    recompute_flops: int
    """The part of ``backward_flops`` that re-runs checkpointed blocks' forwards."""
    forward_flops_by_module: dict[str, int]
    """Forward FLOPs per module path, *exclusive*: each op charged to the innermost running module
    (same convention as ``saved_bytes_by_module``; sums to ``forward_flops``)."""
    backward_flops_by_module: dict[str, int]
    """Backward FLOPs (gradient ops, recomputation excluded) per module path, exclusive: each op charged
    to the module whose forward created the autograd node being run."""
    recompute_flops_by_module: dict[str, int]
    """Recomputation FLOPs per module path, exclusive (``backward_flops_by_module`` + this sums to
    ``backward_flops``)."""

    loss: float
    """The loss of the measured step (a sanity check that the step ran)."""


# --------------------------------------------------------------------------------------------
# Storage helpers
# --------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter once, by storage (tied weights share one)."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(_storage_key(p), p)
    return list(seen.values())


def layer_of(path: str, blocks: Iterable[str]) -> str:
    """The block path ``path`` lies in (longest match), or ``path`` itself outside every block."""
    best = ""
    for b in blocks:
        if (path == b or path.startswith(b + ".")) and len(b) > len(best):
            best = b
    return best or path


# --------------------------------------------------------------------------------------------
# Which module is running
# --------------------------------------------------------------------------------------------


class _ModuleStack:
    """The paths of the modules whose forward is running (innermost last), kept by module hooks.

    Active through the forward *and* the backward: a checkpointed block's recomputation runs its
    submodules' forwards again inside ``loss.backward()``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = module_paths(model)
        self.stack: list[str] = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def _enter_hook(self, name: str):
        def hook(_module, _args) -> None:
            self.stack.append(name)

        return hook

    def _exit_hook(self, _module, _args, _output) -> None:  # returns None: the output is left alone
        self.stack.pop()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = []
        for mod in self.model.modules():
            handles.append(mod.register_forward_pre_hook(self._enter_hook(self.names[id(mod)])))
            handles.append(mod.register_forward_hook(self._exit_hook, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------------------------
# Saved tensors, attributed to modules
# --------------------------------------------------------------------------------------------


class _SavedTensorRecorder:
    """Counts the storages autograd saves, charged to the innermost running module.

    The pack hook of ``saved_tensors_hooks`` charges a storage the first time it is seen.  Parameter
    and buffer storages are never charged (they exist anyway; the engine counts them as weights).
    """

    def __init__(self, modules: _ModuleStack):
        self.modules = modules
        model = modules.model
        self.seen: set[int] = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self.by_module: dict[str, int] = defaultdict(int)
        self.by_dtype: dict[str, int] = defaultdict(int)
        self.checkpointed: list[str] = []
        # every charged tensor is held until the measurement ends: a storage freed early (e.g. in a graph
        # that is only used detached) must not hand its address to a later one and be taken for it
        self._alive: list[torch.Tensor] = []

    def record(self, t: torch.Tensor, where: str | None = None) -> None:
        if t.layout == torch.sparse_coo and t.device.type != "meta":
            # a sparse COO operand (PEFT SHiRA's delta): its index and value storages
            self.record(t._indices(), where)
            self.record(t._values(), where)
            return
        if t.layout != torch.strided or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key in self.seen:
            return
        self.seen.add(key)
        self._alive.append(t)
        nbytes = t.untyped_storage().nbytes()
        self.by_module[self.modules.current() if where is None else where] += nbytes
        self.by_dtype[str(t.dtype).removeprefix("torch.")] += nbytes

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.record(t)
        return t

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Saved-tensor hooks + the checkpoint-input wrapper, for the forward only."""
        with _wrap_checkpoints(self), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield


@contextlib.contextmanager
def _wrap_checkpoints(rec: _SavedTensorRecorder) -> Iterator[None]:
    """Charge what each checkpointed block keeps alive: the tensor inputs of its checkpoint call.

    transformers 5 (``GradientCheckpointingLayer.__init_subclass__``) checkpoints ``forward`` — not
    ``__call__``, so module hooks stay outside — as
    ``self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)`` where the function is
    ``functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)`` by default.
    Non-reentrant checkpointing replaces every tensor saved inside the block by a placeholder (its
    own inner ``saved_tensors_hooks`` shadow ours) and keeps the positional inputs (as saved tensors,
    which our pack hook also sees) and the keyword inputs (through the ``partial`` that the recompute
    closure holds: ``position_embeddings``, masks, ``position_ids``) until the backward.  The CPU RNG
    state it stashes (``torch.get_rng_state()``, 5056 B per block) is host memory and not charged.

    The wrapped function also puts the block's path on the module stack, so that the recomputation in
    the backward (which does not pass through the block's ``__call__`` hooks) is attributed to it.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    stack = rec.modules
    patched = []
    for mod in stack.model.modules():
        if isinstance(mod, GradientCheckpointingLayer) and mod.gradient_checkpointing:
            orig = mod._gradient_checkpointing_func
            name = stack.names[id(mod)]

            def wrapper(fn, *args, _orig=orig, _name=name, **kwargs):
                rec.checkpointed.append(_name)
                leaves, _ = tree_flatten((args, kwargs, getattr(fn, "keywords", {})))
                for t in leaves:
                    if isinstance(t, torch.Tensor):
                        rec.record(t, _name)

                def in_block(*a, **k):
                    stack.stack.append(_name)
                    try:
                        return fn(*a, **k)
                    finally:
                        stack.stack.pop()

                n_sac = len(SAC_STORAGES)
                out = _orig(in_block, *args, **kwargs)
                # a selective checkpoint also keeps the outputs its policy saved, in its cache until the backward
                for storage in SAC_STORAGES[n_sac:]:
                    for t in tree_flatten([list(calls.values()) for calls in storage.values()])[0]:
                        t = getattr(t, "val", t)  # torch.utils.checkpoint._VersionWrapper
                        if isinstance(t, torch.Tensor):
                            rec.record(t, _name)
                return out

            mod._gradient_checkpointing_func = wrapper
            patched.append((mod, orig))
    try:
        yield
    finally:
        for mod, orig in patched:
            mod._gradient_checkpointing_func = orig


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def _cpu_flash_fwd_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``aten._grouped_mm`` (transformers 5 MoE experts): 2 flops per multiply-add of every group.

    2-D x 2-D (ragged K, the weight-gradient form): a (M, K_total) @ b (K_total, N) -> (G, M, N), each
    k in exactly one group: 2·M·K_total·N.  Otherwise K = a.shape[-1] is shared by every output element:
    2·numel(out)·K (2-D x 3-D forward (M_total, K) @ (G, K, N) -> (M_total, N); 3-D x 3-D batched).
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    n_out = 1
    for d in out_shape:
        n_out *= d
    return 2 * n_out * a_shape[-1]


EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd_flop,
    torch.ops.aten._grouped_mm: _grouped_mm_flop,
}
"""Formulas torch's FlopCounterMode lacks (it would count these ops as 0 FLOPs):

* the CPU flash-attention kernel: torch's own CUDA SDPA formulas, 4·b·h·s_q·s_k·d forward and
  10·b·h·s_q·s_k·d backward (5 matmuls: the scores are recomputed), with no causal discount, as for CUDA;
* ``aten._grouped_mm``, which transformers 5 uses for MoE experts (``experts_implementation='grouped_mm'``,
  the default wherever the kernel exists: CPU with torch >= 2.9, CUDA sm80+)."""


_MODULE_KEY = "fitsim_module"


class _NodeTagger(TorchFunctionMode):
    """Forward only: writes the running module's path into ``grad_fn.metadata`` of every autograd node
    a call creates (walking back from its outputs to the nodes already tagged), so that the backward
    can tell which module each backward op belongs to."""

    def __init__(self, modules: _ModuleStack):
        super().__init__()
        self.modules = modules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = self.modules.current()
        todo = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or _MODULE_KEY in node.metadata:
                continue
            node.metadata[_MODULE_KEY] = where
            todo.extend(n for n, _ in node.next_functions)
        return out


class _FlopAttributor(TorchDispatchMode):
    """Counts FLOPs with FlopCounterMode's formulas, charged to one module each (exclusive counts).

    forward: the innermost running module.  backward: during a checkpoint recomputation the module
    stack is non-empty and names the recomputed module (counted separately as recompute); otherwise
    the module that created the autograd node being run (``torch._C._current_autograd_node()``).
    """

    def __init__(self, modules: _ModuleStack, registry: dict):
        super().__init__()
        self.modules = modules
        self.registry = registry
        self.phase = "forward"
        self.counts: dict[str, dict[str, int]] = {
            "forward": defaultdict(int), "backward": defaultdict(int), "recompute": defaultdict(int)
        }

    def _where(self) -> tuple[str, str]:
        if self.phase == "forward":
            return "forward", self.modules.current()
        if self.modules.stack:
            return "recompute", self.modules.current()
        node = torch._C._current_autograd_node()
        return "backward", node.metadata.get(_MODULE_KEY, "") if node is not None else ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            phase, where = self._where()
            self.counts[phase][where] += int(formula(*args, **kwargs, out_val=out))
        return out


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------

_IMPL = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}


def _galore_optimizer(params: list[nn.Parameter], opt: Optimizer, model: nn.Module | None) -> torch.optim.Optimizer:
    """galore-torch 1.0 as transformers' Trainer builds it for ``optim="galore_*"``: the weights of the ``nn.Linear``
    modules that ``optim_target_modules`` selects (the exact name, a substring of it, or a regex matching it whole) in
    one group with the projection settings, every other trainable parameter in a plain group."""
    try:
        import galore_torch
    except ImportError:
        raise NotImplementedError(f"optimizer {opt.name!r}: needs the galore-torch package") from None
    if model is None:
        raise ValueError(f"optimizer {opt.name!r} selects weights by module name: pass the model")
    if opt.name == "galore-adamw-8bit" and not all(p.is_cuda for p in params):
        raise NotImplementedError("optimizer 'galore-adamw-8bit': galore-torch's 8-bit step synchronizes CUDA")
    g = opt.galore
    targets = list(g.targets)

    def selected(name: str) -> bool:
        return name in targets or any(t in name for t in targets) or any(re.fullmatch(t, name) for t in targets)

    wanted = {id(p) for p in params}
    low = [m.weight for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and selected(n) and id(m.weight) in wanted]
    low_ids = {id(p) for p in low}
    groups = [{"params": [p for p in params if id(p) not in low_ids]},
              {"params": low, "rank": g.rank, "update_proj_gap": g.update_proj_gap, "scale": g.scale,
               "proj_type": g.proj_type}]
    if opt.name == "galore-adafactor":
        return galore_torch.GaLoreAdafactor(groups, lr=1e-3, relative_step=False, scale_parameter=False,
                                            warmup_init=False, beta1=0.9 if opt.beta1 else None)
    if opt.name == "galore-adamw-8bit":
        return galore_torch.GaLoreAdamW8bit(groups, lr=1e-3)
    return galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)


def make_optimizer(params: list[nn.Parameter], opt: Optimizer, model: nn.Module | None = None) -> torch.optim.Optimizer:
    """The torch / transformers optimizer of ``opt`` (lr 1e-3) over ``params``.

    adamw/adam/sgd/sgd-momentum: ``torch.optim`` with ``opt.impl`` (foreach / fused / for-loop);
    adafactor: ``transformers.optimization.Adafactor(relative_step=False, beta1=0.9 or None, scale_parameter)``;
    galore-*: galore-torch over ``model``'s parameters (:func:`_galore_optimizer`).
    """
    name = opt.name
    if name in GALORE_BASE:
        return _galore_optimizer(params, opt, model)
    if name in ("paged-adamw-8bit", "paged-adamw-32bit"):
        if not all(p.is_cuda for p in params):
            raise NotImplementedError(f"optimizer {name!r}: paged optimizers live in CUDA managed memory")
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit if name.endswith("8bit") else bnb.optim.PagedAdamW32bit)(params, lr=1e-3)
    if name == "adamw-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise NotImplementedError("optimizer 'adamw-8bit': needs the bitsandbytes package") from None
        return bnb.optim.AdamW8bit(params, lr=1e-3)
    if name == "lion":
        raise NotImplementedError("optimizer 'lion': not in torch.optim (lion-pytorch / bitsandbytes); no CPU truth")
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, relative_step=False, warmup_init=False, beta1=0.9 if opt.beta1 else None,
                         scale_parameter=opt.scale_parameter)
    impl = _IMPL[opt.impl]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, **impl)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.0, **impl)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **impl)
    raise NotImplementedError(f"optimizer {name!r}: no CPU truth")


class StepTraffic(BaseModel):
    """What one optimizer step dispatches (after the first step has built the states)."""

    model_config = ConfigDict(frozen=True)

    bytes: int
    """Bytes read + written in tensors of a parameter's size (states, gradients, temporaries; the small row /
    column statistics and scalars left out), each operator's tensor arguments read and its outputs and
    mutated arguments written; views move nothing."""
    ops: int
    """Operators dispatched, views included (the profiler's record-function markers left out)."""


class _TrafficCounter(TorchDispatchMode):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.bytes, self.ops = numel, 0, 0

    def _size(self, ts: Iterable[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts if t.numel() == self.numel)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func).startswith("profiler."):
            return out
        self.ops += 1
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out  # a view (detach, unsqueeze ...): dispatched, but no kernel moves its bytes
        # copy_ overwrites its destination without reading it
        inputs = (args[1:], kwargs) if func is torch.ops.aten.copy_.default else (args, kwargs)
        reads = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        written: list[torch.Tensor] = []
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            # the fused optimizers mark the gradients mutable for the unscale they do only with a grad_scale
            if a.name == "grads" and kwargs.get("grad_scale") is None:
                continue
            v = args[i] if i < len(args) else kwargs.get(a.name)
            written += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
        ptrs = {t.data_ptr() for t in written}
        written += [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.data_ptr() not in ptrs]
        self.bytes += self._size(reads) + self._size(written)
        return out


def optimizer_step_traffic(opt: Optimizer, shape: tuple[int, ...], count: int, dtype: torch.dtype) -> StepTraffic:
    """The traffic and operators of one step of ``opt`` (:func:`make_optimizer`) over ``count`` parameters of
    ``shape`` in ``dtype``; choose a shape whose element count no row / column statistic shares."""
    params = [nn.Parameter(torch.randn(*shape, dtype=dtype)) for _ in range(count)]
    optimizer = make_optimizer(params, opt)
    for _ in range(2):  # the first step builds the states
        for p in params:
            p.grad = torch.randn_like(p)
        counter = _TrafficCounter(params[0].numel())
        with counter:
            optimizer.step()
    return StepTraffic(bytes=counter.bytes, ops=counter.ops)


# MeZO, as its reference trainer steps (princeton-nlp/MeZO, large_models/trainer.py: zo_perturb_parameters,
# zo_forward, zo_step, zo_update)

def _mezo_no_decay(name: str) -> bool:
    return "bias" in name or "layer_norm" in name or "layernorm" in name


def mezo_perturb(named: list[tuple[str, nn.Parameter]], seed: int, scaling: float, eps: float) -> None:
    """``zo_perturb_parameters``: every trainable parameter moved by ``scaling * eps * z``, z drawn from ``seed``."""
    torch.manual_seed(seed)
    for _, p in named:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scaling * z * eps


def mezo_update(named: list[tuple[str, nn.Parameter]], seed: int, projected_grad: float, lr: float,
                weight_decay: float) -> None:
    """``zo_update``: the SGD step along the regenerated z (weight decay off for biases and layer norms)."""
    torch.manual_seed(seed)
    for name, p in named:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        if _mezo_no_decay(name):
            p.data = p.data - lr * (projected_grad * z)
        else:
            p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)


def mezo_step(model: nn.Module, batch: dict[str, torch.Tensor], *, eps: float = 1e-3, lr: float = 1e-6,
              weight_decay: float = 0.0, seed: int = 0) -> float:
    """One MeZO step: perturb +eps, forward, perturb -2 eps, forward, restore, update; returns the first loss."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def forward() -> float:
        model.eval()
        with torch.inference_mode():
            return float(model(**batch).loss)

    mezo_perturb(named, seed, 1.0, eps)
    loss1 = forward()
    mezo_perturb(named, seed, -2.0, eps)
    loss2 = forward()
    projected_grad = (loss1 - loss2) / (2 * eps)
    mezo_perturb(named, seed, 1.0, eps)
    mezo_update(named, seed, projected_grad, lr, weight_decay)
    return loss1


def mezo_update_traffic(shape: tuple[int, ...], count: int, dtype: torch.dtype) -> StepTraffic:
    """What MeZO's three perturbations and its update dispatch over ``count`` weight matrices of ``shape``."""
    named = [(f"w{i}.weight", nn.Parameter(torch.randn(*shape, dtype=dtype))) for i in range(count)]
    counter = _TrafficCounter(named[0][1].numel())
    with counter:
        for scaling in (1.0, -2.0, 1.0):
            mezo_perturb(named, 0, scaling, 1e-3)
        mezo_update(named, 0, 0.5, 1e-6, 0.0)
    return StepTraffic(bytes=counter.bytes, ops=counter.ops)


def _quant_state_tensors(params: list[nn.Parameter], model: nn.Module) -> list[torch.Tensor]:
    """The tensors of every bitsandbytes 4-bit weight's ``quant_state`` (and its nested ``state2``), and every int8
    layer's per-row fp32 scale (``Int8Params.SCB``, which the first forward moves to ``Linear8bitLt.state``)."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        scb = getattr(getattr(m, "state", None), "SCB", None)
        if type(m).__name__ == "Linear8bitLt" and isinstance(scb, torch.Tensor):
            out.append(scb)
    for p in params:
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if isinstance(t, torch.Tensor)]
            qs = getattr(qs, "state2", None)
    return out


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes per state key over all parameters (storages once; non-tensor entries such as Adafactor's
    integer ``step`` and float ``RMS`` are Python objects, not counted)."""
    seen: set[int] = set()
    out: dict[str, int] = defaultdict(int)
    for state in optimizer.state.values():
        for key, value in state.items():
            # galore-torch's GaLoreProjector keeps its factor(s) as ``ortho_matrix`` (a list for proj_type 'full')
            ortho = getattr(value, "ortho_matrix", None)
            tensors = ortho if isinstance(ortho, list) else [ortho] if ortho is not None else [value]
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                k = _storage_key(t)
                if k in seen:
                    continue
                seen.add(k)
                out[key] += t.untyped_storage().nbytes()
    return dict(out)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def train_batch(scenario: Scenario, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids (micro_batch x seq_len) as inputs and labels (T5: decoder labels of the same length),
    on the CPU (move them to the device that runs the step)."""
    wl = scenario.workload
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = scenario.model.vocab
    ids = torch.randint(0, vocab, (wl.micro_batch, wl.seq_len), generator=gen)
    if scenario.model.arch == "encoder_decoder":
        labels = torch.randint(0, vocab, (wl.micro_batch, wl.seq_len), generator=gen)
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """intra-op threads = 1 while measuring: tiny ops run several times faster, and nothing counted
    (bytes, FLOPs, kernels chosen) depends on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _by_layer(by_module: dict[str, int], blocks: list[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for path, n in by_module.items():
        out[layer_of(path, blocks)] += n
    return dict(out)


def measure(scenario: Scenario, *, dropout: float = 0.0, seed: int = 0) -> Truth:
    """Run one training step of ``scenario`` on CPU and count what it holds and computes.

    Steps: build the model; forward with labels under saved-tensor hooks and the FLOP counters
    (:func:`forward_context`: SDPA pin, autocast); ``loss.backward()`` (:func:`backward_context`);
    ``optimizer.step()``; then read grads and optimizer state.
    """
    if not isinstance(scenario.workload, TrainWorkload):
        raise NotImplementedError("measure() runs a training step; scenario.workload.task is 'infer'")
    with _one_thread():
        return _measure(scenario, dropout=dropout, seed=seed)


def _measure(scenario: Scenario, *, dropout: float, seed: int) -> Truth:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(seed)  # dropout masks, MoE routing of random weights: same run for the same seed
    model = build_model(scenario, dropout=dropout, seed=seed)
    params = _unique_params(model)
    trainable = [p for p in params if p.requires_grad]
    param_keys = {_storage_key(p) for p in params}
    buffers = [b for b in model.buffers() if _storage_key(b) not in param_keys]
    optimizer = make_optimizer(trainable, scenario.optimizer, model)
    batch = train_batch(scenario, seed)

    modules = _ModuleStack(model)
    saved = _SavedTensorRecorder(modules)
    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    flops = _FlopAttributor(modules, counter.flop_registry)
    with modules.active(), counter, flops:
        with forward_context(scenario), saved.active(), _NodeTagger(modules):
            loss = model(**batch).loss
        forward_flops = counter.get_total_flops()
        flops.phase = "backward"
        with backward_context(scenario):
            loss.backward()
        total_flops = counter.get_total_flops()

    quant_state = _quant_state_tensors(params, model)
    grads = [p.grad for p in trainable if p.grad is not None]
    optimizer.step()
    state = _optimizer_state_bytes(optimizer)
    blocks = block_paths(unwrap(model))
    fwd, bwd, rec = (dict(flops.counts[k]) for k in ("forward", "backward", "recompute"))

    return Truth(
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        param_bytes=_storage_bytes(params),
        trainable_param_bytes=_storage_bytes(trainable),
        buffer_bytes=_storage_bytes(buffers),
        saved_bytes_by_module=dict(saved.by_module),
        saved_bytes_by_layer=_by_layer(saved.by_module, blocks),
        saved_bytes_by_dtype=dict(saved.by_dtype),
        saved_bytes_total=sum(saved.by_module.values()),
        checkpointed_layers=tuple(saved.checkpointed),
        quant_state_bytes=_storage_bytes(quant_state),
        grad_bytes=_storage_bytes(grads),
        optimizer_state_bytes=sum(state.values()),
        optimizer_state_bytes_by_key=state,
        forward_flops=forward_flops,
        backward_flops=total_flops - forward_flops,
        recompute_flops=sum(rec.values()),
        forward_flops_by_module={k: v for k, v in fwd.items() if v},
        backward_flops_by_module={k: v for k, v in bwd.items() if v},
        recompute_flops_by_module={k: v for k, v in rec.items() if v},
        loss=float(loss.detach()),
    )
