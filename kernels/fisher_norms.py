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

Kernel layout: one program per (sample, block of scored neurons); it loops over blocks of the
summed-over dimension and, inside, over token chunks, accumulating a ``[bk, bn]`` float32 tile of
``G`` before squaring it (so no two programs write the same output: a GPU runs the grid in
parallel). Every loaded tile is ``[bt, bn]`` or ``[bt, bk]`` with power-of-two sides (the Pallas
Triton lowering requires power-of-two arrays), the dimensions being zero-padded to multiples of them;
``_block_shapes`` picks the sides so that ``_smem_bytes`` (double-buffered input tiles plus the
float32 ``G`` tile and the output tile) stays under ``SMEM_BUDGET`` = 96 KiB, well inside the
227 KiB of shared memory per block of an H100/H200.

``backend="auto"`` uses a Pallas kernel only on a platform listed for it in ``VERIFIED``
(``kernels/backend.py``: where it has been run against its reference, e.g. by
``experiments/gpu_check.py``), else the XLA path. The block-size rules both kernels follow live there.

GPU API: ``pallas_call`` with Triton compiler parameters, which jax 0.10 and 0.11 both lower (tested
on CPU against an abstract H200, ``tests/test_kernels.py``). jax 0.11 marks the Triton backend
deprecated in favour of Mosaic GPU; a Mosaic GPU port waits until these kernels have run on a GPU once.

Letters: b sample, t/s token, o output dim, i input dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hcnr_jax.kernels.backend import (
    SMEM_BUDGET,
    check_block,
    pad_to,
    pow2_block,
    resolve_backend,
    shrink_to_budget,
    triton_params,
)
from hcnr_jax.precision import HIGHEST

AXES = ("input", "output")


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


def _smem_bytes(bt: int, bn: int, bk: int) -> int:
    """Estimated shared memory of one program (float32 bytes): the two input tiles ``[bt, bn]`` and
    ``[bt, bk]`` double-buffered (``num_stages=2``), the ``[bk, bn]`` tile of ``G`` and the ``[bn]``
    output tile. Conservative: Triton keeps the ``G`` tile in registers where it can."""
    return 4 * (2 * (bt * bn + bt * bk) + bk * bn + bn)


def _block_shapes(t: int, o: int, i: int, axis: str, block: int = 128,
                  budget: int = SMEM_BUDGET) -> dict[str, int]:
    """Blocks for ``neuron_sq_norms_pallas``: ``bt`` token chunk, ``bn`` scored neurons (I for axis
    "input", O for "output"), ``bk`` the summed-over neurons; each a power of two in
    [``MIN_BLOCK``, ``block``] (no larger than the padded dimension needs), with
    ``_smem_bytes(bt, bn, bk) <= budget``."""
    check_block(block)
    n, k = (i, o) if axis == "input" else (o, i)
    sizes = {"bt": pow2_block(t, block), "bk": pow2_block(k, block), "bn": pow2_block(n, block)}
    return shrink_to_budget(sizes, _smem_bytes, budget)


def _kernel(keep_ref, other_ref, out_ref, *, bt: int, bk: int):
    # One program: one sample, one block of ``bn`` scored neurons. keep_ref [Tp, bn] is the scored
    # side, other_ref [Tp, Kp] the summed-over side; only [bt, .] chunks of them are ever loaded.
    n_t = keep_ref.shape[0] // bt
    n_k = other_ref.shape[1] // bk
    bn = keep_ref.shape[1]

    def over_k(kb, total):
        def over_t(tb, tile):
            rows = pl.ds(tb * bt, bt)
            keep = keep_ref[rows, :].astype(jnp.float32)  # [bt, bn]
            other = other_ref[rows, pl.ds(kb * bk, bk)].astype(jnp.float32)  # [bt, bk]
            return tile + jax.lax.dot_general(other, keep, (((0,), (0,)), ((), ())), precision=HIGHEST,
                                              preferred_element_type=jnp.float32)  # [bk, bn] of G (or G^T)

        tile = jax.lax.fori_loop(0, n_t, over_t, jnp.zeros((bk, bn), jnp.float32))
        return total + jnp.sum(tile * tile, axis=0)

    out_ref[...] = jax.lax.fori_loop(0, n_k, over_k, jnp.zeros((bn,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("axis", "block", "interpret"))
def neuron_sq_norms_pallas(g: jax.Array, x: jax.Array, axis: str = "input", block: int = 128,
                           interpret: bool = False) -> jax.Array:
    """Pallas version of ``neuron_sq_norms_reference`` (same shapes, float32 result).

    ``block`` (a power of two >= 16) caps every block side; ``_block_shapes`` picks them. Dimensions
    are zero-padded to multiples of their blocks (zeros add nothing to the sums) and the result is
    cut back.
    """
    _check(g, x, axis)
    b, t, o = g.shape
    i = x.shape[2]
    blk = _block_shapes(t, o, i, axis, block)
    bt, bn, bk = blk["bt"], blk["bn"], blk["bk"]
    keep, other = (x, g) if axis == "input" else (g, x)
    n, k = keep.shape[2], other.shape[2]
    tp, np_, kp = pad_to(t, bt), pad_to(n, bn), pad_to(k, bk)
    keep = jnp.pad(keep, ((0, 0), (0, tp - t), (0, np_ - n)))
    other = jnp.pad(other, ((0, 0), (0, tp - t), (0, kp - k)))
    out = pl.pallas_call(
        functools.partial(_kernel, bt=bt, bk=bk),
        grid=(b, np_ // bn),
        in_specs=[pl.BlockSpec(block_shape=(None, tp, bn), index_map=lambda bb, j: (bb, 0, j)),
                  pl.BlockSpec(block_shape=(None, tp, kp), index_map=lambda bb, j: (bb, 0, 0))],
        out_specs=pl.BlockSpec(block_shape=(None, bn), index_map=lambda bb, j: (bb, j)),
        out_shape=jax.ShapeDtypeStruct((b, np_), jnp.float32),
        compiler_params=None if interpret else triton_params(),
        interpret=interpret,
    )(keep, other)
    return out[:, :n]


def neuron_sq_norms(g: jax.Array, x: jax.Array, axis: str = "input", backend: str = "auto") -> jax.Array:
    """Dispatch: ``backend`` "pallas" (interpret mode off GPU), "reference", or "auto" (Pallas where
    ``VERIFIED`` lists this platform, the reference elsewhere)."""
    backend = resolve_backend(backend, "fisher_norms")
    if backend == "pallas":
        return neuron_sq_norms_pallas(g, x, axis=axis, interpret=jax.default_backend() != "gpu")
    return neuron_sq_norms_reference(g, x, axis)

