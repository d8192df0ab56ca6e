"""Temperature / top-p sampling: the sampling step against a float64 reference, greedy tokens at
temperature 0, and per-prompt random streams that do not depend on batching, packing or order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import hcnr_jax
from hcnr_jax.generation import (
    eos_token_ids,
    generate_ids,
    generate_tokens,
    generate_tokens_packed,
    nucleus_mask,
    pack_prompts,
    row_keys,
    sample_next,
)


def _nucleus_ref(logits: np.ndarray, top_p: float) -> tuple[set[int], float]:
    """float64 reference: walk the tokens by (probability desc, id asc) and stop once the kept
    mass reaches top_p. Also returns the distance of every partial sum from top_p, so a case
    that float32 rounding could decide differently is caught rather than silently tested."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    keep, total, margin = set(), 0.0, np.inf
    for i in sorted(range(len(z)), key=lambda i: (-z[i], i)):
        keep.add(i)
        total += p[i]
        margin = min(margin, abs(total - top_p))
        if total >= top_p and top_p < 1:
            break
    return keep, margin


def _probs_ref(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """float64 renormalised nucleus probabilities of softmax(logits / temperature)."""
    z = logits.astype(np.float64) / temperature
    keep, margin = _nucleus_ref(z.astype(np.float32), top_p)
    assert top_p == 1.0 or margin > 1e-5
    p = np.exp(z - z.max())
    p[[i for i in range(len(z)) if i not in keep]] = 0.0
    return p / p.sum()


def test_nucleus_mask_matches_reference():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 40)) * 2).astype(np.float32)
    for top_p in (1e-6, 0.2, 0.5, 0.8, 0.95, 1.0):
        got = np.asarray(nucleus_mask(jnp.asarray(logits), top_p))
        for r in range(len(logits)):
            want, margin = _nucleus_ref(logits[r], top_p)
            assert top_p == 1.0 or margin > 1e-5  # no float32-vs-float64 coin flip in this case
            assert set(np.flatnonzero(got[r]).tolist()) == want, (top_p, r)
        if top_p == 1e-6:
            assert (got.sum(1) == 1).all() and (got.argmax(1) == logits.argmax(1)).all()
    # top_p = 1 keeps every token even where the float32 cumulative sum rounds past 1.
    wide = jnp.asarray(rng.standard_normal((2, 50_000)), jnp.float32)
    assert bool(nucleus_mask(wide, 1.0).all())


def test_nucleus_mask_ties_rank_by_token_id():
    """Equal probabilities at the boundary: the lower token ids are kept first (as argmax picks)."""
    probs = np.array([[0.2, 0.4, 0.2, 0.2], [0.2, 0.2, 0.2, 0.4]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    for top_p, want in ((0.3, [{1}, {3}]), (0.5, [{1, 0}, {3, 0}]), (0.7, [{1, 0, 2}, {3, 0, 1}]),
                        (0.9, [{0, 1, 2, 3}] * 2)):
        got = np.asarray(nucleus_mask(logits, top_p))
        assert [set(np.flatnonzero(g).tolist()) for g in got] == want, top_p
        assert [_nucleus_ref(np.asarray(row), top_p)[0] for row in logits] == want
    # A tie for the top with a tiny top_p: only the argmax (the lower id), for every key.
    tied = jnp.asarray([[1.0, 5.0, 5.0, 0.0]] * 64)
    keys = row_keys(jax.random.key(0), np.arange(64))
    assert np.asarray(sample_next(tied, keys, 1.0, 1e-6)).tolist() == [1] * 64
    assert set(np.asarray(sample_next(tied, keys, 1.0, 1.0)).tolist()) >= {1, 2}


def test_sample_next_greedy_and_plain_categorical():
    logits = jax.random.normal(jax.random.key(1), (8, 97)) * 3
    key = jax.random.key(2)
    argmax = np.asarray(jnp.argmax(logits, -1))
    for top_p in (0.1, 0.9, 1.0):  # temperature 0: argmax whatever the key and top_p
        np.testing.assert_array_equal(sample_next(logits, key, 0.0, top_p), argmax)
        np.testing.assert_array_equal(sample_next(logits, row_keys(key, np.arange(8)), 0.0, top_p), argmax)
    # top_p = 1 is jax.random.categorical over logits / T, draw for draw (typed or raw keys).
    np.testing.assert_array_equal(sample_next(logits, key, 0.7, 1.0), jax.random.categorical(key, logits / 0.7))
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(sample_next(logits, raw, 1.0, 1.0), jax.random.categorical(raw, logits))
    assert sample_next(logits, key, 1.0, 0.9).dtype == jnp.int32


@pytest.mark.parametrize(("temperature", "top_p"), [(1.3, 1.0), (0.7, 0.8), (2.0, 0.5)])
def test_sample_next_frequencies(temperature, top_p):
    """Frequencies of 200k draws (one key per row, as generation does) match the float64
    renormalised nucleus probabilities: tokens outside it never appear, chi-square inside."""
    n = 200_000
    logits = np.random.default_rng(5).standard_normal(10).astype(np.float32)
    want = _probs_ref(logits, temperature, top_p)
    keys = row_keys(jax.random.key(11), np.arange(n))
    draws = np.asarray(sample_next(jnp.broadcast_to(jnp.asarray(logits), (n, 10)), keys, temperature, top_p))
    counts = np.bincount(draws, minlength=10)
    assert (counts[want == 0] == 0).all()
    kept = want > 0
    assert kept.sum() >= 3 and (want[kept] * n > 50).all()  # a test with power: several cells, each well filled
    assert stats.chisquare(counts[kept], want[kept] * n).pvalue > 1e-4


# Every model test below decodes NEW tokens, and the packed calls use generate_ids' packing (batch
# 8, one lane, float32 settings), so the tests share a handful of compiled programs (~5 s each).
NEW = 6


def _prompts(seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 96, 4).tolist()
    return [prefix + rng.integers(3, 96, n).tolist() for n in (1, 7, 3, 12, 5)]


def _left_padded(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    w = max(map(len, prompts))
    ids = np.array([[0] * (w - len(p)) + p for p in prompts])
    mask = np.array([[False] * (w - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def _settings(temperature: float, top_p: float) -> tuple[np.float32, np.float32]:
    return np.float32(temperature), np.float32(top_p)


@pytest.fixture(scope="module")
def llama(tiny_dirs):
    return hcnr_jax.load_pretrained(tiny_dirs["llama"][1])


def test_temperature_zero_is_greedy_padded_and_packed(llama):
    """With keys given (the sampling program), temperature 0 reproduces the greedy tokens, which
    tests/test_model.py and test_generate.py check against transformers."""
    prompts = _prompts()
    eos = jnp.asarray(eos_token_ids(llama), jnp.int32)
    keys = row_keys(jax.random.key(0), np.arange(8))
    ids, mask = _left_padded(prompts)
    args = (llama.params, llama.config, ids, mask, eos, NEW, 0)
    greedy, greedy_len = generate_tokens(*args)
    sampled, sampled_len = generate_tokens(*args, keys[:5], *_settings(0.0, 0.5))
    np.testing.assert_array_equal(sampled, greedy)
    np.testing.assert_array_equal(sampled_len, greedy_len)
    packed = jax.tree.map(jnp.asarray, pack_prompts(prompts, batch_size=8))
    args = (llama.params, llama.config, packed, eos, NEW, 0)
    greedy_p, _ = generate_tokens_packed(*args)
    sampled_p, _ = generate_tokens_packed(*args, keys, *_settings(0.0, 0.5))
    np.testing.assert_array_equal(sampled_p, greedy_p)
    np.testing.assert_array_equal(np.asarray(greedy_p)[:5], greedy)


def test_sampled_tokens_follow_the_key_schedule(llama):
    """Token s of prompt i is sample_next(logits of prompt + tokens so far, fold_in(fold_in(key,
    i), s)): checked step by step against full forwards, on the padded and the packed path."""
    prompts, key = _prompts(), jax.random.key(4)
    eos = jnp.asarray(eos_token_ids(llama), jnp.int32)
    keys = row_keys(key, np.arange(5))
    ids, mask = _left_padded(prompts)
    toks, lengths = generate_tokens(llama.params, llama.config, ids, mask, eos, NEW, 0, keys, *_settings(1.0, 0.9))
    toks, lengths = np.asarray(toks), np.asarray(lengths)
    steps = [(i, s) for i in range(5) for s in range(lengths[i])]
    assert len(steps) >= 20
    ref_ids, ref_mask = _left_padded([prompts[i] + toks[i, :s].tolist() for i, s in steps])
    last = np.asarray(hcnr_jax.logits(llama, ref_ids, ref_mask))[:, -1]
    step_keys = jnp.stack([jax.random.fold_in(keys[i], s) for i, s in steps])
    want = np.asarray(sample_next(jnp.asarray(last), step_keys, 1.0, 0.9))
    np.testing.assert_array_equal([toks[i, s] for i, s in steps], want)
    packed = jax.tree.map(jnp.asarray, pack_prompts(prompts, batch_size=8))
    keys8 = row_keys(key, [0, 1, 2, 3, 4, 9, 9, 9])  # filler rows' keys are irrelevant
    toks_p, _ = generate_tokens_packed(llama.params, llama.config, packed, eos, NEW, 0, keys8, *_settings(1.0, 0.9))
    np.testing.assert_array_equal(np.asarray(toks_p)[:5], toks)


def test_samples_depend_on_seed_and_index_only(llama):
    prompts = _prompts()
    key = jax.random.key(7)
    kw = dict(temperature=1.0, top_p=0.95, key=key)
    out = generate_ids(llama, prompts, NEW, batch_size=2, **kw)
    assert generate_ids(llama, prompts, NEW, batch_size=2, **kw) == out
    # Batch of 8 (3 filler rows, other packing) and a permuted list carrying its indices
    # (batches of 4, other compositions): the same samples.
    assert generate_ids(llama, prompts, NEW, batch_size=8, **kw) == out
    perm = [3, 0, 4, 2, 1]
    assert generate_ids(llama, [prompts[i] for i in perm], NEW, batch_size=4, indices=perm, **kw) == [out[i] for i in perm]
    # Another seed: other tokens (5 prompts x 6 near-uniform draws from 97 tokens).
    assert generate_ids(llama, prompts, NEW, batch_size=2, temperature=1.0, top_p=0.95, key=jax.random.key(8)) != out
    # Other temperature / top_p values reuse the compiled sampler (they are traced).
    before = generate_tokens_packed._cache_size()
    assert generate_ids(llama, prompts, NEW, batch_size=2, temperature=0.3, top_p=0.5, key=key) != out
    assert generate_tokens_packed._cache_size() == before
    # Sampling stops at end of sequence like greedy decoding: nothing after the EOS token.
    eos = eos_token_ids(llama)
    assert all(t not in eos for o in out for t in o[:-1])
    # temperature 0 with a key is the greedy path.
    assert generate_ids(llama, prompts, NEW, batch_size=8, key=key) == generate_ids(llama, prompts, NEW, batch_size=8)


def test_repeated_prompts_sample_independently(llama):
    """m copies of one prompt are m independent samples (each copy has its own index)."""
    p = _prompts()[1]
    out = generate_ids(llama, [p] * 8, NEW, batch_size=8, temperature=5.0, key=jax.random.key(0))
    assert len({tuple(o) for o in out}) == 8
    assert len({o[0] for o in out}) >= 6


def test_sampling_settings_are_checked(llama):
    p = _prompts()[:1]
    with pytest.raises(ValueError, match="PRNG key"):
        generate_ids(llama, p, 2, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(llama, p, 2, temperature=1.0, top_p=0.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(llama, p, 2, temperature=-1.0, key=jax.random.key(0))
