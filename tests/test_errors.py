"""Bad input gets a clear error naming the file, tensor or field, and nothing is written."""

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hcnr_jax
from hcnr_jax import CheckpointError, HcnrError
from hcnr_jax.conversion import hf as hf_io
from hcnr_jax.io import sha256_file


@pytest.fixture
def src(tmp_path, tiny_dirs):
    path = tmp_path / "src"
    shutil.copytree(tiny_dirs["qwen2"][1], path)
    return path


def _edit_weights(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor(src):
    _edit_weights(src, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.bias"):
        hcnr_jax.load_pretrained(src)


def test_wrong_shape(src):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1].copy()

    f = _edit_weights(src, shrink)
    with pytest.raises(CheckpointError) as e:
        hcnr_jax.load_pretrained(src)
    assert str(f) in str(e.value) and "model.layers.0.mlp.down_proj.weight" in str(e.value)
    assert "(48, 71)" in str(e.value) and "(48, 72)" in str(e.value)


def test_unsupported_architecture(src):
    _edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture model_type='gpt2'"):
        hcnr_jax.load_pretrained(src)


@pytest.mark.parametrize("setting", [{"hidden_act": "gelu"}, {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}])
def test_unsupported_setting_rejected(src, setting):
    _edit_config(src, **setting)
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported"):
        hcnr_jax.load_pretrained(src)


def test_corrupt_safetensors_header(src):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: cannot read safetensors file")):
        hcnr_jax.load_pretrained(src)


def test_truncated_safetensors(src):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        hcnr_jax.load_pretrained(src)


@pytest.mark.parametrize("changes, needle", [
    ({"num_hidden_layers": 2}, "unexpected tensor model.layers.2"),
    ({"num_hidden_layers": 4}, "missing tensor model.layers.3"),
    ({"intermediate_size": 64}, "model.layers.0.mlp.gate_proj.weight has shape"),
    ({"vocab_size": 100}, "model.embed_tokens.weight has shape"),
])
def test_config_does_not_match_weights(src, changes, needle):
    _edit_config(src, **changes, layer_types=None)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        hcnr_jax.load_pretrained(src)


def test_missing_shard_in_index(tmp_path):
    import tiny

    path = tiny.save_hf(tiny.hf_model("llama"), tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {victim.name}"):
        hcnr_jax.load_pretrained(path)


def test_not_a_model(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        hcnr_jax.load_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a model directory"):
        hcnr_jax.load_pretrained(tmp_path / "nope")


def test_existing_output_dir_untouched(tmp_path, src):
    model = hcnr_jax.load_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HcnrError, match="already exists"):
        hcnr_jax.save_pretrained(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path, src, monkeypatch):
    """A failure half-way through writing leaves no output and no temporary directory."""
    model = hcnr_jax.load_pretrained(src)
    real = hf_io.save_file
    calls = []

    def flaky(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_io, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        hcnr_jax.save_pretrained(model, tmp_path / "out", max_shard_bytes=20_000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_inputs_never_modified(tmp_path, src):
    before = {p.name: sha256_file(p) for p in src.iterdir()}
    model = hcnr_jax.load_pretrained(src, dtype="bfloat16")
    hcnr_jax.save_pretrained(model, tmp_path / "out")
    assert {p.name: sha256_file(p) for p in src.iterdir()} == before


def test_save_rejects_params_that_do_not_match_config(tmp_path, src):
    model = hcnr_jax.load_pretrained(src)
    params = model.params
    params["model"]["layers"][0]["mlp"].pop("up_proj")
    with pytest.raises(CheckpointError, match="params do not match the config"):
        hcnr_jax.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert np.all(np.isfinite(np.asarray(params["model"]["norm"]["weight"])))
