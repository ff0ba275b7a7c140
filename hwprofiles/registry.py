"""Catalog of device profiles: ``hwprofiles/devices/<name>.yaml``, loaded lazily on first use.

Nothing is read at import.  Names resolve case/underscore/space-insensitively and through each
profile's ``aliases``; an unknown name raises :class:`UnknownNameError` listing the closest names.
The same file helpers serve the system catalog (``hwprofiles/systems/<name>.yaml``, one node type
each); ``systems/_defaults.yaml`` holds the figures used to synthesise a system for a device that
no catalog system uses (:func:`system_for`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hwprofiles import diskcache
from hwprofiles.names import UnknownNameError, normalize, resolve_name
from hwprofiles.schema import GIGA, Device, System, SystemDefaults

DEVICES_DIR = Path(__file__).with_name("devices")
"""One YAML per device; the file stem is the canonical name."""
SYSTEMS_DIR = Path(__file__).with_name("systems")
"""One YAML per system (node type); the file stem is the canonical name. Files starting with ``_`` are not systems."""
DEFAULTS_FILE = SYSTEMS_DIR / "_defaults.yaml"
"""Figures for systems synthesised from a device profile."""

M = TypeVar("M", bound=BaseModel)


class ProfileError(ValueError):
    """A profile YAML that cannot be read or does not validate; the message names the file and the fields."""


# ---- one file ----


def yaml_files(folder: Path) -> dict[str, Path]:
    """Stem -> path of the ``*.yaml`` files in ``folder``, sorted by stem (os.scandir: pathlib's glob costs a
    first estimate milliseconds over a hundred files)."""
    with os.scandir(folder) as it:
        stems = sorted(e.name[: -len(".yaml")] for e in it if e.name.endswith(".yaml") and e.is_file())
    return {s: folder / f"{s}.yaml" for s in stems}


def load_yaml(text: str) -> Any:
    """YAML text as Python data, with libyaml's safe loader when PyYAML was built with it (10x faster) and the
    pure-Python one otherwise.  PyYAML is imported here, on first use: a process whose profiles and models
    all come from the disk cache never parses YAML, and importing it costs 30 ms."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = load_yaml(path.read_text())
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


_CODE = (str(Path(__file__).parent),)
"""The package whose code validates profiles (the disk cache's code key)."""


def load_profile(path: Path, model: type[M]) -> M:
    """Validate the YAML at ``path`` as ``model``; the ``name`` field must equal the file stem.  A profile
    validated by an earlier process from the same file by the same code comes from the disk cache."""
    return diskcache.load_or_build(f"profile-{model.__name__}", "", lambda: _validate_profile(path, model),
                                   code=_CODE, sources=(path,))


def _validate_profile(path: Path, model: type[M]) -> M:
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
    return yaml_files(DEVICES_DIR)


def list_devices() -> list[str]:
    """Canonical device names, sorted (a fresh list over a cached directory listing)."""
    return list(_device_paths())


@functools.cache
def _load(name: str) -> Device:
    return load_device_file(_device_paths()[name])


def all_devices() -> list[Device]:
    """Every device profile, sorted by name."""
    return [_load(name) for name in _device_paths()]


def _alias_table(paths: dict[str, Path], profiles: Iterable[Device | System]) -> dict[str, str]:
    """Normalised alias -> canonical name over ``profiles``; an alias naming two profiles is an error."""
    canonical = {normalize(n): n for n in paths}
    table: dict[str, str] = {}
    for profile in profiles:
        for alias in profile.aliases:
            key = normalize(alias)
            owner = table.get(key) or canonical.get(key)
            if owner is not None and owner != profile.name:
                raise ProfileError(f"{paths[profile.name]}: aliases: {alias!r} already names {owner!r}")
            table[key] = profile.name
    return table


@functools.cache
def _aliases() -> dict[str, str]:
    """Normalised alias -> canonical name over all device profiles; a clash between two devices is an error."""
    return _alias_table(_device_paths(), all_devices())


@functools.cache
def _direct_names() -> dict[str, str]:
    """Normalised canonical name -> canonical name of every device profile."""
    return {normalize(n): n for n in _device_paths()}


def _canonical(name: str) -> str:
    hit = _direct_names().get(normalize(name))
    if hit is not None:  # exact name: no need to read every profile for its aliases
        return hit
    return resolve_name(name, _device_paths(), "device", aliases=_aliases())


def get_device(name: str) -> Device:
    """The device profile called ``name`` (canonical name or alias, any case, ``_``/space for ``-``)."""
    return _load(_canonical(name))


# ---- systems: one file ----


def load_system_file(path: str | Path) -> System:
    """Load one system YAML (any folder); errors name the file and the field.  ``device`` must be the
    canonical name of a profile in ``hwprofiles/devices``."""
    path = Path(path)
    system = load_profile(path, System)
    try:
        canonical = resolve_name(system.device, _device_paths(), "device")
    except UnknownNameError as err:
        raise ProfileError(f"{path}: device: {err} (profiles in {DEVICES_DIR})") from err
    if canonical != system.device:
        raise ProfileError(f"{path}: device: {system.device!r} must be written as the canonical name {canonical!r}")
    return system


# ---- systems: the catalog ----


@functools.cache
def _system_paths() -> dict[str, Path]:
    return {n: p for n, p in yaml_files(SYSTEMS_DIR).items() if not n.startswith("_")}


def list_systems() -> list[str]:
    """Canonical system names, sorted (a fresh list over a cached directory listing)."""
    return list(_system_paths())


@functools.cache
def _load_system(name: str) -> System:
    return load_system_file(_system_paths()[name])


def all_systems() -> list[System]:
    """Every catalog system, sorted by name."""
    return [_load_system(name) for name in _system_paths()]


@functools.cache
def _system_aliases() -> dict[str, str]:
    """Normalised alias -> canonical name over all systems; a clash between two systems is an error."""
    return _alias_table(_system_paths(), all_systems())


def get_system(name: str) -> System:
    """The catalog system called ``name`` (canonical name or alias, any case, ``_``/space for ``-``)."""
    direct = {normalize(n): n for n in _system_paths()}
    hit = direct.get(normalize(name))
    if hit is None:
        hit = resolve_name(name, _system_paths(), "system", aliases=_system_aliases())
    return _load_system(hit)


@functools.cache
def system_defaults() -> SystemDefaults:
    """The figures used to synthesise a system (``systems/_defaults.yaml``)."""
    return load_profile(DEFAULTS_FILE, SystemDefaults)


# ---- systems for a device ----


def system_for(device_name: str, n_gpus: int) -> System:
    """The system to run ``n_gpus`` of ``device_name`` on.

    A catalog system whose device is this device when there is one: the smallest whose
    ``gpus_per_node`` covers ``n_gpus`` (ties broken by name), else the largest multi-node one (the
    job spans nodes).  Otherwise -- no catalog system of the device, or only single-node ones too small
    (a two-GPU workstation asked for eight) -- a system synthesised from the device profile and
    ``systems/_defaults.yaml`` (``derived: true``): ``min(n_gpus, max_gpus_per_node)`` GPUs joined by
    the device's own link (``interconnect_bandwidth_GBps``, or PCIe), the default network between nodes.
    """
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 1:
        raise ValueError(f"n_gpus must be a positive integer, got {n_gpus!r}")
    device = get_device(device_name)
    candidates = _catalog_systems_of(device.name)
    covering = [s for s in candidates if s.gpus_per_node >= n_gpus]
    if covering:
        return min(covering, key=lambda s: (s.gpus_per_node, s.name))
    spanning = [s for s in candidates if s.multi_node]
    if spanning:
        return min(spanning, key=lambda s: (-s.gpus_per_node, s.name))
    return _derived_system(device.name, min(n_gpus, system_defaults().max_gpus_per_node))


def _catalog_systems_of(device_name: str) -> list[System]:
    """The catalog systems whose ``device`` is ``device_name`` (a canonical name).  A system whose device line
    names another catalog device is skipped unparsed; any other is read."""
    others = set(_device_paths()) - {device_name}
    read = (_load_system(n) for n, d in _system_devices().items() if d not in others)
    return [s for s in read if s.device == device_name]


def systems_of(device_name: str) -> list[str]:
    """The catalog systems whose GPUs are ``device_name``'s kind, by name."""
    return sorted(s.name for s in _catalog_systems_of(get_device(device_name).name))


_DEVICE_LINE = re.compile(r"^device:[ \t]*([A-Za-z0-9._-]+)[ \t]*(?:#.*)?$", re.MULTILINE)


@functools.cache
def _system_devices() -> dict[str, str | None]:
    """System name -> its top-level ``device:`` as written (None when the line is not a plain name), read
    from the text so that choosing a system for a device parses only that device's systems."""
    paths = _system_paths()
    return diskcache.load_or_build("system-devices", "", _scan_system_devices, code=_CODE,
                                   sources=tuple(paths.values()))  # the key: every system file's stamp


def _scan_system_devices() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, path in _system_paths().items():
        try:
            m = _DEVICE_LINE.search(path.read_text())
        except OSError:
            m = None
        out[name] = m.group(1) if m else None
    return out


def _tree_or_ring_steps(n: int) -> int:
    """Steps of an n-rank all-reduce, the cheaper of ring 2(n-1) and tree 2*ceil(log2 n) (as simulator.comm)."""
    return min(2 * (n - 1), 2 * math.ceil(math.log2(n)))


@functools.cache
def _derived_system(device_name: str, gpus: int) -> System:
    device = get_device(device_name)
    d = system_defaults()
    kind = d.fabric_by_interconnect.get(device.interconnect, d.fallback_fabric)
    if gpus > d.fabric_max_gpus.get(kind, gpus):
        kind = "pcie"

    def from_device(*fields: str) -> tuple[float, str]:
        for field in fields:
            value = getattr(device, field)
            if value is not None:
                return value, f"device profile {device.name}: {field} ({device.citation(field)})"
        return d.host_to_gpu_bandwidth_GBps, f"_defaults.yaml host_to_gpu_bandwidth_GBps ({d.sources['host_to_gpu_bandwidth_GBps']})"

    link_fields = ("pcie_bandwidth_GBps", "interconnect_bandwidth_GBps") if kind == "pcie" else (
        "interconnect_bandwidth_GBps", "pcie_bandwidth_GBps")
    bandwidth, bandwidth_source = from_device(*link_fields)
    host_bw, host_bw_source = from_device("pcie_bandwidth_GBps")

    # busbw(S) = P * S / (S + S_half): t = alpha + S * f / P with f = 2(n-1)/n (nccl-tests PERFORMANCE.md)
    n = max(gpus, 2)
    fraction, step_us = d.busbw_fraction[kind], d.step_latency_us[kind]
    peak = bandwidth * fraction
    alpha_s = _tree_or_ring_steps(n) * step_us * 1e-6
    s_half = alpha_s * peak * GIGA / (2 * (n - 1) / n)
    curve = tuple((s, peak * s / (s + s_half)) for s in d.curve_sizes_bytes)

    link = "pcie" if device.pcie_gen is not None else "nvlink-c2c"
    net = d.inter_node
    data: dict[str, Any] = {
        "name": f"{device.name}-x{gpus}-derived",
        "display_name": f"{gpus}x {device.display_name} (derived)",
        "device": device.name,
        "gpus_per_node": gpus,
        "intra_node": {"kind": kind, "bandwidth_GBps": bandwidth, "latency_us": step_us,
                       "busbw_curve": curve, "ring_busbw_GBps": None},
        "inter_node": net,
        "host": {"host_ram_GB": None, "cpu_cores": None, "link": link, "pcie_gen": device.pcie_gen,
                 "host_to_gpu_bandwidth_GBps": host_bw, "nvme_capacity_TB": None, "nvme_bandwidth_GBps": None},
        "price_usd_per_gpu_hour": device.price_usd_per_hour,
        "price_source": device.price_source,
        "price_date": device.price_date,
        "node_power_W": None,
        "derived": True,
        "notes": (
            f"Derived from device profile {device.name} and hwprofiles/systems/_defaults.yaml, not a catalog system: "
            f"a {kind} fabric at {bandwidth:g} GB/s, a generic {net.nics_per_node}x {net.nic_bandwidth_Gbps:g} Gb/s "
            f"{net.technology} network; host RAM, CPU cores, NVMe and node power unknown."
        ),
        "sources": {
            "gpus_per_node": f"requested GPUs capped at max_gpus_per_node = {d.max_gpus_per_node} ({d.sources['max_gpus_per_node']})",
            "intra_node.bandwidth_GBps": bandwidth_source,
            "intra_node.latency_us": f"_defaults.yaml step_latency_us[{kind}] ({d.sources['step_latency_us']})",
            "intra_node.busbw_curve": (
                f"synthesised, not measured: peak = {bandwidth:g} GB/s x busbw_fraction[{kind}] {fraction:g} = {peak:.4g} GB/s; "
                f"shape t = alpha + S * 2(n-1)/n / peak with n = {n}, alpha = {_tree_or_ring_steps(n)} steps x {step_us:g} us, "
                f"i.e. busbw = peak * S / (S + {s_half / 1e6:.4g} MB) (_defaults.yaml; {d.sources['busbw_fraction']})"
            ),
            **{f"inter_node.{k}": f"_defaults.yaml inter_node.{k} ({d.sources[f'inter_node.{k}']})"
               for k in ("nics_per_node", "nic_bandwidth_Gbps", "latency_us", "achieved_fraction")},
            "host.host_to_gpu_bandwidth_GBps": host_bw_source,
        },
    }
    if device.pcie_gen is not None:
        data["sources"]["host.pcie_gen"] = f"device profile {device.name}: pcie_gen ({device.citation('pcie_gen')})"
    return System.model_validate(data)
