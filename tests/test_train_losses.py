"""Training losses (SFT, DPO, ORPO) against float64 references, and preference-pair data.

Target log-probabilities come from tiny random models of every family and are checked against
the transformers model in float64; the loss formulas against independent float64 numpy code and
hand-computed cases; extreme log-probabilities must give finite values and gradients.
"""

from __future__ import annotations

import copy
import itertools
import json
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch

import hcnr_jax
from hcnr_jax.data.samples import PairSamples, load_pairs, pairs_from_records, samples_from_records
from hcnr_jax.errors import DataError
from hcnr_jax.stats.fisher_accum import target_capacity
from hcnr_jax.train.losses import (
    ORPO_MAX_MEAN_LOGP,
    dpo_loss,
    orpo_loss,
    preference_logps,
    sft_loss,
    token_logprobs,
)

FAMILIES = tiny.FAMILIES
VOCAB = 97


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (float64 torch model, loaded Pretrained): 2 layers (compile time is per layer);
    qwen2 keeps one full and one sliding-window layer."""
    out = {}
    for f in FAMILIES:
        model = tiny.hf_model(f, num_hidden_layers=2)
        loaded = hcnr_jax.load_pretrained(tiny.save_hf(model, tmp_path_factory.mktemp(f)))
        out[f] = (copy.deepcopy(model).double(), loaded)
    return out


def sparse_batch(seed: int, t: int = 18):
    """Left- and right-padded rows (longer than the sliding windows) with scattered targets; one
    row has a single target, right at the first predictable token."""
    rows = [(0, 15, [3, 7, 8, 14]), (5, t, [6, 11, 12, 13, 17]), (0, t, [1]), (2, 12, [4, 5, 9, 10, 11])]
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(rows), t), np.int32)
    attn = np.zeros((len(rows), t), bool)
    lm = np.zeros((len(rows), t), bool)
    for i, (a, b, targets) in enumerate(rows):
        ids[i, a:b] = rng.integers(3, VOCAB, b - a)
        attn[i, a:b] = True
        lm[i, targets] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def torch_logprobs(model64, batch) -> list[np.ndarray]:
    """float64 log-probabilities of each row's targets, in order, each row run unpadded."""
    out = []
    for ids, attn, lm in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], strict=True):
        real = np.flatnonzero(attn)
        a, b = int(real[0]), int(real[-1]) + 1
        with torch.no_grad():
            logits = model64(torch.tensor(ids[a:b], dtype=torch.long)[None]).logits[0]
        logp = torch.log_softmax(logits, -1).numpy()
        targets = [t for t in range(a + 1, b) if lm[t]]
        out.append(np.array([logp[t - 1 - a, ids[t]] for t in targets]))
    return out


def torch_sft(model64, batch):
    """float64 token-mean NLL of the batch and its gradient (HF name -> array)."""
    model64.zero_grad()
    total, count = 0, 0
    for ids, attn, lm in zip(batch["input_ids"], batch["attention_mask"], batch["loss_mask"], strict=True):
        real = np.flatnonzero(attn)
        a, b = int(real[0]), int(real[-1]) + 1
        x = torch.tensor(ids[a:b], dtype=torch.long)
        logp = torch.log_softmax(model64(x[None]).logits[0, :-1], -1)[torch.arange(b - a - 1), x[1:]]
        m = torch.tensor(lm[a + 1:b], dtype=torch.float64)
        total = total - (logp * m).sum()
        count += int(m.sum())
    loss = total / count
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model64.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_and_sft_match_float64_torch(models, family):
    model64, model = models[family]
    batch = sparse_batch(seed=FAMILIES.index(family))
    capacity = target_capacity(batch["loss_mask"])
    assert capacity == 16  # more slots than targets: most slots are empty
    fn = jax.jit(partial(token_logprobs, cfg=model.config, capacity=capacity))
    logp, valid = fn(model.params, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     loss_mask=batch["loss_mask"])
    assert logp.shape == valid.shape == (4, capacity) and logp.dtype == jnp.float32 and valid.dtype == bool
    logp, valid = np.asarray(logp), np.asarray(valid)
    ref = torch_logprobs(model64, batch)
    for i, r in enumerate(ref):
        assert valid[i].tolist() == [True] * len(r) + [False] * (capacity - len(r))
        np.testing.assert_allclose(logp[i, : len(r)], r, rtol=1e-5, atol=1e-6)
        assert np.all(logp[i, len(r):] == 0.0)

    # SFT: the token-level mean NLL of the whole batch, float64 numpy on the torch log-probs.
    loss, aux = jax.jit(partial(sft_loss, cfg=model.config, capacity=capacity))(model.params, batch=batch)
    flat = np.concatenate(ref)
    np.testing.assert_allclose(float(loss), -flat.sum() / flat.size, rtol=1e-5)
    assert int(aux["tokens"]) == flat.size == 15 and float(aux["loss"]) == float(loss)
    # Not the mean of per-sample means (which differs here: rows have 1 to 5 targets).
    assert abs(float(loss) - np.mean([-r.mean() for r in ref])) > 1e-4


@pytest.fixture(scope="module")
def sft_grad():
    return jax.jit(jax.value_and_grad(sft_loss, has_aux=True), static_argnums=(1, 3))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied embeddings; biases, sliding window, untied head
def test_sft_gradient_matches_float64_torch(models, sft_grad, family):
    from hcnr_jax.params import flatten

    model64, model = models[family]
    batch = sparse_batch(seed=10)
    (loss, _), grads = sft_grad(model.params, model.config, batch, 16)
    ref_loss, ref_grads = torch_sft(model64, batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    flat = flatten(grads)
    if model.config.tie_word_embeddings:
        ref_grads.pop("lm_head.weight", None)  # the same tensor as embed_tokens in torch
    assert set(flat) == set(ref_grads)
    for name, g in flat.items():
        g = np.asarray(g, np.float64)
        err = np.linalg.norm(g - ref_grads[name]) / np.linalg.norm(ref_grads[name])
        assert err <= 1e-4, (name, err)

    # No targets at all: loss 0 and gradient 0, not NaN (same shapes: no recompilation).
    empty = {**batch, "loss_mask": np.zeros_like(batch["loss_mask"])}
    (loss, aux), grads = sft_grad(model.params, model.config, empty, 16)
    assert float(loss) == 0.0 and int(aux["tokens"]) == 0
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))
    # Extreme logits (final norm x 1e4: log-probs of 0 and -1e5): finite loss and gradients.
    params = jax.tree.map(lambda x: x, model.params)
    params["model"]["norm"]["weight"] = params["model"]["norm"]["weight"] * 1e4
    (loss, _), grads = sft_grad(params, model.config, batch, 16)
    assert np.isfinite(float(loss)) and float(loss) > 100
    chex.assert_tree_all_finite(grads)


# --- DPO / ORPO formulas --------------------------------------------------------------------------

def dpo_ref(pc, pr, rc, rr, beta):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    z = beta * ((pc - rc) - (pr - rr))
    return np.logaddexp(0.0, -z), z


def orpo_ref(mc, mr, nll, lam):
    def log_odds(m):
        m = np.minimum(np.asarray(m, np.float64), ORPO_MAX_MEAN_LOGP)
        return m - np.log(-np.expm1(m))  # float64: accurate enough for every m < 0 used here
    lo = log_odds(mc) - log_odds(mr)
    return np.asarray(nll, np.float64) + lam * np.logaddexp(0.0, -lo), lo


def f32(x):
    return np.asarray(x, np.float32)


def test_dpo_hand_cases_and_float64_reference():
    loss, m = dpo_loss(f32([-1.0, -5.0]), f32([-3.0, -7.0]), f32([-2.0, -4.0]), f32([-2.0, -6.0]), 0.5)
    # Row 0: 0.5 * ((-1 + 2) - (-3 + 2)) = 1 -> log(1 + e^-1); row 1: equal log-ratios -> log 2.
    np.testing.assert_allclose(np.asarray(loss), [np.log1p(np.exp(-1.0)), np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["rewards/chosen"]), [0.5, -0.5])
    np.testing.assert_allclose(np.asarray(m["rewards/rejected"]), [-0.5, -0.5])
    np.testing.assert_allclose(np.asarray(m["rewards/margins"]), [1.0, 0.0])
    np.testing.assert_array_equal(np.asarray(m["rewards/accuracies"]), [1.0, 0.0])

    rng = np.random.default_rng(0)
    x = [f32(-rng.uniform(0, 80, 64)) for _ in range(4)]
    for beta in (0.1, 1.0, 5.0):
        want, z = dpo_ref(*x, beta)
        got, m = dpo_loss(*x, beta)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m["rewards/margins"]), z, rtol=1e-4, atol=1e-4)
        # d loss / d pc = -beta * sigmoid(-z); the reference terms get the opposite signs.
        grads = jax.grad(lambda *a, beta=beta: dpo_loss(*a, beta)[0].sum(), argnums=(0, 1, 2, 3))(*x)
        d = beta / (1.0 + np.exp(z))
        for g, sign in zip(grads, (-1, 1, 1, -1), strict=True):
            np.testing.assert_allclose(np.asarray(g), sign * d, rtol=1e-4, atol=1e-7)


def test_orpo_hand_cases_and_float64_reference():
    # p(chosen) = 0.5: odds 1, log odds 0; p(rejected) = 0.2: odds 1/4. Ratio term -log sigmoid(log 4)
    # = log(5/4); swapped: -log sigmoid(-log 4) = log 5.
    mc, mr = f32([np.log(0.5), np.log(0.2)]), f32([np.log(0.2), np.log(0.5)])
    loss, m = orpo_loss(mc, mr, f32([2.0, 3.0]), 0.1)
    np.testing.assert_allclose(np.asarray(loss), [2.0 + 0.1 * np.log(1.25), 3.0 + 0.1 * np.log(5.0)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["log_odds_chosen"]), [np.log(4.0), -np.log(4.0)], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m["log_odds_ratio"]), [np.log(0.8), np.log(0.2)], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["rewards/accuracies"]), [1.0, 0.0])
    np.testing.assert_allclose(np.asarray(m["rewards/chosen"]), 0.1 * mc, rtol=1e-6)

    rng = np.random.default_rng(1)
    # Mean log-probs across both log1mexp branches (-ln 2 ~ -0.69), down to -1e-6.
    mc, mr = (f32(-np.exp(rng.uniform(np.log(1e-6), np.log(8.0), 64))) for _ in range(2))
    nll = f32(rng.uniform(0, 3, 64))
    for lam in (0.1, 1.0):
        want, lo = orpo_ref(mc, mr, nll, lam)
        got, m = orpo_loss(mc, mr, nll, lam)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(m["log_odds_chosen"]), lo, rtol=1e-5, atol=1e-5)
        # Gradients against central differences of the float64 reference.
        grads = jax.grad(lambda *a, lam=lam: orpo_loss(*a, lam)[0].sum(), argnums=(0, 1, 2))(mc, mr, nll)
        for k, g in enumerate(grads):
            args = [np.asarray(a, np.float64) for a in (mc, mr, nll)]
            h = 1e-4 * np.abs(args[k]) if k < 2 else np.full(64, 1e-4)  # m + h stays < 0
            up, down = list(args), list(args)
            up[k], down[k] = args[k] + h, args[k] - h
            num = (orpo_ref(*up, lam)[0] - orpo_ref(*down, lam)[0]) / (2 * h)
            np.testing.assert_allclose(np.asarray(g), num, rtol=1e-4, atol=1e-6)


EXTREMES = f32([0.0, -1e-12, -1e-30, -1e-4, -1.0, -1e4, -3e38])


def test_extreme_log_probs_give_finite_values_and_gradients():
    grid = np.array(list(itertools.product(EXTREMES, repeat=4)), np.float32).T  # 4 x 2401
    for beta in (0.1, 10.0):
        loss, m = dpo_loss(*grid, beta)
        grads = jax.grad(lambda *a, beta=beta: dpo_loss(*a, beta)[0].sum(), argnums=(0, 1, 2, 3))(*grid)
        for x in (loss, *m.values(), *grads):
            assert np.all(np.isfinite(np.asarray(x)))
        # Against float64 within float32's rounding of the log-ratio differences (-1e-4 next to -1e4
        # is below float32 resolution), where that is meaningful (-3e38 absorbs everything).
        want, _ = dpo_ref(*grid, beta)
        ok = np.all(grid > -1e5, axis=0)
        bound = 4 * beta * 2.0**-24 * np.abs(grid.astype(np.float64)).sum(0) + 1e-6
        assert np.all(np.abs(np.asarray(loss, np.float64) - want)[ok] <= bound[ok])
    # Positive (impossible but finite) inputs too.
    big = f32([3e38, -3e38])
    loss, _ = dpo_loss(big, -big, -big, big, 10.0)
    assert np.all(np.isfinite(np.asarray(loss)))

    mc, mr = (f32(a) for a in np.array(list(itertools.product(EXTREMES, repeat=2))).T)
    for lam, nll_value in ((0.1, 0.0), (1.0, 1e4)):
        nll = np.full_like(mc, nll_value)
        loss, m = orpo_loss(mc, mr, nll, lam)
        grads = jax.grad(lambda *a, lam=lam: orpo_loss(*a, lam)[0].sum(), argnums=(0, 1, 2))(mc, mr, nll)
        for x in (loss, *m.values(), *grads):
            assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_allclose(np.asarray(loss), orpo_ref(mc, mr, nll, lam)[0], rtol=1e-5, atol=1e-6)
    # At m = 0 (clamped) the log odds are large but finite: log(1 / 1e-20) ~ 46.
    _, m = orpo_loss(f32([0.0]), f32([-1.0]), f32([0.0]), 1.0)
    assert 40 < float(m["log_odds_chosen"][0]) < 50


# --- Preference pairs ---------------------------------------------------------------------------

def pair_tokenizer():
    from test_data import tiny_tokenizer

    return tiny_tokenizer()


RECORDS = [
    {"prompt": "what is the capital of france", "chosen": "paris", "rejected": "i do not know"},
    {"prompt": "what is a", "chosen": "i do not know", "rejected": "b c"},
    {"prompt": "a b c", "chosen": "c", "rejected": "a b c a b c"},
]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_pairs_tokenize_like_prompt_response_samples(tmp_path):
    tok = pair_tokenizer()
    pairs = load_pairs(write(tmp_path / "p.jsonl", ["", *RECORDS]), tok)
    assert isinstance(pairs, PairSamples) and len(pairs) == 3
    t = pairs.chosen_input_ids.shape[1]
    for side in ("chosen", "rejected"):
        ids, attn, lm = (getattr(pairs, f"{side}_{k}") for k in ("input_ids", "attention_mask", "loss_mask"))
        assert ids.shape == attn.shape == lm.shape == (3, t)
        assert ids.dtype == np.int32 and attn.dtype == bool and lm.dtype == bool
        # The same tokens as the {prompt, response} path, right-padded to the pair's common length.
        ref = samples_from_records([{"prompt": r["prompt"], "response": r[side]} for r in RECORDS], tok)
        for n in range(3):
            k = int(ref.attention_mask[n].sum())
            np.testing.assert_array_equal(ids[n, :k], ref.input_ids[n, :k])
            np.testing.assert_array_equal(lm[n, :k], ref.loss_mask[n, :k])
            assert attn[n, :k].all() and not attn[n, k:].any() and not lm[n, k:].any() and not ids[n, k:].any()
    # The targets are exactly the assistant turns; the prompt part is shared.
    targets = lambda side, n: tok.convert_ids_to_tokens(  # noqa: E731
        getattr(pairs, f"{side}_input_ids")[n][getattr(pairs, f"{side}_loss_mask")[n]].tolist())
    assert targets("chosen", 0) == ["paris", "<|im_end|>"]
    assert targets("rejected", 0) == ["i", "do", "not", "know", "<|im_end|>"]
    assert targets("rejected", 2) == ["a", "b", "c", "a", "b", "c", "<|im_end|>"]
    first = int(np.argmax(pairs.chosen_loss_mask[0]))
    assert first == int(np.argmax(pairs.rejected_loss_mask[0]))
    np.testing.assert_array_equal(pairs.chosen_input_ids[0, :first], pairs.rejected_input_ids[0, :first])
    assert tok.convert_ids_to_tokens(pairs.chosen_input_ids[0, :first].tolist())[-3:] == \
        ["<|im_start|>", "assistant", "\n"]

    sub = pairs.select(np.array([2, 0]))
    assert len(sub) == 2 and sub.sha256 != pairs.sha256
    np.testing.assert_array_equal(sub.rejected_input_ids[0], pairs.rejected_input_ids[2])
    np.testing.assert_array_equal(sub.chosen_loss_mask[1], pairs.chosen_loss_mask[0])
    swapped = pairs_from_records([{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in RECORDS], tok)
    assert swapped.sha256 != pairs.sha256
    assert pairs_from_records(RECORDS, tok).sha256 == pairs.sha256
    assert len(pairs_from_records(RECORDS, tok, limit=2)) == 2
    cut = pairs_from_records(RECORDS, tok, max_length=16)  # record 1: 14 prompt tokens, 2 targets
    assert cut.chosen_input_ids.shape[1] == 16 and cut.chosen_loss_mask[0].sum() == 2


@pytest.mark.parametrize("lines, kwargs, match", [
    ([RECORDS[0], {"prompt": "a", "chosen": "b"}], {}, r"p\.jsonl:2: missing field 'rejected'"),
    ([{"chosen": "b", "rejected": "c"}], {}, r"p\.jsonl:1: missing field 'prompt'"),
    ([RECORDS[0], "", {"prompt": "a", "chosen": ["b"], "rejected": "c"}], {},
     r"p\.jsonl:3: field 'chosen' must be a string, got list"),
    ([{"prompt": "a", "chosen": "b", "rejected": None}], {}, r"p\.jsonl:1: field 'rejected' must be a string"),
    ([RECORDS[1], RECORDS[0]], {"max_length": 12},  # record 2's prompt alone fills 12 tokens
     r"p\.jsonl:2: field 'chosen': no target tokens .*max_length=12"),
    ([RECORDS[0], '{"prompt": "a"'], {}, r"p\.jsonl:2: invalid JSON"),
    ([["a", "b", "c"]], {}, r"p\.jsonl:1: expected a JSON object"),
    ([{"prompt": "a", "chosen": "b", "rejected": "zzz"}], {"tokenizer": None}, r"p\.jsonl:1: .*need a tokenizer"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, lines, kwargs, match):
    kwargs = {"tokenizer": pair_tokenizer(), **kwargs}
    with pytest.raises(DataError, match=match):
        load_pairs(write(tmp_path / "p.jsonl", lines), **kwargs)


def test_preference_logps_one_forward_equals_separate_calls(models):
    _, model = models["llama"]
    pairs = pairs_from_records(RECORDS, pair_tokenizer(), vocab_size=VOCAB)
    t_rej = int(pairs.rejected_attention_mask.sum(1).max())
    t_cho = int(pairs.chosen_attention_mask.sum(1).max())
    assert t_cho < t_rej
    # The chosen side trimmed to its own length: the two sides arrive with different T.
    batch = {f"{side}_{k}": getattr(pairs, f"{side}_{k}")[:, : (t_cho if side == "chosen" else t_rej)]
             for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")}
    capacity = target_capacity(np.concatenate([pairs.chosen_loss_mask, pairs.rejected_loss_mask]), multiple=4)
    got = jax.jit(partial(preference_logps, cfg=model.config, capacity=capacity))(model.params, batch=batch)
    sep = jax.jit(partial(token_logprobs, cfg=model.config, capacity=capacity))
    for side in ("chosen", "rejected"):
        logp, valid = sep(model.params, input_ids=batch[f"{side}_input_ids"],
                          attention_mask=batch[f"{side}_attention_mask"], loss_mask=batch[f"{side}_loss_mask"])
        logp, valid = np.asarray(logp, np.float64), np.asarray(valid)
        n = valid.sum(1)
        np.testing.assert_array_equal(np.asarray(got[f"{side}_tokens"]), n)
        np.testing.assert_array_equal(n, getattr(pairs, f"{side}_loss_mask").sum(1))
        np.testing.assert_allclose(np.asarray(got[f"{side}_logp"]), logp.sum(1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got[f"{side}_mean_logp"]), logp.sum(1) / n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["chosen_nll"]), -np.asarray(got["chosen_mean_logp"]))
    # Chosen and rejected are different answers: different log-probs.
    assert np.all(np.asarray(got["chosen_logp"]) != np.asarray(got["rejected_logp"]))
    # And the losses run on them, with the model itself as the reference: DPO gives log 2.
    loss, _ = dpo_loss(got["chosen_logp"], got["rejected_logp"], got["chosen_logp"], got["rejected_logp"], 0.1)
    np.testing.assert_allclose(np.asarray(loss), np.log(2.0), rtol=1e-6)
