"""Writing PEFT LoRA adapters (``write_adapter``): PEFT loads them exactly (no missing or unexpected
keys, same logits as our merge), chains of adapters, partial targets, and errors naming the module."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tiny

import hcnr_jax
from hcnr_jax.conversion.lora import write_adapter
from hcnr_jax.errors import CheckpointError, HcnrError
from hcnr_jax.params import linear_shapes

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

IDS = np.random.default_rng(0).integers(3, 97, (2, 11))


def fresh(base: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def random_lora(cfg, r: int, seed: int, modules=None, layers=None, scale: float = 0.3):
    """HF module name -> (A [r, in], B [out, r]) with random (non-zero) A and B."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in (range(cfg.num_layers) if layers is None else layers):
        for module, (o, n) in linear_shapes(cfg).items():
            if modules is None or module.split(".")[1] in modules:
                out[f"model.layers.{i}.{module}"] = (
                    (rng.standard_normal((r, n)) * scale).astype(np.float32),
                    (rng.standard_normal((o, r)) * scale).astype(np.float32))
    return out


def peft_load(model, adapter: Path):
    """PEFT's own loading, failing on any warning about keys; returns the PeftModel."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(model, str(adapter)).eval()
    bad = [str(w.message) for w in caught if "key" in str(w.message).lower() or "adapter" in str(w.message).lower()]
    assert not bad, bad
    return pm


def peft_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def assert_close(got, ref, rel: float = 1e-5) -> None:
    got = np.asarray(got, np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rel, err


def assert_peft_holds(pm, lora: dict, r: int) -> None:
    """PEFT created LoRA layers for exactly our modules and loaded our A and B into them."""
    state = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
    expect = {}
    for module, (a, b) in lora.items():
        expect[f"base_model.model.{module}.lora_A.default.weight"] = a
        expect[f"base_model.model.{module}.lora_B.default.weight"] = b
    assert set(state) == set(expect)
    for k, v in expect.items():
        np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (saved tiny HF directory, its ModelConfig)."""
    out = {}
    for family in tiny.FAMILIES:
        path = tiny.save_hf(tiny.hf_model(family, num_hidden_layers=2), tmp_path_factory.mktemp(family))
        out[family] = (path, hcnr_jax.load_pretrained(path).config)
    return out


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_peft_loads_written_adapter_as_we_merge_it(bases, tmp_path, family):
    base, cfg = bases[family]
    lora = random_lora(cfg, r=4, seed=1)
    ad = write_adapter(tmp_path / "ad", lora, r=4, alpha=6, base_model=str(base))
    config = json.loads((ad / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 6 and config["base_model_name_or_path"] == str(base)
    assert sorted(config["target_modules"]) == sorted(m.split(".")[1] for m in linear_shapes(cfg))
    assert config["bias"] == "none" and config["use_dora"] is False and config["lora_dropout"] == 0.0
    from safetensors.numpy import load_file

    stored = load_file(str(ad / "adapter_model.safetensors"))
    assert len(stored) == 2 * len(lora) and all(t.dtype == np.float32 for t in stored.values())
    a, b = lora["model.layers.1.mlp.down_proj"]
    np.testing.assert_array_equal(stored["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], a)
    np.testing.assert_array_equal(stored["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], b)

    pm = peft_load(fresh(base), ad)
    assert_peft_holds(pm, lora, 4)
    ref = peft_logits(pm)  # PEFT's unmerged forward: W x + (alpha / r) B A x
    assert np.abs(ref - peft_logits(fresh(base))).max() > 0.1 * np.abs(ref).max()  # the adapter matters
    ours = hcnr_jax.load_pretrained(f"{base}+{ad}")
    assert_close(hcnr_jax.logits(ours, IDS), ref)
    # The scaling is alpha / r = 1.5, independently of both readers.
    w0 = np.asarray(hcnr_jax.load_pretrained(base).params["model"]["layers"][1]["mlp"]["down_proj"]["weight"])
    w1 = np.asarray(ours.params["model"]["layers"][1]["mlp"]["down_proj"]["weight"])
    np.testing.assert_allclose(w1, w0 + 1.5 * b.astype(np.float64) @ a, rtol=1e-5, atol=1e-6)


def test_partial_targets_load_exactly(bases, tmp_path):
    """Modules in some layers only: PEFT must create LoRA layers exactly there (else it warns of
    missing keys and adds zero-B layers elsewhere)."""
    base, cfg = bases["qwen2"]
    cases = {
        "same_layers": random_lora(cfg, 3, seed=2, modules=("q_proj", "down_proj"), layers=[1]),
        "ragged": {**random_lora(cfg, 3, seed=3, modules=("v_proj",), layers=[0]),
                   **random_lora(cfg, 3, seed=4, modules=("up_proj",), layers=[1])},
    }
    for name, lora in cases.items():
        ad = write_adapter(tmp_path / name, lora, r=3, alpha=5.5)
        config = json.loads((ad / "adapter_config.json").read_text())
        if name == "same_layers":
            assert config["target_modules"] == ["down_proj", "q_proj"] and config["layers_to_transform"] == [1]
        else:
            assert config["target_modules"] == sorted(lora) and config["layers_to_transform"] is None
        pm = peft_load(fresh(base), ad)
        assert_peft_holds(pm, lora, 3)
        assert_close(hcnr_jax.logits(hcnr_jax.load_pretrained(f"{base}+{ad}"), IDS), peft_logits(pm))


def test_chain_of_adapters(bases, tmp_path):
    """BASE+A1+A2 (A2 trained on BASE with A1 merged) equals PEFT merging A1, then applying A2."""
    base, cfg = bases["llama"]
    a1 = write_adapter(tmp_path / "a1", random_lora(cfg, 4, seed=5), r=4, alpha=8)
    a2_lora = random_lora(cfg, 2, seed=6, modules=("o_proj", "gate_proj"))
    a2 = write_adapter(tmp_path / "a2", a2_lora, r=2, alpha=3, base_model=f"{base}+{a1}")
    merged = peft_load(fresh(base), a1).merge_and_unload()
    pm = peft_load(merged, a2)
    assert_peft_holds(pm, a2_lora, 2)
    ref = peft_logits(pm)
    assert_close(hcnr_jax.logits(hcnr_jax.load_pretrained(f"{base}+{a1}+{a2}"), IDS), ref)
    # Each adapter matters: the chain differs from either one alone.
    only1 = np.asarray(hcnr_jax.logits(hcnr_jax.load_pretrained(f"{base}+{a1}"), IDS))
    assert np.abs(only1 - ref).max() > 1e-2 * np.abs(ref).max()


def test_dtype_kept_and_overwrite(bases, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file

    base, cfg = bases["llama"]
    lora = {k: (a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16))
            for k, (a, b) in random_lora(cfg, 2, seed=7, modules=("k_proj",)).items()}
    ad = write_adapter(tmp_path / "ad", lora, r=2, alpha=4)
    stored = load_file(str(ad / "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    # Loads with PEFT (bfloat16 tensors into float32 LoRA layers) and with us, the same.
    pm = peft_load(fresh(base), ad)
    assert_close(hcnr_jax.logits(hcnr_jax.load_pretrained(f"{base}+{ad}"), IDS), peft_logits(pm))
    # Explicit short target_modules (every layer adapted, as a trainer writes it) and extra files.
    every = random_lora(cfg, 2, seed=10, modules=("q_proj", "up_proj"))
    ad2 = write_adapter(tmp_path / "ad2", every, r=2, alpha=4, target_modules=["q_proj", "up_proj"],
                        extra_files={"train_report.json": '{"steps": 3}'})
    assert json.loads((ad2 / "train_report.json").read_text()) == {"steps": 3}
    config = json.loads((ad2 / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "up_proj"] and config["layers_to_transform"] is None
    assert_peft_holds(peft_load(fresh(base), ad2), every, 2)
    with pytest.raises(CheckpointError, match=r"extra file name 'adapter_config\.json'"):
        write_adapter(tmp_path / "ad3", every, r=2, alpha=4, extra_files={"adapter_config.json": "{}"})
    with pytest.raises(HcnrError, match="already exists"):
        write_adapter(tmp_path / "ad", lora, r=2, alpha=4)
    write_adapter(tmp_path / "ad", random_lora(cfg, 2, seed=8, modules=("q_proj",)), r=2, alpha=4, overwrite=True)
    assert all(".q_proj." in k for k in load_file(str(ad / "adapter_model.safetensors")))


def _pair(o: int = 48, n: int = 72, r: int = 4):
    return np.ones((r, n), np.float32), np.ones((o, r), np.float32)


@pytest.mark.parametrize("lora, kwargs, match", [
    ({"model.layers.0.self_attn.x_proj": _pair()}, {}, r"unknown module 'model\.layers\.0\.self_attn\.x_proj'"),
    ({"model.layers.0.mlp.down_proj.weight": _pair()}, {}, r"unknown module 'model\.layers\.0\.mlp\.down_proj\.weight'"),
    ({"model.layers.1.mlp.up_proj": _pair(r=3)}, {}, r"module model\.layers\.1\.mlp\.up_proj: A/B have shapes"),
    ({"model.layers.1.mlp.up_proj": (np.ones((4, 48)), np.ones((72, 3)))}, {},
     r"module model\.layers\.1\.mlp\.up_proj: A/B have shapes \(4, 48\)/\(72, 3\)"),
    ({"model.layers.0.self_attn.q_proj": (np.ones((4, 48, 1)), np.ones((72, 4)))}, {}, r"self_attn\.q_proj: A/B"),
    ({"model.layers.0.self_attn.q_proj": (np.full((4, 48), np.nan), np.ones((72, 4)))}, {}, r"q_proj: A or B holds NaN"),
    ({"model.layers.0.self_attn.q_proj": _pair()}, {"target_modules": ["v_proj"]},
     r"module model\.layers\.0\.self_attn\.q_proj is not matched by target_modules"),
    ({"model.layers.0.self_attn.q_proj": _pair()}, {"r": 0}, r"r must be a positive integer"),
    ({}, {}, r"no modules"),
])
def test_bad_input_names_the_module(tmp_path, lora, kwargs, match):
    kwargs = {"r": 4, "alpha": 8, **kwargs}
    with pytest.raises(CheckpointError, match=match):
        write_adapter(tmp_path / "ad", lora, **kwargs)
    assert not (tmp_path / "ad").exists() and not list(tmp_path.iterdir())  # nothing left behind


def test_shape_that_does_not_fit_the_base_fails_on_load(bases, tmp_path):
    """The writer does not know the base; a wrong in/out size is caught by the reader, naming the module."""
    base, cfg = bases["llama"]
    lora = random_lora(cfg, 2, seed=9, modules=("q_proj",), layers=[0])
    a, b = lora["model.layers.0.self_attn.q_proj"]
    ad = write_adapter(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (a[:, :-1], b)}, r=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight/lora_B\.weight"):
        hcnr_jax.load_pretrained(f"{base}+{ad}")
    # A module the base does not have (layer 5 of a 2-layer model).
    ad5 = write_adapter(tmp_path / "ad5", {"model.layers.5.self_attn.q_proj": (a, b)}, r=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"targets model\.layers\.5\.self_attn\.q_proj"):
        hcnr_jax.load_pretrained(f"{base}+{ad5}")
