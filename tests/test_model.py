"""Logit and greedy-decoding parity with transformers on tiny random models of every family."""

import zlib

import numpy as np
import pytest
import tiny
import torch

import hcnr_jax
from hcnr_jax.generation import generate_tokens


def _rel(a, b, mask):
    return float(np.abs(a - b)[mask].max() / np.abs(b[mask]).max())


def _padded_batch(seed, b=3, t=24, vocab=97):
    """Right- and left-padded rows, longer than every sliding window in tiny.py (5 and 7)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, t))
    mask = np.ones((b, t), bool)
    mask[1, :7] = False  # left padding
    mask[2, 17:] = False  # right padding
    ids[~mask] = 0
    return ids, mask


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("offset", [0, 300])
def test_logits_match_transformers(tiny_dirs, family, offset):
    """float32 logits within 1e-5 relative to max |logit| (measured on CPU: at most 5.5e-7 over
    every family, offset and several batches); offset 300 puts positions past
    original_max_position_embeddings (64), where RoPE scaling changes the angles."""
    torch_model, path = tiny_dirs[family]
    model = hcnr_jax.load_pretrained(path)
    ids, mask = _padded_batch(seed=zlib.crc32(family.encode()) % 1000)  # the same batch in every run
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0) + offset
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                          position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(hcnr_jax.logits(model, ids, mask, positions=pos))
    assert ours.dtype == np.float32
    assert _rel(ours, ref, mask) < 1e-5


def test_default_positions_skip_left_padding(tiny_dirs):
    """Left padding must not shift positions: a padded row equals the same row unpadded."""
    model = hcnr_jax.load_pretrained(tiny_dirs["llama"][1])
    ids, mask = _padded_batch(seed=3)
    full = np.asarray(hcnr_jax.logits(model, ids, mask))
    alone = np.asarray(hcnr_jax.logits(model, ids[1:2, 7:]))
    np.testing.assert_allclose(full[1, 7:], alone[0], rtol=0, atol=1e-5 * np.abs(alone).max())  # measured 2e-7


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_greedy_matches_transformers(tiny_dirs, family):
    """32 greedy tokens from left-padded prompts, identical to transformers' generate."""
    torch_model, path = tiny_dirs[family]
    model = hcnr_jax.load_pretrained(path)
    ids, mask = _padded_batch(seed=7, t=12)
    mask[2, :] = True  # generation batches are left-padded only
    mask[2, :5] = False
    ids = np.where(mask, np.random.default_rng(1).integers(3, 97, ids.shape), 0)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                                   max_new_tokens=32, do_sample=False, eos_token_id=[96], pad_token_id=0)
    ref = ref.numpy()[:, ids.shape[1]:]
    toks, lengths = generate_tokens(model.params, model.config, ids, mask, np.array([96]), 32, 0)
    toks = np.asarray(toks)
    assert toks.shape == (3, 32)
    for r in range(3):
        n = int(lengths[r])
        np.testing.assert_array_equal(toks[r, :n], ref[r, :n])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_packed_segments_equal_separate_rows(tiny_dirs, family):
    """Two prompts packed after a shared prefix (segment ids, explicit positions) give each
    token the logits it has in its own unpadded row; the rows are longer than the sliding
    windows, which packing measures in positions."""
    model = hcnr_jax.load_pretrained(tiny_dirs[family][1])
    rng = np.random.default_rng(5)
    prefix, a, b = (rng.integers(3, 97, n).tolist() for n in (6, 9, 13))
    ids = np.array([prefix + a + b])
    seg = np.array([[0] * 6 + [1] * 9 + [2] * 13])
    pos = np.array([list(range(6)) + list(range(6, 15)) + list(range(6, 19))])
    packed = np.asarray(hcnr_jax.model.forward(model.params, model.config, ids, positions=pos,
                                               segment_ids=seg).logits)[0]
    row_a = np.asarray(hcnr_jax.logits(model, np.array([prefix + a])))[0]
    row_b = np.asarray(hcnr_jax.logits(model, np.array([prefix + b])))[0]
    scale = np.abs(row_b).max()
    np.testing.assert_allclose(packed[:15], row_a, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(packed[15:], row_b[6:], rtol=0, atol=1e-5 * scale)


def test_hidden_states_are_the_residual_stream_of_hugging_face(tmp_path):
    """``forward(..., hidden_states=True)``: embeddings, then the stream after each block; the
    first L match transformers' ``hidden_states`` (its last one is after the final norm, ours before)."""
    from hcnr_jax.model import forward

    hf = tiny.hf_model("llama", num_hidden_layers=3)
    m = hcnr_jax.load_pretrained(tiny.save_hf(hf, tmp_path), dtype="float32")
    ids = np.random.default_rng(0).integers(3, 97, (2, 7)).astype(np.int32)
    out = forward(m.params, m.config, ids, precision="highest", hidden_states=True)
    assert len(out.states) == m.config.num_layers + 1
    with torch.no_grad():
        hs = hf(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
    for i in range(m.config.num_layers):
        np.testing.assert_allclose(np.asarray(out.states[i]), hs[i].numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden), hs[-1].numpy(), atol=1e-5, rtol=1e-5)
    assert forward(m.params, m.config, ids).states is None
