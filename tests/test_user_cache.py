"""The user cache (hcnr_jax.user_cache): where it is, run folders that survive a failure and go after a
success, least-recently-used eviction under a size cap, and `hcnr cache info|clear`."""

from __future__ import annotations

import os
import time

import pytest

from hcnr_jax import user_cache
from hcnr_jax.cli import main
from hcnr_jax.errors import HcnrError


@pytest.fixture
def cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("HCNR_CACHE_MAX_SIZE", raising=False)
    return tmp_path / "c"


def _fill(folder, n_bytes: int, used: float) -> None:
    """``n_bytes`` of work in a run folder, last used at time ``used``."""
    folder.mkdir(parents=True)
    (folder / "work.bin").write_bytes(b"x" * n_bytes)
    (folder / user_cache.RUN_MARKER).write_text('{"description": "a run"}')
    os.utime(folder / user_cache.RUN_MARKER, (used, used))


@pytest.mark.parametrize(("text", "expected"), [("20GB", 20 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                                ("1000", 1000), ("none", None), ("2 kb", 2000)])
def test_parse_size(text, expected):
    assert user_cache.parse_size(text) == expected


def test_a_bad_cap_names_the_variable(cache_root, monkeypatch, capsys):
    monkeypatch.setenv("HCNR_CACHE_MAX_SIZE", "lots")
    with pytest.raises(HcnrError, match="HCNR_CACHE_MAX_SIZE='lots'"):
        user_cache.max_bytes()
    assert main(["cache", "info"]) == 2 and "HCNR_CACHE_MAX_SIZE" in capsys.readouterr().err


def test_run_folder_goes_after_success_and_stays_after_a_failure(cache_root):
    identity = {"model": "m", "data": "abc"}
    with user_cache.run_folder("stats", identity) as run:
        assert run.path.parent == cache_root / "runs" and not run.resumed
        (run.path / "part.bin").write_bytes(b"1")
        first = run.path
    assert not first.exists()
    with pytest.raises(KeyboardInterrupt), user_cache.run_folder("stats", identity) as run:
        (run.path / "part.bin").write_bytes(b"1")
        raise KeyboardInterrupt
    assert (first / "part.bin").exists()  # the same inputs find the same folder: the rerun resumes
    with user_cache.run_folder("stats", identity) as run:
        assert run.path == first and run.resumed
    with user_cache.run_folder("stats", {"model": "m", "data": "other"}, keep=True) as run:
        (run.path / "part.bin").write_bytes(b"1")
    assert run.path != first and (run.path / "part.bin").exists()  # --keep-cache


def test_least_recently_used_runs_are_evicted_beyond_the_cap(cache_root, monkeypatch):
    now = time.time()
    for name, used in (("old", now - 300), ("mid", now - 200), ("new", now - 100)):
        _fill(cache_root / "runs" / name, 1000, used)
    monkeypatch.setenv("HCNR_CACHE_MAX_SIZE", "2500")
    with user_cache.run_folder("eval", {"x": 1}) as run:  # starting a run prunes: 3 x 1000 bytes > 2500
        assert not (cache_root / "runs" / "old").exists()
        assert (cache_root / "runs" / "mid").exists() and (cache_root / "runs" / "new").exists()
        assert run.path.exists()
    monkeypatch.setenv("HCNR_CACHE_MAX_SIZE", "0")
    with user_cache.run_folder("eval", {"x": 2}):
        # A cap of 0 evicts everything else, but never the folder in use.
        assert [p.name for p in (cache_root / "runs").iterdir()] == [f"eval-{user_cache.run_key({'command': 'eval', 'x': 2})}"]


def test_a_run_in_use_is_neither_evicted_nor_cleared(cache_root, capsys):
    _fill(cache_root / "runs" / "done", 10, time.time())
    (cache_root / "data").mkdir()
    (cache_root / "data" / "kuq.jsonl").write_text("{}\n")
    with user_cache.run_folder("repair", {"x": 1}, keep=True) as run:
        assert user_cache.prune(limit=0) and run.path.exists() and not (cache_root / "runs" / "done").exists()
        assert main(["cache", "info"]) == 0
        out = capsys.readouterr().out
        assert str(cache_root) in out and "runs/: 1," in out and "in use" in out
        assert main(["cache", "clear"]) == 0
        assert f"kept {run.path}: a run is using it" in capsys.readouterr().out and run.path.exists()
    assert main(["cache", "clear"]) == 0
    assert not list((cache_root / "runs").iterdir()) and (cache_root / "data" / "kuq.jsonl").exists()
    assert main(["cache", "clear", "--data"]) == 0 and not (cache_root / "data" / "kuq.jsonl").exists()


def test_an_unwritable_cache_runs_without_one(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HCNR_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    with user_cache.run_folder("stats", {}) as run:
        assert run is None


def test_source_identity_changes_when_the_model_is_rewritten(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a")
    before = user_cache.source_identity(model)
    (model / "model.safetensors").write_bytes(b"ab")
    assert user_cache.source_identity(model) != before
    assert user_cache.source_identity("org/name")["files"] == []  # a hub id (not local): its text alone
