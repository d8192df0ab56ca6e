"""Gram accumulation ``H + X^T X`` over the non-padding rows of X (the Hessian statistic).

``gram_reference`` is the ``jax.numpy`` version; ``gram_pallas`` tiles ``H`` into ``[bi, bi]``
blocks, one program each, which loops over ``[bn, bi]`` token chunks inside the kernel and adds the
sum to its block of ``H`` in place (``input_output_aliases``); no two programs write the same block
(a GPU runs the grid in parallel). ``gram`` dispatches like ``fisher_norms.neuron_sq_norms``
(``kernels/backend.py``).

Block sides are powers of two (the Pallas Triton lowering requires power-of-two arrays), the
dimensions zero-padded to multiples of them; ``_block_shapes`` picks them so that ``_smem_bytes``
(double-buffered token chunks plus the float32 accumulator, ``H`` and output tiles) stays under
``SMEM_BUDGET`` = 96 KiB, well inside the 227 KiB of shared memory per block of an H100/H200.

Letters: n token (samples x positions flattened), i/j input dim.
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


def _check(h: jax.Array, x: jax.Array, mask: jax.Array) -> None:
    if x.ndim != 2 or mask.shape != x.shape[:1] or h.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"expected h [I, I], x [N, I], mask [N]; got {h.shape}, {x.shape}, {mask.shape}")


def gram_reference(h: jax.Array, x: jax.Array, mask: jax.Array) -> jax.Array:
    """h [I, I] float32, x [N, I], mask [N] bool -> h + sum over masked-in rows of x x^T (float32)."""
    _check(h, x, mask)
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    return h + jnp.einsum("ni,nj->ij", x, x, precision=HIGHEST)


def _smem_bytes(bn: int, bi: int) -> int:
    """Estimated shared memory of one program (float32 bytes): two ``[bn, bi]`` token chunks
    double-buffered (``num_stages=2``), the ``[bi, bi]`` accumulator, ``H`` tile and output tile."""
    return 4 * (2 * 2 * bn * bi + 3 * bi * bi)


def _block_shapes(n: int, i: int, block: int = 128, token_block: int = 256,
                  budget: int = SMEM_BUDGET) -> dict[str, int]:
    """Blocks for ``gram_pallas``: ``bn`` token chunk (at most ``token_block``), ``bi`` side of an
    ``H`` block (at most ``block``); powers of two >= 16 with ``_smem_bytes(bn, bi) <= budget``."""
    check_block(block)
    check_block(token_block, "token_block")
    return shrink_to_budget({"bn": pow2_block(n, token_block), "bi": pow2_block(i, block)}, _smem_bytes, budget)


def _kernel(x_i_ref, x_j_ref, h_ref, out_ref, *, bn: int):
    # x_i_ref, x_j_ref [Np, bi]: columns of this block's rows / columns of H (rows already masked);
    # only [bn, bi] chunks are loaded.
    bi = out_ref.shape[0]

    def body(k, acc):
        rows = pl.ds(k * bn, bn)
        xi = x_i_ref[rows, :].astype(jnp.float32)
        xj = x_j_ref[rows, :].astype(jnp.float32)
        return acc + jax.lax.dot_general(xi, xj, (((0,), (0,)), ((), ())), precision=HIGHEST,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_i_ref.shape[0] // bn, body, jnp.zeros((bi, bi), jnp.float32))
    out_ref[...] = h_ref[...] + acc


@functools.partial(jax.jit, static_argnames=("block", "token_block", "interpret"), donate_argnums=0)
def gram_pallas(h: jax.Array, x: jax.Array, mask: jax.Array, block: int = 128, token_block: int = 256,
                interpret: bool = False) -> jax.Array:
    """Pallas version of ``gram_reference`` (``h`` is donated and updated in place).

    ``block`` / ``token_block`` (powers of two >= 16) cap the ``H`` block side and the token chunk;
    ``_block_shapes`` picks them within the shared-memory budget.
    """
    _check(h, x, mask)
    n, i = x.shape
    blk = _block_shapes(n, i, block, token_block)
    bn, bi = blk["bn"], blk["bi"]
    ip, np_ = pad_to(i, bi), pad_to(n, bn)
    # Masked-out and padded rows are zero, padded columns are zero: none changes the kept block of H.
    x = jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
    x = jnp.pad(x, ((0, np_ - n), (0, ip - i)))
    hp = jnp.pad(h.astype(jnp.float32), ((0, ip - i), (0, ip - i)))
    out = pl.pallas_call(
        functools.partial(_kernel, bn=bn),
        grid=(ip // bi, ip // bi),
        in_specs=[
            pl.BlockSpec(block_shape=(np_, bi), index_map=lambda a, c: (0, a)),
            pl.BlockSpec(block_shape=(np_, bi), index_map=lambda a, c: (0, c)),
            pl.BlockSpec(block_shape=(bi, bi), index_map=lambda a, c: (a, c)),
        ],
        out_specs=pl.BlockSpec(block_shape=(bi, bi), index_map=lambda a, c: (a, c)),
        out_shape=jax.ShapeDtypeStruct((ip, ip), jnp.float32),
        input_output_aliases={2: 0},
        compiler_params=None if interpret else triton_params(),
        interpret=interpret,
    )(x, x, hp)
    return out[:i, :i]


def gram(h: jax.Array, x: jax.Array, mask: jax.Array, backend: str = "auto") -> jax.Array:
    """``h + X^T X`` over masked-in rows; ``backend`` as in ``fisher_norms.neuron_sq_norms``."""
    if resolve_backend(backend, "gram") == "pallas":
        return gram_pallas(h, x, mask, interpret=jax.default_backend() != "gpu")
    return gram_reference(h, x, mask)
