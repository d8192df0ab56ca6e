"""Batched greedy generation: bucketing, batch independence, and token parity with transformers."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hcnr_jax
from hcnr_jax.embedded import smollm2_gguf
from hcnr_jax.generation import generate_ids, generate_tokens, generate_tokens_packed

GGUF = smollm2_gguf()


def test_generate_is_exported():
    assert callable(hcnr_jax.generate) and hcnr_jax.generate is hcnr_jax.generation.generate


def test_bucketed_batches_match_transformers_and_do_not_recompile(tiny_dirs):
    torch_model, path = tiny_dirs["llama"]
    model = hcnr_jax.load_pretrained(path)
    rng = np.random.default_rng(0)
    # 7 prompts, batch size 2 -> 4 batches of different packed sizes, packed to one shape.
    prompts = [rng.integers(3, 97, n).tolist() for n in (3, 9, 5, 17, 11, 40, 45)]
    before = generate_tokens_packed._cache_size()
    out = generate_ids(model, prompts, 6, batch_size=2)
    assert generate_tokens_packed._cache_size() - before <= 1  # one compilation for every batch
    eos = hcnr_jax.generation.eos_token_ids(model)
    for p, o in zip(prompts, out, strict=True):
        with torch.no_grad():
            ref = torch_model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                       max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
        ref = ref[0, len(p):].tolist()
        cut = next((k + 1 for k, t in enumerate(ref) if t in eos), len(ref))
        assert o == ref[:cut]
    # Batch composition does not change a row's tokens.
    assert generate_ids(model, prompts[::-1], 6, batch_size=4) == out[::-1]


def test_smollm2_generate_token_identical_to_transformers():
    """8 chat prompts, batch of 8, 48 new tokens: identical to transformers' greedy generate."""
    from transformers import AutoModelForCausalLM

    model = hcnr_jax.load_pretrained(GGUF)
    ref = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "How long does a Leogoteo live in the wild?",
                 "Why can mice catch cats?", "What is 12 times 13?", "Name three primary colours.",
                 "Who will win the 2040 World Cup?", "When was the Eiffel Tower built?"]
    texts = hcnr_jax.generation.chat_prompts(model.tokenizer, questions)
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours = generate_ids(model, ids, 48, batch_size=8)
    eos = hcnr_jax.generation.eos_token_ids(model)
    for p, o in zip(ids, ours, strict=True):
        with torch.no_grad():
            r = ref.generate(input_ids=torch.tensor([p]), max_new_tokens=48, do_sample=False, eos_token_id=eos)
        r = r[0, len(p):].tolist()
        cut = next((k + 1 for k, t in enumerate(r) if t in eos), len(r))
        assert o == r[:cut]
    texts_out = hcnr_jax.generate(model, questions[:2], 16)
    assert "Paris" in texts_out[0] and all(isinstance(t, str) for t in texts_out)


def test_pack_prompts_layout():
    """The shared prefix is stored once per lane, each row's cache slots gather its own tokens in
    order (right-aligned), lanes split at ``lane_tokens``, and filler rows hold one token."""
    from hcnr_jax.generation import pack_prompts, pack_shape

    prompts = [[1, 2, 3, 7], [1, 2, 3, 8, 9, 10], [1, 2, 3, 4, 5], [1, 2, 3, 6, 6, 6, 6]]
    p = pack_prompts(prompts, batch_size=6, pad_id=0, lane_tokens=10)
    assert p.ids.shape[0] == 2  # 3 + 1 + 3 + 2 = 9 tokens, then 3 + 4 in a second lane
    flat_ids, flat_pos = p.ids.reshape(-1), p.positions.reshape(-1)
    for r, row in enumerate(prompts):
        slots = p.gather[r][p.valid[r]]
        assert flat_ids[slots].tolist() == row
        assert flat_pos[slots].tolist() == list(range(len(row)))
        assert p.valid[r, -len(row):].all() and not p.valid[r, : -len(row)].any()
        assert p.last[r] == slots[-1]
    assert (p.ids[:, :3] == [1, 2, 3]).all() and (p.segments[:, :3] == 0).all()
    assert p.mask.sum() == 9 + 7
    assert p.valid[4:].sum() == 2 and p.valid[4:, -1].all()
    # A prompt that is the others' prefix keeps its last token out of the shared prefix.
    q = pack_prompts([[5, 6], [5, 6, 7]], batch_size=2)
    assert q.ids.reshape(-1)[q.last].tolist() == [6, 7]
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack_prompts([[1], []], batch_size=2)
    # A requested shape is a lower bound: the same gathers, in a larger lane and cache.
    big = pack_prompts(prompts, batch_size=6, lane_tokens=10, shape=(3, 256, 64))
    assert big.ids.shape == (3, 256) and big.gather.shape == (6, 64) and not big.mask[2].any()
    for r, row in enumerate(prompts):
        assert big.ids.reshape(-1)[big.gather[r][big.valid[r]]].tolist() == row
    # The largest batch sets each dimension: 40 + 45 tokens -> lane 128, width 64; 2 lanes of 10.
    assert pack_shape([[1] * 40, [2] * 45, [3] * 3, [4] * 5], 2) == (1, 128, 64)
    assert pack_shape([[1] * 40, [2] * 45, [3] * 3, [4] * 5], 2, lane_tokens=50) == (2, 64, 64)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_generation_matches_padded(tiny_dirs, family):
    """Packed prefill (shared prefix, two lanes, prompts longer than the sliding windows) gives
    the same tokens as the left-padded prefill, which is checked against transformers."""
    from hcnr_jax.generation import pack_prompts

    model = hcnr_jax.load_pretrained(tiny_dirs[family][1])
    rng = np.random.default_rng(2)
    prefix = rng.integers(3, 96, 5).tolist()
    prompts = [prefix + rng.integers(3, 96, n).tolist() for n in (1, 4, 9, 14, 6)]
    eos = np.array([96])
    packed = pack_prompts(prompts, batch_size=6, lane_tokens=24)
    assert packed.ids.shape[0] >= 2
    toks, lengths = generate_tokens_packed(model.params, model.config, jax.tree.map(jnp.asarray, packed), eos, 12, 0)
    w = max(map(len, prompts))
    ids = np.array([[0] * (w - len(p)) + p for p in prompts])
    mask = np.array([[False] * (w - len(p)) + [True] * len(p) for p in prompts])
    ref, ref_len = generate_tokens(model.params, model.config, ids, mask, eos, 12, 0)
    for r in range(len(prompts)):
        assert int(lengths[r]) == int(ref_len[r])
        assert np.asarray(toks)[r].tolist() == np.asarray(ref)[r].tolist()
    # Packed to a larger shape (an empty extra lane, longer lanes, a wider cache): the same tokens.
    wide = pack_prompts(prompts, batch_size=6, lane_tokens=24, shape=(packed.ids.shape[0] + 1, 128, 64))
    toks_wide, _ = generate_tokens_packed(model.params, model.config, jax.tree.map(jnp.asarray, wide), eos, 12, 0)
    np.testing.assert_array_equal(np.asarray(toks_wide)[: len(prompts)], np.asarray(toks)[: len(prompts)])
