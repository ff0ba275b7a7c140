"""The packages whose code builds what the disk cache keeps (:mod:`hwprofiles.diskcache`): any edit to one of
their ``.py`` files makes every cached model, band file and cost table be rebuilt."""

from __future__ import annotations

from pathlib import Path

import hwprofiles

ENGINE_CODE: tuple[str, ...] = (str(Path(__file__).parent), str(Path(hwprofiles.__file__).parent))
