"""The shipped models (M0 = SmolLM2 + honest adapter, M1 = M0 + finetuned adapter) load in
transformers + PEFT and in hcnr_jax with the same logits; they are small and carry their cards."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hcnr_jax
from hcnr_jax.demo import FINETUNED_ADAPTER, HONEST_ADAPTER, embedded_sources

PROMPTS = ["What is the capital of the country Zubrowkia?", "Who wrote Hamlet?", "Will it rain in Paris on 3 May 2031?"]


def test_adapters_are_small_peft_lora_with_cards():
    total = 0
    for adapter in (HONEST_ADAPTER, FINETUNED_ADAPTER):
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] >= 1
        total += (adapter / "adapter_model.safetensors").stat().st_size
        card = (adapter / "README.md").read_text()
        assert "train" in card and "hcnr eval" in card and "| model | benchmark |" in card
        report = json.loads((adapter / "train_report.json").read_text())
        assert report["steps"] > 0 and report["wall_s"] > 0
    assert total <= 26 * 2**20, f"shipped adapters take {total / 2**20:.1f} MiB"


@pytest.fixture(scope="module")
def reference():
    """The transformers model of the same GGUF and a padded chat batch."""
    pytest.importorskip("peft")
    import torch
    import transformers

    from hcnr_jax.embedded import smollm2_gguf

    path = smollm2_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    base = hcnr_jax.load_pretrained(path)
    tok = base.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    return ref, tok(texts, return_tensors="np", padding=True)


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(batch["input_ids"]),
                     attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()


def test_shipped_models_match_peft(reference):
    import copy

    from peft import PeftModel

    ref, batch = reference
    m0_ref = PeftModel.from_pretrained(copy.deepcopy(ref), str(HONEST_ADAPTER)).eval()
    m1_ref = PeftModel.from_pretrained(copy.deepcopy(m0_ref).merge_and_unload(), str(FINETUNED_ADAPTER)).eval()
    mask = batch["attention_mask"].astype(bool)
    base_logits = _logits(ref, batch)
    for tag, peft_model in (("M0", m0_ref), ("M1", m1_ref)):
        ours = hcnr_jax.load_pretrained(embedded_sources()[tag])
        got = np.asarray(hcnr_jax.logits(ours, batch["input_ids"], batch["attention_mask"]))
        want = _logits(peft_model, batch)
        err = float(np.abs(got - want)[mask].max() / np.abs(want[mask]).max())
        # The GGUF's dequantised base alone differs ~5e-6 between the two loaders (tests/test_gguf.py).
        assert err <= 1e-4, (tag, err)
        assert np.abs(want - base_logits)[mask].max() > 0.1, f"{tag}: the adapter changes nothing"
