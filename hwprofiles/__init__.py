"""Hardware described as data: one YAML per device under ``devices/``, one pydantic schema, a lazy registry.

>>> from hwprofiles import get_device
>>> get_device("H100-SXM-80GB").peak_flops("bf16")   # doctest: +SKIP
"""

from hwprofiles.names import UnknownNameError
from hwprofiles.registry import ProfileError, all_devices, get_device, list_devices, load_device_file
from hwprofiles.schema import Device, Efficiency, PeakTflops

__all__ = [
    "Device",
    "Efficiency",
    "PeakTflops",
    "ProfileError",
    "UnknownNameError",
    "all_devices",
    "get_device",
    "list_devices",
    "load_device_file",
]
