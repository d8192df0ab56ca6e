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
    from test_stats import random_samples
    model = hcnr_jax.load_pretrained({model_dir!r})
    cache = Path({cache!r})

    def die(done):
        if done == 2:
            assert list(cache.glob("*.ckpt/2")), "checkpoint 2 must be on disk before the kill"
            os.kill(os.getpid(), signal.SIGKILL)

    stats.fisher(model.params, model.config, random_samples(n=8, seed=11), batch_size=2, cache_dir=cache,
                 checkpoint_every=1, on_batch=die)
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
    resumed = stats.fisher(model.params, model.config, samples, batch_size=2, cache_dir=cache, checkpoint_every=1,
                           on_batch=seen.append)
    assert seen == [3, 4], "the rerun must resume after the last checkpoint of the killed process"
    full = stats.fisher(model.params, model.config, samples, batch_size=2)
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
    assert not list(cache.glob("*.ckpt")) and list(cache.glob("*.safetensors"))


def test_kill_and_resume_is_bit_identical(model, tmp_path):
    samples = random_samples(n=8, seed=11)
    full = stats.fisher(model.params, model.config, samples, batch_size=2)

    def kill_after_two(done):
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        stats.fisher(model.params, model.config, samples, batch_size=2, cache_dir=tmp_path, checkpoint_every=1,
                     on_batch=kill_after_two)
    assert list(tmp_path.glob("*.ckpt")), "no checkpoint was written"
    seen = []
    resumed = stats.fisher(model.params, model.config, samples, batch_size=2, cache_dir=tmp_path,
                           checkpoint_every=1, on_batch=seen.append)
    assert seen == [3, 4], "the resumed run must start after the last checkpoint"
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])
    assert not list(tmp_path.glob("*.ckpt")), "checkpoints must be removed once the result is cached"


def test_cache_hit_and_misses(model, tmp_path):
    samples = random_samples(n=4, seed=12)
    calls = []

    def run(params=model.params, s=samples, **kw):
        return stats.hessian(params, model.config, s, batch_size=4, cache_dir=tmp_path, on_batch=calls.append, **kw)

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
    stats.hessian(model.params, model.config, samples, batch_size=2, cache_dir=tmp_path, on_batch=calls.append)
    assert len(calls) == 5, "changed settings (batch size) must miss"
    stats.fisher(model.params, model.config, samples, batch_size=4, cache_dir=tmp_path, on_batch=calls.append)
    stats.fisher(model.params, model.config, samples, batch_size=4, cache_dir=tmp_path, neuron_axis="output",
                 on_batch=calls.append)
    assert len(calls) == 7, "another kind or neuron axis must miss"
