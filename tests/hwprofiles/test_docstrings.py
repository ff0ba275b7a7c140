"""Attribute docstrings become field descriptions exactly as pydantic's own extraction reads them."""

from __future__ import annotations

import importlib
import inspect

from pydantic import Field
from pydantic._internal._docs_extraction import extract_docstrings_from_cls

from hwprofiles._docstrings import attach, module_docstrings
from hwprofiles.schema import _Strict
from simulator.config.base import Strict

MODULES = ["hwprofiles.schema", "simulator.config.model", "simulator.config.methods", "simulator.config.training",
           "simulator.config.parallel", "simulator.config.scenario", "simulator.planner"]


def _models():
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, (Strict, _Strict)) and obj.__module__ == name:
                yield obj


def test_descriptions_equal_pydantic_attribute_docstrings():
    n = 0
    for cls in _models():
        docs: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            if klass.__module__.split(".")[0] in ("simulator", "hwprofiles"):
                docs.update(extract_docstrings_from_cls(klass, use_inspect=True))
        for name, info in cls.model_fields.items():
            if name in docs:
                assert info.description == docs[name], (cls.__name__, name)
                n += 1
    assert n > 250


def test_an_explicit_description_wins_and_subclasses_inherit():
    class Base(Strict):
        a: int = 1
        """from the docstring"""
        b: int = Field(default=2, description="explicit")
        """ignored"""

    class Child(Base):
        c: int = 3
        """child field"""

    assert Base.model_fields["a"].description == "from the docstring"
    assert Base.model_fields["b"].description == "explicit"
    assert Child.model_fields["a"].description == "from the docstring"
    assert Child.model_fields["c"].description == "child field"
    assert module_docstrings(__name__)[Child.__qualname__] == {"c": "child field"}
    attach(Child)  # idempotent
    assert Child.model_fields["c"].description == "child field"
