"""Written config.json and tokenizer_config.json carry what transformers 4.57 reads (beside the 5.x
spelling); scripts/test_transformers4.sh loads them there and compares logits."""

from __future__ import annotations

import json

import numpy as np
import tiny

from hcnr_jax.conversion.hf import with_legacy_rope


def test_flat_rope_parameters():
    hf = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    out = with_legacy_rope(hf)
    assert out["rope_theta"] == 5e5 and out["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert out["rope_parameters"] == hf["rope_parameters"] and "rope_theta" not in hf  # input untouched
    plain = with_legacy_rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain["rope_theta"] == 1e6 and "rope_scaling" not in plain
    kept = with_legacy_rope({**hf, "rope_theta": 1.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert kept["rope_theta"] == 1.0 and kept["rope_scaling"]["rope_type"] == "linear"
    assert with_legacy_rope({"rope_theta": 3.0}) == {"rope_theta": 3.0}


def test_per_layer_type_rope_parameters():
    hf = {"rope_parameters": {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    out = with_legacy_rope(hf)
    assert (out["rope_theta"], out["rope_local_base_freq"]) == (1e6, 1e4)
    assert out["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}


def test_saved_model_has_legacy_keys_and_loads_in_transformers(tmp_path):
    import torch
    import transformers

    from hcnr_jax.pretrained import load_pretrained, logits, save_pretrained

    src = tiny.save_hf(tiny.hf_model("gemma3"), tmp_path / "src")
    model = load_pretrained(src)
    save_pretrained(model, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    rp = cfg["rope_parameters"]
    assert cfg["rope_theta"] == rp["full_attention"]["rope_theta"]
    assert cfg["rope_local_base_freq"] == rp["sliding_attention"]["rope_theta"]
    assert cfg["rope_scaling"]["factor"] == rp["full_attention"]["factor"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = np.arange(1, 14)[None]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits(model, ids)), want, rtol=1e-5, atol=1e-5)


def test_tokenizer_class_both_versions_know(tmp_path):
    from hcnr_jax.pretrained import _name_tokenizer_for_both

    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "bos_token": "<s>"}))
    _name_tokenizer_for_both(path)
    assert json.loads(path.read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    path.write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    _name_tokenizer_for_both(path)
    assert json.loads(path.read_text()) == {"tokenizer_class": "GemmaTokenizer"}
