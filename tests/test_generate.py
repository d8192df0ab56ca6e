"""Batched greedy generation: bucketing, batch independence, and token parity with transformers."""


import numpy as np
import torch

import hcnr_jax
from hcnr_jax.embedded import smollm2_gguf
from hcnr_jax.generation import generate_ids, greedy_tokens

GGUF = smollm2_gguf()


def test_generate_is_exported():
    assert callable(hcnr_jax.generate) and hcnr_jax.generate is hcnr_jax.generation.generate


def test_bucketed_batches_match_transformers_and_do_not_recompile(tiny_dirs):
    torch_model, path = tiny_dirs["llama"]
    model = hcnr_jax.load_pretrained(path)
    rng = np.random.default_rng(0)
    # 5 prompts of different lengths (all within one 32-token bucket), batch size 2 -> 3 batches.
    prompts = [rng.integers(3, 97, n).tolist() for n in (3, 9, 5, 17, 11)]
    before = greedy_tokens._cache_size()
    out = generate_ids(model, prompts, 6, batch_size=2)
    assert greedy_tokens._cache_size() - before <= 1  # one compilation for every batch
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
