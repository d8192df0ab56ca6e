"""experiments/gpu_check.py end to end on a tiny config (the CPU mode of the accelerator check)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "experiments" / "gpu_check.py"


def test_gpu_check_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and doc["failed"] == [] and doc["tiny"]
    rows = {r["check"]: r for r in doc["rows"]}
    for name in ("kernel:fisher_norms:input:2x13x40x24", "kernel:gram:50x37", "stats:fisher_input",
                 "stats:fisher_output", "stats:hessian", "repair"):
        assert rows[name]["ok"] is True, rows[name]
        if name != "repair":
            assert rows[name]["value"] <= rows[name]["limit"]
    assert set(rows["repair"]["stage_seconds"]) == {"load", "fisher", "select", "hessian", "solve"}
    assert rows["generate:jax"]["value"] > 0 and "skipped" in rows["generate:transformers"]
    assert rows["repair:plan_vs_measured"]["predicted_mib"] > 0
    assert rows["repair:mfu:fisher"]["tflops_per_s"] > 0


def test_failures_give_a_nonzero_exit(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_fail", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def broken(rows, tiny):
        with rows.check("kernel:broken") as row:
            row.update(value=1.0, limit=2e-5, ok=False)

    monkeypatch.setattr(gpu_check, "check_kernels", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--tiny", "--skip", "stats,repair,generate", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["failed"] == ["kernel:broken"]
