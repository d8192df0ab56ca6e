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

Inputs are float32 arrays ``w_orig, w_sft [out, in]``, ``h [in, in]`` (undamped), ``restored
bool [in]`` (at least one True), ``damping`` = lambda; ``options`` come from
``RepairConfig.solver_options``. `make_result` pins the task columns and computes the objective
before compensation (restore only) and after, both with the undamped H. Select it with
``solver: mine`` after importing your module, or name the module in the setting itself,
``solver: my_package.my_solvers:mine`` (``hcnr repair --solver my_package.my_solvers:mine``): the
module is imported, which registers it, and nothing else of the pipeline changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax.errors import HcnrError

HIGHEST = jax.lax.Precision.HIGHEST
MAX_DAMPING_RETRIES = 8


@dataclass(frozen=True)
class SolverResult:
    """A solved layer: ``w_new [out, in]`` float32, and the objective f (undamped H) of the
    restore-only weight (``objective_before``) and of ``w_new`` (``objective_after``).
    ``damping`` is the lambda finally used; ``info`` holds solver-specific diagnostics."""

    w_new: np.ndarray
    objective_before: float
    objective_after: float
    damping: float
    info: dict[str, Any] = field(default_factory=dict)


class Solver(Protocol):
    def __call__(self, w_orig: np.ndarray, w_sft: np.ndarray, h: np.ndarray, restored: np.ndarray,
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
    return float(objective(jnp.asarray(w, jnp.float32), jnp.asarray(w_orig, jnp.float32),
                           jnp.asarray(h, jnp.float32)))


def restore_only(w_orig: np.ndarray, w_sft: np.ndarray, restored: np.ndarray) -> np.ndarray:
    """``W_sft`` with the restored columns copied bit-exactly from ``W_orig``."""
    return np.where(np.asarray(restored, bool)[None, :], np.asarray(w_orig), np.asarray(w_sft))


def make_result(w_hc: Any, w_orig: np.ndarray, w_sft: np.ndarray, h: np.ndarray, restored: np.ndarray,
                damping: float, **info: Any) -> SolverResult:
    """Assemble ``W``: task columns = ``W_sft`` exactly, restored columns = ``w_hc [out, n_hc]``."""
    restored = np.asarray(restored, bool)
    w_new = np.array(w_sft, np.float32, copy=True)
    w_new[:, restored] = np.asarray(w_hc, np.float32)
    before = layer_objective(restore_only(w_orig, w_sft, restored), w_orig, h)
    return SolverResult(w_new, before, layer_objective(w_new, w_orig, h), float(damping), info)


def damping_scale(h: Any) -> float:
    """``mean(diag H)`` of the whole layer H, or 1 when H is all zero (nothing seen any input)."""
    scale = float(np.mean(np.diag(np.asarray(h, np.float32))))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def damp(h: jax.Array, damping: float, scale: float) -> jax.Array:
    """``h + damping * scale * I`` (``scale`` = `damping_scale` of the whole layer's H)."""
    return h + jnp.float32(damping * scale) * jnp.eye(h.shape[0], dtype=jnp.float32)


@jax.jit
def _cholesky(h: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    chol = jnp.linalg.cholesky(h + shift * jnp.eye(h.shape[0], dtype=h.dtype))
    return chol, jnp.all(jnp.isfinite(chol))


def cholesky_with_retry(h: jax.Array, damping: float, scale: float) -> tuple[jax.Array, float]:
    """Lower Cholesky factor of ``h + damping * scale * I``, raising the damping tenfold until it
    is finite (JAX returns NaN, not an error, for a matrix that is not positive definite)."""
    lam = float(damping)
    for _ in range(MAX_DAMPING_RETRIES):
        chol, ok = _cholesky(h, jnp.float32(lam * scale))
        if bool(ok):
            return chol, lam
        lam = max(lam * 10.0, 1e-6)
    raise HcnrError(f"Hessian not positive definite even with damping {lam:g} (non-finite inputs?)")


def _split(w_orig: np.ndarray, w_sft: np.ndarray, restored: np.ndarray) -> tuple[np.ndarray, np.ndarray, jax.Array]:
    restored = np.asarray(restored, bool)
    hc, task = np.flatnonzero(restored), np.flatnonzero(~restored)
    dw_task = jnp.asarray(w_sft[:, task], jnp.float32) - jnp.asarray(w_orig[:, task], jnp.float32)
    return hc, task, dw_task


# --- the registered solvers ---------------------------------------------------------------------

@register_solver("none")
def solve_none(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
    """Restore only (the paper's "w/o compensation" ablation)."""
    return make_result(np.asarray(w_orig)[:, np.asarray(restored, bool)], w_orig, w_sft, h, restored, damping)


@jax.jit
def _exact_update(chol: jax.Array, dw_task: jax.Array, h_th: jax.Array) -> jax.Array:
    # E H_hh = -dW_t H_th  <=>  H_hh E^T = -(dW_t H_th)^T   (H symmetric)
    rhs = jnp.matmul(dw_task, h_th, precision=HIGHEST)
    return -jax.scipy.linalg.cho_solve((chol, True), rhs.T).T


@register_solver("exact")
def solve_exact(w_orig, w_sft, h, restored, damping, **options) -> SolverResult:
    """Joint optimum: ``W_hc = W_orig[:, hc] - dW[:, task] H[task, hc] inv(H[hc, hc])``.

    Setting the gradient of f in the restored columns E = W_hc - W_orig[:, hc] to zero,
    ``2 (dW_t H_th + E H_hh) = 0``; H is the damped one, so this is the ridge optimum.
    """
    hc, task, dw_task = _split(w_orig, w_sft, restored)
    w_orig_hc = np.asarray(w_orig, np.float32)[:, hc]
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    hd = jnp.asarray(h, jnp.float32)
    # The damped H's diagonal lies in H_hh; its H_th block is off-diagonal, so undamped.
    chol, lam = cholesky_with_retry(hd[np.ix_(hc, hc)], damping, damping_scale(h))
    e = _exact_update(chol, dw_task, hd[np.ix_(task, hc)])
    return make_result(w_orig_hc + np.asarray(e), w_orig, w_sft, h, restored, lam)


@jax.jit
def _paper_update(chol: jax.Array, dw_task: jax.Array, task: jax.Array, hc: jax.Array) -> jax.Array:
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
    hc, task, dw_task = _split(w_orig, w_sft, restored)
    w_orig_hc = np.asarray(w_orig, np.float32)[:, hc]
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    chol, lam = cholesky_with_retry(jnp.asarray(h, jnp.float32), damping, damping_scale(h))
    e = _paper_update(chol, dw_task, jnp.asarray(task), jnp.asarray(hc))
    return make_result(w_orig_hc + np.asarray(e), w_orig, w_sft, h, restored, lam)


def _cg_rows(a: jax.Array, b: jax.Array, iters: int, tol: float) -> tuple[jax.Array, jax.Array]:
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


_cg_rows_jit = jax.jit(_cg_rows, static_argnums=(2, 3))


@register_solver("cg")
def solve_cg(w_orig, w_sft, h, restored, damping, *, iters: int = 100, tol: float = 1e-5,
             **options) -> SolverResult:
    """Research solver: the ``exact`` system ``E H_hh = -dW_t H_th`` by damped conjugate gradients.

    No factorisation or inverse of H_hh, only products with it, so very wide layers fit where a
    Cholesky would not; ``iters`` caps the work (options ``iters`` [100], ``tol`` [1e-5], relative
    residual per row). Starting from E = 0 (restore only), each CG step lowers the damped
    objective, so any ``iters`` is at least as good as ``none`` on it.
    """
    hc, task, dw_task = _split(w_orig, w_sft, restored)
    w_orig_hc = np.asarray(w_orig, np.float32)[:, hc]
    if task.size == 0:
        return make_result(w_orig_hc, w_orig, w_sft, h, restored, damping)
    hd = jnp.asarray(h, jnp.float32)
    h_hh = damp(hd[np.ix_(hc, hc)], damping, damping_scale(h))
    rhs = -jnp.matmul(dw_task, hd[np.ix_(task, hc)], precision=HIGHEST)
    e, n = _cg_rows_jit(h_hh, rhs, int(iters), float(tol))
    return make_result(w_orig_hc + np.asarray(e), w_orig, w_sft, h, restored, damping,
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
    """Run the registered solver ``name`` on one layer after checking the inputs and the output."""
    fn = get_solver(name)
    w_orig = np.asarray(w_orig, np.float32)
    w_sft = np.asarray(w_sft, np.float32)
    h = np.asarray(h, np.float32)
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
    if result.w_new.shape != w_orig.shape or not np.all(np.isfinite(result.w_new)):
        raise HcnrError(f"solver {name!r} returned a non-finite or misshapen weight")
    return result
