"""Checkpoint/resume and the result cache of the statistics engine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_stats import random_samples

import hcnr_jax
from hcnr_jax import stats
from hcnr_jax.params import get, set_leaves
from hcnr_jax.stats import StatsOptions


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import tiny

    return tiny.save_hf(tiny.hf_model("llama", num_hidden_layers=2), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def model(model_dir):
    return hcnr_jax.load_pretrained(model_dir)


# Runs the same accumulation as the test below in a fresh interpreter and SIGKILLs itself right
# after the checkpoint of batch 2 is on disk: no exception handler, no atexit, no orbax cleanup.
KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import hcnr_jax
    from hcnr_jax import stats
    from hcnr_jax.stats import StatsOptions
    from test_stats import random_samples
    model = hcnr_jax.load_pretrained({model_dir!r})
    cache = Path({cache!r})

    def die(done):
        if done == 2:
            assert list(cache.glob("*.ckpt/2")), "checkpoint 2 must be on disk before the kill"
            os.kill(os.getpid(), signal.SIGKILL)

    stats.fisher(model.params, model.config, random_samples(n=8, seed=11), StatsOptions(
        batch_size=2, cache_dir=cache, checkpoint_every=1, on_batch=die))
    sys.exit(3)  # not reached
""")


def test_sigkilled_process_resumes_bit_identical(model, model_dir, tmp_path):
    cache = tmp_path / "cache"
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER.format(tests=str(Path(__file__).parent), model_dir=str(model_dir),
                                           cache=str(cache)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert list(cache.glob("*.ckpt")) and not list(cache.glob("*.safetensors"))

    samples = random_samples(n=8, seed=11)
    seen: list[int] = []
    resumed = stats.fisher(model.params, model.config, samples, StatsOptions(
        batch_size=2, cache_dir=cache, checkpoint_every=1, on_batch=seen.append))
    assert seen == [3, 4], "the rerun must resume after the last checkpoint of the killed process"
    full = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=2))
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
    assert not list(cache.glob("*.ckpt")) and list(cache.glob("*.safetensors"))


def fisher_killed_after_two_batches(model, cache_dir):
    """A Fisher run on 8 samples killed after its second batch (checkpoint every batch); returns the
    samples and the uninterrupted result to compare with."""
    samples = random_samples(n=8, seed=11)
    full = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=2))

    def kill_after_two(done):
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        stats.fisher(model.params, model.config, samples, StatsOptions(
            batch_size=2, cache_dir=cache_dir, checkpoint_every=1, on_batch=kill_after_two))
    return samples, full


def test_kill_and_resume_is_bit_identical(model, tmp_path):
    samples, full = fisher_killed_after_two_batches(model, tmp_path)
    assert list(tmp_path.glob("*.ckpt")), "no checkpoint was written"
    seen = []
    resumed = stats.fisher(model.params, model.config, samples, StatsOptions(
        batch_size=2, cache_dir=tmp_path, checkpoint_every=1, on_batch=seen.append))
    assert seen == [3, 4], "the resumed run must start after the last checkpoint"
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
    assert not list(tmp_path.glob("*.ckpt")), "checkpoints must be removed once the result is cached"


def test_cache_hit_and_misses(model, tmp_path):
    samples = random_samples(n=4, seed=12)
    calls = []

    def run(params=model.params, s=samples, **kw):
        return stats.hessian(params, model.config, s, StatsOptions(batch_size=4, cache_dir=tmp_path,
                                                                   on_batch=calls.append, **kw))

    first = run()
    assert calls == [1]
    again = run()
    assert calls == [1], "a rerun with the same weights, data and settings must hit the cache"
    name = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(again[name], first[name])
    assert again["model.layers.0.self_attn.k_proj.weight"] is again["model.layers.0.self_attn.q_proj.weight"]

    w = np.array(get(model.params, name))
    w[0, 0] += 1.0
    run(params=set_leaves(model.params, {name: w}))
    assert calls == [1, 1], "changed weights must miss"
    run(s=random_samples(n=4, seed=13))
    assert calls == [1, 1, 1], "changed data must miss"
    stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=2, cache_dir=tmp_path,
                                                                    on_batch=calls.append))
    assert len(calls) == 5, "changed settings (batch size) must miss"
    stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=4, cache_dir=tmp_path,
                                                                   on_batch=calls.append))
    stats.fisher(model.params, model.config, samples, StatsOptions(
        batch_size=4, cache_dir=tmp_path, on_batch=calls.append), neuron_axis="output")
    assert len(calls) == 7, "another kind or neuron axis must miss"


# --- two runs on one cache, damaged entries, non-finite results ------------------------------------

def test_a_second_run_waits_for_the_entry_then_reads_it(model, tmp_path, caplog):
    """Two runs needing the same entry used to crash one another in orbax (FileNotFoundError): now
    the second waits for the first (naming it), then reads its result instead of recomputing."""
    import threading

    from hcnr_jax import HcnrError

    samples = random_samples(n=4, seed=15)
    started, release = threading.Event(), threading.Event()
    first: dict = {}

    def block(done):
        started.set()
        assert release.wait(120)

    def run_first():
        first["result"] = stats.hessian(model.params, model.config, samples, StatsOptions(
            batch_size=2, cache_dir=tmp_path, checkpoint_every=1, on_batch=block))

    t = threading.Thread(target=run_first)
    t.start()
    try:
        assert started.wait(300)
        with pytest.raises(HcnrError, match=rf"cache entry {tmp_path}/hessian-\w+ is locked by process {os.getpid()} "
                                            r"on host .*gave up after waiting 0 s \(--lock-timeout\)"):
            stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=2, cache_dir=tmp_path,
                                                                            lock_timeout=0))
        threading.Timer(0.5, release.set).start()
        calls: list[int] = []
        with caplog.at_level("WARNING", logger="hcnr_jax.io"):
            second = stats.hessian(model.params, model.config, samples, StatsOptions(
                batch_size=2, cache_dir=tmp_path, lock_timeout=300, on_batch=calls.append))
    finally:
        release.set()
        t.join()
    assert calls == [], "the second run reads the first one's result"
    assert "is locked by process" in caplog.text and "waiting up to 300 s" in caplog.text
    for n, v in first["result"].items():
        np.testing.assert_array_equal(second[n], v)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"], "no lock file or checkpoint left"


def _damage_result(path: Path, how: str) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
        return
    if how == "garbage":
        path.write_bytes(b"\0" * 64)
        return
    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in names}
    name = sorted(tensors)[0]
    if how == "nan":
        tensors[name][0, 0] = np.nan
    elif how == "wrong-shape":
        tensors[name] = tensors[name][:-1, :-1].copy()
    elif how == "missing-tensor":
        del tensors[name]
    elif how == "other-key":
        meta["key"] = "0" * 32
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "garbage", "nan", "wrong-shape", "missing-tensor", "other-key"])
def test_damaged_cached_result_is_set_aside_and_recomputed(model, tmp_path, caplog, how):
    samples = random_samples(n=4, seed=16)
    calls: list[int] = []

    def run():
        return stats.hessian(model.params, model.config, samples, StatsOptions(
            batch_size=4, cache_dir=tmp_path, on_batch=calls.append))

    first = run()
    [entry] = tmp_path.glob("*.safetensors")
    _damage_result(entry, how)
    with caplog.at_level("WARNING", logger="hcnr_jax.io"):
        again = run()
    assert calls == [1, 1], "the damaged entry is recomputed"
    [aside] = tmp_path.glob(f"{entry.name}.damaged-*")
    assert f"{entry} is damaged" in caplog.text and str(aside) in caplog.text
    for n, v in first.items():
        np.testing.assert_array_equal(again[n], v)
    run()
    assert calls == [1, 1], "the recomputed entry is good"


@pytest.mark.parametrize("how", ["truncated-files", "missing-arrays"])
def test_damaged_checkpoint_is_set_aside_and_the_run_starts_over(model, tmp_path, caplog, how):
    import shutil

    samples, full = fisher_killed_after_two_batches(model, tmp_path)
    [ckpt] = tmp_path.glob("*.ckpt")
    step = ckpt / "2" / "default"
    if how == "truncated-files":
        for f in step.rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        shutil.rmtree(step)
    seen: list[int] = []
    with caplog.at_level("WARNING", logger="hcnr_jax.io"):
        resumed = stats.fisher(model.params, model.config, samples, StatsOptions(
            batch_size=2, cache_dir=tmp_path, checkpoint_every=1, on_batch=seen.append))
    assert seen == [1, 2, 3, 4], "the run starts over"
    [aside] = tmp_path.glob(f"{ckpt.name}.damaged-*")
    assert f"{ckpt} is damaged" in caplog.text and str(aside) in caplog.text
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])


def test_non_finite_statistics_are_refused_not_cached(model, tmp_path):
    from hcnr_jax import HcnrError

    name = "model.layers.0.input_layernorm.weight"
    w = np.array(get(model.params, name))
    w[3] = np.nan
    params = set_leaves(model.params, {name: w})
    with pytest.raises(HcnrError, match=r"hessian-\w+\.safetensors: hessian of model\.layers\.0\.\w+\.\w+\.weight "
                                        r"holds \d+ NaN or infinite value\(s\)"):
        stats.hessian(params, model.config, random_samples(n=4, seed=17), StatsOptions(
            batch_size=2, cache_dir=tmp_path, checkpoint_every=1))
    assert list(tmp_path.iterdir()) == [], "no result, checkpoint or lock is left"
