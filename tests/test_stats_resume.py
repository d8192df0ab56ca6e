"""Checkpoint/resume and the result cache of the statistics engine."""

from __future__ import annotations

import numpy as np
import pytest
from test_stats import random_samples

import hcnr_jax
from hcnr_jax import stats
from hcnr_jax.params import get, set_leaves


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import tiny

    return hcnr_jax.load_pretrained(tiny.save_hf(tiny.hf_model("llama", num_hidden_layers=2),
                                                 tmp_path_factory.mktemp("llama")))


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
