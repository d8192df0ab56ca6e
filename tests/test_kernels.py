"""Pallas kernels against their jax.numpy references (interpret mode on CPU), random padded shapes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from hcnr_jax.kernels.fisher_norms import neuron_sq_norms, neuron_sq_norms_pallas, neuron_sq_norms_reference
from hcnr_jax.kernels.gram import gram, gram_pallas, gram_reference


def _direct64(g, x, axis):
    grad = np.einsum("bto,bti->boi", g.astype(np.float64), x.astype(np.float64))
    return (grad**2).sum(1 if axis == "input" else 2)


@pytest.mark.parametrize("shape", [(2, 7, 20, 37), (3, 13, 33, 9), (1, 30, 16, 16)])
@pytest.mark.parametrize("axis", ["input", "output"])
def test_neuron_norms(shape, axis):
    b, t, o, i = shape
    rng = np.random.default_rng(sum(shape))
    g = rng.normal(size=(b, t, o)).astype(np.float32)
    x = rng.normal(size=(b, t, i)).astype(np.float32)
    g[:, t - 3:] = 0.0  # padding tokens carry no gradient
    want = _direct64(g, x, axis)
    for got in (neuron_sq_norms_reference(g, x, axis, "ghost"), neuron_sq_norms_reference(g, x, axis, "direct"),
                neuron_sq_norms_pallas(g, x, axis=axis, block=16, interpret=True),
                neuron_sq_norms(g, x, axis, backend="pallas")):
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(50, 37), (9, 8), (130, 20)])
def test_gram(shape):
    n, i = shape
    rng = np.random.default_rng(n)
    x = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(n) < 0.7
    h0 = rng.normal(size=(i, i)).astype(np.float32)
    xm = x.astype(np.float64) * mask[:, None]
    want = h0 + xm.T @ xm
    for got in (gram_reference(jnp.asarray(h0), x, mask),
                gram_pallas(jnp.asarray(h0), x, mask, block=16, token_block=16, interpret=True),
                gram(jnp.asarray(h0), x, mask, backend="pallas")):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_bad_shapes_and_backend():
    with pytest.raises(ValueError):
        neuron_sq_norms_reference(np.zeros((2, 3, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError):
        neuron_sq_norms(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), backend="cuda")
    with pytest.raises(ValueError):
        gram_reference(np.zeros((3, 3)), np.zeros((5, 4)), np.zeros(5, bool))


def test_auto_uses_pallas_only_where_verified(monkeypatch):
    """``backend="auto"``: the XLA reference unless the kernel is listed as checked on this platform."""
    import jax

    from hcnr_jax.kernels import fisher_norms

    assert fisher_norms.resolve_backend("auto", "gram") == "reference"
    assert fisher_norms.VERIFIED["fisher_norms"] == fisher_norms.VERIFIED["gram"] == frozenset()  # none yet
    monkeypatch.setitem(fisher_norms.VERIFIED, "gram", frozenset({jax.default_backend()}))
    assert fisher_norms.resolve_backend("auto", "gram") == "pallas"
    assert fisher_norms.resolve_backend("auto", "fisher_norms") == "reference"
    assert fisher_norms.resolve_backend("reference", "gram") == "reference"
