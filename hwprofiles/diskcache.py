"""A persistent cache of validated profiles and compiled cost tables, so that a new process's first estimate
skips parsing YAML and compiling the operator graph it has already seen.

One pickle per entry under ``$FITSIM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fitsim``, else ``~/.cache/fitsim``;
``FITSIM_CACHE_DIR=off`` turns the cache off).  An entry is found through a key that holds

* the code that built it: the size and modification time of every ``.py`` file of the packages passed in, and
  the Python, pydantic and numpy versions -- an edited engine, schema or dependency starts a new folder;
* the data it was built from: the path, size and modification time of each source file (as Python's own
  ``.pyc`` check), or the caller's key (a cost table's model and plan).

The full key is stored beside the object and compared on load.  Anything unexpected -- a missing, truncated,
foreign or unreadable entry, a folder that cannot be written -- falls back to building the object, which is
then stored on a best-effort basis (written to a temporary file and renamed into place, so a concurrent reader
never sees half an entry).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CACHE_ENV = "FITSIM_CACHE_DIR"
"""Environment variable naming the cache folder; ``off`` (or ``0``, ``none``, empty) disables the cache."""
_OFF = {"off", "0", "none", "false", ""}
_PROTOCOL = 5
KEEP_CODE_VERSIONS = 8
"""Folders of other code versions kept beside the current one; older ones are removed when a new one starts."""


def cache_root() -> Path | None:
    """The cache folder, or None when the cache is off."""
    raw = os.environ.get(CACHE_ENV)
    if raw is not None:
        return None if raw.strip().lower() in _OFF else Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fitsim"


@functools.cache
def code_fingerprint(*package_dirs: str) -> str:
    """A digest of the code that builds cached objects: (path, size, mtime) of each ``.py`` file under
    ``package_dirs`` and the interpreter's and core libraries' versions."""
    import numpy
    import pydantic

    h = hashlib.sha256(f"{sys.version}|pydantic {pydantic.VERSION}|numpy {numpy.__version__}".encode())
    for d in package_dirs:
        for rel, st in sorted(_py_files(d, "")):
            h.update(f"{d}|{rel}|{st.st_size}|{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def _py_files(root: str, rel: str) -> list[tuple[str, os.stat_result]]:
    """(relative path, stat) of the ``.py`` files under ``root`` (os.scandir: a tenth of pathlib's time)."""
    out = []
    with os.scandir(os.path.join(root, rel)) as it:
        for e in it:
            name = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=False):
                if e.name != "__pycache__":
                    out += _py_files(root, name)
            elif e.name.endswith(".py"):
                out.append((name, e.stat()))
    return out


def file_stamp(path: Path) -> str:
    """What identifies one version of a source file: its absolute path, size and modification time.  The path is
    made absolute without resolving symlinks (``Path.resolve`` costs a system call per component, a tenth of a
    millisecond per file on a first estimate); a file reached through another link only misses the cache."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _entry_path(root: Path, fingerprint: str, namespace: str, key: str) -> Path:
    return root / fingerprint / namespace / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".pkl")


def _read(path: Path, key: str) -> object | None:
    try:
        with open(path, "rb") as f:
            stored_key, obj = pickle.load(f)
    except Exception:  # missing, truncated or foreign: rebuild
        return None
    return obj if stored_key == key else None


def _prune(root: Path, current: str) -> None:
    """Remove all but the :data:`KEEP_CODE_VERSIONS` most recently used folders of other code versions."""
    try:
        others = sorted((d for d in root.iterdir() if d.is_dir() and d.name != current),
                        key=lambda d: d.stat().st_mtime, reverse=True)
        for d in others[KEEP_CODE_VERSIONS:]:
            shutil.rmtree(d, ignore_errors=True)
    except OSError:
        pass


def _write(path: Path, key: str, obj: object, root: Path, fingerprint: str) -> None:
    try:
        if not (root / fingerprint).exists():
            _prune(root, fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump((key, obj), f, protocol=_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except Exception:  # read-only or full disk, unpicklable object: the cache is only an optimisation
        pass


def load_or_build(namespace: str, key: str, build: Callable[[], T], *, code: tuple[str, ...],
                  sources: tuple[Path, ...] = ()) -> T:
    """``build()``, or the object a previous process built for the same ``key``, ``sources`` and ``code``
    (package folders whose ``.py`` files build it)."""
    root = cache_root()
    if root is None:
        return build()
    try:
        full_key = "|".join((namespace, key, *(file_stamp(p) for p in sources)))
    except OSError:
        return build()  # a source that cannot be stat'ed: let build() report it
    fingerprint = code_fingerprint(*code)
    path = _entry_path(root, fingerprint, namespace, full_key)
    hit = _read(path, full_key)
    if hit is not None:
        return hit  # type: ignore[return-value]
    obj = build()
    _write(path, full_key, obj, root, fingerprint)
    return obj
