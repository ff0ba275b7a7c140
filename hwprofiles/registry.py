"""Catalog of device profiles: ``hwprofiles/devices/<name>.yaml``, loaded lazily on first use.

Nothing is read at import.  Names resolve case/underscore/space-insensitively and through each
profile's ``aliases``; an unknown name raises :class:`UnknownNameError` listing the closest names.
The file helpers take a folder and a model class so that a future ``systems/`` catalog can reuse them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TypeVar

import yaml

# libyaml's safe loader when PyYAML was built with it (10x faster), the pure-Python one otherwise
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
from pydantic import BaseModel, ValidationError

from hwprofiles.names import normalize, resolve_name
from hwprofiles.schema import Device

DEVICES_DIR = Path(__file__).with_name("devices")
"""One YAML per device; the file stem is the canonical name."""

M = TypeVar("M", bound=BaseModel)


class ProfileError(ValueError):
    """A profile YAML that cannot be read or does not validate; the message names the file and the fields."""


# ---- one file ----


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=_LOADER)
    except (OSError, yaml.YAMLError) as err:
        raise ProfileError(f"{path}: cannot read profile: {err}") from err
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _describe(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "(whole profile)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_profile(path: Path, model: type[M]) -> M:
    """Validate the YAML at ``path`` as ``model``; the ``name`` field must equal the file stem."""
    data = _read_yaml(path)
    try:
        profile = model.model_validate(data)
    except ValidationError as err:
        raise ProfileError(_describe(path, err)) from err
    name = getattr(profile, "name", path.stem)
    if name != path.stem:
        raise ProfileError(f"{path}: name: {name!r} must equal the file stem {path.stem!r}")
    return profile


def load_device_file(path: str | Path) -> Device:
    """Load one device YAML (any folder); errors name the file and the field."""
    return load_profile(Path(path), Device)


# ---- the catalog ----


@functools.cache
def _device_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DEVICES_DIR.glob("*.yaml"))}


def list_devices() -> list[str]:
    """Canonical device names, sorted (a fresh list over a cached directory listing)."""
    return list(_device_paths())


@functools.cache
def _load(name: str) -> Device:
    return load_device_file(_device_paths()[name])


def all_devices() -> list[Device]:
    """Every device profile, sorted by name."""
    return [_load(name) for name in _device_paths()]


@functools.cache
def _aliases() -> dict[str, str]:
    """Normalised alias -> canonical name over all profiles; a clash between two devices is an error."""
    canonical = {normalize(n): n for n in _device_paths()}
    table: dict[str, str] = {}
    for device in all_devices():
        for alias in device.aliases:
            key = normalize(alias)
            owner = table.get(key) or canonical.get(key)
            if owner is not None and owner != device.name:
                raise ProfileError(
                    f"{_device_paths()[device.name]}: aliases: {alias!r} already names {owner!r}"
                )
            table[key] = device.name
    return table


def _canonical(name: str) -> str:
    direct = {normalize(n): n for n in _device_paths()}
    hit = direct.get(normalize(name))
    if hit is not None:  # exact name: no need to read every profile for its aliases
        return hit
    return resolve_name(name, _device_paths(), "device", aliases=_aliases())


def get_device(name: str) -> Device:
    """The device profile called ``name`` (canonical name or alias, any case, ``_``/space for ``-``)."""
    return _load(_canonical(name))
