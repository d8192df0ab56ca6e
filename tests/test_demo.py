"""`hcnr demo`: its table from metrics, and its checks before any work. (The whole demo runs in CI's
clean-environment smoke, `scripts/smoke_first_run.sh`, as `hcnr demo --smoke`.)"""

from __future__ import annotations

import math

import pytest

from hcnr_jax import demo
from hcnr_jax.cli import main as cli_main
from hcnr_jax.errors import HcnrError


def metrics(f1_kuq, f1_sa, rf_kuq, rf_sa, acc):
    return {"kuq": {"f1": f1_kuq, "rf_delta": rf_kuq}, "selfaware": {"f1": f1_sa, "rf_delta": rf_sa},
            "hotpotqa": {"containment": acc}}


def test_summary_row_averages_the_honesty_sets():
    row = demo.summarise(metrics(0.6, 0.4, 0.5, 0.1, 0.12))
    assert row == pytest.approx({"f1_kuq": 0.6, "f1_selfaware": 0.4, "avg_f1": 0.5, "avg_rf_delta": 0.3,
                                 "hotpotqa_acc": 0.12})
    # A benchmark whose F1 is undefined (no refusal at all) does not hide the other one.
    assert demo.summarise(metrics(math.nan, 0.4, 0.0, 0.2, 0.1))["avg_f1"] == pytest.approx(0.4)


def test_markdown_table_has_one_row_per_model():
    rows = {tag: {**demo.summarise(metrics(0.5, 0.5, 0.2, 0.2, 0.1)), "time_s": 12.0} for tag in ("M0", "M1", "M1+HCNR")}
    table = demo.markdown(rows, demo.DemoSettings(limit=50))
    lines = [ln for ln in table.splitlines() if ln.startswith("| M")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["M0", "M1", "M1+HCNR"]
    assert "| 50.0 | 50.0 | 50.0 | 20.0 | 10.0 | 12 |" in lines[0] and "50 evaluation-split" in table


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
