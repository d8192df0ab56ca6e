"""Pallas kernels against their jax.numpy references (interpret mode on CPU), random padded shapes."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from hcnr_jax.kernels import fisher_norms
from hcnr_jax.kernels import gram as gram_mod
from hcnr_jax.kernels.backend import SMEM_BUDGET
from hcnr_jax.kernels.fisher_norms import neuron_sq_norms, neuron_sq_norms_pallas, neuron_sq_norms_reference
from hcnr_jax.kernels.gram import gram, gram_pallas, gram_reference

AWKWARD = (13, 24, 37, 40, 50, 1000, 14336)


def _direct64(g, x, axis):
    grad = np.einsum("bto,bti->boi", g.astype(np.float64), x.astype(np.float64))
    return (grad**2).sum(1 if axis == "input" else 2)


@pytest.mark.parametrize("shape", [(2, 7, 20, 37), (3, 13, 33, 9), (1, 30, 16, 16), (2, 13, 40, 24), (1, 50, 13, 40), (2, 150, 200, 90)])
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
        chex.assert_shape(got, want.shape)
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(50, 37), (9, 8), (130, 20), (24, 40), (13, 50), (300, 100)])
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
        chex.assert_shape(got, (i, i))
        chex.assert_type(got, jnp.float32)
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

    from hcnr_jax.kernels import backend

    assert backend.resolve_backend("auto", "gram") == "reference"
    assert backend.VERIFIED["fisher_norms"] == backend.VERIFIED["gram"] == frozenset()  # none yet
    monkeypatch.setitem(backend.VERIFIED, "gram", frozenset({jax.default_backend()}))
    assert backend.resolve_backend("auto", "gram") == "pallas"
    assert backend.resolve_backend("auto", "fisher_norms") == "reference"
    assert backend.resolve_backend("reference", "gram") == "reference"


def _pow2(n):
    return n >= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("axis", ["input", "output"])
def test_fisher_blocks_are_powers_of_two(axis):
    """Every tile the kernel loads or stores ([bt, bn], [bt, bk], [bn]) has power-of-two sides, as the
    Pallas Triton lowering requires, and fits the shared-memory budget."""
    for t in (*AWKWARD, 256, 512):
        for o in AWKWARD:
            for i in AWKWARD:
                blk = fisher_norms._block_shapes(t, o, i, axis)
                assert set(blk) == {"bt", "bn", "bk"} and all(_pow2(v) and v <= 128 for v in blk.values()), blk
                assert fisher_norms._smem_bytes(**blk) <= SMEM_BUDGET
    with pytest.raises(ValueError):
        fisher_norms._block_shapes(13, 40, 24, axis, block=24)


def test_gram_blocks_are_powers_of_two():
    for n in (*AWKWARD, 4096):
        for i in AWKWARD:
            blk = gram_mod._block_shapes(n, i)
            assert set(blk) == {"bn", "bi"} and all(_pow2(v) for v in blk.values()), blk
            assert gram_mod._smem_bytes(**blk) <= SMEM_BUDGET
    with pytest.raises(ValueError):
        gram_mod._block_shapes(50, 37, token_block=100)


# (T, O, I) of the gpu_check shape and of Llama-3.1-8B's linears (q/o 4096x4096, k/v 1024x4096,
# gate/up 14336x4096, down 4096x14336) at up to 512 tokens.
FISHER_LAYERS = [(256, 1024, 512)] + [(t, o, i) for t in (13, 128, 512)
                                      for o, i in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]]


@pytest.mark.parametrize("axis", ["input", "output"])
@pytest.mark.parametrize("t, o, i", FISHER_LAYERS)
def test_fisher_smem_bound(t, o, i, axis):
    """The estimated shared memory per program stays within the default 96 KiB budget (H100/H200:
    227 KiB per block; the first H200 run asked for 256 KiB with 128-wide tiles over all 256 tokens)."""
    blk = fisher_norms._block_shapes(t, o, i, axis)
    assert fisher_norms._smem_bytes(**blk) <= 96 * 1024
    assert fisher_norms._smem_bytes(bt=256, bn=128, bk=128) > 227 * 1024  # the old choice would not fit


@pytest.mark.parametrize("n, i", [(4096, 1024), (50, 37), (4096, 4096), (8 * 512, 14336)])
def test_gram_smem_bound(n, i):
    blk = gram_mod._block_shapes(n, i)
    assert gram_mod._smem_bytes(**blk) <= 96 * 1024
    assert blk == gram_mod._block_shapes(n, i, block=128, token_block=256)  # the defaults gram_pallas uses


def _lower_for_cuda(fn, *args):
    """Lower ``fn`` for CUDA with no GPU present, targeting an abstract H200 (the lent device kind):
    jax >= 0.11 asks the Triton lowering for the device's compute capability, which an abstract
    mesh supplies."""
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    h200 = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h200)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def test_kernels_lower_to_triton():
    """The Pallas Triton lowering runs in Python, so it can be checked without a GPU: every kernel
    lowers for CUDA at the shapes that failed on the first H200 run (non-power-of-two arrays).
    Shared memory is only known after Triton compiles on a device (``experiments/gpu_check.py``)."""
    import jax
    from jax.experimental import pallas as pl

    def probe(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    f32 = jax.ShapeDtypeStruct
    try:
        from jax.experimental.pallas import triton as plgpu

        _lower_for_cuda(lambda x: pl.pallas_call(probe, out_shape=f32((16,), jnp.float32),
                                                 compiler_params=plgpu.CompilerParams())(x), f32((16,), jnp.float32))
    except Exception as e:  # this jax/jaxlib cannot lower Pallas for CUDA here
        pytest.skip(f"no Pallas Triton lowering for cuda on this install: {type(e).__name__}: {e}")
    # The control: the lowering does reject what failed on the H200 (a non-power-of-two array).
    with pytest.raises(Exception, match="power of 2"):
        _lower_for_cuda(lambda x: pl.pallas_call(probe, out_shape=f32((24,), jnp.float32),
                                                 compiler_params=plgpu.CompilerParams())(x), f32((24,), jnp.float32))
    # The gpu_check shapes, then a Llama-3.1-8B down_proj (O 4096, I 14336) at 256 tokens.
    for b, t, o, i in [(2, 13, 40, 24), (8, 256, 1024, 512), (1, 256, 4096, 14336)]:
        for axis in ("input", "output"):
            low = _lower_for_cuda(lambda g, x, axis=axis: neuron_sq_norms_pallas(g, x, axis=axis),
                                  f32((b, t, o), jnp.float32), f32((b, t, i), jnp.bfloat16))
            assert "triton" in low.as_text()  # a Triton kernel call, not an XLA fallback
    for n, i in [(50, 37), (4096, 1024)]:
        low = _lower_for_cuda(gram_pallas, f32((i, i), jnp.float32), f32((n, i), jnp.float32), f32((n,), jnp.bool_))
        assert "triton" in low.as_text()
