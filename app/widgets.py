"""The widgets of one scenario (sidebar on the Estimate page, one column per scenario on Compare).

Each knob of :mod:`app.knobs` becomes one widget chosen from its field's annotation, with the field's
docstring as its help.  Widget keys are ``<prefix><knob key>`` (``"e.workload.micro_batch"``).
The values live in a flat state per prefix (``st.session_state[prefix + "__state"]``), which survives
widgets that are hidden for a while (a method's knobs while another method is chosen, every page
switch), seeds the widgets when they are drawn again, and is what the URL parameter encodes.

Adding a knob: a field in the Scenario's schema (and, for a new Scenario field, its name in
``knobs.LAYOUT``); a new kind of annotation: a branch in :func:`knob_widget`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import streamlit as st
from pydantic import ValidationError

from app import knobs as K
from app import loaders
from app.knobs import Knob, Widget
from simulator import Scenario, from_hf_config
from simulator.config.parallel import Parallel
from simulator.cli import format_validation_error

STATE, URL_SEEN, UPLOAD, UPLOAD_ERROR = "__state", "__url", "__upload", "__upload_error"
EXPANDED = frozenset({"Method", "GPUs and parallelism", "Numerics and memory", "Inference"})
"""Sections open on first view."""


@dataclass
class ScenarioInput:
    """What the widgets of one scenario produced: the flat state, the scenario dict, and either the
    validated Scenario or the one-line validation message."""

    state: dict[str, Any]
    data: dict[str, Any]
    scenario: Scenario | None
    error: str | None

    @property
    def label(self) -> str:
        return K.short_label(self.state)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def validate(data: dict[str, Any]) -> tuple[Scenario | None, str | None]:
    """``Scenario.model_validate`` with its error as one line naming the field, never a traceback."""
    try:
        return Scenario.model_validate(data), None
    except ValidationError as err:
        return None, one_line(format_validation_error(err))
    except Exception as err:  # unknown names (with their close matches), engine checks
        return None, one_line(err)


# --------------------------------------------------------------------------------------------- state


def state(prefix: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat state of ``prefix`` (created from ``default`` or the field defaults on first use)."""
    key = prefix + STATE
    if key not in st.session_state:
        st.session_state[key] = copy.deepcopy(default) if default is not None else K.default_state()
    return st.session_state[key]


def set_state(prefix: str, new: dict[str, Any]) -> None:
    """Replace the state of ``prefix``; its widgets take the new values when next drawn (call this before
    drawing them in the current run)."""
    st.session_state[prefix + STATE] = copy.deepcopy(new)
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(prefix) and not key.startswith(prefix + "__"):
            del st.session_state[key]


def sync_from_url(prefix: str, param: str) -> list[str]:
    """Load the scenario in the URL parameter ``param`` when it is new to this session (a shared link,
    a reload); returns the problems of the parameter (its valid parts are loaded all the same)."""
    text = st.query_params.get(param)
    if text is None or text == st.session_state.get(prefix + URL_SEEN):
        return []
    new, problems = K.from_param(text)
    set_state(prefix, new)
    st.session_state[prefix + URL_SEEN] = text
    return problems


def write_url(prefix: str, param: str, text: str) -> None:
    """Put ``text`` in the URL parameter (the shareable link) if it changed."""
    if st.query_params.get(param) != text:
        st.query_params[param] = text
    st.session_state[prefix + URL_SEEN] = text


# ------------------------------------------------------------------------------------------ widgets


def _seed(key: str, value: Any) -> None:
    if key not in st.session_state:
        st.session_state[key] = value


def _fmt_choice(v: Any) -> str:
    name = getattr(v, "name", None)
    return f"{v.value} ({name.lower()})" if name is not None and hasattr(v, "value") else str(v)


def _float_step(knob: Knob) -> float:
    lo, hi = knob.bounds()
    small = any(getattr(m, "lt", None) is not None and m.lt <= 1 for m in knob.info.metadata)
    return 0.05 if small or (hi is not None and hi <= 1) else 1.0


def _arch_json(s: dict[str, Any]) -> str:
    if s.get("model") == K.CUSTOM_MODEL and s.get("custom_model"):
        return json.dumps(s["custom_model"], sort_keys=True)
    return loaders.arch_json(s["model"])


def _module_options(s: dict[str, Any], selected: list[str]) -> list[str]:
    """The model's module names, plus any selected name the model lacks (so that the scenario's own
    validation can name it instead of the widget dropping it)."""
    try:
        names = loaders.target_names(_arch_json(s))
    except Exception:  # a model the picker cannot trace: offer what is selected
        names = []
    return names + [n for n in selected if n not in names]


TARGET_MODES = {"default": "PEFT default for the family", "all-linear": "all linear layers", "modules": "chosen modules"}


def _targets(prefix: str, s: dict[str, Any], knob: Knob) -> Any:
    """LoRA targets: PEFT's default (None), 'all-linear', or a list of module names."""
    key = prefix + knob.key
    value = s[knob.key]
    mode = "default" if value is None else "all-linear" if value == "all-linear" else "modules"
    _seed(key + "#mode", mode)
    mode = st.selectbox(knob.label, list(TARGET_MODES), key=key + "#mode", format_func=TARGET_MODES.get, help=knob.help)
    if mode == "default":
        return None
    if mode == "all-linear":
        return "all-linear"
    return _modules(prefix, s, knob, key + "#list", "target modules", optional=False,
                    current=value if isinstance(value, list) else [])


def _modules(prefix: str, s: dict[str, Any], knob: Knob, key: str, label: str, optional: bool,
             current: list[str] | None) -> list[str] | None:
    _seed(key, list(current or []))
    chosen = list(st.session_state[key])
    options = _module_options(s, chosen)
    picked = st.multiselect(label, options, key=key, help=knob.help,
                            placeholder="PEFT default" if optional else "choose modules")
    return (picked or None) if optional else list(picked)


def _catalog_choice(prefix: str, s: dict[str, Any], knob: Knob) -> Any:
    """A name from a catalog (:data:`knobs.CATALOG_CHOICES`), or None for the field's default; a name the
    catalog lacks (from a link) stays selectable so that the estimate can name it."""
    key = prefix + knob.key
    value = s[knob.key]
    names: list[Any] = [None, *getattr(loaders, K.CATALOG_CHOICES[knob.key])(s.get("gpu"))]
    if value not in names:
        names.append(value)
    _seed(key, value)
    default_label = K.CATALOG_DEFAULT_LABELS.get(knob.key, "default")
    return st.selectbox(knob.label, names, key=key, help=knob.help,
                        format_func=lambda n: default_label if n is None else str(n))


def knob_widget(prefix: str, s: dict[str, Any], knob: Knob) -> None:
    """Draw the widget of one knob (if it applies) and write its value into the state ``s``."""
    if not knob.shown(s):
        return
    key = prefix + knob.key
    value = s[knob.key]
    w = knob.widget
    lo, hi = knob.bounds()
    if knob.key in K.CATALOG_CHOICES:
        v: Any = _catalog_choice(prefix, s, knob)
    elif w is Widget.CHOICE:
        options = list(knob.choices)
        _seed(key, value if value in options else knob.default)
        v = st.selectbox(knob.label, options, key=key, help=knob.help, format_func=_fmt_choice)
    elif w is Widget.BOOL:
        _seed(key, bool(value))
        v = st.checkbox(knob.label, key=key, help=knob.help)
    elif w is Widget.MULTI_CHOICE:
        options = list(knob.choices)
        _seed(key, [x for x in (value or []) if x in options])
        v = st.multiselect(knob.label, options, key=key, help=knob.help)
    elif w in (Widget.INT, Widget.OPTIONAL_INT):
        _seed(key, None if value is None else int(value))
        v = st.number_input(knob.label, min_value=None if lo is None else int(lo), max_value=None if hi is None else int(hi),
                            step=1, key=key, help=knob.help, placeholder="default")
    elif w in (Widget.FLOAT, Widget.OPTIONAL_FLOAT):
        _seed(key, None if value is None else float(value))
        v = st.number_input(knob.label, min_value=None if lo is None else float(lo), max_value=None if hi is None else float(hi),
                            step=_float_step(knob), format="%g", key=key, help=knob.help, placeholder="default")
    elif w is Widget.TARGETS:
        v = _targets(prefix, s, knob)
    elif w is Widget.MODULES:
        v = _modules(prefix, s, knob, key, knob.label, optional=knob.optional, current=value)
    elif w in (Widget.TEXT, Widget.OPTIONAL_TEXT):
        _seed(key, "" if value is None else str(value))
        text = st.text_input(knob.label, key=key, help=knob.help)
        v = (text.strip() or None) if w is Widget.OPTIONAL_TEXT else text
    else:  # an annotation without a widget keeps its value
        return
    s[knob.key] = v


def _on_upload(prefix: str) -> None:
    """A config.json was uploaded: map it to an architecture and select it."""
    f = st.session_state.get(prefix + UPLOAD)
    st.session_state[prefix + UPLOAD_ERROR] = None
    if f is None:
        return
    try:
        cfg = json.loads(f.getvalue())
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a JSON object, got {type(cfg).__name__}")
        arch = from_hf_config(cfg)
    except Exception as err:  # invalid JSON, unsupported model_type, missing keys: one line
        st.session_state[prefix + UPLOAD_ERROR] = f"{f.name}: {one_line(err)}"
        return
    s = state(prefix)
    custom = arch.model_dump(mode="json")
    _rebase(prefix, s, custom)
    s["custom_model"] = custom
    s["model"] = K.CUSTOM_MODEL
    st.session_state[prefix + "model"] = K.CUSTOM_MODEL


def _rebase(prefix: str, s: dict[str, Any], new_model: Any) -> None:
    """Workload knobs left at the old model's defaults follow the new model (its context length)."""
    for key in K.rebase_workload(s, new_model):
        st.session_state.pop(prefix + key, None)  # drawn again from the state


def _on_model_change(prefix: str) -> None:
    s = state(prefix)
    new = st.session_state[prefix + "model"]
    _rebase(prefix, s, K.model_value({**s, "model": new}))
    s["model"] = new


def model_and_gpu(prefix: str, s: dict[str, Any], upload: bool = True) -> None:
    names = loaders.model_names()
    options = names + ([K.CUSTOM_MODEL] if s.get("custom_model") else [])
    _seed(prefix + "model", s["model"] if s["model"] in options else K.default_model())
    s["model"] = st.selectbox("model", options, key=prefix + "model", help=Scenario.model_fields["model"].description,
                              format_func=lambda n: K.model_label(s) if n == K.CUSTOM_MODEL else n,
                              on_change=_on_model_change, args=(prefix,))
    if upload:
        with st.expander("Upload a Hugging Face config.json"):
            st.file_uploader("config.json", type=["json"], key=prefix + UPLOAD,
                             on_change=_on_upload, args=(prefix,),
                             help="A local model's config.json, mapped with simulator.from_hf_config.")
        err = st.session_state.get(prefix + UPLOAD_ERROR)
        if err:
            st.error(err)
    devices = loaders.device_names()
    labels = loaders.device_labels()
    _seed(prefix + "gpu", s["gpu"] if s["gpu"] in devices else Scenario.model_fields["gpu"].default)
    s["gpu"] = st.selectbox("GPU", devices, key=prefix + "gpu", help=Scenario.model_fields["gpu"].description,
                            format_func=lambda n: labels.get(n, n))


def workload(prefix: str, s: dict[str, Any]) -> None:
    tasks = list(K.workload_classes())
    _seed(prefix + "task", s["task"] if s["task"] in tasks else tasks[0])
    s["task"] = st.radio("task", tasks, key=prefix + "task", horizontal=True, format_func=lambda t: K.TASK_LABELS.get(t, t),
                         help=Scenario.model_fields["workload"].description)
    for knob in K.workload_knobs(s["task"]):
        knob_widget(prefix, s, knob)


def method(prefix: str, s: dict[str, Any]) -> None:
    kinds = list(K.method_classes())
    _seed(prefix + "method.kind", s["method.kind"] if s["method.kind"] in kinds else kinds[0])
    s["method.kind"] = st.selectbox("method", kinds, key=prefix + "method.kind",
                                    help=Scenario.model_fields["method"].description)
    doc = (K.method_classes()[s["method.kind"]].__doc__ or "").strip()
    if doc:
        st.caption(doc)
    for knob in K.method_knobs(s["method.kind"]):
        knob_widget(prefix, s, knob)


def gpus_caption(s: dict[str, Any]) -> None:
    """The number of GPUs the parallel degrees make (when they form a valid layout)."""
    try:
        par = Parallel.model_validate(K.data_from_state(s).get("parallel", {}))
    except ValidationError:
        return
    st.caption(f"{par.n_gpus} GPU{'s' if par.n_gpus != 1 else ''} (dp x tp x pp x cp)")


def scenario_form(prefix: str, container: Any = None, *, upload: bool = True) -> ScenarioInput:
    """Draw every widget of one scenario into ``container`` (default: the sidebar) and validate it."""
    s = state(prefix)
    with container if container is not None else st.sidebar:
        model_and_gpu(prefix, s, upload=upload)
        workload(prefix, s)
        for title, fields in K.LAYOUT:
            shown = [f for f in fields if f in Scenario.model_fields and K.applies(f, s["task"])]
            if not shown:
                continue
            with st.expander(title, expanded=title in EXPANDED):
                for f in shown:
                    if f == "method":
                        method(prefix, s)
                    else:
                        for knob in K.field_knobs(f):
                            knob_widget(prefix, s, knob)
                        if f == "parallel":
                            gpus_caption(s)
    data = K.data_from_state(s)
    scenario, error = validate(data)
    return ScenarioInput(state=s, data=data, scenario=scenario, error=error)
