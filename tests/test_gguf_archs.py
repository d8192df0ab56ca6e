"""GGUF import for every architecture: tiny GGUFs written as llama.cpp's converter writes them
(tensor names from the gguf package's own name map, Q/K rows permuted for llama, Gemma norms stored
as 1 + w, quantised tensors), loaded back and checked against the HF model they came from and
against transformers' own GGUF loader; the lazy header reader against gguf.GGUFReader."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

import hcnr_jax
from hcnr_jax.conversion.gguf import ARCHS, load_gguf
from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import flatten

# family -> (GGUF architecture, tiny.hf_model overrides that llama.cpp's metadata can express)
CASES = {
    "llama": ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # Mistral without a sliding window (v0.2 on): llama.cpp writes it as "llama"; linear RoPE scaling.
    "mistral": ("llama", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                            use_sliding_window=False)),
    "qwen3": ("qwen3", {}),
    # Gemma 3 as llama.cpp runs it: every 6th layer global, local base 10000, scale 1/sqrt(head_dim).
    "gemma3": ("gemma3", dict(num_hidden_layers=6, sliding_window_pattern=6, attention_bias=False,
                              query_pre_attn_scalar=12, final_logit_softcapping=None,
                              rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=100000.0,
                                                                       factor=4.0),
                                                   sliding_attention=dict(rope_type="default",
                                                                          rope_theta=10000.0)))),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Byte offsets of the float16 scales inside one 256-value block of each K-quant (ggml-common.h).
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def quantise(t: np.ndarray, qtype, seed: int) -> np.ndarray:
    """``t`` in ``qtype`` as llama.cpp stores it. gguf.quants has no K-quant quantiser, so K-quant
    blocks are random bytes with small float16 scales: valid blocks whose values differ from ``t``
    (both loaders read the same bytes, which is what the comparison needs)."""
    import gguf

    if qtype.name not in K_SCALES:
        return gguf.quants.quantize(t, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (t.shape[0], t.shape[1] // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype.name]:
        raw[:, :, at:at + 2] = np.full(raw.shape[:2], 1e-5, np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(t.shape[0], -1)


def write_gguf(path: Path, model, arch: str, quant: dict[str, object] | None = None) -> Path:
    """``model`` (a transformers CausalLM) as llama.cpp would write it; ``quant`` maps a substring of
    the GGUF tensor name to the GGML type it is stored in (float32 otherwise)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float().numpy()
        module, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(module)}.{suffix}"
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            t = t + np.float32(1)  # Gemma3Model.modify_tensors
        qtype = next((q for key, q in (quant or {}).items() if key in gname), None)
        if qtype is None:
            w.add_tensor(gname, np.ascontiguousarray(t, np.float32))
        else:
            w.add_tensor(gname, quantise(t, qtype, seed=len(gname)), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _batch(seed: int, t: int = 20):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 97, (2, t))
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False
    return np.where(mask, ids, 0), mask


def _rel(a, b, mask):
    return float(np.abs(a - b)[mask].max() / np.abs(b[mask]).max())


@pytest.mark.parametrize("family", list(CASES))
def test_float32_gguf_is_the_hf_model(tmp_path, family):
    """Every tensor back in HF layout (bit-exact; Gemma's norms within the rounding of the stored
    1 + w) and logits within 1e-5 of the HF model the file was written from."""
    arch, overrides = CASES[family]
    hf = tiny.hf_model(family, seed=3, **overrides)
    path = write_gguf(tmp_path / f"{family}.gguf", hf, arch)
    model = load_gguf(path, tokenizer=False)
    assert model.config.model_type == ARCHS[arch].model_type
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = {k: np.asarray(v) for k, v in flatten(model.params).items()}
    assert set(ours) == set(ref) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    for name, w in ours.items():
        if arch == "gemma3" and name.endswith("norm.weight"):
            np.testing.assert_allclose(w, ref[name], rtol=0, atol=2**-23 * 4, err_msg=name)
        else:
            np.testing.assert_array_equal(w, ref[name], err_msg=name)
    ids, mask = _batch(7)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    assert _rel(np.asarray(hcnr_jax.logits(model, ids, mask)), want, mask) < 1e-5


QUANT = {"token_embd": "Q8_0", "attn_q.": "Q5_0", "attn_k.": "Q4_1", "attn_v.": "Q8_0", "attn_output": "Q4_K",
         "ffn_gate": "Q5_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "output.": "Q6_K"}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_quantised_gguf_matches_transformers_gguf_loader(tmp_path, family):
    """K-quants and legacy quants (the types Q4_K_M files hold) dequantised as gguf.quants does, and
    the model equal to what transformers builds from the same file (an independent reading of the
    conventions: names, norms, biases, tying); greedy tokens identical."""
    import gguf
    import transformers

    arch, overrides = CASES[family]
    # transformers' GGUF configs read no head_dim for qwen3 and no query_pre_attn_scalar for gemma3: the
    # checkpoints' values (128; 256 = head_dim) are its defaults, so the tiny models use them too.
    head_dim = {"qwen2": 64, "qwen3": 128, "gemma3": 256}[family]
    dims = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                head_dim=head_dim, tie_word_embeddings=family != "qwen2")
    if family == "gemma3":
        overrides = {**overrides, "query_pre_attn_scalar": 256, "rope_parameters": None}
    hf = tiny.hf_model(family, seed=4, **{**overrides, **dims})
    quant = {k: gguf.GGMLQuantizationType[v] for k, v in QUANT.items()}
    folder = tmp_path / "q"
    folder.mkdir()
    path = write_gguf(folder / "m.gguf", hf, arch, quant)
    model = load_gguf(path, tokenizer=False)
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.name in ("blk.0.ffn_down.weight", "token_embd.weight", "blk.1.attn_k.weight"):
            assert t.tensor_type != gguf.GGMLQuantizationType.F32
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="m.gguf",
                                                            dtype=torch.float32).eval()
    ref_params = ref.state_dict()
    for name, w in flatten(model.params).items():
        np.testing.assert_allclose(np.asarray(w), ref_params[name].numpy(), rtol=0, atol=1e-6, err_msg=name)
    ids, mask = _batch(9)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    assert _rel(np.asarray(hcnr_jax.logits(model, ids, mask)), want, mask) < 1e-5
    # The quantisation really happened: the weights differ from the float model's.
    assert not np.allclose(np.asarray(flatten(model.params)["model.layers.0.mlp.down_proj.weight"]),
                           hf.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy(), atol=1e-6)


def test_header_reader_equals_gguf_reader_and_is_lazy(tmp_path):
    """Every metadata field and tensor (bytes, type, shape) as gguf.GGUFReader reads them; a 262,144
    token vocabulary (Gemma 3's size) is parsed in well under a second (GGUFReader: ~10 s here)."""
    import gguf

    from hcnr_jax.conversion.gguf_reader import GGUFFile

    hf = tiny.hf_model("qwen3", seed=1)
    path = tmp_path / "v.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    tokens = [f"tok{i}▁é" for i in range(262144)]
    w.add_token_list(tokens)
    w.add_token_scores(np.linspace(-1, 0, len(tokens), dtype=np.float32).tolist())
    w.add_token_types([1] * len(tokens))
    w.add_string("general.name", "tiny")
    w.add_float64("test.f64", 1.5)
    w.add_bool("test.flag", True)
    w.add_array("test.ints", [1, -2, 3])
    for i, (name, t) in enumerate(hf.state_dict().items()):
        if i < 6:
            qtype = gguf.GGMLQuantizationType.F16 if t.ndim == 1 else gguf.GGMLQuantizationType.F32
            arr = t.detach().numpy().astype(np.float16 if qtype.name == "F16" else np.float32)
            w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t0 = time.perf_counter()
    ours = GGUFFile(path)
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == 262144
    elapsed = time.perf_counter() - t0
    ref = gguf.GGUFReader(path)
    assert set(ours.fields) | {k for k in ref.fields if k.startswith("GGUF.")} == set(ref.fields)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.dims == tuple(int(d) for d in b.shape)
        np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type).reshape(-1),
                                      gguf.quants.dequantize(b.data, b.tensor_type).reshape(-1))
    assert elapsed < 2.0, elapsed  # measured 0.3 s on 2 busy cores


def test_unsupported_quant_type_and_corrupt_header_are_named(tmp_path):
    import gguf

    hf = tiny.hf_model("qwen3", seed=1)
    path = write_gguf(tmp_path / "m.gguf", hf, "qwen3")
    # A type id GGML does not have, written into one tensor's header entry.
    data = bytearray(path.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == gguf.GGMLQuantizationType.F32
    bad_type = tmp_path / "bad_type.gguf"
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    bad_type.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight has unknown GGML type 99"):
        load_gguf(bad_type, tokenizer=False)
    # A file cut inside its header.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cannot read GGUF file header") as e:
        load_gguf(cut, tokenizer=False)
    assert str(cut) in str(e.value)


def test_unsupported_rope_scaling_is_named(tmp_path):
    import gguf

    path = tmp_path / "yarn.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    for add, v in (("block_count", 2), ("embedding_length", 48), ("feed_forward_length", 72), ("head_count", 6)):
        getattr(w, f"add_{add}")(v)
    w.add_vocab_size(97)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"qwen3\.rope\.scaling\.type='yarn'"):
        load_gguf(path, tokenizer=False)


def gemma_vocab_gguf(path: Path) -> Path:
    """A metadata-only Gemma 3 GGUF vocabulary the way llama.cpp writes Gemma's: sentencepiece
    ("llama") without merges, runs of spaces stored as real spaces, byte fallback, control tokens."""
    import gguf

    words = ["▁", "a", "b", "h", "e", "l", "o", "t", "▁t", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁the", "ab"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "  ", "   ",
              *(f"<0x{b:02X}>" for b in range(256)), *words]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 2, 3, 3, 3, 1, 1] + [6] * 256 + [1] * len(words))
    w.add_token_scores([0.0] * (9 + 256) + [-float(i) for i in range(len(words))])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gemma3_tokenizer_equals_transformers_gguf(tmp_path):
    """Gemma's sentencepiece vocabulary (space-run tokens respelled, merges rebuilt in file order),
    built from our header reader, equals transformers' GGUF tokenizer; BOS added, control tokens whole."""
    from test_gguf import TRICKY, assert_same_tokenizer
    from transformers import AutoTokenizer

    from hcnr_jax.conversion.gguf import _read_reader, _tokenizer

    folder = tmp_path / "g"
    folder.mkdir()
    path = gemma_vocab_gguf(folder / "t.gguf")
    ref = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    ours = _tokenizer(path, _read_reader(path), cache=False)
    texts = [*TRICKY, "hello the  hello   the", "<start_of_turn>user\nhello<end_of_turn>\n"]
    assert_same_tokenizer(ours, ref, texts, tmp_path)
    ids = ours("<start_of_turn>hello  the")["input_ids"]
    # BOS, the control token whole, "he" + "llo" (no prefix space), the two-space token (stored as "  ").
    assert ids[:5] == [2, 5, 275, 277, 7]
    assert ours.mask_token == "<mask>" and type(ours).__name__ == "GemmaTokenizer"
