"""The knobs of a Scenario as the dashboard sees them, read from the pydantic fields.

Every knob is one field of :class:`~simulator.Scenario` or of one of its sub-models; its key is the
field's path (``"workload.micro_batch"``, ``"method.r"``, ``"precision"``).  Label, help text (the
attribute docstring), allowed values, bounds and default all come from the field, so a new field of a
method or a workload appears by itself, and a new Scenario field needs one entry in :data:`LAYOUT`.

One scenario has three forms here:

``state``
    flat ``{key: value}`` holding every knob of every task and method (what the widgets hold, so that
    switching method and back keeps the rank you typed);
``data``
    the nested dict given to ``Scenario.model_validate``: only the chosen task and method;
``compact``
    ``data`` without the values equal to their defaults: the URL parameter and the YAML a person writes.

Nothing here imports streamlit, so all of it is tested directly.
"""

from __future__ import annotations

import copy
import enum
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from hwprofiles import get_device
from simulator import Scenario
from simulator.config import ModelArch
from simulator.config.methods import BNB_QUANTS
from simulator.config.parallel import ZeroStage
from simulator.config.training import GALORE_BASE
from simulator.models import list_models, resolve_model_name

DEFAULT_MODEL = "llama-3.1-8b"
"""The model a fresh dashboard starts with (the first catalog model if this one is ever removed)."""

CUSTOM_MODEL = "<uploaded config.json>"
"""Value of the ``model`` knob when the architecture comes from an uploaded Hugging Face config."""

TRAIN, INFER = "train", "infer"

LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Method", ("method",)),
    ("GPUs and parallelism", ("parallel", "system")),
    ("Numerics and memory", ("precision", "optimizer", "checkpointing", "loss")),
    ("Inference", ("inference",)),
    ("Kernels and runtime", ("attention", "implementation", "compile", "padded_batches", "expandable_segments",
                             "host_sync_per_block")),
)
"""Sidebar sections below model, GPU and workload: (title, Scenario fields shown in it, in order).
A Scenario field named nowhere keeps its default (or the value a loaded scenario gave it)."""

TASK_FIELDS: dict[str, frozenset[str]] = {
    TRAIN: frozenset({"method", "optimizer", "checkpointing", "loss"}),
    INFER: frozenset({"inference"}),
}
"""Scenario fields that apply to one task only; the other task leaves them out of its data."""

SHOWN_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "checkpointing.every_k": ("checkpointing.mode", ("every_k",)),
    "checkpointing.reentrant": ("checkpointing.mode", ("full", "every_k", "offload")),
    "optimizer.beta1": ("optimizer.name", ("adafactor", "galore-adafactor")),
    "optimizer.scale_parameter": ("optimizer.name", ("adafactor",)),
    **{f"optimizer.{f}": ("optimizer.name", tuple(GALORE_BASE))
       for f in ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_proj_type", "galore_targets")},
    "inference.group_size": ("inference.weights", ("gptq", "awq")),
    "inference.double_quant": ("inference.weights", ("nf4", "fp4")),
    **{f"inference.{f}": ("inference.engine", ("vllm",))
       for f in ("gpu_memory_utilization", "max_num_seqs", "kv_block_tokens")},
    "method.group_size": ("method.quant", ("gptq", "awq")),
    "method.blocksize": ("method.quant", ("nf4", "fp4")),
    "method.double_quant": ("method.quant", ("nf4", "fp4")),
    "method.bnb_keeps_input": ("method.quant", ("nf4", "fp4")),
    "method.use_dora": ("method.quant", BNB_QUANTS),
    "method.fp32_unquantized": ("method.quant", BNB_QUANTS),
    "method.qkv_parts": ("implementation", ("litgpt",)),
    "method.encoder_hidden_size": ("method.prefix_projection", (True,)),
    "parallel.pp_virtual": ("parallel.pp_schedule", ("interleaved",)),
    "parallel.fsdp_version": ("parallel.fsdp", ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")),
    "parallel.reshard_after_forward": ("parallel.fsdp", ("full_shard", "hybrid_shard")),
    "parallel.fsdp_embedding_units": ("parallel.fsdp", ("full_shard", "hybrid_shard")),
    "parallel.fsdp_mixed_precision": ("parallel.fsdp", ("full_shard", "shard_grad_op", "hybrid_shard")),
    "parallel.fsdp_no_sync": ("parallel.fsdp", ("full_shard", "shard_grad_op", "hybrid_shard")),
    "parallel.fsdp1_mixed_units": ("parallel.fsdp_version", (1,)),
    "parallel.ddp_bucket_MiB": ("parallel.zero", (ZeroStage.NONE,)),
    "parallel.ddp_bucket_view": ("parallel.zero", (ZeroStage.NONE,)),
    "parallel.reduce_bucket_elems": ("parallel.zero", (ZeroStage.OPTIMIZER, ZeroStage.GRADIENTS, ZeroStage.PARAMETERS)),
    "parallel.contiguous_gradients": ("parallel.zero", (ZeroStage.OPTIMIZER, ZeroStage.GRADIENTS, ZeroStage.PARAMETERS)),
    "parallel.overlap_comm": ("parallel.zero", (ZeroStage.OPTIMIZER, ZeroStage.GRADIENTS, ZeroStage.PARAMETERS)),
    "parallel.allgather_bucket_elems": ("parallel.zero", (ZeroStage.OPTIMIZER, ZeroStage.GRADIENTS)),
    "parallel.stage3_prefetch_bucket_elems": ("parallel.zero", (ZeroStage.PARAMETERS,)),
    "parallel.stage3_max_live_parameters": ("parallel.zero", (ZeroStage.PARAMETERS,)),
    "parallel.stage3_param_persistence_threshold": ("parallel.zero", (ZeroStage.PARAMETERS,)),
}
"""Knobs that matter only for some values of another knob (the field docstrings say which)."""

FIRST: tuple[str, ...] = ("quant", "r", "alpha", "targets", "n_virtual_tokens", "bottleneck", "n_trainable_layers")
"""Field names shown first within their section (the knobs most people change)."""

LABELS: dict[str, str] = {
    "optimizer.name": "optimizer",
    "optimizer.impl": "optimizer implementation",
    "compile": "torch.compile (fused pointwise kernels)",
    "optimizer.beta1": "Adafactor first moment",
    "optimizer.scale_parameter": "Adafactor scale_parameter",
    "optimizer.in_backward": "optimizer step in backward",
    "checkpointing.mode": "activation checkpointing",
    "checkpointing.every_k": "checkpoint one block in k",
    "checkpointing.reentrant": "reentrant checkpoint (reruns the whole block)",
    "method.fp32_unquantized": "fp32 unquantized parameters (PEFT kbit preparation)",
    "inference.weights": "weight quantization",
    "inference.group_size": "quantization group size",
    "inference.double_quant": "double quantization",
    "inference.engine": "serving engine",
    "inference.gpu_memory_utilization": "engine memory share (gpu_memory_utilization)",
    "inference.max_num_seqs": "max sequences at once (max_num_seqs)",
    "inference.kv_block_tokens": "KV block size (tokens)",
    "seq_len": "sequence length",
    "micro_batch": "micro-batch",
    "grad_accum": "gradient accumulation",
    "prompt_len": "prompt length",
    "gen_len": "generated tokens",
    "prefill_logits": "prefill logits kept",
    "r": "rank r",
    "kv_dtype": "KV-cache dtype",
    "n_virtual_tokens": "virtual tokens",
    "n_trainable_layers": "trainable blocks",
    "total_tokens": "total training tokens",
    "parallel.dp": "data parallel (dp)",
    "parallel.tp": "tensor parallel (tp)",
    "parallel.pp": "pipeline stages (pp)",
    "parallel.cp": "context parallel (cp)",
    "parallel.ep": "expert parallel (ep)",
    "parallel.sp": "sequence parallel (with tp)",
    "parallel.zero": "ZeRO stage",
    "parallel.fsdp": "FSDP sharding",
    "parallel.fsdp_version": "FSDP version",
    "parallel.reshard_after_forward": "FSDP reshard after forward",
    "parallel.fsdp_mixed_precision": "FSDP mixed precision (fp32 shards, 16-bit gathers)",
    "parallel.fsdp_no_sync": "FSDP gradient accumulation under no_sync",
    "parallel.fsdp1_mixed_units": "FSDP1 units mix frozen and trainable weights",
    "parallel.offload_optimizer": "offload optimizer states",
    "parallel.offload_params": "offload parameters",
    "parallel.pp_schedule": "pipeline schedule",
    "parallel.pp_virtual": "model chunks per pipeline rank",
    "parallel.ddp_bucket_MiB": "DDP bucket (MiB)",
    "parallel.ddp_bucket_view": "DDP gradient as bucket view",
    "parallel.reduce_bucket_elems": "ZeRO reduce bucket (elements)",
    "parallel.allgather_bucket_elems": "ZeRO all-gather bucket (elements)",
    "parallel.contiguous_gradients": "ZeRO contiguous gradients",
    "parallel.overlap_comm": "ZeRO overlap_comm (a second reduce bucket at stages 1-2)",
    "parallel.stage3_prefetch_bucket_elems": "ZeRO-3 prefetch bucket (elements)",
    "parallel.stage3_max_live_parameters": "ZeRO-3 max live parameters",
    "parallel.stage3_param_persistence_threshold": "ZeRO-3 persistence threshold",
    "system": "system (node type)",
}
"""Readable labels by knob key or field name where the name is terse; otherwise the field name with spaces,
after its Scenario field for a sub-model's field ('optimizer impl')."""

TASK_LABELS = {TRAIN: "training step", INFER: "inference"}

CATALOG_CHOICES: dict[str, str] = {"system": "system_names"}
"""Knobs whose values are names from a catalog: knob key -> the :mod:`app.loaders` function listing them
for the scenario's GPU.  None (the field's default) is offered first as 'default'."""

CATALOG_DEFAULT_LABELS: dict[str, str] = {"system": "default (derived from the GPU)"}


class Widget(str, enum.Enum):
    """How a knob is entered, derived from the field's annotation."""

    CHOICE = "choice"  # Literal / Enum
    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    OPTIONAL_INT = "optional_int"
    OPTIONAL_FLOAT = "optional_float"
    MULTI_CHOICE = "multi_choice"  # list[Literal]: several of a fixed set
    TARGETS = "targets"  # list[str] | 'all-linear' | None (LoRA's target modules)
    MODULES = "modules"  # list[str] | None, or list[str]: module names of the model
    TEXT = "text"
    OPTIONAL_TEXT = "optional_text"
    NONE = "none"  # no widget: the field keeps its value


# ------------------------------------------------------------------------------------ annotations


def _args(ann: Any) -> tuple[Any, ...]:
    return typing.get_args(ann)


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)  # Optional[int] and int | None


def _non_none(ann: Any) -> list[Any]:
    return [a for a in _args(ann) if a is not type(None)] if _is_union(ann) else [ann]


def _is_literal(ann: Any) -> bool:
    return typing.get_origin(ann) is Literal


def _is_list_of_str(ann: Any) -> bool:
    return typing.get_origin(ann) is list and _args(ann) == (str,)


def widget_of(ann: Any) -> Widget:
    """The widget for a field annotation."""
    parts = _non_none(ann)
    optional = _is_union(ann) and len(parts) < len(_args(ann))
    if len(parts) == 1:
        a = parts[0]
        if _is_literal(a) or (isinstance(a, type) and issubclass(a, enum.Enum)):
            return Widget.CHOICE
        if a is bool:
            return Widget.BOOL
        if a is int:
            return Widget.OPTIONAL_INT if optional else Widget.INT
        if a is float:
            return Widget.OPTIONAL_FLOAT if optional else Widget.FLOAT
        if a is str:
            return Widget.OPTIONAL_TEXT if optional else Widget.TEXT
        if _is_list_of_str(a):
            return Widget.MODULES
        if typing.get_origin(a) is list and len(_args(a)) == 1 and _is_literal(_args(a)[0]):
            return Widget.MULTI_CHOICE
    if any(_is_list_of_str(a) for a in parts) and any(_is_literal(a) for a in parts):
        return Widget.TARGETS
    return Widget.NONE


def choices_of(ann: Any) -> tuple[Any, ...]:
    """Allowed values of a Literal or Enum annotation (Optional allowed); empty otherwise."""
    out: list[Any] = []
    for a in _non_none(ann):
        if typing.get_origin(a) is list and len(_args(a)) == 1:
            a = _args(a)[0]  # the choices of a multi-choice list
        if _is_literal(a):
            out += list(_args(a))
        elif isinstance(a, type) and issubclass(a, enum.Enum):
            out += list(a)
    return tuple(out)


# ------------------------------------------------------------------------------------------ knobs


@dataclass(frozen=True)
class Knob:
    """One field of the scenario as a widget: ``key`` in the flat state, ``name`` in ``owner``."""

    key: str
    owner: type[BaseModel]
    name: str

    @property
    def info(self) -> FieldInfo:
        return self.owner.model_fields[self.name]

    @property
    def help(self) -> str:
        return self.info.description or ""

    @property
    def label(self) -> str:
        if self.key in LABELS:
            return LABELS[self.key]
        if self.name in LABELS:
            return LABELS[self.name]
        head = self.key.split(".")[0]
        plain = self.name.replace("_", " ")
        return plain if head in ("workload", "method") or self.key == self.name else f"{head} {plain}"

    @property
    def widget(self) -> Widget:
        return widget_of(self.info.annotation)

    @property
    def optional(self) -> bool:
        """None is an allowed value (it means the library's default)."""
        return type(None) in _args(self.info.annotation)

    @property
    def choices(self) -> tuple[Any, ...]:
        return choices_of(self.info.annotation)

    @property
    def default(self) -> Any:
        return copy.deepcopy(self.info.get_default(call_default_factory=True))

    def bounds(self) -> tuple[float | None, float | None]:
        """(min, max) a widget can enforce: inclusive bounds, and exclusive ones for integers."""
        lo = hi = None
        integer = self.widget in (Widget.INT, Widget.OPTIONAL_INT)
        for m in self.info.metadata:
            if isinstance(m, at.Ge):
                lo = m.ge
            elif isinstance(m, at.Gt) and integer:
                lo = m.gt + 1
            elif isinstance(m, at.Le):
                hi = m.le
            elif isinstance(m, at.Lt) and integer:
                hi = m.lt - 1
        return lo, hi

    def shown(self, state: Mapping[str, Any]) -> bool:
        """Whether this knob matters given the other knobs (:data:`SHOWN_WHEN`)."""
        rule = SHOWN_WHEN.get(self.key)
        return rule is None or state.get(rule[0]) in rule[1]


def _tagged_classes(field: str, tag: str) -> dict[str, type[BaseModel]]:
    """The classes of a tagged-union Scenario field, by tag value (method kind, workload task)."""
    ann = Scenario.model_fields[field].annotation
    return {c.model_fields[tag].default: c for c in _args(ann)}


@cache
def method_classes() -> dict[str, type[BaseModel]]:
    """Method kind -> its config class, in the order of the Scenario's union."""
    return _tagged_classes("method", "kind")


@cache
def workload_classes() -> dict[str, type[BaseModel]]:
    """Task -> its workload class."""
    return _tagged_classes("workload", "task")


def _ordered(names: Iterable[str]) -> list[str]:
    names = list(names)
    return sorted(names, key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), names.index(n)))


@cache
def _method_key_names() -> dict[tuple[str, str], str]:
    """(kind, field) -> state key: ``method.<field>`` for the methods that type and default the field as the
    first method having it does (LoRA, DoRA and QLoRA share the rank and the targets), ``method.<kind>.<field>``
    for a method that types it differently (IA3's targets cannot be 'all-linear') or defaults it differently
    (SHiRA's r is 32, LoRA's 8)."""
    def sig(info) -> str:
        return repr(info.annotation) + "|" + repr(info.get_default(call_default_factory=True))

    first: dict[str, str] = {}  # field name -> the annotation and default of the first method that has it
    for cls in method_classes().values():
        for name, info in cls.model_fields.items():
            first.setdefault(name, sig(info))
    return {
        (kind, name): f"method.{name}" if sig(info) == first[name] else f"method.{kind}.{name}"
        for kind, cls in method_classes().items()
        for name, info in cls.model_fields.items()
        if name != "kind"
    }


@cache
def method_knobs(kind: str) -> tuple[Knob, ...]:
    cls = method_classes()[kind]
    keys = _method_key_names()
    return tuple(Knob(keys[(kind, n)], cls, n) for n in _ordered(cls.model_fields) if n != "kind")


@cache
def workload_knobs(task: str) -> tuple[Knob, ...]:
    cls = workload_classes()[task]
    return tuple(Knob(f"workload.{n}", cls, n) for n in cls.model_fields if n != "task")


def nested_class(field: str) -> type[BaseModel] | None:
    """The sub-model class of a Scenario field such as ``optimizer``; None for a plain value."""
    ann = Scenario.model_fields[field].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


@cache
def field_knobs(field: str) -> tuple[Knob, ...]:
    """The knobs of one Scenario field shown in :data:`LAYOUT` (not model, gpu, workload, method)."""
    cls = nested_class(field)
    if cls is None:
        return (Knob(field, Scenario, field),)
    return tuple(Knob(f"{field}.{n}", cls, n) for n in _ordered(cls.model_fields))


def laid_out_fields() -> tuple[str, ...]:
    """Scenario fields the layout shows (other than model, gpu and workload), in order."""
    return tuple(f for _, fields in LAYOUT for f in fields if f in Scenario.model_fields)


def all_knobs() -> list[Knob]:
    out: list[Knob] = []
    for task in workload_classes():
        out += workload_knobs(task)
    seen: set[str] = set()
    for kind in method_classes():
        out += [k for k in method_knobs(kind) if k.key not in seen]
        seen |= {k.key for k in method_knobs(kind)}
    for f in laid_out_fields():
        if f != "method":
            out += field_knobs(f)
    return out


def applies(field: str, task: str) -> bool:
    """Whether a Scenario field is part of the data for ``task``."""
    other = [t for t in TASK_FIELDS if t != task]
    return not any(field in TASK_FIELDS[t] for t in other)


# ------------------------------------------------------------------------------------------- state


def default_model() -> str:
    names = list_models()
    return DEFAULT_MODEL if DEFAULT_MODEL in names else names[0]


def model_value(state: Mapping[str, Any]) -> Any:
    """The ``model`` of the scenario dict: a catalog name, or the uploaded architecture's fields."""
    if state.get("model") == CUSTOM_MODEL and state.get("custom_model"):
        return copy.deepcopy(state["custom_model"])
    return state.get("model")


def workload_defaults(model: Any, task: str) -> dict[str, Any]:
    """The workload knobs' defaults for ``model`` as the Scenario sets them (its default sequence length is
    shortened to a shorter model context); the field defaults where that scenario does not validate."""
    try:
        w = Scenario.model_validate({"model": model, "workload": {"task": task}}).workload
    except Exception:  # e.g. inference defaults on an encoder (gen_len must be 0): the scenario will say so
        return {k.key: k.default for k in workload_knobs(task)}
    return {k.key: getattr(w, k.name) for k in workload_knobs(task)}


def rebase_workload(state: dict[str, Any], new_model: Any) -> list[str]:
    """Before the model changes to ``new_model``: workload knobs still at the current model's defaults move to
    the new model's (gpt2's 1024-token context instead of the usual 2048).  Returns the keys changed."""
    changed = []
    old_model = model_value(state)
    for task in workload_classes():
        old, new = workload_defaults(old_model, task), workload_defaults(new_model, task)
        for key, v in new.items():
            if v != old[key] and state.get(key) == old[key]:
                state[key] = v
                changed.append(key)
    return changed


def default_state() -> dict[str, Any]:
    """Every knob at its default; the model is :data:`DEFAULT_MODEL`."""
    state: dict[str, Any] = {
        "model": default_model(),
        "custom_model": None,
        "gpu": Scenario.model_fields["gpu"].default,
        "task": Scenario.model_fields["workload"].get_default(call_default_factory=True).task,
        "method.kind": Scenario.model_fields["method"].get_default(call_default_factory=True).kind,
        "extra": {},
    }
    for k in all_knobs():
        state.setdefault(k.key, k.default)
    for task in workload_classes():
        state.update(workload_defaults(state["model"], task))
    return state


def _value(v: Any) -> Any:
    """A state value as plain JSON data (enum members as their value)."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def data_from_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario dict of a state: model, gpu, the chosen task's workload and the fields that apply."""
    data: dict[str, Any] = {"model": model_value(state), "gpu": state["gpu"]}
    task = state["task"]
    data["workload"] = {"task": task, **{k.name: _value(state[k.key]) for k in workload_knobs(task)}}
    for field in laid_out_fields():
        if not applies(field, task):
            continue
        if field == "method":
            kind = state["method.kind"]
            data["method"] = {"kind": kind, **{k.name: _value(state[k.key]) for k in method_knobs(kind)}}
        elif nested_class(field) is not None:
            data[field] = {k.name: _value(state[k.key]) for k in field_knobs(field)}
        else:
            data[field] = _value(state[field])
    for field, v in (state.get("extra") or {}).items():
        data.setdefault(field, copy.deepcopy(v))
    return data


def _defaults_of(cls: type[BaseModel]) -> dict[str, Any]:
    return {n: _value(i.get_default(call_default_factory=True)) for n, i in cls.model_fields.items()}


def compact(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` without the values equal to their field defaults (model and gpu always stay)."""
    out: dict[str, Any] = {}
    for field, value in data.items():
        if field in ("model", "gpu") or field not in Scenario.model_fields:
            out[field] = value
            continue
        info = Scenario.model_fields[field]
        tag = {"workload": "task", "method": "kind"}.get(field)
        if tag is not None and isinstance(value, Mapping):
            classes = workload_classes() if field == "workload" else method_classes()
            cls = classes.get(value.get(tag))
            if cls is None:
                out[field] = dict(value)
                continue
            defaults = _defaults_of(cls)
            sub = {k: v for k, v in value.items() if k != tag and v != defaults.get(k, object())}
            default_tag = getattr(info.get_default(call_default_factory=True), tag)
            if sub or value.get(tag) != default_tag:
                out[field] = {tag: value.get(tag), **sub}
            continue
        cls = nested_class(field)
        if cls is not None and isinstance(value, Mapping):
            defaults = _defaults_of(cls)
            sub = {k: v for k, v in value.items() if v != defaults.get(k, object())}
            if sub:
                out[field] = sub
            continue
        if value != _value(info.get_default(call_default_factory=True)):
            out[field] = value
    return out


# ---------------------------------------------------------------------------------------- decoding


def _errors(prefix: str, err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def state_from_data(data: Any, base: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A state from a scenario dict (as in the URL or a YAML file), over ``base`` (default: defaults).

    Each value is checked on its own (model name, gpu name, each field of the workload, the method and the
    laid-out fields), so one bad value is reported and everything else still loads; the combination is
    checked later by Scenario itself, so an invalid combination shows the scenario's own message.
    Returns (state, problems): each problem is one line naming the field.
    """
    state = copy.deepcopy(dict(base)) if base is not None else default_state()
    if not isinstance(data, Mapping):
        return state, [f"a scenario must be a mapping of fields (model, gpu, workload, ...), got {type(data).__name__}"]
    problems: list[str] = []
    state["extra"] = {}
    given = {f"workload.{k}" for k in data.get("workload") or {}} if isinstance(data.get("workload"), Mapping) else set()
    for field, value in data.items():
        if field not in Scenario.model_fields:
            problems.append(f"{field}: unknown field; allowed: {', '.join(Scenario.model_fields)}")
            continue
        try:
            problems += _load_field(state, field, value)
        except ValidationError as err:
            problems += _errors(field, err)
        except ValueError as err:  # unknown model / gpu names list the closest ones
            problems.append(f"{field}: {_one_line(str(err))}")
    for task in workload_classes():  # what the scenario leaves out follows its model (a shorter context)
        state.update({k: v for k, v in workload_defaults(model_value(state), task).items() if k not in given})
    return state, problems


def _load_field(state: dict[str, Any], field: str, value: Any) -> list[str]:
    if field == "model":
        if isinstance(value, str):
            state["model"] = resolve_model_name(value)
        else:
            state["custom_model"] = ModelArch.model_validate(value).model_dump(mode="json")
            state["model"] = CUSTOM_MODEL
        return []
    if field == "gpu":
        if not isinstance(value, str):
            raise ValueError(f"expected a device name, got {type(value).__name__}")
        state["gpu"] = get_device(value).name
        return []
    if field == "workload":
        w = dict(value) if isinstance(value, Mapping) else value
        if isinstance(w, dict) and "task" not in w:  # Scenario's own rule: inference fields mean inference
            w["task"] = INFER if {k.name for k in workload_knobs(INFER)} & set(w) else TRAIN
        cls = _tag_class(workload_classes(), "task", w)
        state["task"] = w["task"]
        return _load_fields(state, field, cls, {"task": w["task"]}, workload_knobs(w["task"]), w)
    if field == "method":
        cls = _tag_class(method_classes(), "kind", value)
        state["method.kind"] = value["kind"]
        return _load_fields(state, field, cls, {"kind": value["kind"]}, method_knobs(value["kind"]), value)
    if field not in laid_out_fields():
        TypeAdapter(Scenario.model_fields[field].annotation).validate_python(value)  # the rest with the Scenario
        state["extra"][field] = value
        return []
    cls = nested_class(field)
    if cls is None:
        state[field] = TypeAdapter(Scenario.model_fields[field].annotation).validate_python(value)
        return []
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of {', '.join(cls.model_fields)}, got {type(value).__name__}")
    return _load_fields(state, field, cls, {}, field_knobs(field), value)


def _tag_class(classes: Mapping[str, type[BaseModel]], tag: str, value: Any) -> type[BaseModel]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping with '{tag}', got {type(value).__name__}")
    if tag not in value:
        raise ValueError(f"{tag}: missing; one of {', '.join(classes)}")
    cls = classes.get(value[tag])
    if cls is None:
        raise ValueError(f"{tag}: {value[tag]!r} is not one of {', '.join(classes)}")
    return cls


def _load_fields(state: dict[str, Any], field: str, cls: type[BaseModel], tag: dict[str, Any],
                 knobs: Iterable[Knob], value: Mapping[str, Any]) -> list[str]:
    """Each field of a sub-model validated alone (with the others at their defaults)."""
    problems = [f"{field}.{n}: unknown field; allowed: {', '.join(cls.model_fields)}"
                for n in value if n not in cls.model_fields]
    for k in knobs:
        if k.name not in value:
            state[k.key] = k.default
            continue
        try:
            obj = cls.model_validate({**tag, k.name: value[k.name]})
        except ValidationError as err:
            if not all(e["loc"] == () for e in err.errors()):
                problems += _errors(field, err)
                continue
            # only a check across fields failed (sp needs tp > 1): the value itself is valid, and the
            # combination is checked later by the Scenario with the rest of the link's values
            state[k.key] = _field_adapter(cls, k.name).validate_python(value[k.name])
            continue
        state[k.key] = getattr(obj, k.name)
    return problems


def _field_adapter(cls: type[BaseModel], name: str) -> TypeAdapter:
    info = cls.model_fields[name]
    ann = typing.Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(ann)


# ---------------------------------------------------------------------------------------------- URL


def to_param(data: Mapping[str, Any]) -> str:
    """The compact scenario as one short JSON text (the ``s`` URL parameter)."""
    return json.dumps(compact(data), separators=(",", ":"))


def from_param(text: str, base: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """A state from the URL parameter; invalid JSON is one problem and leaves ``base``."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as err:
        state = copy.deepcopy(dict(base)) if base is not None else default_state()
        return state, [f"not JSON ({_one_line(str(err))})"]
    return state_from_data(data, base)


def list_to_param(datas: Iterable[Mapping[str, Any]]) -> str:
    """Several scenarios (the Compare page) as one JSON list."""
    return json.dumps([compact(d) for d in datas], separators=(",", ":"))


def list_from_param(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """States from a JSON list of scenarios; problems are prefixed with the scenario's number."""
    try:
        items = json.loads(text)
    except (TypeError, ValueError) as err:
        return [], [f"not JSON ({_one_line(str(err))})"]
    if not isinstance(items, list):
        return [], [f"expected a JSON list of scenarios, got {type(items).__name__}"]
    states, problems = [], []
    for i, item in enumerate(items, 1):
        s, p = state_from_data(item)
        states.append(s)
        problems += [f"scenario {i}: {x}" for x in p]
    return states, problems


# --------------------------------------------------------------------------------------- labelling


def model_label(state: Mapping[str, Any]) -> str:
    if state.get("model") == CUSTOM_MODEL and state.get("custom_model"):
        return f"{state['custom_model'].get('name', 'uploaded')} (uploaded)"
    return str(state.get("model"))


def short_label(state: Mapping[str, Any]) -> str:
    """'llama-3.1-8b qlora on h100-sxm-80gb' / '... infer on ...'."""
    what = state.get("method.kind") if state.get("task") == TRAIN else INFER
    return f"{model_label(state)} {what} on {state.get('gpu')}"
