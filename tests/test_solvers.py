"""Solvers against float64 NumPy references on well- and ill-conditioned random problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hcnr_jax.errors import HcnrError
from hcnr_jax.repair import solvers as S


def problem(seed, out=7, n_in=11, tokens=40, cond="well", frac=0.5):
    """W_orig, W_sft [out, in], H = X^T X [in, in] (float64), restored bool [in]."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(tokens, n_in))
    if cond == "ill":
        x[:, 1] = x[:, 0] * 1.0001            # near-collinear inputs
        x = x * np.logspace(0, -4, n_in)      # widely spread scales
    elif cond == "singular":
        x = x[:, :3] @ rng.normal(size=(3, n_in))  # rank 3
    elif cond == "dead":
        x[:, [2, 5]] = 0.0                    # columns that never see input
    h = x.T @ x
    w_orig = rng.normal(size=(out, n_in))
    w_sft = w_orig + 0.3 * rng.normal(size=(out, n_in))
    restored = np.zeros(n_in, bool)
    restored[rng.permutation(n_in)[: max(1, int(frac * n_in))]] = True
    if cond == "dead":
        restored[[2, 5]] = [True, False]       # a dead column on each side
    return w_orig, w_sft, h, restored


def damped64(h, lam):
    scale = np.mean(np.diag(h))
    scale = scale if scale > 0 else 1.0
    return h + lam * scale * np.eye(h.shape[0])


def objective64(w, w_orig, h):
    d = np.asarray(w, np.float64) - w_orig
    return float(np.trace(d @ h @ d.T))


def exact64(w_orig, w_sft, h, restored, lam):
    hd = damped64(h, lam)
    hc, t = np.flatnonzero(restored), np.flatnonzero(~restored)
    w = w_sft.copy()
    w[:, hc] = w_orig[:, hc] - (w_sft - w_orig)[:, t] @ hd[np.ix_(t, hc)] @ np.linalg.inv(hd[np.ix_(hc, hc)])
    return w


def paper64(w_orig, w_sft, h, restored, lam):
    hinv = np.linalg.inv(damped64(h, lam))
    hc, t = np.flatnonzero(restored), np.flatnonzero(~restored)
    w = w_sft.copy()
    comp = sum(np.outer((w_sft - w_orig)[:, k] / hinv[k, k], hinv[k, hc]) for k in t)
    w[:, hc] = w_orig[:, hc] + comp
    return w


def f32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cond", ["well", "ill"])
def test_exact_matches_float64_and_is_optimal(seed, cond):
    w_orig, w_sft, h, restored = problem(seed, cond=cond)
    lam = 0.01
    res = S.solve("exact", *f32(w_orig, w_sft, h), restored, lam)
    ref = exact64(*f32(w_orig, w_sft, h), restored, lam)
    scale = np.abs(ref).max()
    tol = 1e-4 if cond == "well" else 2e-3
    np.testing.assert_allclose(res.w_new, ref, atol=tol * scale)
    # Zero gradient of the damped objective in the free (restored) columns, at float64.
    hd = damped64(np.asarray(h, np.float32).astype(np.float64), lam)
    grad = 2 * (np.asarray(res.w_new, np.float64) - np.float32(w_orig).astype(np.float64)) @ hd
    gscale = np.abs(2 * (np.float32(w_sft) - np.float32(w_orig)).astype(np.float64) @ hd).max()
    assert np.abs(grad[:, restored]).max() <= tol * gscale
    # Not above paper or none on the objective it minimises (float64 evaluation).
    others = {n: S.solve(n, *f32(w_orig, w_sft, h), restored, lam).w_new for n in ("paper", "none", "cg")}
    f = {n: objective64(w, np.float32(w_orig), hd) for n, w in {**others, "exact": res.w_new}.items()}
    assert f["exact"] <= min(f["paper"], f["none"]) * (1 + 1e-5)
    assert f["exact"] < f["none"]


@pytest.mark.parametrize("seed", range(3))
def test_paper_matches_printed_formula(seed):
    w_orig, w_sft, h, restored = problem(seed)
    res = S.solve("paper", *f32(w_orig, w_sft, h), restored, 0.01)
    ref = paper64(*f32(w_orig, w_sft, h), restored, 0.01)
    np.testing.assert_allclose(res.w_new, ref, atol=1e-4 * np.abs(ref).max())


def test_paper_equals_exact_with_one_pinned_neuron():
    w_orig, w_sft, h, _ = problem(5)
    restored = np.ones(h.shape[0], bool)
    restored[4] = False
    a = S.solve("paper", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    b = S.solve("exact", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    # ...but not with several pinned neurons: the printed sum is not the joint optimum.
    w_orig, w_sft, h, restored = problem(5)
    a = S.solve("paper", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    b = S.solve("exact", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    assert np.abs(a - b).max() > 1e-3


def test_exact_undamped_well_conditioned_is_true_optimum():
    w_orig, w_sft, h, restored = problem(7, tokens=200)
    res = S.solve("exact", *f32(w_orig, w_sft, h), restored, 0.0)
    h32 = np.float32(h).astype(np.float64)
    g = 2 * (np.asarray(res.w_new, np.float64) - np.float32(w_orig)) @ h32
    assert np.abs(g[:, restored]).max() < 1e-3 * np.abs(h32).max()
    assert res.objective_after < res.objective_before
    assert res.damping == 0.0


@pytest.mark.parametrize("name", sorted(S.SOLVERS))
@pytest.mark.parametrize("cond", ["singular", "dead"])
def test_damping_handles_singular_and_dead_columns(name, cond):
    w_orig, w_sft, h, restored = problem(3, cond=cond)
    res = S.solve(name, *f32(w_orig, w_sft, h), restored, 0.01)
    assert np.all(np.isfinite(res.w_new)) and np.isfinite(res.objective_after)
    # Pinned columns are W_sft bit for bit, whatever the solver did.
    np.testing.assert_array_equal(res.w_new[:, ~restored], np.float32(w_sft)[:, ~restored])
    if cond == "dead" and name in ("exact", "cg", "none"):
        # A restored column that never sees input has nothing to compensate: it stays W_orig
        # (its H row is zero, so the update is zero); exact/cg are ridge there.
        np.testing.assert_array_equal(res.w_new[:, 2], np.float32(w_orig)[:, 2])


def test_zero_damping_singular_retries_and_records_damping():
    w_orig, w_sft, h, restored = problem(4, cond="singular")
    for name in ("exact", "paper"):
        res = S.solve(name, *f32(w_orig, w_sft, h), restored, 0.0)
        assert res.damping > 0.0, name
        assert np.all(np.isfinite(res.w_new))


def test_all_zero_hessian():
    w_orig, w_sft, h, restored = problem(1)
    for name in sorted(S.SOLVERS):
        res = S.solve(name, *f32(w_orig, w_sft, np.zeros_like(h)), restored, 0.01)
        np.testing.assert_array_equal(res.w_new[:, restored], np.float32(w_orig)[:, restored])
        assert res.objective_before == res.objective_after == 0.0


def test_none_restores_bit_exactly():
    w_orig, w_sft, h, restored = problem(2)
    res = S.solve("none", *f32(w_orig, w_sft, h), restored, 0.01)
    np.testing.assert_array_equal(res.w_new[:, restored], np.float32(w_orig)[:, restored])
    np.testing.assert_array_equal(res.w_new[:, ~restored], np.float32(w_sft)[:, ~restored])
    assert res.objective_after == res.objective_before
    assert res.objective_before == pytest.approx(
        objective64(S.restore_only(*f32(w_orig, w_sft), restored), np.float32(w_orig), np.float32(h)), rel=1e-4)


def test_cg_converges_to_exact_and_never_worse_than_none():
    w_orig, w_sft, h, restored = problem(6, out=5, n_in=30, tokens=100)
    ex = S.solve("exact", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    cg = S.solve("cg", *f32(w_orig, w_sft, h), restored, 0.01, iters=200, tol=1e-7).w_new
    np.testing.assert_allclose(cg, ex, atol=1e-3 * np.abs(ex).max())
    hd = damped64(np.float32(h).astype(np.float64), 0.01)
    none = objective64(S.restore_only(*f32(w_orig, w_sft), restored), np.float32(w_orig), hd)
    for iters in (1, 2, 5):
        w = S.solve("cg", *f32(w_orig, w_sft, h), restored, 0.01, iters=iters).w_new
        assert objective64(w, np.float32(w_orig), hd) <= none * (1 + 1e-6)


def test_index_array_and_all_restored():
    w_orig, w_sft, h, restored = problem(8)
    a = S.solve("exact", *f32(w_orig, w_sft, h), np.flatnonzero(restored), 0.01).w_new
    b = S.solve("exact", *f32(w_orig, w_sft, h), restored, 0.01).w_new
    np.testing.assert_array_equal(a, b)
    full = np.ones_like(restored)
    for name in sorted(S.SOLVERS):
        res = S.solve(name, *f32(w_orig, w_sft, h), full, 0.01)
        np.testing.assert_array_equal(res.w_new, np.float32(w_orig))


def test_bad_inputs():
    w_orig, w_sft, h, restored = problem(0)
    with pytest.raises(HcnrError, match="unknown solver"):
        S.solve("nope", w_orig, w_sft, h, restored, 0.01)
    with pytest.raises(HcnrError, match="no restored"):
        S.solve("exact", w_orig, w_sft, h, np.zeros_like(restored), 0.01)
    with pytest.raises(HcnrError, match="shapes"):
        S.solve("exact", w_orig, w_sft[:, :-1], h, restored, 0.01)


def test_registry_accepts_a_new_solver_in_one_place():
    @S.register_solver("_test_half")
    def half(w_orig, w_sft, h, restored, damping, **options):
        return S.make_result(0.5 * (w_orig + w_sft)[:, restored], w_orig, w_sft, h, restored, damping)

    try:
        w_orig, w_sft, h, restored = problem(0)
        res = S.solve("_test_half", *f32(w_orig, w_sft, h), restored, 0.01)
        np.testing.assert_array_equal(res.w_new[:, ~restored], np.float32(w_sft)[:, ~restored])
        with pytest.raises(ValueError, match="already registered"):
            S.register_solver("_test_half")(half)
    finally:
        S.SOLVERS.pop("_test_half")


def test_solver_in_its_own_file_by_module_name(tmp_path, monkeypatch):
    """`--solver my_solvers:shrink` imports a solver file that only registers itself."""
    (tmp_path / "my_solvers.py").write_text(
        "from hcnr_jax.repair.solvers import register_solver, make_result\n"
        "@register_solver('shrink')\n"
        "def shrink(w_orig, w_sft, h, restored, damping, **options):\n"
        "    return make_result(0.9 * w_orig[:, restored], w_orig, w_sft, h, restored, damping)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from hcnr_jax.repair.config import RepairConfig

        RepairConfig(solver="my_solvers:shrink").validate()
        w_orig, w_sft, h, restored = problem(1)
        res = S.solve("my_solvers:shrink", *f32(w_orig, w_sft, h), restored, 0.01)
        np.testing.assert_allclose(res.w_new[:, restored], 0.9 * np.float32(w_orig)[:, restored], rtol=1e-6)
        with pytest.raises(HcnrError, match="cannot import module 'no_such_mod'"):
            S.solve("no_such_mod:x", *f32(w_orig, w_sft, h), restored, 0.01)
    finally:
        S.SOLVERS.pop("shrink", None)
        S.SOLVERS.pop("my_solvers:shrink", None)


@pytest.mark.parametrize("name", ["exact", "paper", "cg", "none"])
def test_device_inputs_give_the_same_result_on_the_device(name):
    """The pipeline hands jax arrays (float32, or bfloat16 weights cast by `solve`); the result is
    the NumPy-input one bit for bit, and ``w_new`` stays a jax array."""
    *arrays, restored = problem(9)
    w_orig, w_sft, h = f32(*arrays)
    host = S.solve(name, w_orig, w_sft, h, restored, 0.01)
    dev = S.solve(name, jnp.asarray(w_orig), jnp.asarray(w_sft), jnp.asarray(h), jnp.asarray(restored), 0.01)
    assert isinstance(host.w_new, jax.Array) and isinstance(dev.w_new, jax.Array)
    assert dev.w_new.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dev.w_new), np.asarray(host.w_new))
    assert (dev.objective_before, dev.objective_after, dev.damping) == \
        (host.objective_before, host.objective_after, host.damping)
    # Called directly (not through `solve`), a solver takes NumPy too.
    direct = S.SOLVERS[name](w_orig, w_sft, h, restored, 0.01)
    np.testing.assert_array_equal(np.asarray(direct.w_new), np.asarray(host.w_new))
    bf16 = S.solve(name, jnp.asarray(w_orig, jnp.bfloat16), jnp.asarray(w_sft, jnp.bfloat16), h, restored, 0.01)
    np.testing.assert_array_equal(np.asarray(bf16.w_new)[:, ~restored],
                                  np.asarray(jnp.asarray(w_sft, jnp.bfloat16), np.float32)[:, ~restored])


def test_helpers_accept_numpy_and_jax():
    *arrays, restored = problem(10)
    w_orig, w_sft, h = f32(*arrays)
    for conv in (np.asarray, jnp.asarray):
        a, b, hh = conv(w_orig), conv(w_sft), conv(h)
        r = S.restore_only(a, b, restored)
        np.testing.assert_array_equal(np.asarray(r), np.where(restored[None, :], w_orig, w_sft))
        assert S.layer_objective(r, a, hh) == pytest.approx(objective64(r, w_orig, h), rel=1e-5)
        assert S.damping_scale(hh) == pytest.approx(np.mean(np.diag(h)), rel=1e-6)
        hc, task, dw = S._split(a, b, restored)
        np.testing.assert_array_equal(hc, np.flatnonzero(restored))
        np.testing.assert_array_equal(np.asarray(dw), (w_sft - w_orig)[:, task])
        res = S.make_result(conv(w_orig[:, restored]), a, b, hh, restored, 0.01)
        assert isinstance(res.w_new, jax.Array)
        np.testing.assert_array_equal(np.asarray(res.w_new), np.asarray(r))
        assert res.objective_after == res.objective_before
    assert S.damping_scale(np.zeros((3, 3), np.float32)) == 1.0


def test_user_solver_returning_numpy_is_converted():
    @S.register_solver("_test_numpy")
    def numpy_restore(w_orig, w_sft, h, restored, damping, **options):
        w = np.array(w_sft, np.float32)
        w[:, restored] = np.asarray(w_orig)[:, restored]
        return S.SolverResult(w, 0.0, 0.0, damping)

    try:
        w_orig, w_sft, h, restored = problem(11)
        res = S.solve("_test_numpy", *f32(w_orig, w_sft, h), restored, 0.01)
        assert isinstance(res.w_new, jax.Array)
        np.testing.assert_array_equal(np.asarray(res.w_new), np.asarray(S.restore_only(*f32(w_orig, w_sft), restored)))
    finally:
        S.SOLVERS.pop("_test_numpy")
