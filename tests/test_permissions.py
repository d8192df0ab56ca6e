"""Files and folders we write get the user's umask (0644/0755 under the usual 022), not the
0600/0700 of tempfile's temporary names they are written under."""

from __future__ import annotations

import os
import stat

import pytest
import tiny

from hcnr_jax.io import atomic_output_dir, atomic_write_text


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_helpers_follow_umask(umask, tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
    atomic_write_text(tmp_path / "f.json", "{}")
    assert _mode(tmp_path / "out") == 0o777 & ~umask
    assert _mode(tmp_path / "out" / "a.txt") == _mode(tmp_path / "f.json") == 0o666 & ~umask
    with atomic_output_dir(tmp_path / "out", overwrite=True):  # a replaced output too
        pass
    assert _mode(tmp_path / "out") == 0o777 & ~umask


def test_saved_model_follows_umask(umask, tmp_path):
    from hcnr_jax.pretrained import load_pretrained, save_pretrained

    src = tiny.save_hf(tiny.hf_model("qwen3", num_hidden_layers=1), tmp_path / "src")
    out = save_pretrained(load_pretrained(src), tmp_path / "out")
    assert _mode(out) == 0o777 & ~umask
    files = list(out.iterdir())
    assert {f.name for f in files} >= {"config.json", "model.safetensors"}
    assert {f.name: _mode(f) for f in files} == {f.name: 0o666 & ~umask for f in files}


def test_command_outputs_follow_umask(umask, tmp_path, tiny_dirs):
    """Files the commands write beside or inside their outputs (calib's JSONL, merge's report
    inside its model folder) get the umask too."""
    from hcnr_jax.cli import main

    calib = tmp_path / "c.jsonl"
    assert main(["calib", "--kind", "honesty", "-n", "2", "--out", str(calib)]) == 0
    model = tiny_dirs["qwen2"][1]
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(model), "--finetuned", str(model), "--alpha", "0.5", "--out", str(merged)]) == 0
    assert {_mode(calib), _mode(merged / "merge_report.json"), _mode(merged / "config.json")} == {0o666 & ~umask}
    assert _mode(merged) == 0o777 & ~umask
