"""Model sources: one parse (`hcnr_jax.source.ModelSource`) for directories, GGUF files, adapter
chains and Hugging Face hub ids; hub ids loaded from a prepared hub cache, never the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny

from hcnr_jax.errors import CheckpointError, HcnrError
from hcnr_jax.source import ModelSource

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_parse_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "a1").mkdir()
    assert ModelSource.parse("base") == ModelSource("base")
    assert ModelSource.parse("m.gguf").is_gguf and not ModelSource.parse("Org/m.gguf").is_gguf  # the latter: a hub id
    assert ModelSource.parse("Org/name") == ModelSource("Org/name", hub=True)
    assert ModelSource.parse("Org/name@v1.0") == ModelSource("Org/name", hub=True, revision="v1.0")
    assert ModelSource.parse("base+a1+a2") == ModelSource("base", adapters=("a1", "a2"))
    assert ModelSource.parse("Org/name@main+a1") == ModelSource("Org/name", True, "main", ("a1",))
    # Paths that are not org/name: local, whatever exists.
    for text in ("/abs/x", "./x/y", "a/b/c", "x"):
        assert not ModelSource.parse(text).hub, text


def test_existing_path_wins(tmp_path, monkeypatch):
    """A relative path that exists is that path, never a hub id; a path with '+' that exists is never split,
    and a chain's base may contain '+' (the longest existing prefix)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Org" / "name").mkdir(parents=True)
    assert ModelSource.parse("Org/name") == ModelSource("Org/name")
    (tmp_path / "my+model").mkdir()
    (tmp_path / "ad").mkdir()
    assert ModelSource.parse("my+model") == ModelSource("my+model")
    assert ModelSource.parse("my+model+ad") == ModelSource("my+model", adapters=("ad",))
    assert ModelSource.parse("my+model+ad").local_paths() == [Path("my+model"), Path("ad")]
    assert ModelSource.parse("Other/hub+ad").local_paths() == [Path("ad")]  # a hub base is not local


def test_describe_and_bad_chain(tmp_path):
    src = ModelSource.parse(f"Org/name@{COMMIT}+{tmp_path}/ad")
    assert src.describe() == f"Org/name@{COMMIT}+{tmp_path}/ad" == str(src)
    assert src.describe(lambda p: "<" + Path(p).name + ">") == f"Org/name@{COMMIT}+<ad>"
    assert src.base_source == ModelSource("Org/name", True, COMMIT)
    with pytest.raises(CheckpointError, match=r"base\+: an empty adapter"):
        ModelSource.parse("base+")
    with pytest.raises(CheckpointError, match="empty model source"):
        ModelSource.parse("")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding Org/tiny-llama at COMMIT (main points at it), the layout huggingface_hub
    writes: models--Org--tiny-llama/{refs/main, snapshots/<commit>/...}; and the torch model."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--Org--tiny-llama"
    model = tiny.hf_model("llama", num_hidden_layers=2)
    tiny.save_hf(model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, model


def _offline(monkeypatch, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_api(hub_cache, monkeypatch, tmp_path):
    import torch

    from hcnr_jax.pretrained import load_pretrained, logits, model_max_positions

    cache, ref = hub_cache
    _offline(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)  # no local Org/tiny-llama
    ids = np.arange(1, 12)[None]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    for text in ("Org/tiny-llama", f"Org/tiny-llama@{COMMIT}", "Org/tiny-llama@main"):
        model = load_pretrained(text)
        assert model.source == text
        np.testing.assert_allclose(np.asarray(logits(model, ids)), want, rtol=1e-5, atol=1e-5)
    assert model_max_positions("Org/tiny-llama") == ref.config.max_position_embeddings
    with pytest.raises(HcnrError, match=r"^Org/missing: not a local path, and not in the Hugging Face hub cache.*"
                                        r"HF_HUB_OFFLINE is set"):
        load_pretrained("Org/missing")
    with pytest.raises(HcnrError, match=r"^Org/tiny-llama@v9: not a local path"):
        load_pretrained("Org/tiny-llama@v9")


def _cli(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "hcnr_jax.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_hub_id_cli(hub_cache, tmp_path):
    """hcnr convert org/name OUT from the cache, offline; an uncached id: one line naming it, exit 2."""
    from safetensors.numpy import load_file

    cache, ref = hub_cache
    r = _cli(["convert", f"Org/tiny-llama@{COMMIT}", "out"], cache, tmp_path)
    assert r.returncode == 0, r.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = {k: v.numpy() for k, v in ref.state_dict().items() if k in got}
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in got)
    r = _cli(["convert", "Org/not-cached", "out2"], cache, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Org/not-cached: not a local path" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out2").exists()


def test_hub_config_for_plan(hub_cache, monkeypatch, tmp_path):
    from hcnr_jax.plan import load_hf_config

    cache, ref = hub_cache
    _offline(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)
    assert load_hf_config(f"Org/tiny-llama@{COMMIT}")["num_hidden_layers"] == ref.config.num_hidden_layers == 2


def test_hub_cache_first_then_hub(monkeypatch, tmp_path):
    """Online: the cache is asked first (local_files_only), the hub only when it lacks the id; a hub
    failure is one line naming the id and the cause (snapshot_download stubbed: no network)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from hcnr_jax.source import hub_snapshot

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def fake(repo_id, revision=None, local_files_only=False):
        calls.append((repo_id, revision, local_files_only))
        if repo_id == "Org/cached" and local_files_only:
            return str(tmp_path)
        if local_files_only:
            raise LocalEntryNotFoundError("not in cache")
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert hub_snapshot("Org/cached") == tmp_path and calls == [("Org/cached", None, True)]
    with pytest.raises(HcnrError) as e:
        hub_snapshot("Org/x", "v2")
    assert str(e.value) == ("Org/x@v2: not a local path, not in the Hugging Face hub cache, and the hub could not "
                            "provide it (ConnectionError: Failed to resolve 'huggingface.co')")
    assert calls[1:] == [("Org/x", "v2", True), ("Org/x", "v2", False)]


def test_hub_base_with_adapters(hub_cache, monkeypatch, tmp_path):
    """``org/name+A1+A2`` merges the adapters onto the cached snapshot, in order, exactly as the
    snapshot's local path does; the source is recorded as written."""
    from test_lora_write import random_lora

    from hcnr_jax.conversion.lora import write_adapter
    from hcnr_jax.params import flatten
    from hcnr_jax.pretrained import load_pretrained

    cache, _ = hub_cache
    _offline(monkeypatch, cache)
    monkeypatch.chdir(tmp_path)
    base = load_pretrained("Org/tiny-llama")
    write_adapter("a1", random_lora(base.config, 2, seed=1), r=2, alpha=4)
    write_adapter("a2", random_lora(base.config, 2, seed=2, layers=[1]), r=2, alpha=2)
    hub = load_pretrained("Org/tiny-llama+a1+a2")
    local = load_pretrained(f"{cache}/models--Org--tiny-llama/snapshots/{COMMIT}+a1+a2")
    assert hub.source == "Org/tiny-llama+a1+a2"
    got, want, orig = flatten(hub.params), flatten(local.params), flatten(base.params)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not np.array_equal(got["model.layers.1.self_attn.q_proj.weight"],
                              orig["model.layers.1.self_attn.q_proj.weight"])
