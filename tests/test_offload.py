"""The idle model leaves memory while a statistics pass runs on the other (hcnr_jax.offload and
repair.pipeline.one_model_at_a_time): bit-exact round trips, files removed, the same repair."""

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
    assert len(list(off.folder.iterdir())) == 3  # the empty array stays in memory
    assert off.nbytes == sum(a.nbytes for a, _, _ in want.values())
    back = offload.restore(off)
    assert not off.folder.exists()
    got = flatten(back)
    assert set(got) == set(want)
    for k, (a, dtype, sharding) in want.items():
        assert got[k].dtype == dtype and got[k].sharding == sharding, k
        np.testing.assert_array_equal(np.asarray(got[k]).view(np.uint8), a.view(np.uint8), err_msg=k)


def test_discard_removes_the_files(tmp_path):
    off = offload.offload(tree(), tmp_path)
    offload.discard(off)
    assert not off.folder.exists() and off.leaves == []


def test_numpy_leaves_are_not_offloaded():
    assert offload.can_offload(tree())
    assert not offload.can_offload({"w": np.ones(3)})
    assert not offload.can_offload({})


@pytest.fixture(scope="module")
def loaded(pair_dirs):  # noqa: F811
    base, ft = pair_dirs["llama"]
    hon, task = pair_dirs["data"]
    cfg = RepairConfig()
    return P.load(base, ft, hon, task, cfg)


def test_one_model_at_a_time(loaded, tmp_path, monkeypatch):
    """use(name): the other model's params are gone (None) while it waits, and come back bit for
    bit; every model is back after the block and the folder is empty."""
    import dataclasses

    state = dataclasses.replace(loaded, options=dataclasses.replace(loaded.options, cache_dir=str(tmp_path)))
    assert state.owned == {"orig", "sft"}
    before = {n: {k: np.asarray(v) for k, v in flatten(p).items()} for n, p in state.models().items()}
    with P.one_model_at_a_time(state) as use:
        use("orig")
        assert state.finetuned.params is None and state.base.params is not None
        assert len(list(tmp_path.iterdir())) == 1  # one model's folder
        use("sft")
        assert state.base.params is None and state.finetuned.params is not None
    assert list(tmp_path.iterdir()) == []
    for n, p in state.models().items():
        for k, v in flatten(p).items():
            np.testing.assert_array_equal(np.asarray(v), before[n][k], err_msg=f"{n} {k}")


def test_an_error_inside_deletes_the_waiting_copy(loaded, tmp_path):
    import dataclasses

    state = dataclasses.replace(loaded, options=dataclasses.replace(loaded.options, cache_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="stop"), P.one_model_at_a_time(state) as use:
        use("orig")
        raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_a_callers_models_stay_in_place(pair_dirs):  # noqa: F811
    """Models the caller passed as `Pretrained` are referenced by the caller: nothing to free, so
    nothing is written."""
    import hcnr_jax

    base, ft = (hcnr_jax.load_pretrained(p) for p in pair_dirs["llama"])
    state = P.load(base, ft, *pair_dirs["data"], RepairConfig())
    assert state.owned == frozenset()
    with P.one_model_at_a_time(state) as use:
        use("orig")
        assert state.finetuned.params is ft.params


def test_the_repair_is_the_same_with_and_without_offloading(pair_dirs, tmp_path, monkeypatch):  # noqa: F811
    """From sources (the repair owns the models): the statistics passes run with the other model
    offloaded (checked by a spy), and the repaired weights and report equal those of a repair
    that keeps both in memory."""
    calls = []
    real = offload.offload
    monkeypatch.setattr(offload, "offload", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, ft = pair_dirs["llama"]
    hon, task = pair_dirs["data"]
    kept = repair(base, ft, hon, task, RepairConfig(), progress=False, offload_idle=False)
    assert calls == []
    moved = repair(base, ft, hon, task, RepairConfig(), progress=False)
    assert len(calls) == 3  # fisher: orig's pass (sft waits), sft's pass (orig waits); the Hessians' pass
    a, b = flatten(kept.model.params), flatten(moved.model.params)
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    strip = ("timing_s", "memory")
    assert {k: v for k, v in kept.report.items() if k not in strip} == \
        {k: v for k, v in moved.report.items() if k not in strip}
