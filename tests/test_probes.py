"""experiments/probes.py: last-prompt-token hidden states, the probe / AUROC pipeline, end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tiny

import hcnr_jax
from hcnr_jax.embedded import smollm2_gguf
from hcnr_jax.model import forward

SCRIPT = Path(__file__).parent.parent / "experiments" / "probes.py"


@pytest.fixture(scope="module")
def probes():
    spec = importlib.util.spec_from_file_location("probes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_layers(probes):
    assert probes.default_layers(30) == (6, 12, 18, 24, 30)
    assert probes.default_layers(3) == (1, 2, 3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases, a sliding window
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_last_token_states_match_unpadded_forward(probes, tiny_dirs, family, pad_side):
    import torch

    hf, path = tiny_dirs[family]
    model = hcnr_jax.load_pretrained(path, dtype="float32")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 17, 9, 1, 12)]
    layers = (0, 1, 2, 3)
    # Batch of 3 with different lengths (sorted by length, then 2 batches): padding in every batch.
    states, final = probes.last_token_states(model, prompts, layers, batch_size=3, pad_side=pad_side,
                                             width_multiple=8, with_final=True)
    assert states.shape == (5, 4, 48) and states.dtype == np.float32
    for i, p in enumerate(prompts):
        ids = np.asarray([p], np.int32)
        # The model's own unpadded forward: its final-norm hidden state at the last token.
        want_final = np.asarray(forward(model.params, model.config, ids, precision="highest").hidden[0, -1])
        np.testing.assert_allclose(final[i], want_final, atol=1e-5, rtol=1e-5)
        # Residual streams after 0..L-1 blocks: Hugging Face's hidden_states of the unpadded prompt.
        with torch.no_grad():
            hs = hf(torch.tensor(ids, dtype=torch.long), output_hidden_states=True).hidden_states
        for j, layer in enumerate(layers[:-1]):
            np.testing.assert_allclose(states[i, j], hs[layer][0, -1].numpy(), atol=1e-5, rtol=1e-5)
        # After the last block: its final norm is the model's final hidden state.
        x = states[i, -1].astype(np.float64)
        w = np.asarray(model.params["model"]["norm"]["weight"], np.float64)
        normed = w * x / np.sqrt(np.mean(x * x) + model.config.rms_norm_eps)
        np.testing.assert_allclose(normed, want_final, atol=1e-5, rtol=1e-5)
    # The same prompts one at a time, unpadded, give the same features.
    alone = np.stack([probes.last_token_states(model, [p], layers, batch_size=1, width_multiple=1)[0]
                      for p in prompts])
    np.testing.assert_allclose(states, alone, atol=1e-5, rtol=1e-5)


def test_weighted_auroc_is_sklearns_on_repeated_examples(probes):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    s = np.round(rng.normal(size=30), 1)  # ties
    y = np.arange(30) % 3 == 0
    w = rng.integers(0, 4, (3, 30)).astype(float)
    w[:, [0, 1]] = 1  # both classes present
    got = probes.weighted_auroc(s[y], s[~y], w[:, y], w[:, ~y])
    for r in range(3):
        want = roc_auc_score(np.repeat(y, w[r].astype(int)), np.repeat(s, w[r].astype(int)))
        assert got[r] == pytest.approx(want, abs=1e-12)
    reps = probes.bootstrap_auroc(y, s, 200, seed=3)
    assert reps.shape == (200,) and np.array_equal(reps, probes.bootstrap_auroc(y, s, 200, seed=3))
    assert abs(np.mean(reps) - roc_auc_score(y, s)) < 0.05


def _synthetic(seed, n=240, d=20, shift=4.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    bench = np.array(["a", "b", "c"])[np.arange(n) // 2 % 3]
    x = rng.normal(size=(n, 2, d))
    x[:, :, 0] += shift * y[:, None]  # one direction separates the classes, at both "layers"
    return x, y, bench


def test_probe_pipeline_separable_and_shuffled(probes):
    x, y, bench = _synthetic(0)
    x1 = x + np.random.default_rng(5).normal(scale=0.1, size=x.shape)
    res = probes.evaluate_probes({"M0": x, "M1": x1}, y, bench, (4, 8), seed=0, resamples=200)
    assert res["split"] == dict(n_train=120, n_test=120)
    for layer in ("4", "8"):
        for key in ("M0->M0", "M1->M1", "M0->M1"):
            m = res["layers"][layer][key]
            assert m["split"]["auroc"] > 0.97 and m["split"]["n"] == 120 and m["split"]["n_unanswerable"] == 60
            lo, hi = m["split"]["ci"]
            assert lo <= m["split"]["auroc"] <= hi
            assert m["lobo"]["mean"] > 0.97 and set(m["lobo"]["per_benchmark"]) == {"a", "b", "c"}
            assert m["lobo"]["ci"][0] <= m["lobo"]["mean"] <= m["lobo"]["ci"][1]
    # Seeded: the same inputs give the same numbers.
    again = probes.evaluate_probes({"M0": x, "M1": x1}, y, bench, (4, 8), seed=0, resamples=200)
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)
    # Shuffled labels: nothing to find (more examples, so that chance stays near 0.5).
    x, y, bench = _synthetic(1, n=1200)
    shuffled = np.random.default_rng(7).permutation(y)
    res = probes.evaluate_probes({"M0": x, "M1": x}, shuffled, bench, (4, 8), seed=0, resamples=200, lobo=False)
    for layer in ("4", "8"):
        m = res["layers"][layer]["M0->M0"]
        assert abs(m["split"]["auroc"] - 0.5) < 0.06 and "lobo" not in m
        assert m["split"]["ci"][0] < 0.53 and m["split"]["ci"][1] > 0.47


def _fake_data(root: Path, n: int = 40) -> Path:
    (root / "kuq").mkdir(parents=True)
    with open(root / "kuq" / "knowns_unknowns.jsonl", "w") as f:
        for i in range(n):
            unknown = i % 2 == 1
            q = f"What will the weather be on Mars in year {3000 + i}?" if unknown else f"What is {i} plus {i}?"
            f.write(json.dumps(dict(question=q, answer=[] if unknown else [str(2 * i)], unknown=unknown)) + "\n")
    (root / "selfaware").mkdir()
    rows = [dict(question=f"Why do people dream about number {i}?" if i % 2 else f"Who wrote book number {i}?",
                 answerable=not i % 2, answer=None if i % 2 else [f"author {i}"]) for i in range(n)]
    (root / "selfaware" / "SelfAware.json").write_text(json.dumps(dict(example=rows)))
    return root


def test_main_end_to_end_on_a_tiny_chat_model(probes, tmp_path):
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = tiny.hf_model("llama", vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tiny.save_hf(model, tmp_path / "tiny_chat")
    tok.save_pretrained(path)
    data = _fake_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--model", str(path), "--model", str(path), "--benchmarks", "kuq,selfaware", "--data-dir", str(data),
            "--limit", "12", "--layers", "1,3", "--bootstrap", "50", "--batch-size", "4", "--out-dir", str(out)]
    assert probes.main(argv) == 0
    doc = json.loads((out / "probes.json").read_text())
    assert doc["n"] == 24 and doc["n_unanswerable"] == 12 and doc["n_per_benchmark"] == dict(kuq=12, selfaware=12)
    assert doc["layers"] == [1, 3] and doc["num_layers"] == 3 and doc["seed"] == 0 and doc["resamples"] == 50
    assert doc["command"].startswith("python experiments/probes.py --model ")
    for layer in ("1", "3"):
        r = doc["results"]["layers"][layer]
        # M1 is M0 here: the transfer probe is the M0 probe on the same features.
        assert r["M0->M1"]["split"] == r["M0->M0"]["split"] == r["M1->M1"]["split"]
        assert 0 <= r["M0->M0"]["split"]["auroc"] <= 1 and r["M0->M0"]["split"]["n"] == 12
        assert set(r["M0->M1"]["lobo"]["per_benchmark"]) == {"kuq", "selfaware"}
    assert 0 <= doc["text_baseline"]["auroc"] <= 1
    table = (out / "probes.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table and "M0->M1 split" in table and "text (TF-IDF)" in table
    assert not list(out.glob("*tmp*"))  # written through temp files, renamed
