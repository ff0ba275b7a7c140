"""Attribute docstrings as field descriptions, one source parse per module.

Every input model documents a field with the string literal under it (an *attribute docstring*); the CLI
help, the dashboard tooltips and the schema tables read it as ``model_fields[name].description``.
pydantic's ``use_attribute_docstrings`` finds each class's source by walking the call stack and re-reading
the file per class, which made importing the engine slow; :func:`attach` parses each module once
(cached) and sets the descriptions on a class the first time its ``model_fields`` is read
(:class:`DescribedFields`, which the base models install), so that importing the engine parses no source
at all.  An explicit ``Field(description=...)`` wins, as with pydantic.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys

__all__ = ["DescribedFields", "attach", "module_docstrings"]

_ATTACHED: set[type] = set()
"""Classes whose descriptions are set (each is read once)."""


def _class_docs(node: ast.ClassDef) -> dict[str, str]:
    """``{attribute: docstring}`` of one class body: an annotated name followed by a string literal."""
    out: dict[str, str] = {}
    body = node.body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return out


@functools.lru_cache(maxsize=None)
def module_docstrings(module_name: str) -> dict[str, dict[str, str]]:
    """``{class qualname: {attribute: docstring}}`` for every class defined in a module (nested ones and
    those defined in functions by their ``__qualname__``); empty when the module has no readable source."""
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return {}
    out: dict[str, dict[str, str]] = {}

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, ast.ClassDef):
                name = prefix + node.name
                out[name] = _class_docs(node)
                visit(node.body, name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, f"{prefix}{node.name}.<locals>.")  # classes defined in a function

    visit(ast.parse(source).body, "")
    return out


def attach(cls: type) -> None:
    """Set the description of every field of pydantic model ``cls`` that has none from the attribute
    docstring of the nearest class in its MRO that documents it (once per class)."""
    if cls in _ATTACHED:
        return
    _ATTACHED.add(cls)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        module = getattr(klass, "__module__", None)
        if module is None or module == "builtins" or module.startswith("pydantic"):
            continue
        docs.update(module_docstrings(module).get(klass.__qualname__, {}))
    for name, info in cls.__pydantic_fields__.items():
        if info.description is None and name in docs:
            info.description = docs[name]


class DescribedFields:
    """``model_fields`` of a base model, as pydantic's class property, with the attribute docstrings set
    as descriptions on first read (a class-level descriptor; list it in ``ignored_types``)."""

    def __get__(self, instance: object, owner: type) -> dict:
        attach(owner)
        return getattr(owner, "__pydantic_fields__", {})
