"""What `hcnr repair` writes and says: the dtype of the written weights (--dtype, and the default
for each kind of fine-tuned input), the closing lines, and a repair stopped by Ctrl-C that resumes
from the user cache without any flag."""

from __future__ import annotations

import json
import re
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from test_repair import _cli, pair_dirs  # noqa: F401  (the fixture)

from hcnr_jax.repair.output import output_dtype, stored_dtype
from hcnr_jax.user_cache import user_cache_dir

SIZE = r"[0-9.]+ (B|kB|MB|GB)"  # the written folder's size, as `hcnr_jax.user_cache.human` prints it


def _safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes in the safetensors headers under ``folder`` (read without loading any tensor)."""
    out = set()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


def _runs() -> list[str]:
    runs = user_cache_dir() / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.exists() else []


def test_repair_dtype_flag_and_closing_lines(pair_dirs, tmp_path, capsys):  # noqa: F811
    rc, out = _cli(pair_dirs, tmp_path, "--dtype", "bfloat16", "--no-plots", "--r-cw", "0.5")
    text = capsys.readouterr().out
    assert rc == 0, text
    assert _safetensors_dtypes(out) == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert "bfloat16" in (config.get("torch_dtype"), config.get("dtype"))
    rep = json.loads((out / "hcnr_report.json").read_text())
    assert rep["output"] == {"dtype": "bfloat16", "dtype_from": "--dtype"}
    s = rep["summary"]
    neurons = sum(r["restored_neurons"] for r in rep["layers"])
    lines = text.strip().splitlines()[-4:]
    assert lines[0].startswith(f"Restored {neurons:,} neurons ({s['restored_params']:,} parameters")
    assert f"in {s['layers_kept']} of {s['layers']} layers" in lines[0] and "solver exact" in lines[0]
    assert re.match(rf"Wrote the repaired model to {re.escape(str(out))}: bfloat16, {SIZE} \(--dtype\), in ", lines[1])
    assert lines[3].split() == ["hcnr", "compare", "--model", str(pair_dirs["llama"][1]), "--model", str(out),
                                "--out", f"{out}_compare"]
    assert not [r for r in _runs() if r.startswith("repair-")]  # the statistics went with the run


def test_default_dtype_is_the_finetuned_inputs(pair_dirs, tmp_path, capsys):  # noqa: F811
    rc, out = _cli(pair_dirs, tmp_path, "--no-plots", "--r-cw", "0.5", "--no-cache")
    assert rc == 0
    assert _safetensors_dtypes(out) == {"F32"}
    text = capsys.readouterr().out
    assert re.search(rf": float32, {SIZE} \(the fine-tuned input's dtype\)", text), text


def _gguf_with(path: Path, kind: str) -> Path:
    """A GGUF holding one 2-D tensor of GGML type ``kind`` (enough for the header-only dtype rule)."""
    import gguf
    from gguf.quants import quantize

    t = np.linspace(-1, 1, 32 * 64, dtype=np.float32).reshape(32, 64)
    qtype = gguf.GGMLQuantizationType[kind]
    w = gguf.GGUFWriter(str(path), "llama")
    if kind == "F32":
        w.add_tensor("blk.0.ffn_down.weight", t)
    else:
        w.add_tensor("blk.0.ffn_down.weight", quantize(t, qtype), raw_dtype=qtype)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # 1-D tensors stay F32 in every GGUF
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("kind", "expected"), [("F32", "float32"), ("F16", "float16"), ("Q8_0", "bfloat16"),
                                                ("Q4_1", "bfloat16")])
def test_default_dtype_of_a_gguf(tmp_path, kind, expected):
    path = _gguf_with(tmp_path / f"m.{kind}.gguf", kind)
    dtype, why = output_dtype(None, str(path))
    assert dtype == expected
    if expected == "bfloat16":
        assert stored_dtype(str(path))[0] is None and f"quantised GGUF: {kind}," in why and "--dtype" in why
    assert output_dtype("float16", str(path)) == ("float16", "--dtype")
    assert output_dtype(None, f"{path}+{tmp_path}")[0] == expected  # a LoRA adapter on it: the base's type


def test_ctrl_c_in_repair_resumes_from_the_user_cache_without_flags(pair_dirs, tmp_path, capsys, caplog,  # noqa: F811
                                                                     monkeypatch):
    """The first run is stopped during the honesty Fisher; the same command resumes it (its first
    batches are not recomputed) and the run folder goes once the model is written."""
    import logging

    from hcnr_jax.stats import engine

    real, calls = engine.step_and_shardings, []

    def patched(*a, **k):
        step, *rest = real(*a, **k)

        def step_then_ctrl_c(*args):
            result = step(*args)
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)
            return result

        return (step_then_ctrl_c, *rest)

    monkeypatch.setattr(engine, "step_and_shardings", patched)
    flags = ("--no-plots", "--r-cw", "0.5", "--batch-size", "2")
    rc, out = _cli(pair_dirs, tmp_path, *flags)
    err = capsys.readouterr().err
    assert rc == 130 and "progress saved in" in err and str(user_cache_dir() / "runs") in err, err
    assert not out.exists() and len([r for r in _runs() if r.startswith("repair-")]) == 1
    monkeypatch.setattr(engine, "step_and_shardings", real)
    with caplog.at_level(logging.INFO):
        rc, out = _cli(pair_dirs, tmp_path, *flags)
    assert rc == 0 and out.is_dir()
    assert "resumed from" in caplog.text and not [r for r in _runs() if r.startswith("repair-")]


def test_merge_dtype_flag(pair_dirs, tmp_path, capsys):  # noqa: F811
    """hcnr merge --dtype float16: the merge in float32, then cast; the report and the last lines say so."""
    import hcnr_jax
    from hcnr_jax.cli import main
    from hcnr_jax.params import flatten
    from hcnr_jax.repair.choose import merge

    base, ft = pair_dirs["llama"]
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--finetuned", str(ft), "--alpha", "0.5", "--dtype", "float16",
                 "--out", str(out)]) == 0
    assert _safetensors_dtypes(out) == {"F16"}
    rep = json.loads((out / "merge_report.json").read_text())
    assert (rep["dtype"], rep["dtype_from"]) == ("float16", "--dtype")
    got = flatten(hcnr_jax.load_pretrained(out).params)
    want = flatten(merge(hcnr_jax.load_pretrained(base).params, hcnr_jax.load_pretrained(ft).params, 0.5))
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k]).astype(np.float16)) for k in want)
    text = capsys.readouterr().out
    assert re.search(rf"; float16, {SIZE} \(--dtype\)", text) and f"hcnr compare --model {ft} --model {out}" in text
