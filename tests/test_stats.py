"""Fisher and Hessian against a float64 PyTorch per-sample loop on tiny models of every family."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch

import hcnr_jax
from hcnr_jax import stats
from hcnr_jax.data.samples import samples_from_records
from hcnr_jax.params import linear_names
from hcnr_jax.stats import StatsOptions
from hcnr_jax.stats.reference import fisher_vmap

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")


def random_samples(n: int = 6, vocab: int = 97, seed: int = 0, lengths=(5, 16)):
    """Pre-tokenized records of varying length with random (non-empty) loss masks."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        t = int(rng.integers(*lengths))
        mask = (rng.random(t) < 0.6).astype(int)
        mask[-1] = 1
        records.append({"input_ids": rng.integers(0, vocab, t).tolist(), "loss_mask": mask.tolist()})
    return samples_from_records(records, tokenizer=None)


def torch_reference(model, samples):
    """float64 loop over samples (each unpadded): Fisher sums for both axes and X^T X per layer."""
    m = copy.deepcopy(model).double()
    linears = {n: p for n, p in m.named_parameters() if n.endswith("proj.weight")}
    inputs: dict[str, list] = {}
    hooks = [mod.register_forward_hook(lambda mod, a, o, name=name: inputs.setdefault(name, []).append(a[0][0]))
             for name, mod in m.named_modules() if name + ".weight" in linears]
    fin = {n: 0 for n in linears}
    fout = {n: 0 for n in linears}
    for i in range(len(samples)):
        real = np.flatnonzero(samples.attention_mask[i])  # left or right padding
        a, b = int(real[0]), int(real[-1]) + 1
        ids = torch.tensor(samples.input_ids[i, a:b], dtype=torch.long)
        lm = torch.tensor(samples.loss_mask[i, a + 1:b], dtype=torch.float64)
        logits = m(ids[None]).logits[0]
        if lm.sum() == 0:  # no targets: loss 0, no gradient
            continue
        nll = -torch.log_softmax(logits[:-1], -1)[torch.arange(b - a - 1), ids[1:]]
        loss = (nll * lm).sum() / lm.sum()
        grads = torch.autograd.grad(loss, list(linears.values()))
        for n, g in zip(linears, grads, strict=True):
            fin[n] = fin[n] + (g**2).sum(0)
            fout[n] = fout[n] + (g**2).sum(1)
    for h in hooks:
        h.remove()
    hess = {n + ".weight": sum(x.T @ x for x in xs).detach().numpy() for n, xs in inputs.items()}
    n = len(samples)
    return ({k: (v / n).detach().numpy() for k, v in fin.items()},
            {k: (v / n).detach().numpy() for k, v in fout.items()}, hess)


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """family -> (torch model, loaded Pretrained): 2-layer tiny models (compile time is per layer)."""
    import tiny

    out = {}
    for f in FAMILIES:
        model = tiny.hf_model(f, num_hidden_layers=2)
        if f == "qwen2":  # keep one sliding-window and one full layer
            model = tiny.hf_model(f, num_hidden_layers=2, max_window_layers=1)
        out[f] = (model, hcnr_jax.load_pretrained(tiny.save_hf(model, tmp_path_factory.mktemp(f))))
    return out


@pytest.fixture(scope="module")
def loaded(tiny2):
    return {f: m for f, (_, m) in tiny2.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_against_float64_torch_loop(family, tiny2):
    torch_model, model = tiny2[family]
    samples = random_samples(seed=FAMILIES.index(family))
    fin, fout, hess = torch_reference(torch_model, samples)
    names = linear_names(model.config)
    assert set(fin) == set(names) and set(hess) == set(names)

    got_in = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=4),
                          neuron_axis="input")
    # The output axis shares all code but the final reduction: one family checks it (compile time).
    got_out = (stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=4),
                            neuron_axis="output")
               if family == "llama" else None)
    got_h = stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=4))
    for n in names:
        assert got_in[n].dtype == np.float32 and got_in[n].shape == fin[n].shape
        assert rel_err(got_in[n], fin[n]) <= 1e-5, (n, rel_err(got_in[n], fin[n]))
        if got_out is not None:
            assert rel_err(got_out[n], fout[n]) <= 1e-5, (n, rel_err(got_out[n], fout[n]))
        assert got_h[n].dtype == np.float32
        assert rel_err(got_h[n], hess[n]) <= 1e-5, (n, rel_err(got_h[n], hess[n]))
    layer = "model.layers.1."
    assert got_h[layer + "self_attn.k_proj.weight"] is got_h[layer + "self_attn.q_proj.weight"]
    assert got_h[layer + "mlp.up_proj.weight"] is got_h[layer + "mlp.gate_proj.weight"]


def test_matches_vmap_grad_and_is_not_a_squared_batch_gradient(loaded):
    # Same model, samples and batch shape as the llama case above: the Fisher step is reused.
    model = loaded["llama"]
    samples = random_samples(seed=0)
    got = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=4))
    ref = fisher_vmap(model.params, model.config, samples, batch_size=6)
    for n in ref:
        assert rel_err(got[n], ref[n]) <= 1e-5
    # The square of the mean gradient is a different (smaller) quantity: make sure we are not it.
    import jax

    from hcnr_jax.model import forward
    from hcnr_jax.params import get, set_leaves

    name = linear_names(model.config)[0]

    @jax.jit
    def mean_loss(w):
        p = set_leaves(model.params, {name: w})
        logits = forward(p, model.config, samples.input_ids, samples.attention_mask).logits
        return stats.per_sample_loss(logits, samples.input_ids, samples.loss_mask).mean()

    g = np.asarray(jax.grad(mean_loss)(get(model.params, name)))
    assert rel_err((g**2).sum(0), got[name].astype(np.float64)) > 0.1


def test_batch_size_and_padding_do_not_change_results(loaded):
    model = loaded["llama"]
    samples = random_samples(seed=0)
    a = stats.fisher(model.params, model.config, samples,
                     StatsOptions(batch_size=4))  # 6 samples: one padded batch
    b = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=6))
    ha = stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=4))
    hb = stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=6))
    for n in a:
        assert rel_err(a[n], b[n].astype(np.float64)) <= 1e-6
        assert rel_err(ha[n], hb[n].astype(np.float64)) <= 1e-6


def test_hessian_of_chosen_layers_only(loaded):
    """``layers=`` accumulates only the requested layers' H (shared inputs stay shared)."""
    model = loaded["llama"]
    cfg = model.config
    samples = random_samples(n=4, seed=3)
    full = stats.hessian(model.params, cfg, samples, StatsOptions(batch_size=2))
    chosen = ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.self_attn.k_proj.weight"]
    part = stats.hessian(model.params, cfg, samples, StatsOptions(batch_size=2), layers=chosen)
    assert sorted(part) == sorted(chosen)
    for name in chosen:
        np.testing.assert_array_equal(part[name], full[name])
    assert part[chosen[0]] is part[chosen[2]]


def sparse_samples(vocab: int = 97, t: int = 20):
    """Left and right padding, targets scattered with different counts per row (one row none, one
    row only the first predictable token, one row the last), built directly (not right-padded)."""
    from hcnr_jax.data.samples import Samples

    rows = [  # (first real token, end, target positions)
        (0, 14, [3, 7, 8, 13]),
        (6, t, [7, 12, 19]),
        (0, 10, []),
        (0, t, [1, 2, 5, 9, 10, 11, 15, 16, 17, 19]),
        (3, t, [4, 19]),
        (0, 9, [1]),
    ]
    rng = np.random.default_rng(7)
    ids = np.zeros((len(rows), t), np.int32)
    attn = np.zeros((len(rows), t), bool)
    lm = np.zeros((len(rows), t), bool)
    for i, (a, b, targets) in enumerate(rows):
        ids[i, a:b] = rng.integers(3, vocab, b - a)
        attn[i, a:b] = True
        lm[i, targets] = True
    return Samples(ids, attn, lm, "sparse-targets")


def test_lm_head_only_at_targets_is_exact(tiny2):
    """The Fisher gathers each row's target-predicting hidden states into a fixed capacity before
    the LM head: sparse, irregular targets with left/right padding give the full-logits result."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax.model import lm_head
    from hcnr_jax.stats import fisher_accum

    torch_model, model = tiny2["llama"]
    params, cfg = model.params, model.config
    samples = sparse_samples()
    assert fisher_accum.target_capacity(samples.loss_mask) == 16  # 10 targets at most, rounded up
    assert fisher_accum.target_capacity(samples.loss_mask, multiple=8) == 16
    assert fisher_accum.target_capacity(samples.loss_mask, multiple=64) == 19  # capped at T - 1
    assert fisher_accum.target_capacity(np.zeros((2, 5), bool)) == 0

    # The gathered loss and its gradient w.r.t. the hidden states equal the full-logits ones.
    ids, lm = jnp.asarray(samples.input_ids), jnp.asarray(samples.loss_mask)
    hidden = jax.random.normal(jax.random.key(0), (*ids.shape, cfg.hidden_size), jnp.float32)

    @jax.jit
    def full(h):
        loss = lambda h: stats.per_sample_loss(lm_head(params, cfg, h), ids, lm)  # noqa: E731
        return loss(h), jax.grad(lambda h: loss(h).sum())(h)

    @partial(jax.jit, static_argnums=1)
    def gathered(h, capacity):
        loss = lambda h: fisher_accum.gathered_loss(params, cfg, h, ids, lm, capacity)  # noqa: E731
        return loss(h), jax.grad(lambda h: loss(h).sum())(h)

    want, want_grad = full(hidden)
    assert float(want[2]) == 0.0 and np.all(np.asarray(want)[[0, 1, 3, 4, 5]] > 0)
    for capacity in (10, 16, 19):  # exactly the most targets, rounded up, every position
        got, got_grad = gathered(hidden, capacity)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    # Too small a capacity drops targets: the comparison above would notice a wrong gather.
    assert abs(float(gathered(hidden, 9)[0][3]) - float(want[3])) > 1e-4

    fin, _, _ = torch_reference(torch_model, samples)
    got = stats.fisher(params, cfg, samples, StatsOptions(batch_size=4))  # 6 samples: one padded batch
    for n in fin:
        assert rel_err(got[n], fin[n]) <= 1e-5, (n, rel_err(got[n], fin[n]))


def test_chunked_lm_head_equals_gathered(tiny2):
    """The LM head over target slots in chunks (each chunk's gradient taken in the forward pass):
    the same per-sample losses and hidden-state gradients as all slots at once by plain autodiff,
    for chunks that divide the capacity, do not, cover it and exceed it; under a cotangent that is
    not all ones; and no gradient reaches the LM head's weight."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax.stats import fisher_accum

    _, model = tiny2["llama"]
    params, cfg = model.params, model.config
    samples = sparse_samples()
    ids, lm = jnp.asarray(samples.input_ids), jnp.asarray(samples.loss_mask)
    hidden = jax.random.normal(jax.random.key(1), (*ids.shape, cfg.hidden_size), jnp.float32)

    weights = jnp.arange(1.0, ids.shape[0] + 1)  # a cotangent that differs per sample

    @partial(jax.jit, static_argnums=(1, 2))
    def both(h, capacity, chunk):
        if chunk is None:  # the reference: every slot at once, plain autodiff
            loss = lambda h: fisher_accum.gathered_loss(params, cfg, h, ids, lm, capacity)  # noqa: E731
        else:
            loss = lambda h: fisher_accum.chunked_loss(params, cfg, h, ids, lm, capacity, chunk)  # noqa: E731
        return loss(h), jax.grad(lambda h: (weights * loss(h)).sum())(h)

    want, want_grad = both(hidden, 16, None)
    assert np.abs(np.asarray(want_grad)).max() > 0
    for chunk in (3, 4, 8, 16, 32):
        got, got_grad = both(hidden, 16, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    # A capacity that drops a target is noticed through the chunks too.
    assert abs(float(both(hidden, 9, 4)[0][3]) - float(want[3])) > 1e-4
    # The head's weight is a constant of the chunked loss (the Fisher differentiates its taps only).
    grad_params = jax.grad(lambda p: fisher_accum.chunked_loss(p, cfg, hidden, ids, lm, 16, 4).sum())(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_params))


@pytest.mark.parametrize("axis", ["input", "output"])
def test_norms_in_the_backward_pass_equal_norms_after_it(loaded, axis):
    """The fused step (norms reduced in each linear's backward, blocks rematerialised, LM head in
    chunks) equals the previous one (every layer's output gradient and input kept until the end)
    on sparse targets with left and right padding, and needs less temporary memory."""
    import jax

    from hcnr_jax.stats import fisher_accum

    model = loaded["llama"]
    params, cfg = model.params, model.config
    samples = sparse_samples()
    batch = {"input_ids": samples.input_ids, "attention_mask": samples.attention_mask,
             "loss_mask": samples.loss_mask}
    state = fisher_accum.init(params, cfg, axis)
    old = jax.jit(partial(fisher_accum.update_unfused, cfg=cfg, neuron_axis=axis, max_targets=16))(
        state, params, batch)
    fused = jax.jit(lambda p, b: fisher_accum.norms_and_loss(p, cfg, b, neuron_axis=axis, max_targets=16,
                                                            lm_chunk=4)[0])
    new = fused(params, batch)
    for n in old:
        assert rel_err(new[n], np.asarray(old[n], np.float64)) <= 1e-6, n
    if axis == "input":  # memory: compiled temporaries of the two steps (XLA's CPU numbers)
        def temp(fn, *args):
            return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

        t_old = temp(partial(fisher_accum.update_unfused, cfg=cfg, max_targets=16), state, params, batch)
        t_new = temp(partial(fisher_accum.update, cfg=cfg, max_targets=16), state, params, batch)
        assert t_new < t_old, (t_new, t_old)


def test_padding_leaves_the_fisher_unchanged(loaded):
    """``Samples.padded_to`` (the repair pads both Fisher sets to one length, one compiled step):
    the same Fisher to float32 rounding, the same hash; shorter than the samples is an error."""
    model = loaded["llama"]
    samples = sparse_samples()
    t = samples.input_ids.shape[1]
    longer = samples.padded_to(t + 13)
    assert longer.input_ids.shape == (len(samples), t + 13) and longer.sha256 == samples.sha256
    assert samples.padded_to(t) is samples
    want = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=4))
    got = stats.fisher(model.params, model.config, longer, StatsOptions(batch_size=4))
    for n in want:
        assert rel_err(got[n], np.asarray(want[n], np.float64)) <= 1e-5, n
    with pytest.raises(ValueError, match="already"):
        samples.padded_to(t - 1)
