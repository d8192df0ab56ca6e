"""experiments/gpu_check.py end to end on a tiny config (the CPU mode of the accelerator check)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "experiments" / "gpu_check.py"


def _run_sh(tmp_path, *args):
    """experiments/gpu_check.sh as the device would run it, minus the install, with this interpreter
    as its python3."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # A wrapper, not a symlink: a virtual environment's python finds its packages by the path it was
    # started as.
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), HCNR_GPU_CHECK_INSTALL="0",
               PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT.with_suffix(".sh")), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_gpu_check_tiny(tmp_path):
    """The prepared device command end to end on a tiny config (the CPU mode of the accelerator check)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    proc = _run_sh(tmp_path, "--tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "backend cpu" in (out / "preflight.txt").read_text()
    assert "OK in" in (out / "gpu_check.log").read_text()
    doc = json.loads((out / "gpu_check.json").read_text())
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
    fisher = rows["repair:fisher_peak"]
    assert fisher["ok"] is not False and fisher["predicted_mib"] > fisher["resident_model_mib"] > 0
    assert rows["repair:mfu:fisher"]["tflops_per_s"] > 0
    for name in ("stats:fisher_input:pallas", "stats:fisher_output:pallas", "stats:hessian:pallas",
                 "kernels_at_scale:fisher", "kernels_at_scale:hessian"):
        assert rows[name]["ok"] is True and rows[name]["interpret"] is True, rows[name]
    assert gpu_check.verified_hint(doc) is None  # interpreted, tiny: nothing to verify


def test_verified_hint_needs_every_kernel_row_compiled_and_passing():
    spec = importlib.util.spec_from_file_location("gpu_check_hint", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rows = [{"check": "kernel:gram:50x37", "ok": True, "interpret": False},
            {"check": "stats:hessian:pallas", "ok": True, "interpret": False},
            {"check": "stats:hessian", "ok": True}, {"check": "repair", "ok": False}]
    doc = {"tiny": False, "backend": "gpu", "device": "NVIDIA H200", "rows": rows}
    assert "'gpu'" in gpu_check.verified_hint(doc)
    for change in ({"ok": False}, {"ok": None}, {"interpret": True}):
        bad = [dict(rows[0], **change), *rows[1:]]
        assert gpu_check.verified_hint(dict(doc, rows=bad)) is None, change
    assert gpu_check.verified_hint(dict(doc, tiny=True)) is None


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


def test_sh_stops_before_the_8b_rows_without_a_gpu(tmp_path):
    proc = _run_sh(tmp_path)
    assert proc.returncode == 4
    assert "no GPU visible to jax" in proc.stdout and "preflight failed" in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()
