"""Gram accumulation ``H + X^T X`` over the non-padding rows of X (the Hessian statistic).

``gram_reference`` is the ``jax.numpy`` version; ``gram_pallas`` tiles ``H`` into blocks and
reduces over token tiles inside the kernel, accumulating into ``H`` in place
(``input_output_aliases``). ``gram`` dispatches like ``fisher_norms.neuron_sq_norms``.

Letters: n token (samples x positions flattened), i/j input dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hcnr_jax.kernels.fisher_norms import HIGHEST, resolve_backend


def _check(h: jax.Array, x: jax.Array, mask: jax.Array) -> None:
    if x.ndim != 2 or mask.shape != x.shape[:1] or h.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"expected h [I, I], x [N, I], mask [N]; got {h.shape}, {x.shape}, {mask.shape}")


def gram_reference(h: jax.Array, x: jax.Array, mask: jax.Array) -> jax.Array:
    """h [I, I] float32, x [N, I], mask [N] bool -> h + sum over masked-in rows of x x^T (float32)."""
    _check(h, x, mask)
    x = jnp.where(mask[:, None], x.astype(jnp.float32), 0.0)
    return h + jnp.einsum("ni,nj->ij", x, x, precision=HIGHEST)


def _kernel(x_i_ref, x_j_ref, m_ref, h_ref, out_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        out_ref[...] = h_ref[...]

    m = m_ref[...].astype(jnp.float32)  # [Nb, 1]
    xi = x_i_ref[...].astype(jnp.float32) * m
    xj = x_j_ref[...].astype(jnp.float32)
    out_ref[...] += jax.lax.dot_general(xi, xj, (((0,), (0,)), ((), ())), precision=HIGHEST,
                                        preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("block", "token_block", "interpret"), donate_argnums=0)
def gram_pallas(h: jax.Array, x: jax.Array, mask: jax.Array, block: int = 128, token_block: int = 256,
                interpret: bool = False) -> jax.Array:
    """Pallas version of ``gram_reference`` (``h`` is donated and updated in place)."""
    _check(h, x, mask)
    n, i = x.shape
    bi = min(block, pl.cdiv(i, 8) * 8)
    bn = min(token_block, pl.cdiv(n, 8) * 8)
    ip, np_ = pl.cdiv(i, bi) * bi, pl.cdiv(n, bn) * bn
    # Padded rows are masked out, padded columns are zero: neither changes the kept block of H.
    x = jnp.pad(x, ((0, np_ - n), (0, ip - i)))
    m = jnp.pad(mask.astype(jnp.float32), (0, np_ - n))[:, None]
    hp = jnp.pad(h.astype(jnp.float32), ((0, ip - i), (0, ip - i)))
    out = pl.pallas_call(
        _kernel,
        grid=(ip // bi, ip // bi, np_ // bn),
        in_specs=[
            pl.BlockSpec((bn, bi), lambda a, c, k: (k, a)),
            pl.BlockSpec((bn, bi), lambda a, c, k: (k, c)),
            pl.BlockSpec((bn, 1), lambda a, c, k: (k, 0)),
            pl.BlockSpec((bi, bi), lambda a, c, k: (a, c)),
        ],
        out_specs=pl.BlockSpec((bi, bi), lambda a, c, k: (a, c)),
        out_shape=jax.ShapeDtypeStruct((ip, ip), jnp.float32),
        input_output_aliases={3: 0},
        interpret=interpret,
    )(x, x, m, hp)
    return out[:i, :i]


def gram(h: jax.Array, x: jax.Array, mask: jax.Array, backend: str = "auto") -> jax.Array:
    """``h + X^T X`` over masked-in rows; ``backend`` as in ``fisher_norms.neuron_sq_norms``."""
    if resolve_backend(backend, "gram") == "pallas":
        return gram_pallas(h, x, mask, interpret=jax.default_backend() != "gpu")
    return gram_reference(h, x, mask)
