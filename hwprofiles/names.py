"""Name lookup with close-match suggestions (shared by every registry)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnknownNameError(ValueError):
    """An unknown catalog name; the message lists the closest known names."""


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def resolve_name(name: str, choices: Iterable[str], what: str, aliases: dict[str, str] | None = None) -> str:
    """Return the canonical choice for ``name`` (case/underscore-insensitive) or raise with close matches."""
    choices = list(choices)
    by_norm = {normalize(c): c for c in choices}
    for alias, target in (aliases or {}).items():
        by_norm.setdefault(normalize(alias), target)
    key = normalize(name)
    if key in by_norm:
        return by_norm[key]
    close = difflib.get_close_matches(key, list(by_norm), n=5, cutoff=0.5)
    hint = ", ".join(dict.fromkeys(by_norm[c] for c in close)) if close else ", ".join(sorted(choices)[:12]) + (" ..." if len(choices) > 12 else "")
    raise UnknownNameError(f"unknown {what} {name!r}; closest: {hint}")
