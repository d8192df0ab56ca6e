"""Per-sample, per-neuron squared weight-gradient norms of a linear layer (the Fisher reduction).

For one sample with layer input ``x [T, I]`` and output gradient ``g [T, O]`` the weight gradient
is ``G = g^T x [O, I]``. The statistics need ``sum_o G[o, i]^2`` (input neurons, columns) or
``sum_i G[o, i]^2`` (output neurons, rows), never ``G`` itself. Two exact ways:

- ghost norm: ``sum_o G[o, i]^2 = sum_{t,s} (g_t . g_s) x_{t,i} x_{s,i}``: a ``[T, T]`` Gram of one
  side, then one matmul with the other; ``~2 T^2 (O + I)`` flops, nothing of size ``O x I``.
- direct: form ``G`` and reduce; ``~2 T O I`` flops. Cheaper when ``T (O + I) > O I``.

The Pallas kernel forms ``G`` tile by tile in on-chip memory and reduces it there, so ``G`` never
reaches HBM (the per-sample gradient is never materialised). ``neuron_sq_norms_reference`` is the
plain ``jax.numpy`` version (ghost or direct, whichever is cheaper); ``neuron_sq_norms`` dispatches.

``backend="auto"`` uses a Pallas kernel only on a platform listed for it in ``VERIFIED`` (where it
has been run against its reference, e.g. by ``experiments/gpu_check.py``), else the XLA path.

Letters: b sample, t/s token, o output dim, i input dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST
AXES = ("input", "output")

# Kernel -> platforms (``jax.default_backend()``) where its compiled (not interpreted) Pallas
# version has been checked against its reference; ``backend="auto"`` uses Pallas only there.
# Empty today: the kernels have not run on a GPU or TPU yet. Add a platform after
# ``experiments/gpu_check.py`` passes its "kernels" rows on it.
VERIFIED: dict[str, frozenset[str]] = {
    "fisher_norms": frozenset(),
    "gram": frozenset(),
}


def _check(g: jax.Array, x: jax.Array, axis: str) -> None:
    if axis not in AXES:
        raise ValueError(f"neuron axis must be one of {AXES}, got {axis!r}")
    if g.ndim != 3 or x.ndim != 3 or g.shape[:2] != x.shape[:2]:
        raise ValueError(f"expected g [B, T, O] and x [B, T, I] with the same B, T; got {g.shape}, {x.shape}")


def neuron_sq_norms_reference(g: jax.Array, x: jax.Array, axis: str = "input", method: str = "auto") -> jax.Array:
    """g [B, T, O], x [B, T, I] -> float32 [B, I] (axis "input") or [B, O] (axis "output").

    ``method``: "ghost", "direct" or "auto" (the one with fewer flops for these shapes).
    Padding tokens must already be zero in ``g`` or ``x``.
    """
    _check(g, x, axis)
    g, x = g.astype(jnp.float32), x.astype(jnp.float32)
    _, t, o = g.shape
    i = x.shape[2]
    if method == "auto":
        method = "ghost" if t * (o + i) <= o * i else "direct"
    if method == "direct":
        grad = jnp.einsum("bto,bti->boi", g, x, precision=HIGHEST)
        return jnp.sum(grad * grad, axis=1 if axis == "input" else 2)
    if method != "ghost":
        raise ValueError(f"unknown method {method!r}")
    # The side whose neurons are scored keeps its dimension; the other side collapses to [T, T].
    keep, other = (x, g) if axis == "input" else (g, x)
    gram = jnp.einsum("btk,bsk->bts", other, other, precision=HIGHEST)
    mixed = jnp.einsum("bts,bsn->btn", gram, keep, precision=HIGHEST)
    return jnp.sum(mixed * keep, axis=1)


def _kernel(g_ref, x_ref, out_ref, *, axis: str):
    # Grid (b, n, k): n tiles the scored neurons, k tiles the summed-over dimension (last, so the
    # output block stays resident while it accumulates).
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    g = g_ref[0].astype(jnp.float32)  # [T, Ob]
    x = x_ref[0].astype(jnp.float32)  # [T, Ib]
    grad = jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=jnp.float32)  # [Ob, Ib] tile of G
    reduce_axis = 0 if axis == "input" else 1
    out_ref[...] += jnp.sum(grad * grad, axis=reduce_axis)[None, :]


@functools.partial(jax.jit, static_argnames=("axis", "block", "interpret"))
def neuron_sq_norms_pallas(g: jax.Array, x: jax.Array, axis: str = "input", block: int = 128,
                           interpret: bool = False) -> jax.Array:
    """Pallas version of ``neuron_sq_norms_reference`` (same shapes, float32 result).

    Dimensions are zero-padded to a multiple of ``block`` (zeros add nothing to the sums) and the
    result is cut back.
    """
    _check(g, x, axis)
    b, t, o = g.shape
    i = x.shape[2]
    tp = pl.cdiv(t, 8) * 8
    bo, bi = min(block, pl.cdiv(o, 8) * 8), min(block, pl.cdiv(i, 8) * 8)
    op, ip = pl.cdiv(o, bo) * bo, pl.cdiv(i, bi) * bi
    g = jnp.pad(g, ((0, 0), (0, tp - t), (0, op - o)))
    x = jnp.pad(x, ((0, 0), (0, tp - t), (0, ip - i)))
    if axis == "input":
        n_blk, n_out = bi, ip
        grid = (b, ip // bi, op // bo)
        g_spec = pl.BlockSpec((1, tp, bo), lambda bb, n, k: (bb, 0, k))
        x_spec = pl.BlockSpec((1, tp, bi), lambda bb, n, k: (bb, 0, n))
    else:
        n_blk, n_out = bo, op
        grid = (b, op // bo, ip // bi)
        g_spec = pl.BlockSpec((1, tp, bo), lambda bb, n, k: (bb, 0, n))
        x_spec = pl.BlockSpec((1, tp, bi), lambda bb, n, k: (bb, 0, k))
    out = pl.pallas_call(
        functools.partial(_kernel, axis=axis),
        grid=grid,
        in_specs=[g_spec, x_spec],
        out_specs=pl.BlockSpec((1, n_blk), lambda bb, n, k: (bb, n)),
        out_shape=jax.ShapeDtypeStruct((b, n_out), jnp.float32),
        interpret=interpret,
    )(g, x)
    return out[:, : (i if axis == "input" else o)]


def neuron_sq_norms(g: jax.Array, x: jax.Array, axis: str = "input", backend: str = "auto") -> jax.Array:
    """Dispatch: ``backend`` "pallas" (interpret mode off GPU), "reference", or "auto" (Pallas where
    ``VERIFIED`` lists this platform, the reference elsewhere)."""
    backend = resolve_backend(backend, "fisher_norms")
    if backend == "pallas":
        return neuron_sq_norms_pallas(g, x, axis=axis, interpret=jax.default_backend() != "gpu")
    return neuron_sq_norms_reference(g, x, axis)


def resolve_backend(backend: str, kernel: str | None = None) -> str:
    """"pallas" or "reference" for ``backend``; "auto" is "pallas" only where ``VERIFIED[kernel]``
    holds the current platform (``kernel`` None: no kernel is verified)."""
    if backend not in ("auto", "pallas", "reference"):
        raise ValueError(f"kernel backend must be auto, pallas or reference, got {backend!r}")
    if backend == "auto":
        verified = VERIFIED.get(kernel, frozenset()) if kernel is not None else frozenset()
        return "pallas" if jax.default_backend() in verified else "reference"
    return backend
