"""LoRA merge against PEFT's own ``merge_and_unload`` on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny

import hcnr_jax
from hcnr_jax.conversion.lora import merge_lora
from hcnr_jax.errors import CheckpointError
from hcnr_jax.params import flatten

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fresh(base_dir: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def randomise(peft_model, seed: int, biases: bool = False) -> None:
    """LoRA B starts at zero (the merge would be the identity): give A, B and trained biases values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif biases and name.endswith("base_layer.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_adapter(base_dir: Path, out: Path, seed: int = 1, biases: bool = False, **lora_kwargs):
    """Save a randomised adapter for the model in ``base_dir``; return PEFT's merged torch model."""
    model = peft.get_peft_model(fresh(base_dir), peft.LoraConfig(**lora_kwargs))
    randomise(model, seed, biases)
    model.save_pretrained(str(out))
    return model.merge_and_unload()


def assert_same_weights(ours, ref_model, rtol: float = 1e-6, atol: float = 1e-6) -> int:
    flat = flatten(ours.params)
    state = ref_model.state_dict()
    if ours.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert set(flat) == set(state)
    for name, ref in state.items():
        np.testing.assert_allclose(np.asarray(flat[name]), ref.numpy(), rtol=rtol, atol=atol, err_msg=name)
    return len(state)


def assert_same_logits(ours, ref_model) -> None:
    ids = np.random.default_rng(0).integers(3, 97, (2, 9))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    got = np.asarray(hcnr_jax.logits(ours, ids))
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> saved float32 tiny HF directory."""
    out = {}
    for family in ("llama", "qwen2"):
        out[family] = tiny.save_hf(tiny.hf_model(family), tmp_path_factory.mktemp(f"base_{family}"))
    return out


def test_merge_matches_peft_all_linear(bases, tmp_path):
    base = bases["llama"]
    ref = make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    ours = hcnr_jax.load_pretrained(f"{base}+{tmp_path / 'ad'}")
    before = flatten(hcnr_jax.load_pretrained(base).params)
    after = flatten(ours.params)
    # The merge really changed every adapted weight (B was randomised) and nothing else.
    changed = {n for n in after if not np.array_equal(np.asarray(after[n]), np.asarray(before[n]))}
    assert changed == {n for n in after if n.split(".")[-2] in ALL_LINEAR}
    assert assert_same_weights(ours, ref) > 0
    assert_same_logits(ours, ref)
    assert ours.source.endswith("+" + str(tmp_path / "ad"))


def test_merge_rslora_patterns_biases_lm_head(bases, tmp_path):
    """rsLoRA scaling, per-module rank/alpha patterns, bias="lora_only", an lm_head target and
    fan_in_fan_out=True in the stored config (which PEFT resets for Linear layers)."""
    base = bases["qwen2"]
    make_adapter(
        base, tmp_path / "ad", seed=2, biases=True, r=4, lora_alpha=8, use_rslora=True, bias="lora_only",
        target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
        rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"layers.2.self_attn.v_proj": 3, "proj": 5},  # "proj": no match, as in PEFT
    )
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = True
    cfg_path.write_text(json.dumps(cfg))
    # Reference: PEFT loading exactly these files.
    ref = peft.PeftModel.from_pretrained(fresh(base), str(tmp_path / "ad")).merge_and_unload()
    ours = merge_lora(hcnr_jax.load_pretrained(base), tmp_path / "ad")
    assert_same_weights(ours, ref)
    assert_same_logits(ours, ref)
    plain = flatten(hcnr_jax.load_pretrained(base).params)["model.layers.0.self_attn.q_proj.bias"]
    merged = flatten(ours.params)["model.layers.0.self_attn.q_proj.bias"]
    assert not np.array_equal(np.asarray(plain), np.asarray(merged))


def test_merge_in_float32_cast_once(bases, tmp_path):
    base = bases["llama"]
    make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    f32 = hcnr_jax.load_pretrained(f"{base}+{tmp_path / 'ad'}")
    bf16 = hcnr_jax.load_pretrained(f"{base}+{tmp_path / 'ad'}", dtype="bfloat16")
    base16 = flatten(hcnr_jax.load_pretrained(base, dtype="bfloat16").params)
    name = "model.layers.0.self_attn.q_proj.weight"
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].astype(np.float64)
    b = t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].astype(np.float64)
    expect = (np.asarray(base16[name], np.float64) + 2.0 * b @ a).astype(np.float32)
    got = np.asarray(bf16.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"])
    assert got.dtype == base16[name].dtype
    # One rounding to bfloat16 of the float32 sum: within half a bf16 ulp of the exact value.
    np.testing.assert_allclose(got.astype(np.float32), expect, rtol=2**-8, atol=0)
    assert np.asarray(f32.params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"]).dtype == np.float32


def _edit(adapter: Path, config: dict | None = None, rename: tuple[tuple[str, str], ...] = (),
          drop: str | None = None) -> None:
    from safetensors.numpy import load_file, save_file

    if config:
        p = adapter / "adapter_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **config}))
    if rename or drop:
        f = adapter / "adapter_model.safetensors"
        t = load_file(str(f))
        for old, new in rename:
            t[new] = t.pop(old)
        if drop:
            t.pop(drop)
        save_file(t, str(f))


PRE = "base_model.model.model.layers.0."


@pytest.mark.parametrize("case, edit, match", [
    ("dora", dict(config={"use_dora": True}), "adapter_config.json: unsupported setting use_dora"),
    ("modules_to_save", dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    ("not_lora", dict(config={"peft_type": "IA3"}), "only LORA"),
    ("unknown_target", dict(rename=tuple((PRE + f"self_attn.q_proj.lora_{x}.weight", PRE + f"self_attn.x_proj.lora_{x}.weight")
                                         for x in "AB")), "lora_A.weight targets model.layers.0.self_attn.x_proj"),
    ("missing_b", dict(drop=PRE + "mlp.down_proj.lora_B.weight"), "mlp.down_proj.lora_B.weight is missing"),
    ("rank", dict(config={"rank_pattern": {"down_proj": 3}}), "mlp.down_proj.lora_A.weight/lora_B.weight have shapes"),
    ("embedding", dict(rename=((PRE + "self_attn.q_proj.lora_A.weight",
                                "base_model.model.model.embed_tokens.lora_embedding_A"),)), "lora_embedding_A"),
])
def test_merge_errors_name_file_and_tensor(bases, tmp_path, case, edit, match):
    base = bases["llama"]
    ad = tmp_path / case
    make_adapter(base, ad, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    _edit(ad, **edit)
    with pytest.raises(CheckpointError, match=match) as e:
        hcnr_jax.load_pretrained(f"{base}+{ad}")
    assert str(ad) in str(e.value)


@pytest.mark.parametrize("part, value", [("B", np.nan), ("A", np.inf), ("B", -np.inf)])
def test_merge_refuses_non_finite_adapter(bases, tmp_path, part, value):
    """An adapter holding NaN or Inf is refused, naming the file and the tensor, not merged."""
    from safetensors.numpy import load_file, save_file

    base = bases["llama"]
    ad = tmp_path / "ad"
    make_adapter(base, ad, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    f = ad / "adapter_model.safetensors"
    t = load_file(str(f))
    name = PRE + f"mlp.down_proj.lora_{part}.weight"
    t[name][1, 2] = value
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="NaN or infinite") as e:
        hcnr_jax.load_pretrained(f"{base}+{ad}")
    assert str(f) in str(e.value) and name in str(e.value)


def test_merge_refuses_overflow_of_the_base_dtype(bases, tmp_path):
    """A finite adapter whose merged weight does not fit the base's float16 is an error, not inf."""
    from safetensors.numpy import load_file, save_file

    base = bases["llama"]
    ad = tmp_path / "ad"
    make_adapter(base, ad, r=4, lora_alpha=8, target_modules=["q_proj"])
    f = ad / "adapter_model.safetensors"
    t = load_file(str(f))
    key = PRE + "self_attn.q_proj.lora_B.weight"
    t[key] = (t[key] * 1e5).astype(np.float32)
    save_file(t, str(f))
    assert np.all(np.isfinite(np.asarray(flatten(hcnr_jax.load_pretrained(f"{base}+{ad}").params)[
        "model.layers.0.self_attn.q_proj.weight"])))  # float32: fits
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj.* overflows float16") as e:
        hcnr_jax.load_pretrained(f"{base}+{ad}", dtype="float16")
    assert str(f) in str(e.value)
