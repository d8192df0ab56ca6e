"""The README's usage runs as written: every `hcnr` line of its "Use" block and its Python snippet,
on a tiny Llama that carries SmolLM2's tokenizer (and the embedded GGUF where the line names it),
so the README cannot drift from the code again.

Placeholders (SRC, path/to/hf_model, DIR, ...) are replaced by the test's files; every other word
is kept. Only limits are added, per command, so that the whole README runs in a few minutes on two
CPU cores (the line `hcnr demo` runs in CI's smoke as `hcnr demo --smoke`; here it is parsed).
That run takes minutes, so it is marked `slow` and CI runs it as its own step (.ci/run); the default
suite parses every line with the real parser and compiles the snippet.
Lines run in README order in one working folder, so a later line reads what an earlier one wrote.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Added after each command's own flags (argparse: the last value wins): small enough to be quick.
LIMITS = {
    "stats": ["--limit", "4", "--max-length", "160", "--no-progress"],
    "repair": ["--limit", "4", "--max-length", "160", "--no-plots"],
    "merge": [],
    "eval": ["--limit", "2", "--max-new-tokens", "4", "--bootstrap", "10"],
    "compare": ["--limit", "2", "--max-new-tokens", "4", "--bootstrap", "10"],
    "honesty-data": ["-n", "4", "--samples", "2", "--max-new-tokens", "4"],
    "train": ["--limit", "4", "--max-length", "160", "--batch-size", "2"],
    "calib": ["-n", "8"],
}


def readme_commands() -> list[str]:
    """Each command of the README's "Use" block: continuation lines joined, comments removed."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n## Use\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for raw in block.splitlines():
        line = re.sub(r"\s+#.*$", "", raw) if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(pending.strip())
            pending = ""
    return commands


def readme_python() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_block_is_plain_commands():
    """Every line is a plain command (no [optional] or a|b alternatives a shell would not run)."""
    commands = readme_commands()
    assert len(commands) >= 20 and all(c.startswith("hcnr ") for c in commands)
    for c in commands:
        assert not re.search(r"[\[\]|]", c), c


def _fixture(root: Path) -> dict[str, str]:
    """The files the placeholders stand for; returns placeholder -> path."""
    import tiny
    from test_repair import fine_tune

    from hcnr_jax.conversion.gguf import load_gguf
    from hcnr_jax.conversion.lora import write_adapter
    from hcnr_jax.embedded import smollm2_gguf

    gguf = smollm2_gguf()
    tok = load_gguf(gguf, dtype="float16").tokenizer
    kw = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    paths = {}
    for name, model in (("base", tiny.hf_model("llama", **kw)), ("sft", fine_tune(tiny.hf_model("llama", **kw)))):
        paths[name] = tiny.save_hf(model, root / "models" / name)
        tok.save_pretrained(paths[name])
    out_dim, in_dim = model.model.layers[0].self_attn.q_proj.weight.shape
    rng = np.random.default_rng(0)
    adapter = write_adapter(root / "models" / "lora", {
        "model.layers.0.self_attn.q_proj": (rng.normal(size=(2, in_dim)).astype(np.float32) * 0.01,
                                            rng.normal(size=(out_dim, 2)).astype(np.float32) * 0.01)}, r=2, alpha=4)
    data = root / "data"
    for bench, folder, stem in (("falseqa", "falseqa/unknownbench_version", "FalseQA"), ("nec", "nec", "NEC"),
                                ("refunq", "refunq", "RefuNQ")):
        (data / folder).mkdir(parents=True)
        for kind in ("answerable", "unanswerable"):
            rows = [{"prompt": f"{bench} {kind} question {i}?", "label": ["yes"]} for i in range(30)]
            (data / folder / f"{stem}_{kind}.json").write_text(json.dumps(rows))
    (data / "triviaqa").mkdir()
    (data / "triviaqa" / "triviaqa_sm_sub.jsonl").write_text("".join(
        json.dumps({"context": f"Question: Which city is number {i}?\nAnswer:", "answer": "Paris", "aliases": []})
        + "\n" for i in range(40)))
    work = root / "work"
    work.mkdir()
    (work / "samples.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": "I don't know."})
                                                + "\n" for i in range(4)))
    return {"path/to/hf_model": str(paths["base"]), "path/to/base": str(paths["base"]),
            "path/to/lora_adapter": str(adapter), "SmolLM2-135M-Instruct.Q4_1.gguf": str(gguf),
            "SRC": str(paths["base"]), "BASE_SRC": str(paths["base"]), "SFT_SRC": str(paths["sft"]),
            "config.json": str(paths["base"] / "config.json"), "DIR": str(data),
            "base_dir": str(paths["base"]), "sft_dir": str(paths["sft"])}


def _argv(command: str, subst: dict[str, str]) -> list[str]:
    words = shlex.split(command)[1:]  # without "hcnr"
    out = ["+".join(subst.get(part, part) for part in w.split("+")) if "+" in w else subst.get(w, w) for w in words]
    return out + LIMITS.get(out[0], [])


# Run in fresh processes: the `--mesh data=2,model=4` line and the Python snippet need 8 devices.
DRIVER = r"""
import json, sys, time, traceback
from hcnr_jax.cli import main
for argv in json.loads(sys.argv[1]):
    t0 = time.perf_counter()
    rc = main(argv)
    print(f"README LINE rc={rc} {time.perf_counter() - t0:.1f}s: hcnr {' '.join(argv)}", flush=True)
    if rc != 0:
        sys.exit(f"failed: hcnr {' '.join(argv)}")
"""


def _run(code: str, args: list[str], cwd: Path, devices: int = 1) -> None:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.pop("HCNR_DATA_DIR", None)  # only the shipped subsets and DIR: what a reader of the README has
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-5000:])


def _snippet(subst: dict[str, str]) -> str:
    """The README's Python, placeholders replaced, the repair given a small limit, results checked."""
    code = readme_python()
    for key in ("path/to/hf_model", "base_dir", "sft_dir"):
        code = code.replace(f'"{key}"', repr(subst[key]))
    code = code.replace("finetuned=" + repr(subst["sft_dir"]) + ")",
                        "finetuned=" + repr(subst["sft_dir"]) + ", limit=4, max_length=160, progress=False)")
    assert "limit=4" in code, "the README's repair call changed: update this test's limit"
    return code + "\nassert logits.shape[:2] == batch['input_ids'].shape and len(answers) == 1 and result.report\n"


def test_readme_lines_parse(tmp_path):
    """Every README command parses with the real parser as written, and its Python compiles and names
    only what hcnr_jax exports (fast; the slow test below runs them all)."""
    import hcnr_jax
    from hcnr_jax.cli import build_parser

    subst = {k: str(tmp_path / k.replace("/", "_")) for k in ("path/to/hf_model", "base_dir", "sft_dir")}
    for command in readme_commands():
        args = build_parser().parse_args(_argv(command, {}))
        assert args.func is not None, command
    code = _snippet(subst)
    compile(code, "README.md", "exec")
    used = set(re.findall(r"hcnr_jax\.(\w+)", code))
    assert used <= set(hcnr_jax.__all__), used - set(hcnr_jax.__all__)


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path):
    """Minutes: 414 s on 2 shared CPU cores, 880 s with the compare, --task-data and --dtype lines and
    other test runs on the cores. CI runs it (.ci/run); here `pytest -m slow tests/test_readme.py`."""
    subst = _fixture(tmp_path)
    commands = readme_commands()
    one_device = [_argv(c, subst) for c in commands if "--mesh data=" not in c and not c.startswith("hcnr demo")]
    eight = [_argv(c, subst) for c in commands if "--mesh data=" in c]
    demo = [c for c in commands if c.startswith("hcnr demo")]
    assert len(one_device) + len(eight) + len(demo) == len(commands) and eight and demo
    work = tmp_path / "work"
    _run(DRIVER, [json.dumps(one_device)], work)
    # The mesh line and the Python snippet (its mesh= load) in one process with 8 devices.
    _run(DRIVER + "\n" + _snippet(subst), [json.dumps(eight)], work, devices=8)
    assert (work / "saved_dir" / "config.json").is_file()
    # The demo line parses as written (it runs in scripts/smoke_first_run.sh as `hcnr demo --smoke`).
    from hcnr_jax.cli import build_parser

    assert build_parser().parse_args(shlex.split(demo[0])[1:]).command == "demo"
