"""Restoration + compensation of one layer, and the registry of solvers.

The problem (docs/method.md, Stage 2). For one linear layer ``W [out, in]`` (HF layout), neurons are
input columns. ``restored`` marks the honesty-critical columns ``hc``; the others (``task``)
stay pinned at ``W_sft``. With ``H = X^T X [in, in]`` the layer inputs' second moment on the
calibration data, the layer objective is the squared output error against the original layer

    f(W) = ||(W - W_orig) X^T||_F^2 = tr((W - W_orig) H (W - W_orig)^T).

Every solver returns a new ``W`` whose task columns are exactly ``W_sft`` and whose restored
columns start from ``W_orig`` (copied bit-exactly) plus a compensation. Damping: solvers factor
``H_d = H + lambda * mean(diag H) * I``; JAX's Cholesky returns NaN instead of raising, so each
factorisation is checked and retried with ten times more damping, and the damping actually used
is returned. Columns that never see input (zero rows/columns of H) get only the damping term,
which is what keeps them finite.

Adding a solver: one function in one file, registered by name, e.g.

    @register_solver("mine")
    def mine(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
        w_hc = ...  # [out, n_restored] float32: the new values of the restored columns
        return make_result(w_hc, w_orig, w_sft, h, restored, damping)

Inputs are ``w_orig, w_sft [out, in]``, ``h [in, in]`` (undamped), ``restored bool [in]`` (a
NumPy mask, at least one True), ``damping`` = lambda; ``options`` come from
``RepairConfig.solver_options``. Through `solve` (the pipeline's path) the three arrays arrive as
float32 jax arrays on the device, where the pipeline keeps weights, Hessians and updates
(``np.asarray`` makes a host copy if a solver wants NumPy); called directly, every helper here
also accepts NumPy arrays. Only scalars (objectives, damping, flags) come back to the host.
`make_result` accepts ``w_hc`` as a jax or NumPy array, pins the task columns on the device and
computes the objective before compensation (restore only) and after, both with the undamped H.
A solver may also build its `SolverResult` itself with a NumPy ``w_new``: `solve` converts it.
Select it with ``solver: mine`` after importing your module, or name the module in the setting itself,
``solver: my_package.my_solvers:mine`` (``hcnr repair --solver my_package.my_solvers:mine``): the
module is imported, which registers it, and nothing else of the pipeline changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.errors import HcnrError
from hcnr_jax.precision import HIGHEST

MAX_DAMPING_RETRIES = 8


Array = jax.Array | np.ndarray


@dataclass(frozen=True)
class SolverResult:
    """A solved layer: ``w_new [out, in]`` float32, and the objective f (undamped H) of the
    restore-only weight (``objective_before``) and of ``w_new`` (``objective_after``).
    ``damping`` is the lambda finally used; ``info`` holds solver-specific diagnostics.

    ``w_new`` is a jax array (on the device) from the built-in solvers and from `solve`, which
    converts a user solver's NumPy ``w_new``; a solver itself may return either."""

    w_new: Array
    objective_before: float
    objective_after: float
    damping: float
    info: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    """``(w_orig, w_sft, h, restored, damping, **options) -> SolverResult``: the arrays are jax
    (from `solve`: float32, on the device) or NumPy; ``restored`` is a NumPy bool mask."""

    def __call__(self, w_orig: Array, w_sft: Array, h: Array, restored: np.ndarray,
                 damping: float, **options: Any) -> SolverResult: ...


SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    """Decorator: make ``fn`` available as ``solver: name``. Names are unique."""

    def deco(fn: Solver) -> Solver:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        SOLVERS[name] = fn
        return fn

    return deco


# --- shared pieces ------------------------------------------------------------------------------

@jax.jit
def objective(w: jax.Array, w_orig: jax.Array, h: jax.Array) -> jax.Array:
    """The traced layer objective (float32 scalar); `layer_objective` is its host-side wrapper."""
    d = w.astype(jnp.float32) - w_orig.astype(jnp.float32)
    return jnp.sum(jnp.matmul(d, h.astype(jnp.float32), precision=HIGHEST) * d)


def layer_objective(w: Any, w_orig: Any, h: Any) -> float:
    """tr((W - W_orig) H (W - W_orig)^T) in float32 (W, W_orig [out, in]; H [in, in])."""
    return float(objective(as_float32(w), as_float32(w_orig), as_float32(h)))


def as_float32(x: Any) -> jax.Array:
    """``x`` as a float32 jax array: a jax array is cast where it lives (no copy if it is float32
    already), a NumPy array is copied to the default device once."""
    return jnp.asarray(x).astype(jnp.float32) if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)


def _mask(restored: Any) -> np.ndarray:
    """The restored mask on the host (it is small): bool [in]."""
    return np.asarray(restored, bool)


def _idx(positions: np.ndarray) -> jax.Array:
    return jnp.asarray(positions, jnp.int32)


@jax.jit
def _cols(w: jax.Array, idx: jax.Array) -> jax.Array:
    """``w[:, idx]``, gathered on the device."""
    return jnp.take(w, idx, axis=1)


@jax.jit
def _block(h: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """``h[rows][:, cols]`` as one gather (no ``h[rows]`` intermediate)."""
    return h[rows[:, None], cols[None, :]]


def restore_only(w_orig: Any, w_sft: Any, restored: Any) -> jax.Array:
    """``W_sft`` with the restored columns copied bit-exactly from ``W_orig`` (on the device)."""
    return jnp.where(jnp.asarray(_mask(restored))[None, :], jnp.asarray(w_orig), jnp.asarray(w_sft))


@jax.jit
def _assemble(w_hc: jax.Array, w_orig: jax.Array, w_sft: jax.Array, h: jax.Array,
              hc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    w_new = w_sft.at[:, hc].set(w_hc)
    before = objective(w_sft.at[:, hc].set(jnp.take(w_orig, hc, axis=1)), w_orig, h)
    return w_new, before, objective(w_new, w_orig, h)


def make_result(w_hc: Any, w_orig: Any, w_sft: Any, h: Any, restored: Any,
                damping: float, **info: Any) -> SolverResult:
    """Assemble ``W``: task columns = ``W_sft`` exactly, restored columns = ``w_hc [out, n_hc]``.

    Inputs jax or NumPy; the work is done on the device, ``w_new`` is a float32 jax array and
    only the two objectives come to the host."""
    hc = _idx(np.flatnonzero(_mask(restored)))
    w_new, before, after = _assemble(as_float32(w_hc), as_float32(w_orig), as_float32(w_sft), as_float32(h), hc)
    before, after = jax.device_get((before, after))
    return SolverResult(w_new, float(before), float(after), float(damping), info)


@jax.jit
def _diag_mean(h: jax.Array) -> jax.Array:
    return jnp.mean(jnp.diagonal(h).astype(jnp.float32))


def damping_scale(h: Any) -> float:
    """``mean(diag H)`` of the whole layer H, or 1 when H is all zero (nothing seen any input)."""
    scale = float(_diag_mean(jnp.asarray(h)))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def damp(h: jax.Array, damping: float, scale: float) -> jax.Array:
    """``h + damping * scale * I`` (``scale`` = `damping_scale` of the whole layer's H)."""
    return h + jnp.float32(damping * scale) * jnp.eye(h.shape[0], dtype=jnp.float32)


@jax.jit
def cholesky_shifted(h: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lower Cholesky factor of ``h [n, n] + shift I``, whether it is finite). Public: ``hcnr_jax.plan``
    compiles the solvers' device work from these pieces."""
    chol = jnp.linalg.cholesky(h + shift * jnp.eye(h.shape[0], dtype=h.dtype))
    return chol, jnp.all(jnp.isfinite(chol))


def cholesky_with_retry(h: jax.Array, damping: float, scale: float) -> tuple[jax.Array, float]:
    """Lower Cholesky factor of ``h + damping * scale * I``, raising the damping tenfold until it
    is finite (JAX returns NaN, not an error, for a matrix that is not positive definite)."""
    lam = float(damping)
    for _ in range(MAX_DAMPING_RETRIES):
        chol, ok = cholesky_shifted(h, jnp.float32(lam * scale))
        if bool(ok):
            return chol, lam
        lam = max(lam * 10.0, 1e-6)
    raise HcnrError(f"Hessian not positive definite even with damping {lam:g} (non-finite inputs?)")


@jax.jit
def _task_shift(w_orig: jax.Array, w_sft: jax.Array, task: jax.Array) -> jax.Array:
    return jnp.take(w_sft, task, axis=1) - jnp.take(w_orig, task, axis=1)


def _split(w_orig: Any, w_sft: Any, restored: Any) -> tuple[np.ndarray, np.ndarray, jax.Array]:
    """Host index arrays of the restored (``hc``) and pinned (``task``) columns, and the pinned
    columns' shift ``dW[:, task] = W_sft[:, task] - W_orig[:, task]`` on the device."""
    restored = _mask(restored)
    hc, task = np.flatnonzero(restored), np.flatnonzero(~restored)
    return hc, task, _task_shift(as_float32(w_orig), as_float32(w_sft), _idx(task))


def _columns(w_orig: Any, w_sft: Any, h: Any, restored: Any) -> tuple[jax.Array, ...]:
    """What every compensating solver starts from, on the device: float32 ``w_orig, w_sft, h``,
    the restored (``hc``) and pinned (``task``) column indices, ``dW[:, task]`` and ``W_orig[:, hc]``."""
    w_orig, w_sft, h = as_float32(w_orig), as_float32(w_sft), as_float32(h)
    hc, task, dw_task = _split(w_orig, w_sft, restored)
    hc, task = _idx(hc), _idx(task)
    return w_orig, w_sft, h, hc, task, dw_task, _cols(w_orig, hc)


# --- the registered solvers ---------------------------------------------------------------------

@register_solver("none")
def solve_none(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
    """Restore only (the paper's "w/o compensation" ablation)."""
    w_orig_hc = _cols(as_float32(w_orig), _idx(np.flatnonzero(_mask(restored))))
    return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)


@jax.jit
def exact_update(chol: jax.Array, dw_task: jax.Array, h_th: jax.Array) -> jax.Array:
    """The restored columns' change ``E [out, n_hc]`` of the exact solve, from ``chol`` of the
    damped ``H[hc, hc]``, ``dw_task [out, n_task]`` and ``h_th = H[task, hc]``."""
    # E H_hh = -dW_t H_th  <=>  H_hh E^T = -(dW_t H_th)^T   (H symmetric)
    rhs = jnp.matmul(dw_task, h_th, precision=HIGHEST)
    return -jax.scipy.linalg.cho_solve((chol, True), rhs.T).T


@register_solver("exact")
def solve_exact(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
    """Joint optimum: ``W_hc = W_orig[:, hc] - dW[:, task] H[task, hc] inv(H[hc, hc])``.

    Setting the gradient of f in the restored columns E = W_hc - W_orig[:, hc] to zero,
    ``2 (dW_t H_th + E H_hh) = 0``; H is the damped one, so this is the ridge optimum.
    """
    w_orig, w_sft, h, hc, task, dw_task, w_orig_hc = _columns(w_orig, w_sft, h, restored)
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    # The damped H's diagonal lies in H_hh; its H_th block is off-diagonal, so undamped.
    chol, lam = cholesky_with_retry(_block(h, hc, hc), damping, damping_scale(h))
    e = exact_update(chol, dw_task, _block(h, task, hc))
    return make_result(w_orig_hc + e, w_orig, w_sft, h, restored, lam)


@jax.jit
def paper_update(chol: jax.Array, dw_task: jax.Array, task: jax.Array, hc: jax.Array) -> jax.Array:
    """The restored columns' change ``E [out, n_hc]`` as printed in the paper, from ``chol`` of the
    whole damped ``H [in, in]`` and ``dw_task [out, n_task]``."""
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(chol.shape[0], dtype=chol.dtype))
    diag = jnp.diag(hinv)[task]
    return jnp.matmul(dw_task / diag[None, :], hinv[task][:, hc], precision=HIGHEST)


@register_solver("paper")
def solve_paper(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
    """As printed: ``W_hc = W_orig[:, hc] + sum_{k in task} dW[:, k] / [H^-1]_kk * [H^-1]_{k, hc}``.

    Each pinned column's shift is compensated on its own, OBS-style, with the inverse of the
    whole damped H; the sum over k ignores how the compensations interact, so with several
    pinned columns it is not the optimum (with exactly one it equals ``exact``).
    """
    w_orig, w_sft, h, hc, task, dw_task, w_orig_hc = _columns(w_orig, w_sft, h, restored)
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    chol, lam = cholesky_with_retry(h, damping, damping_scale(h))
    e = paper_update(chol, dw_task, task, hc)
    return make_result(w_orig_hc + e, w_orig, w_sft, h, restored, lam)


@functools.partial(jax.jit, static_argnums=(2, 3))
def cg_rows(a: jax.Array, b: jax.Array, iters: int, tol: float) -> tuple[jax.Array, jax.Array]:
    """Solve ``X A = B`` row by row by conjugate gradients (A [n, n] SPD, B [r, n]), X0 = 0.

    Returns X and the iterations each row ran. Converged rows stop moving (their step is 0).
    """
    x = jnp.zeros_like(b)
    r = b
    p = r
    rr = jnp.sum(r * r, axis=1)
    stop = tol * tol * jnp.maximum(rr, jnp.finfo(jnp.float32).tiny)

    def body(_, state):
        x, r, p, rr, n = state
        active = rr > stop
        ap = jnp.matmul(p, a, precision=HIGHEST)
        pap = jnp.sum(p * ap, axis=1)
        alpha = jnp.where(active & (pap > 0), rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rr_new = jnp.sum(r * r, axis=1)
        beta = jnp.where(active & (rr > 0), rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        p = jnp.where(active[:, None], r + beta[:, None] * p, p)
        return x, r, p, jnp.where(active, rr_new, rr), n + active.astype(jnp.int32)

    x, _, _, _, n = jax.lax.fori_loop(0, iters, body, (x, r, p, rr, jnp.zeros(b.shape[0], jnp.int32)))
    return x, n



@register_solver("cg")
def solve_cg(w_orig, w_sft, h, restored, damping, *, iters: int = 100, tol: float = 1e-5,
             **options) -> SolverResult:
    """Research solver: the ``exact`` system ``E H_hh = -dW_t H_th`` by damped conjugate gradients.

    No factorisation or inverse of H_hh, only products with it, so very wide layers fit where a
    Cholesky would not; ``iters`` caps the work (options ``iters`` [100], ``tol`` [1e-5], relative
    residual per row). Starting from E = 0 (restore only), each CG step lowers the damped
    objective, so any ``iters`` is at least as good as ``none`` on it.
    """
    w_orig, w_sft, h, hc, task, dw_task, w_orig_hc = _columns(w_orig, w_sft, h, restored)
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    h_hh = damp(_block(h, hc, hc), damping, damping_scale(h))
    rhs = -jnp.matmul(dw_task, _block(h, task, hc), precision=HIGHEST)
    e, n = cg_rows(h_hh, rhs, int(iters), float(tol))
    return make_result(w_orig_hc + e, w_orig, w_sft, h, restored, damping,
                       cg_max_iters=int(jnp.max(n)))


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; ``"pkg.module:name"`` imports ``pkg.module`` first
    (importing it registers its solvers), so a solver in its own file needs no pipeline change."""
    if name not in SOLVERS and ":" in name:
        import importlib

        module, _, short = name.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise HcnrError(f"solver={name!r}: cannot import module {module!r} ({e})") from e
        if short in SOLVERS:
            SOLVERS[name] = SOLVERS[short]
    if name not in SOLVERS:
        raise HcnrError(f"solver={name!r}: unknown solver; registered: {sorted(SOLVERS)}")
    return SOLVERS[name]


def solve(name: str, w_orig: Any, w_sft: Any, h: Any, restored: Any, damping: float,
          **options: Any) -> SolverResult:
    """Run the registered solver ``name`` on one layer after checking the inputs and the output.

    ``w_orig, w_sft, h``: jax or NumPy arrays, handed to the solver as float32 jax arrays on the
    device (a jax array stays where it is); ``restored``: bool [in] or an index array. The
    result's ``w_new`` is a float32 jax array whatever the solver returned."""
    fn = get_solver(name)
    w_orig, w_sft, h = as_float32(w_orig), as_float32(w_sft), as_float32(h)
    restored = np.asarray(restored)
    if restored.dtype != bool:  # an index array
        mask = np.zeros(w_orig.shape[1], bool)
        mask[restored.astype(np.int64)] = True
        restored = mask
    if w_orig.shape != w_sft.shape or w_orig.ndim != 2:
        raise HcnrError(f"W_orig {w_orig.shape} and W_sft {w_sft.shape}: need equal [out, in] shapes")
    if h.shape != (w_orig.shape[1],) * 2 or restored.shape != (w_orig.shape[1],):
        raise HcnrError(f"H {h.shape} / restored {restored.shape} do not match in={w_orig.shape[1]}")
    if not restored.any():
        raise HcnrError("no restored neurons: nothing to solve")
    result = fn(w_orig, w_sft, h, restored, damping, **options)
    w_new = as_float32(result.w_new)
    if w_new.shape != w_orig.shape or not bool(jnp.all(jnp.isfinite(w_new))):
        raise HcnrError(f"solver {name!r} returned a non-finite or misshapen weight")
    return result if w_new is result.w_new else dataclasses.replace(result, w_new=w_new)
