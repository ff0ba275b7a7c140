"""Session-wide test settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The disk cache (hwprofiles.diskcache) of this test session lives in its own folder: the tests neither read
# what an earlier run or the user's own estimates left nor leave anything behind.
_CACHE = tempfile.mkdtemp(prefix="fitsim-test-cache-")
os.environ["FITSIM_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
