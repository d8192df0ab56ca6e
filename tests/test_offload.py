"""The idle model leaves memory while a statistics pass runs on the other (hcnr_jax.offload and
repair.pipeline.one_model_at_a_time): bit-exact round trips, files removed, the same repair."""

import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_repair import pair_dirs, write_jsonl  # noqa: F401  (module fixture reused)

from hcnr_jax import offload
from hcnr_jax.params import flatten
from hcnr_jax.repair import RepairConfig, repair
from hcnr_jax.repair import pipeline as P


def tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {"a": {"w": jax.random.normal(k[0], (5, 7), jnp.float32)},
            "b": jax.random.normal(k[1], (3,), jnp.float32).astype(jnp.bfloat16),
            "c": jnp.zeros((0, 4), jnp.float32),
            "d": jax.random.randint(k[2], (4,), 0, 9, jnp.int32)}


def test_round_trip_is_bit_exact_and_removes_its_files(tmp_path):
    params = tree()
    want = {k: (np.asarray(v), v.dtype, v.sharding) for k, v in flatten(params).items()}
    off = offload.offload(params, tmp_path)
    assert off.folder is not None and off.folder.parent == tmp_path  # a CPU: files, not host copies
    assert len(list(off.folder.glob("*.bin"))) == 3  # the empty array stays in memory
    assert off.nbytes == sum(a.nbytes for a, _, _ in want.values())
    back = offload.restore(off)
    assert not off.folder.exists()
    got = flatten(back)
    assert set(got) == set(want)
    for k, (a, dtype, sharding) in want.items():
        assert got[k].dtype == dtype and got[k].sharding == sharding, k
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint8), a.view(np.uint8), err_msg=k)


def test_a_killed_process_folder_is_deleted_by_the_next_offload(tmp_path):
    # A process offloads into tmp_path and is SIGKILLed: it cannot delete its folder itself.
    code = ("import os, signal, jax.numpy as jnp; from hcnr_jax import offload; "
            f"offload.offload({{'w': jnp.ones((4, 4))}}, {str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    (left,) = tmp_path.glob("offload-*")
    assert (left / "0.bin").exists() and (left / offload.OWNER).exists()
    mine = offload.offload(tree(), tmp_path)
    assert not left.exists()
    assert sorted(tmp_path.glob("offload-*")) == [mine.folder]
    other = offload.offload(tree(), tmp_path)  # this process's own folder is kept: its owner runs
    assert mine.folder.exists() and other.folder.exists()
    offload.discard(mine)
    offload.discard(other)


@pytest.mark.parametrize("owner", [None, "elsewhere {pid} {start}", "{host} {pid} 1", "{host} not-a-pid 1"])
def test_sweep_deletes_only_folders_of_a_gone_owner(tmp_path, owner):
    folder = tmp_path / "offload-x"
    folder.mkdir()
    if owner is not None:
        line = owner.format(host=socket.gethostname(), pid=os.getpid(), start=offload._start_time(os.getpid()))
        (folder / offload.OWNER).write_text(line + "\n")
    gone = offload.sweep_stale(tmp_path)
    # "{host} {pid} 1": this process's id with another start time: the id was reused, the owner is gone.
    reused = owner == "{host} {pid} 1" and offload._start_time(os.getpid()) is not None
    assert gone == ([folder] if reused else [])
    assert folder.exists() != reused


def test_discard_removes_the_files(tmp_path):
    off = offload.offload(tree(), tmp_path)
    offload.discard(off)
    assert not off.folder.exists() and off.leaves == []


def test_numpy_leaves_are_not_offloaded():
    assert offload.can_offload(tree())
    assert not offload.can_offload({"w": np.ones(3)})
    assert not offload.can_offload({})


def test_get_places_one_leaf(tmp_path):
    params = tree()
    off = offload.offload(params, tmp_path)
    np.testing.assert_array_equal(np.asarray(off.get("a.w")), np.asarray(params["a"]["w"]))
    assert off.get("b").dtype == jnp.bfloat16
    offload.discard(off)


def state_of(pair_dirs, tmp_path, offload_idle=True, models=None):  # noqa: F811
    from hcnr_jax.stats import StatsOptions

    base, ft = models or pair_dirs["llama"]
    return P.load(base, ft, *pair_dirs["data"], RepairConfig(), StatsOptions(cache_dir=str(tmp_path)),
                  offload_idle=offload_idle)


def test_use_moves_one_model_at_a_time(pair_dirs, tmp_path):  # noqa: F811
    """Loading leaves the base away (in files) while the fine-tuned model loads; use(name) swaps,
    bit for bit; a layer of the model that is away is read alone; release deletes the files."""
    ref = state_of(pair_dirs, tmp_path / "ref", offload_idle=False)
    want = {n: {k: np.asarray(v) for k, v in flatten(p).items()} for n, p in ref.models().items()}
    state = state_of(pair_dirs, tmp_path / "s")
    assert state.owned == {"orig", "sft"} and set(state.away) == {"orig"} and state.base.params is None
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(np.asarray(state.weights(name)[0]), want["orig"][name])
    state.use("orig")
    assert state.finetuned.params is None and set(state.away) == {"sft"}
    assert len(list((tmp_path / "s").iterdir())) == 1  # one model's folder at a time
    state.use("sft")
    for n in ("orig", "sft"):
        state.use(n)
        for k, v in flatten(state.model(n).params).items():
            np.testing.assert_array_equal(np.asarray(v), want[n][k], err_msg=f"{n} {k}")
    state.release()
    assert state.away == {} and list((tmp_path / "s").iterdir()) == []


def test_a_failed_load_deletes_the_waiting_copy(pair_dirs, tmp_path):  # noqa: F811
    base, _ = pair_dirs["llama"]
    with pytest.raises(Exception):  # noqa: B017  (whatever the loader raises for a missing model)
        state_of(pair_dirs, tmp_path, models=(base, str(tmp_path / "missing")))
    assert not any(tmp_path.iterdir())


def test_a_callers_models_stay_in_place(pair_dirs, tmp_path):  # noqa: F811
    """Models the caller passed as `Pretrained` are referenced by the caller: nothing to free, so
    nothing is written."""
    import hcnr_jax

    base, ft = (hcnr_jax.load_pretrained(p) for p in pair_dirs["llama"])
    state = state_of(pair_dirs, tmp_path, models=(base, ft))
    assert state.owned == frozenset() and state.away == {}
    state.use("orig")
    assert state.finetuned.params is ft.params and state.away == {}


def test_the_repair_is_the_same_with_and_without_offloading(pair_dirs, tmp_path, monkeypatch):  # noqa: F811
    """From sources (the repair owns the models): the base waits away during the load, the
    statistics passes run with the other model away and the solve reads the base layer by layer
    (checked by spies); the repaired weights and report equal those of a repair that keeps both
    in memory, and no file is left."""
    from hcnr_jax.stats import StatsOptions

    moved, got = [], []
    real_off, real_get = offload.offload, offload.Offloaded.get
    monkeypatch.setattr(offload, "offload", lambda *a, **k: moved.append(1) or real_off(*a, **k))
    monkeypatch.setattr(offload.Offloaded, "get", lambda self, n: got.append(n) or real_get(self, n))
    base, ft = pair_dirs["llama"]
    hon, task = pair_dirs["data"]
    kept = repair(base, ft, hon, task, RepairConfig(), progress=False, offload_idle=False)
    assert moved == [] and got == []
    folder = tmp_path / "stats"
    out = repair(base, ft, hon, task, RepairConfig(), progress=False, stats_options=StatsOptions(cache_dir=str(folder)))
    # load: base away; Fisher on orig: sft away; Fisher on sft: orig away (calib_model sft: no move)
    assert len(moved) == 3
    layers = out.report["layers"]  # the selection reads every base layer, the solve the kept ones
    assert len(got) == len(layers) + sum(r["kept"] for r in layers)
    assert not list(folder.glob("offload-*"))
    a, b = flatten(kept.model.params), flatten(out.model.params)
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    strip = ("timing_s", "memory")
    assert {k: v for k, v in kept.report.items() if k not in strip} == \
        {k: v for k, v in out.report.items() if k not in strip}


def test_own_model_repaired_in_place_a_callers_left_alone(pair_dirs, monkeypatch):  # noqa: F811
    """The fine-tuned model a repair loaded itself is repaired in place, one set_leaves per kept
    layer as it is solved; a caller's model keeps its weights (its repaired layers are set at the
    end, once); the repaired weights are the same bit for bit."""
    import hcnr_jax

    calls = []
    real = P.set_leaves
    monkeypatch.setattr(P, "set_leaves", lambda params, upd: calls.append(len(upd)) or real(params, upd))
    hon, task = pair_dirs["data"]
    base, ft = (hcnr_jax.load_pretrained(p) for p in pair_dirs["llama"])
    before = {k: np.asarray(v).copy() for k, v in flatten(ft.params).items()}
    theirs = repair(base, ft, hon, task, RepairConfig(), progress=False)
    kept = sum(r["kept"] for r in theirs.report["layers"])
    assert kept > 1 and calls == [kept]
    for k, v in flatten(ft.params).items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
    calls.clear()
    ours = repair(*pair_dirs["llama"], hon, task, RepairConfig(), progress=False)
    assert calls == [1] * kept
    a, b = flatten(theirs.model.params), flatten(ours.model.params)
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def test_release_free_heap_reaches_glibc():
    """On glibc (Linux: these machines and CI) the trim is found and called; elsewhere it says False."""
    import platform

    from hcnr_jax.offload import release_free_heap

    assert release_free_heap() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
