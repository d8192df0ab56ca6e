"""`hcnr demo`: its table from metrics, and its checks before any work. (The whole demo runs in CI's
clean-environment smoke, `scripts/smoke_first_run.sh`, as `hcnr demo --smoke`.)"""

from __future__ import annotations

import math

import pytest

from hcnr_jax import demo
from hcnr_jax.cli import main as cli_main
from hcnr_jax.errors import HcnrError


def metrics(f1_kuq, f1_sa, rf_kuq, rf_sa, acc, ll=-1.5):
    return {"kuq": {"f1": f1_kuq, "rf_delta": rf_kuq}, "selfaware": {"f1": f1_sa, "rf_delta": rf_sa},
            "hotpotqa": {"containment": acc, "gold_loglik": ll}}


def test_summary_row_averages_the_honesty_sets():
    row = demo.summarise(metrics(0.6, 0.4, 0.5, 0.1, 0.12))
    assert row == pytest.approx({"f1_kuq": 0.6, "f1_selfaware": 0.4, "avg_f1": 0.5, "avg_rf_delta": 0.3,
                                 "hotpotqa_acc": 0.12, "hotpotqa_gold_loglik": -1.5})
    # A benchmark whose F1 is undefined (no refusal at all) does not hide the other one.
    assert demo.summarise(metrics(math.nan, 0.4, 0.0, 0.2, 0.1))["avg_f1"] == pytest.approx(0.4)


def test_markdown_table_has_one_row_per_model():
    rows = {tag: {**demo.summarise(metrics(0.5, 0.5, 0.2, 0.2, 0.1)), "time_s": 12.0} for tag in ("M0", "M1", "M1+HCNR")}
    table = demo.markdown(rows, demo.DemoSettings(limit=50))
    lines = [ln for ln in table.splitlines() if ln.startswith("| M")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["M0", "M1", "M1+HCNR"]
    assert "| 50.0 | 50.0 | 50.0 | 20.0 | 10.0 | -1.500 | 12 |" in lines[0] and "50 evaluation-split" in table


def test_merge_row_is_chosen_on_the_shipped_development_samples(tmp_path):
    """The demo's merge baseline: alpha chosen by the rule on the shipped development files (never
    evaluation rows), and the merged model is M0 + alpha (M1 - M0)."""
    import json

    import jax
    import numpy as np
    import tiny
    from test_repair import fine_tune
    from transformers import AutoTokenizer

    import hcnr_jax
    from hcnr_jax.data.benchmarks import BENCHMARKS, load_benchmark, normalise
    from hcnr_jax.embedded import calibration_file, smollm2_gguf
    from hcnr_jax.repair.choose import merge

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kw = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    paths = []
    for name, model in (("m0", tiny.hf_model("llama", **kw)), ("m1", fine_tune(tiny.hf_model("llama", **kw)))):
        paths.append(tiny.save_hf(model, tmp_path / name))
        tok.save_pretrained(paths[-1])
    m0, m1 = (hcnr_jax.load_pretrained(p) for p in paths)
    choice, merged = demo.choose_merge(m0, m1)
    assert choice["chosen"] in demo.MERGE_ALPHAS and len(choice["candidates"]) == len(demo.MERGE_ALPHAS)
    want = merge(m0.params, m1.params, choice["chosen"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(merged.params),
                                                     jax.tree_util.tree_leaves(want), strict=True))
    # --smoke scores the first SMOKE_DEV samples of each file: both kinds of question are among them.
    small, _ = demo.choose_merge(m0, m1, demo.SMOKE_DEV)
    assert len(small["candidates"]) == len(demo.MERGE_ALPHAS)
    assert small["base"] != choice["base"]  # scored on fewer samples than the full files
    # The development files hold development rows only.
    for kind, benches in (("dev_honesty", ("kuq", "selfaware")), ("dev_task", ("hotpotqa",))):
        lines = calibration_file(kind).read_text().splitlines()
        prompts = {normalise(json.loads(line)["prompt"]) for line in lines}
        sides = {normalise(r["question"]): r["split"] for b in benches for r in load_benchmark(b)}
        # (KUQ and SelfAware share a few questions: one may stand in both halves of the honesty file)
        assert len(lines) == 64 and len(prompts) >= 60 and {sides[p] for p in prompts} == {"development"}, kind
    assert all(b in BENCHMARKS for b in ("kuq", "selfaware", "hotpotqa"))


def test_bad_flags_and_existing_output_fail_before_any_work(tmp_path, capsys):
    assert cli_main(["demo", "--limit", "0", "--out", str(tmp_path / "d")]) == 2
    assert "--limit=0" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert cli_main(["demo", "--out", str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_shipped_adapter_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "HONEST_ADAPTER", tmp_path / "honest")
    with pytest.raises(HcnrError, match="honest: the shipped adapter is missing"):
        demo.embedded_sources()
