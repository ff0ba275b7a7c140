"""Hardware described as data: one YAML per device under ``devices/`` and per node type under
``systems/``, one pydantic schema, a lazy registry.

>>> from hwprofiles import get_device, system_for
>>> get_device("H100-SXM-80GB").peak_flops("bf16")   # doctest: +SKIP
>>> system_for("h100-sxm-80gb", 16).name               # doctest: +SKIP
'dgx-h100'
"""

from hwprofiles.names import UnknownNameError
from hwprofiles.registry import (
    ProfileError,
    all_devices,
    all_systems,
    get_device,
    get_system,
    list_devices,
    list_systems,
    load_device_file,
    load_system_file,
    system_defaults,
    system_for,
    systems_of,
)
from hwprofiles.schema import (
    Device,
    Efficiency,
    HostSpec,
    InterNodeFabric,
    IntraNodeFabric,
    PeakTflops,
    System,
    SystemDefaults,
)

__all__ = [
    "Device",
    "Efficiency",
    "HostSpec",
    "InterNodeFabric",
    "IntraNodeFabric",
    "PeakTflops",
    "ProfileError",
    "System",
    "SystemDefaults",
    "UnknownNameError",
    "all_devices",
    "all_systems",
    "get_device",
    "get_system",
    "list_devices",
    "list_systems",
    "load_device_file",
    "load_system_file",
    "system_defaults",
    "system_for",
    "systems_of",
]
