"""The disk cache of validated profiles and compiled cost tables: hits, invalidation, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwprofiles import diskcache, load_device_file
from hwprofiles.registry import DEVICES_DIR

ROOT = Path(__file__).resolve().parents[2]
CODE = (str(Path(diskcache.__file__).parent),)


class Counter:
    def __init__(self, value):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return self.value


def test_an_entry_is_built_once_and_then_read(tmp_path, monkeypatch):
    monkeypatch.setenv(diskcache.CACHE_ENV, str(tmp_path / "c"))
    src = tmp_path / "x.yaml"
    src.write_text("a: 1\n")
    build = Counter({"a": [1, 2, 3]})
    assert diskcache.load_or_build("t", "k", build, code=CODE, sources=(src,)) == {"a": [1, 2, 3]}
    again = diskcache.load_or_build("t", "k", build, code=CODE, sources=(src,))
    assert again == {"a": [1, 2, 3]} and build.calls == 1
    assert len(list((tmp_path / "c").rglob("*.pkl"))) == 1
    # another key, namespace or source is another entry
    diskcache.load_or_build("t", "k2", build, code=CODE, sources=(src,))
    diskcache.load_or_build("u", "k", build, code=CODE, sources=(src,))
    assert build.calls == 3


def test_an_edited_source_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(diskcache.CACHE_ENV, str(tmp_path / "c"))
    src = tmp_path / "x.yaml"
    src.write_text("a: 1\n")
    build = Counter(1)
    diskcache.load_or_build("t", "k", build, code=CODE, sources=(src,))
    src.write_text("a: 22\n")  # another size
    diskcache.load_or_build("t", "k", build, code=CODE, sources=(src,))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same size, another time
    diskcache.load_or_build("t", "k", build, code=CODE, sources=(src,))
    assert build.calls == 3


def test_broken_or_foreign_entries_are_rebuilt_and_replaced(tmp_path, monkeypatch):
    root = tmp_path / "c"
    monkeypatch.setenv(diskcache.CACHE_ENV, str(root))
    build = Counter([7])
    diskcache.load_or_build("t", "k", build, code=CODE)
    (entry,) = root.rglob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:10])  # truncated
    assert diskcache.load_or_build("t", "k", build, code=CODE) == [7] and build.calls == 2
    import pickle
    entry.write_bytes(pickle.dumps(("another key", [8])))  # a colliding file holding another key
    assert diskcache.load_or_build("t", "k", build, code=CODE) == [7] and build.calls == 3
    assert diskcache.load_or_build("t", "k", build, code=CODE) == [7] and build.calls == 3  # rewritten


def test_off_or_unwritable_cache_only_builds(tmp_path, monkeypatch):
    build = Counter("v")
    monkeypatch.setenv(diskcache.CACHE_ENV, "off")
    assert diskcache.cache_root() is None
    for _ in range(2):
        assert diskcache.load_or_build("t", "k", build, code=CODE) == "v"
    assert build.calls == 2
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(diskcache.CACHE_ENV, str(blocker / "c"))
    assert diskcache.load_or_build("t", "k", build, code=CODE) == "v" and build.calls == 3


def test_a_missing_source_is_left_to_the_builder(tmp_path, monkeypatch):
    monkeypatch.setenv(diskcache.CACHE_ENV, str(tmp_path / "c"))

    def build():
        raise FileNotFoundError("the builder names the missing file")

    with pytest.raises(FileNotFoundError, match="builder names"):
        diskcache.load_or_build("t", "k", build, code=CODE, sources=(tmp_path / "missing.yaml",))


def test_a_cached_profile_equals_a_fresh_one_and_follows_edits(tmp_path, monkeypatch):
    monkeypatch.setenv(diskcache.CACHE_ENV, str(tmp_path / "c"))
    path = tmp_path / "h100-sxm-80gb.yaml"
    text = (DEVICES_DIR / "h100-sxm-80gb.yaml").read_text()
    path.write_text(text)
    first, second = load_device_file(path), load_device_file(path)
    monkeypatch.setenv(diskcache.CACHE_ENV, "off")
    assert first == second == load_device_file(path)
    monkeypatch.setenv(diskcache.CACHE_ENV, str(tmp_path / "c"))
    path.write_text(text.replace("hbm_bandwidth_GBps: 3350", "hbm_bandwidth_GBps: 3000"))
    assert load_device_file(path).hbm_bandwidth_GBps == 3000


def _estimate_json(cache: str) -> dict:
    code = ("import json, simulator; e = simulator.estimate({'model': 'qwen2.5-0.5b', 'gpu': 'a100-sxm-80gb', "
            "'method': {'kind': 'qlora', 'r': 16}, 'workload': {'task': 'train', 'micro_batch': 2, 'seq_len': 1024}}, "
            "what_fits=False); print(e.model_dump_json())")
    env = dict(os.environ, **{diskcache.CACHE_ENV: cache})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def test_a_new_process_estimates_the_same_from_the_cache(tmp_path):
    cache = str(tmp_path / "c")
    cold = _estimate_json(cache)  # builds and stores the profiles, the model, the bands and the cost table
    namespaces = {p.parent.name for p in Path(cache).rglob("*.pkl")}
    assert {"profile-Device", "profile-System", "model", "bands", "cost-table"} <= namespaces
    assert _estimate_json(cache) == cold == _estimate_json("off")


def test_folders_of_old_code_versions_are_pruned(tmp_path, monkeypatch):
    root = tmp_path / "c"
    monkeypatch.setenv(diskcache.CACHE_ENV, str(root))
    for i in range(diskcache.KEEP_CODE_VERSIONS + 3):
        d = root / f"old{i:02d}"
        d.mkdir(parents=True)
        os.utime(d, (1_000_000 + i, 1_000_000 + i))
    diskcache.load_or_build("t", "k", Counter(1), code=CODE)  # a new code version's first entry
    left = sorted(d.name for d in root.iterdir() if d.name.startswith("old"))
    assert left == [f"old{i:02d}" for i in range(3, diskcache.KEEP_CODE_VERSIONS + 3)]
    assert len(list(root.rglob("*.pkl"))) == 1
