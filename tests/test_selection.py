"""Stage 1 (selection) on synthetic Fisher scores and weights."""

import numpy as np
import pytest

from hcnr_jax.errors import HcnrError
from hcnr_jax.repair import selection as sel


def test_top_count_rounding():
    assert sel.top_count(0.5, 11) == 6   # 5.5 rounds up
    assert sel.top_count(0.4, 10) == 4
    assert sel.top_count(0.01, 10) == 1  # at least one
    assert sel.top_count(1.0, 7) == 7


def test_kl_priority_matches_float64_formula():
    rng = np.random.default_rng(0)
    s_hon, s_task = rng.random(20) ** 3, rng.random(20) ** 3
    eps = 1e-8
    p = s_hon / s_hon.sum() + eps
    q = s_task / s_task.sum() + eps
    ref = p * np.log(p / q)
    r = sel.priority_scores(np.float32(s_hon), np.float32(s_task), "kl", eps)
    np.testing.assert_allclose(r, ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sel.priority_scores(s_hon, s_task, "diff", eps), p - q, atol=1e-6)
    np.testing.assert_allclose(sel.priority_scores(s_hon, s_task, "hon_only", eps), p, rtol=1e-5)


def test_priority_is_scale_invariant_per_layer_and_handles_zeros():
    rng = np.random.default_rng(1)
    s_hon, s_task = rng.random(16), rng.random(16)
    a = sel.top_mask(sel.priority_scores(s_hon, s_task, "kl", 1e-8), 0.5)
    b = sel.top_mask(sel.priority_scores(1e6 * s_hon, 1e-3 * s_task, "kl", 1e-8), 0.5)
    np.testing.assert_array_equal(a, b)
    r = sel.priority_scores(np.zeros(8), np.zeros(8), "kl", 1e-8)
    assert np.all(np.isfinite(r))
    with pytest.raises(HcnrError, match="non-finite"):
        sel.priority_scores(np.array([1.0, np.nan]), np.ones(2), "kl", 1e-8)


def test_kl_prefers_honesty_specific_neurons():
    # Neuron 0: important for honesty only; neuron 1: for both; neuron 2: for task only.
    r = sel.priority_scores(np.array([5.0, 5.0, 0.1, 1.0]), np.array([0.1, 5.0, 5.0, 1.0]), "kl", 1e-8)
    assert np.argmax(r) == 0 and np.argmin(r) == 2


def test_random_priority_is_seeded():
    def run(seed):
        return sel.priority_scores(np.ones(30), np.ones(30), "random", 1e-8, np.random.default_rng([seed, 0]))
    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_perturbation_formula():
    rng = np.random.default_rng(2)
    w0, w1 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    m = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    d = sel.perturbation(*sel.masked_norms(w0, w1, m, "input"))
    ref = np.linalg.norm((w1 - w0)[:, m]) / np.linalg.norm(w0[:, m])
    assert d == pytest.approx(ref, rel=1e-5)
    m_rows = np.array([1, 0, 1, 0, 0], bool)
    d = sel.perturbation(*sel.masked_norms(w0, w1, m_rows, "output"))
    assert d == pytest.approx(np.linalg.norm((w1 - w0)[m_rows]) / np.linalg.norm(w0[m_rows]), rel=1e-5)
    assert sel.perturbation(0.0, 0.0) == 0.0 and sel.perturbation(1.0, 0.0) == np.inf


@pytest.mark.parametrize("axis", ["input", "output"])
def test_masked_norms_on_device_match_float64(axis):
    """Device float32 sums of the float32 products agree with float64 sums to ~1e-7; jax or NumPy
    weights (bfloat16 cast on the device), bool or index masks give the same numbers."""
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(384, 512)).astype(np.float32)
    w1 = (w0 + 0.01 * rng.normal(size=w0.shape)).astype(np.float32)
    n = w0.shape[1] if axis == "input" else w0.shape[0]
    m = rng.random(n) < 0.5
    a, b = (w0[:, m], w1[:, m]) if axis == "input" else (w0[m], w1[m])
    d = b - a
    ref = (np.sum(d * d, dtype=np.float64), np.sum(a * a, dtype=np.float64))
    got = sel.masked_norms(w0, w1, m, axis)
    assert got == pytest.approx(ref, rel=1e-6)
    assert sel.masked_norms(jnp.asarray(w0), jnp.asarray(w1), m, axis) == got
    assert sel.masked_norms(w0, w1, np.flatnonzero(m), axis) == got
    b0, b1 = jnp.asarray(w0, jnp.bfloat16), jnp.asarray(w1, jnp.bfloat16)
    h0, h1 = np.asarray(b0, np.float32), np.asarray(b1, np.float32)
    assert sel.masked_norms(b0, b1, m, axis) == sel.masked_norms(h0, h1, m, axis)


def test_keep_units_count_and_params():
    d = [0.1, 0.5, 0.3, 0.9, 0.2]
    np.testing.assert_array_equal(sel.keep_units(d, [1] * 5, 0.4, "count"), [0, 1, 0, 1, 0])
    # params: sizes in d order are 10 (unit 3), 1 (unit 1), 1 (unit 2) ...; 40% of 14 = 5.6 -> one unit.
    np.testing.assert_array_equal(sel.keep_units(d, [1, 1, 1, 10, 1], 0.4, "params"), [0, 0, 0, 1, 0])


def _layers(n_blocks=4, seed=0):
    rng = np.random.default_rng(seed)
    mods = {"self_attn.q_proj": (6, 8), "self_attn.o_proj": (8, 6), "mlp.down_proj": (8, 10)}
    names, w, fh, ft = [], {}, {}, {}
    for b in range(n_blocks):
        for m, shape in mods.items():
            n = f"model.layers.{b}.{m}.weight"
            names.append(n)
            w0 = rng.normal(size=shape).astype(np.float32)
            w[n] = (w0, w0 + rng.uniform(0.01, 1.0) * rng.normal(size=shape).astype(np.float32))
            fh[n], ft[n] = rng.random(shape[1]), rng.random(shape[1])
    return names, w, fh, ft


def test_select_module_and_block():
    names, w, fh, ft = _layers()
    out = sel.select(names, w.__getitem__, fh, ft, r_iw=0.5, r_cw=0.4)
    assert [s.name for s in out] == names
    assert sum(s.kept for s in out) == sel.top_count(0.4, len(names))
    kept_d = min(s.d for s in out if s.kept)
    assert all(s.d <= kept_d for s in out if not s.kept)
    for s in out:
        assert s.candidates.sum() == sel.top_count(0.5, s.shape[1])
        assert s.restored.sum() == (s.candidates.sum() if s.kept else 0)
        assert s.d == s.d_layer
    blk = sel.select(names, w.__getitem__, fh, ft, r_iw=0.5, r_cw=0.5, layer_unit="block")
    kept_blocks = {sel.block_of(s.name) for s in blk if s.kept}
    assert len(kept_blocks) == 2
    for s in blk:  # all modules of a block share its fate and its d
        assert s.kept == (sel.block_of(s.name) in kept_blocks)
    # block d is the pooled ratio, between its modules' own d's
    for b in range(4):
        group = [s for s in blk if sel.block_of(s.name) == b]
        assert min(g.d_layer for g in group) <= group[0].d <= max(g.d_layer for g in group)


def test_select_bad_fisher():
    names, w, fh, ft = _layers(1)
    fh[names[0]] = fh[names[0]][:-1]
    with pytest.raises(HcnrError, match="Fisher"):
        sel.select(names, w.__getitem__, fh, ft, r_iw=0.5, r_cw=0.4)
    del ft[names[1]]
    with pytest.raises(HcnrError, match="no Fisher"):
        sel.select(names[1:], w.__getitem__, fh, ft, r_iw=0.5, r_cw=0.4)
