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
from hcnr_jax.params import flatten


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


@pytest.mark.parametrize("stored, shown", [(np.float64, "float64"), (np.int32, "int32")])
def test_unsupported_tensor_dtype(src, stored, shown):
    name = "model.layers.1.mlp.up_proj.weight"
    f = _edit_weights(src, lambda t: t.update({name: t[name].astype(stored)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{f}: tensor {name} has unsupported dtype {shown}")):
        hcnr_jax.load_pretrained(src)


def test_mixed_stored_dtypes_cast_per_tensor(src):
    """Each tensor is cast on its own as it is read: a float16 tensor among float32 ones loads as
    float32 or bfloat16 exactly as a whole-model cast would give it."""
    import ml_dtypes

    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_weights(src, lambda t: t.update({name: t[name].astype(np.float16)}))
    stored = load_file(str(src / "model.safetensors"))
    for dtype in ("float32", "bfloat16"):
        flat = flatten(hcnr_jax.load_pretrained(src, dtype=dtype).params)
        target = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
        for k, v in stored.items():
            got = np.asarray(flat[k])
            assert got.dtype == target and got.tobytes() == v.astype(target).tobytes(), (dtype, k)


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


# --- casts that overflow, non-finite weights ------------------------------------------------------

def test_dtype_cast_that_overflows_is_an_error(src):
    """float16 holds up to 65504: a larger float32 weight is an error naming the file and tensor,
    never an inf written to the output (`hcnr convert`: tests/test_bad_inputs.py)."""
    name = "model.layers.1.mlp.up_proj.weight"

    def enlarge(t):
        t[name][3, 5] = 1e5

    f = _edit_weights(src, enlarge)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)}: casting to float16 overflows") as e:
        hcnr_jax.load_pretrained(src, dtype="float16")
    assert str(f) in str(e.value) and "1e+05" in str(e.value)
    assert hcnr_jax.load_pretrained(src, dtype="bfloat16").dtype.name == "bfloat16"  # fits bfloat16


def test_save_refuses_non_finite_weights(tmp_path, src):
    import jax.numpy as jnp

    model = hcnr_jax.load_pretrained(src)
    leaf = model.params["model"]["layers"][2]["self_attn"]["o_proj"]
    leaf["weight"] = jnp.asarray(leaf["weight"]).at[0, 1].set(jnp.inf).at[4, 2].set(jnp.nan)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.o_proj\.weight holds 2 NaN or infinite"):
        hcnr_jax.save_pretrained(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no temp dir
    hcnr_jax.save_pretrained(model, out, allow_nonfinite=True)  # on request
    assert np.isinf(load_file(str(out / "model.safetensors"))["model.layers.2.self_attn.o_proj.weight"][0, 1])
    with pytest.raises(CheckpointError, match=r"tensor w holds 1 NaN"):
        hf_io.write_weights({"w": np.array([1.0, np.nan], np.float32)}, tmp_path)


# --- leftovers of killed runs -----------------------------------------------------------------------

def _dead_pid():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigkilled_write_leaves_a_temp_dir_that_the_next_write_removes(tmp_path, caplog):
    import os
    import subprocess
    import sys

    from hcnr_jax.io import _temp_prefix, atomic_output_dir

    out = tmp_path / "out"
    script = ("import os, signal; from hcnr_jax.io import atomic_output_dir\n"
              f"with atomic_output_dir({str(out)!r}) as tmp:\n"
              "    (tmp / 'weights.bin').write_bytes(b'x' * 1000)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -9
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and (left[0] / "weights.bin").exists() and not out.exists()
    # A live run's temp dir (this process), another host's and an old-style one (no pid) are kept.
    live = tmp_path / (_temp_prefix("out", "tmp") + "live")
    foreign = tmp_path / f".out.tmp-otherhost-{_dead_pid()}-abc"
    legacy = tmp_path / ".out.tmp-k3j2h1g0"
    dead_file = tmp_path / f"{_temp_prefix('out', 'tmp').rsplit('-', 2)[0]}-{_dead_pid()}-file"
    for d in (live, foreign, legacy):
        d.mkdir()
    dead_file.write_text("torn")
    with caplog.at_level("WARNING", logger="hcnr_jax.io"), atomic_output_dir(out) as tmp:
        assert f"-{os.getpid()}-" in tmp.name  # the owner is in the name
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, legacy.name, "out"])
    assert f"removed {left[0]}" in caplog.text and str(legacy) in caplog.text and str(foreign) in caplog.text


def test_atomic_file_write_removes_stale_temp_files(tmp_path):
    from hcnr_jax.io import _temp_prefix, atomic_write_text

    stale = tmp_path / (_temp_prefix("m.json", "tmp").rsplit("-", 2)[0] + f"-{_dead_pid()}-abc")
    stale.write_text("{")
    atomic_write_text(tmp_path / "m.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# --- sequence length against the model's positions ---------------------------------------------------

def test_default_max_length_is_lowered_to_the_models_positions(src, caplog):
    from hcnr_jax.pretrained import model_max_positions, resolve_max_length

    assert model_max_positions(src) == 256 and model_max_positions(f"{src}+adapter") == 256
    assert model_max_positions("no/such/model") is None
    assert resolve_max_length([src], 128, explicit=True) == 128
    with caplog.at_level("INFO", logger="hcnr_jax.pretrained"):
        assert resolve_max_length([src], 512, explicit=False) == 256
    assert "exceeds max_position_embeddings=256" in caplog.text


# --- outputs that would overwrite an input (the refused ones: tests/test_bad_inputs.py) ---------------

@pytest.fixture
def fake_models(tmp_path):
    """Directories standing for models (never loaded: the checks come first), each with a file."""
    dirs = {}
    for name in ("base", "ft", "adapter"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "config.json").write_text("{}")
    return dirs


def test_model_source_paths(tmp_path, fake_models):
    from hcnr_jax.io import model_source_paths

    base, ft, adapter = fake_models["base"], fake_models["ft"], fake_models["adapter"]
    assert model_source_paths(base) == [base]
    assert model_source_paths(f"{base}+{adapter}") == [base, adapter]
    assert model_source_paths(f"{base}+{ft}+{adapter}") == [base, ft, adapter]
    assert model_source_paths(f"Org/hub-model+{adapter}") == [adapter]  # not local: nothing to protect
    plus = tmp_path / "a+b"
    plus.mkdir()
    assert model_source_paths(plus) == [plus]  # an existing path is never split


def test_eval_out_beside_the_model_passes_the_check(tmp_path, fake_models, capsys):
    """An --out beside the model passes the output checks (this one then fails on loading the
    stand-in model, not on --out); eval now writes --out whole, so a folder holding the model is
    refused with --overwrite (it would be replaced) and without it (it exists)."""
    from hcnr_jax.cli import main

    model = str(fake_models["base"])
    assert main(["eval", "--model", model, "--benchmarks", "kuq", "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "the output" not in err and "config.json" in err
    assert main(["eval", "--model", model, "--benchmarks", "kuq", "--out", str(tmp_path), "--overwrite"]) == 2
    assert "the output contains the --model input" in capsys.readouterr().err


# --- shard indexes ------------------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    import tiny

    return tiny.save_hf(tiny.hf_model("llama"), tmp_path / "sharded", max_shard_size="20KB")


def _edit_index(path, fn):
    f = path / hf_io.INDEX_NAME
    index = json.loads(f.read_text())
    fn(index["weight_map"])
    f.write_text(json.dumps(index))
    return f


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE", 7])
def test_shard_index_entry_outside_the_model_directory_is_refused(sharded, entry):
    """An index must not make the loader read a file outside the model (``..``, an absolute path),
    even one that exists and holds the right tensors."""
    outside = sharded.parent / "outside.safetensors"
    shutil.copyfile(sorted(sharded.glob("model-*.safetensors"))[0], outside)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = _edit_index(sharded, lambda m: m.update({"model.norm.weight": entry}))
    with pytest.raises(CheckpointError) as e:
        hcnr_jax.load_pretrained(sharded)
    msg = str(e.value)
    assert msg.startswith(f"{index}: weight_map entry 'model.norm.weight'") and repr(entry) in msg


def test_shard_index_entry_naming_a_shard_without_the_tensor(sharded):
    holder = hf_io.weight_map(sharded)["model.norm.weight"]
    other = next(f for f in sorted(sharded.glob("model-*.safetensors")) if f != holder)
    _edit_index(sharded, lambda m: m.update({"model.norm.weight": other.name}))
    with pytest.raises(CheckpointError, match=re.escape(f"{other}: index lists tensor model.norm.weight, "
                                                        "but the file lacks it")):
        hcnr_jax.load_pretrained(sharded)


def test_shard_index_may_name_symlinks_and_subfolders_inside_the_model(sharded, tmp_path):
    """The Hugging Face cache links each shard to its blob store outside the snapshot folder: a
    symlink inside the directory is fine, and so is a shard in a subfolder."""
    expected = hcnr_jax.load_pretrained(sharded).params
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shards = sorted(sharded.glob("model-*.safetensors"))
    for f in shards[:2]:
        f.rename(blobs / f.name)
        f.symlink_to(blobs / f.name)
    (sharded / "sub").mkdir()
    shards[2].rename(sharded / "sub" / shards[2].name)
    _edit_index(sharded, lambda m: m.update({k: f"sub/{v}" for k, v in m.items() if v == shards[2].name}))
    got = hcnr_jax.load_pretrained(sharded).params
    np.testing.assert_array_equal(np.asarray(got["model"]["norm"]["weight"]), np.asarray(expected["model"]["norm"]["weight"]))


# --- non-finite numbers in reports --------------------------------------------------------------------

def test_strict_json_and_finite_tensors_name_the_field():
    from hcnr_jax.io import check_finite_tensors, strict_json

    assert json.loads(strict_json({"a": [1.0, np.float32(2)], "b": None}, "r.json")) == {"a": [1.0, 2.0], "b": None}
    with pytest.raises(HcnrError, match=r"^r\.json: field layers\[1\]\.objective_after is nan \(and 1 more"):
        strict_json({"layers": [{"objective_after": 1.0}, {"objective_after": float("nan")}], "x": np.inf}, "r.json")
    check_finite_tensors({"w": np.ones(3, np.float32), "i": np.arange(3)}, "s.safetensors")
    with pytest.raises(HcnrError, match=r"^s\.safetensors: tensor w holds 2 NaN or infinite value\(s\) of 3"):
        check_finite_tensors({"w": np.array([np.inf, 1, np.nan], np.float32)}, "s.safetensors")


def test_repair_report_with_nan_is_refused_before_anything_is_written(tmp_path, src):
    from hcnr_jax.repair.pipeline import RepairResult, write_repair

    report = {"summary": {"objective_after": 1.0}, "layers": [{"name": "a", "objective_after": 0.5},
                                                               {"name": "b", "objective_after": float("inf")}]}
    out = tmp_path / "repaired"
    with pytest.raises(HcnrError, match=r"hcnr_report\.json: field layers\[1\]\.objective_after is inf"):
        write_repair(RepairResult(hcnr_jax.load_pretrained(src), report), out, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- locks ----------------------------------------------------------------------------------------------

HOLDER = """
import sys
from hcnr_jax.io import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock ``tmp_path/entry.lock`` until told to end (a line on its stdin)."""
    import subprocess
    import sys

    lock = tmp_path / "entry.lock"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    yield lock, p
    p.kill()
    p.wait()


def test_lock_held_by_another_process_names_it_then_is_acquired_when_released(holder, caplog):
    import os
    import socket
    import threading

    from hcnr_jax.io import file_lock

    lock, p = holder
    assert json.loads(lock.read_text())["pid"] == p.pid
    with caplog.at_level("WARNING", logger="hcnr_jax.io"):
        with pytest.raises(HcnrError) as e, file_lock(lock, timeout=0.4, what="cache entry E", poll=0.05):
            pass
        msg = str(e.value)
        assert f"cache entry E is locked by process {p.pid} on host {socket.gethostname()}" in msg
        assert "gave up after waiting 0.4 s (--lock-timeout)" in msg and "\n" not in msg
        assert caplog.text.count("is locked by") == 1, "the holder is named once, not at every poll"

        def release():
            p.stdin.write("\n")
            p.stdin.flush()

        threading.Timer(0.3, release).start()
        with file_lock(lock, timeout=60, poll=0.05):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert p.wait(30) == 0 and not lock.exists()
    assert "taking over" not in caplog.text  # released properly: nothing stale


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, caplog):
    from hcnr_jax.io import file_lock

    lock, p = holder
    p.kill()
    p.wait()
    assert lock.exists(), "SIGKILL leaves the file (the kernel drops the lock itself)"
    with caplog.at_level("WARNING", logger="hcnr_jax.io"), file_lock(lock, timeout=0):
        pass
    assert f"taking over the lock left by process {p.pid}" in caplog.text and not lock.exists()


def test_lock_still_held_by_a_child_of_a_dead_process_is_taken_over(tmp_path, caplog):
    """The lock is held (a forked child kept the descriptor) but the process it names is gone."""
    import socket
    import subprocess
    import sys

    from hcnr_jax.io import file_lock

    lock = tmp_path / "entry.lock"
    script = ("import fcntl, json, os, sys\n"
              f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
              "fcntl.flock(fd, fcntl.LOCK_EX)\n"
              f"os.write(fd, json.dumps({{'host': {socket.gethostname()!r}, 'pid': {_dead_pid()}}}).encode())\n"
              "print('held', flush=True)\n"
              "sys.stdin.readline()\n")
    p = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with caplog.at_level("WARNING", logger="hcnr_jax.io"), file_lock(lock, timeout=5):
            pass
        assert "taking over the lock of process" in caplog.text and "which is gone" in caplog.text
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_lock_is_released_on_exceptions_and_ctrl_c(tmp_path, exc):
    from hcnr_jax.io import file_lock

    lock = tmp_path / "entry.lock"
    with pytest.raises(exc), file_lock(lock):
        assert lock.exists()
        raise exc()
    assert not lock.exists()
    with file_lock(lock, timeout=0):
        pass
