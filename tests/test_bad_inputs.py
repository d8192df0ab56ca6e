"""The bad-input table (docs/errors.md): every `hcnr` command, given bad input, exits with status 2
and one line `hcnr COMMAND: error: ...` naming the file, tensor, field or flag at fault, with no
traceback; nothing is written (no output, no temporary leftovers) and every input file keeps its
bytes.

Each case builds its bad input in a fresh workspace (`Workspace`) and returns the command line and
the words its message must contain. The checks that make a case fail come before any model work
(compilation, statistics, generation), so the whole table runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from hcnr_jax.cli import main


@dataclass
class Workspace:
    root: Path
    m: Path  # tiny qwen2 (max_position_embeddings=256), no tokenizer
    data: Path  # pre-tokenized samples that fit the model
    out: Path  # where the command is told to write (absent unless a case creates it)
    sharded: Path  # tiny llama in shards, with model.safetensors.index.json

    def edit_weights(self, fn: Callable[[dict], None]) -> Path:
        f = self.m / "model.safetensors"
        tensors = load_file(str(f))
        fn(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})
        return f

    def edit_config(self, **changes: object) -> None:
        cfg = json.loads((self.m / "config.json").read_text())
        cfg.update(changes)
        (self.m / "config.json").write_text(json.dumps(cfg))

    def edit_index(self, fn: Callable[[dict], None]) -> Path:
        f = self.sharded / "model.safetensors.index.json"
        index = json.loads(f.read_text())
        fn(index["weight_map"])
        f.write_text(json.dumps(index))
        return f

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def fake_model(self, name: str) -> Path:
        """A directory standing for a model that is never loaded (the failing check comes first)."""
        d = self.root / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text("{}")
        return d


CASES: dict[str, Callable[[Workspace], tuple[list[str], list[str]]]] = {}


def case(name: str):
    def register(fn):
        assert name not in CASES
        CASES[name] = fn
        return fn
    return register


def _convert(w: Workspace, src: Path | str | None = None, *flags: str) -> list[str]:
    return ["convert", str(src or w.m), str(w.out), *flags]


def _stats(w: Workspace, *flags: str, data: Path | None = None, kind: str = "fisher") -> list[str]:
    return ["stats", "--model", str(w.m), "--data", str(data or w.data), "--kind", kind, "--out", str(w.out),
            "--no-progress", *flags]


def _repair(w: Workspace, *flags: str, base: object = None, ft: object = None, out: object = None) -> list[str]:
    return ["repair", "--base", str(base or w.m), "--finetuned", str(ft or w.m), "--out", str(out or w.out),
            "--no-plots", *flags]


def _eval(w: Workspace, *flags: str, model: object = None, out: object = None) -> list[str]:
    return ["eval", "--model", str(model or w.m), "--benchmarks", "kuq", "--out", str(out or w.out), *flags]


def _train(w: Workspace, *flags: str, data: Path | None = None) -> list[str]:
    return ["train", "--model", str(w.m), "--data", str(data or w.data), "--out", str(w.out), *flags]


# --- convert: models that cannot be read --------------------------------------------------------------

@case("convert/missing-tensor")
def _(w):
    w.edit_weights(lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    return _convert(w), [str(w.m), "missing tensor model.layers.1.self_attn.k_proj.bias"]


@case("convert/wrong-shape")
def _(w):
    name = "model.layers.0.mlp.down_proj.weight"

    def shrink(t):
        t[name] = t[name][:, :-1].copy()

    f = w.edit_weights(shrink)
    return _convert(w), [str(f), name, "(48, 71)", "(48, 72)"]


@case("convert/config-does-not-match-weights")
def _(w):
    w.edit_config(num_hidden_layers=2, layer_types=None)
    return _convert(w), ["model.safetensors", "unexpected tensor model.layers.2", "config.json"]


@case("convert/corrupt-safetensors-header")
def _(w):
    f = w.m / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    f.write_bytes(bytes(data))
    return _convert(w), [str(f), "cannot read safetensors file"]


@case("convert/truncated-safetensors")
def _(w):
    f = w.m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return _convert(w), [str(f)]


@case("convert/unsupported-architecture")
def _(w):
    w.edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    return _convert(w), ["config.json", "unsupported architecture model_type='gpt2'"]


@case("convert/config-not-json")
def _(w):
    (w.m / "config.json").write_text('{"model_type": "qwen2",')
    return _convert(w), [str(w.m / "config.json"), "invalid JSON"]


@case("convert/not-a-model")
def _(w):
    return _convert(w, w.root / "no_such_model"), ["no_such_model", "not a model directory"]


@case("convert/shard-missing")
def _(w):
    victim = sorted(w.sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    return _convert(w, w.sharded), ["model.safetensors.index.json", f"lists shard {victim.name}"]


@case("convert/shard-index-entry-above-the-model")
def _(w):
    (w.root / "x.safetensors").write_bytes(sorted(w.sharded.glob("model-*.safetensors"))[0].read_bytes())
    index = w.edit_index(lambda m: m.update({"model.norm.weight": "../x.safetensors"}))
    return _convert(w, w.sharded), [str(index), "'model.norm.weight'", "'../x.safetensors'", "outside the model"]


@case("convert/shard-index-entry-absolute")
def _(w):
    target = str(w.root / "x.safetensors")
    (w.root / "x.safetensors").write_bytes(sorted(w.sharded.glob("model-*.safetensors"))[0].read_bytes())
    index = w.edit_index(lambda m: m.update({"model.norm.weight": target}))
    return _convert(w, w.sharded), [str(index), repr(target), "outside the model"]


@case("convert/shard-index-not-json")
def _(w):
    index = w.sharded / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')
    return _convert(w, w.sharded), [str(index), "not a valid safetensors index"]


@case("convert/float16-overflow")
def _(w):
    name = "model.layers.1.mlp.up_proj.weight"

    def enlarge(t):
        t[name][3, 5] = 1e5

    f = w.edit_weights(enlarge)
    return _convert(w, None, "--dtype", "float16"), [str(f), name, "casting to float16 overflows", "1e+05"]


@case("convert/nan-weight")
def _(w):
    name = "model.layers.2.self_attn.o_proj.weight"

    def poison(t):
        t[name][0, 1] = float("nan")

    w.edit_weights(poison)
    return _convert(w), [name, "holds 1 NaN or infinite value(s)", "refusing to write"]


@case("convert/existing-output")
def _(w):
    w.out.mkdir()
    (w.out / "keep.txt").write_text("mine")
    return _convert(w), [str(w.out), "already exists"]


# --- stats ---------------------------------------------------------------------------------------------

@case("stats/dedupe-with-fisher")
def _(w):
    return _stats(w, "--dedupe"), ["--dedupe applies to --kind hessian only"]


@case("stats/batch-size-0")
def _(w):
    return _stats(w, "--batch-size", "0"), ["--batch-size must be positive, got 0"]


@case("stats/lock-timeout-negative")
def _(w):
    return _stats(w, "--cache-dir", str(w.root / "cache"), "--lock-timeout", "-1"), ["--lock-timeout", "-1"]


@case("stats/no-cache-and-keep-cache")
def _(w):
    return _stats(w, "--no-cache", "--keep-cache"), ["--no-cache and --keep-cache"]


@case("stats/no-cache-and-cache-dir")
def _(w):
    return _stats(w, "--no-cache", "--cache-dir", str(w.root / "c")), ["--no-cache and --cache-dir"]


@case("stats/max-length-above-positions")
def _(w):
    return _stats(w, "--max-length", "1024"), ["max_length=1024 exceeds max_position_embeddings=256", str(w.m)]


@case("stats/data-not-utf8")
def _(w):
    bad = w.write("latin1.jsonl", b'{"prompt": "caf\xe9", "response": "x"}\n')
    return _stats(w, data=bad), [f"{bad}:1", "not UTF-8"]


@case("stats/loss-mask-length")
def _(w):
    bad = w.write("bad.jsonl", '{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}\n'
                               '{"input_ids": [1, 2], "loss_mask": [0]}\n')
    return _stats(w, data=bad), [f"{bad}:2", "loss_mask"]


@case("stats/model-missing")
def _(w):
    return ["stats", "--model", str(w.root / "nope"), "--data", str(w.data), "--kind", "hessian",
            "--out", str(w.out)], ["nope", "not a model directory"]


# --- repair --------------------------------------------------------------------------------------------

@case("repair/max-length-above-positions")
def _(w):
    return _repair(w, "--max-length", "1024"), ["max_length=1024 exceeds max_position_embeddings=256", str(w.m)]


@case("repair/yaml-max-length-above-positions")
def _(w):
    y = w.write("c.yaml", "max_length: 1024\n")
    return _repair(w, "--config", str(y)), ["max_length=1024 exceeds max_position_embeddings=256"]


@case("repair/yaml-unknown-key")
def _(w):
    y = w.write("c.yaml", "r_iw: 0.3\ncolour: red\n")
    return _repair(w, "--config", str(y)), ["c.yaml", "colour"]


@case("repair/lock-timeout-negative")
def _(w):
    return _repair(w, "--cache-dir", str(w.root / "cache"), "--lock-timeout", "-5"), ["--lock-timeout", "-5"]


@case("repair/honesty-data-missing")
def _(w):
    return _repair(w, "--honesty-data", str(w.root / "hon.jsonl")), ["hon.jsonl", "no such data file"]


@case("repair/choose-without-development-data")
def _(w):
    return _repair(w, "--choose", "r_cw=0.3,0.5"), ["--choose needs --dev-honesty and --dev-task"]


@case("repair/choose-unknown-setting")
def _(w):
    return _repair(w, "--choose", "colour=1,2", "--dev-honesty", str(w.data), "--dev-task", str(w.data)), [
        "--choose 'colour=1,2'", "r_cw, r_iw, damping"]


@case("repair/choose-bad-value")
def _(w):
    return _repair(w, "--choose", "r_cw=0.3,1.7", "--dev-honesty", str(w.data), "--dev-task", str(w.data)), ["r_cw"]


@case("repair/baseline-contradicted")
def _(w):
    return _repair(w, "--baseline", "layers", "--r-iw", "0.5"), ["--baseline layers sets --r-iw 1.0", "--r-iw 0.5"]


def _merge(w: Workspace, *flags: str) -> list[str]:
    return ["merge", "--base", str(w.m), "--finetuned", str(w.m), "--out", str(w.out), *flags]


@case("merge/alpha-out-of-range")
def _(w):
    return _merge(w, "--alpha", "1.5"), ["--alpha 1.5", "[0, 1]"]


@case("merge/alpha-not-a-number")
def _(w):
    return _merge(w, "--alpha", "half"), ["--alpha 'half'", "comma-separated numbers"]


@case("merge/several-alphas-without-development-data")
def _(w):
    return _merge(w, "--alpha", "0.25,0.5"), ["--dev-honesty and --dev-task"]


@case("merge/dev-data-missing")
def _(w):
    return _merge(w, "--alpha", "0.25,0.5", "--dev-honesty", str(w.root / "dev.jsonl"), "--dev-task", str(w.data)), [
        "dev.jsonl", "no such data file"]


@case("merge/output-exists")
def _(w):
    w.out.mkdir()
    return _merge(w, "--alpha", "0.5"), [str(w.out), "--overwrite"]


def _repair_out(w: Workspace, which: str) -> tuple[list[str], list[str]]:
    """--out (with --overwrite, which would replace it) equal to, inside or containing an input."""
    base, ft, adapter = w.fake_model("base"), w.fake_model("ft"), w.fake_model("adapter")
    finetuned, out, victim = {
        "out-is-finetuned": (ft, ft, ft), "out-is-base": (ft, base, base), "inside-base": (ft, base / "repaired", base),
        "contains-inputs": (ft, w.root, base), "inside-adapter": (f"{base}+{adapter}", adapter / "repaired", adapter),
    }[which]
    return (_repair(w, "--overwrite", base=base, ft=finetuned, out=out),
            [f"{out}: the output", str(victim), "contains" if which == "contains-inputs" else "the output"])


for _which in ("out-is-finetuned", "out-is-base", "inside-base", "contains-inputs", "inside-adapter"):
    case(f"repair/{_which}")(lambda w, which=_which: _repair_out(w, which))


# --- eval ----------------------------------------------------------------------------------------------

@case("eval/max-new-tokens-0")
def _(w):
    return _eval(w, "--max-new-tokens", "0"), ["--max-new-tokens must be a positive integer, got 0"]


@case("eval/bootstrap-negative")
def _(w):
    return _eval(w, "--bootstrap", "-1"), ["--bootstrap must be >= 0, got -1"]


@case("eval/unknown-rules")
def _(w):
    return (_eval(w, "--rules", "bogus", model=w.root / "no_model"),
            ["--rules: unknown refusal rules 'bogus'; known: default, selfaware"])


@case("eval/demos-missing")
def _(w):
    return _eval(w, "--demos", str(w.root / "demos.jsonl")), ["--demos", "demos.jsonl"]


@case("eval/demos-not-json")
def _(w):
    demos = w.write("demos.jsonl", '{"prompt": "q", "response": "a"}\n{"prompt": \n')
    return _eval(w, "--demos", str(demos)), ["--demos", f"{demos}:2", "invalid JSON"]


def _eval_out(w: Workspace, which: str) -> tuple[list[str], list[str]]:
    """--out equal to or inside a model it reads."""
    base, adapter = w.fake_model("base"), w.fake_model("adapter")
    model, out, victim = {"same": (base, base, base), "inside": (base, base / "eval", base),
                          "inside-adapter": (f"{base}+{adapter}", adapter / "sub" / "eval", adapter),
                          "inside-reference": (w.fake_model("ft"), base / "eval", base)}[which]
    flags = ("--reference", str(base)) if which == "inside-reference" else ()
    return _eval(w, *flags, model=model, out=out), [f"{out}: the output", str(victim)]


for _which in ("same", "inside", "inside-adapter", "inside-reference"):
    case(f"eval/out-{_which}")(lambda w, which=_which: _eval_out(w, which))


# --- train ---------------------------------------------------------------------------------------------

@case("train/max-length-above-positions")
def _(w):
    return _train(w, "--max-length", "1024"), ["max_length=1024 exceeds max_position_embeddings=256", str(w.m)]


@case("train/data-missing")
def _(w):
    return _train(w, data=w.root / "none.jsonl"), ["none.jsonl", "no such data file"]


@case("train/yaml-non-finite")
def _(w):
    y = w.write("t.yaml", "learning_rate: .nan\n")
    return _train(w, "--config", str(y)), ["t.yaml", "learning_rate"]


@case("train/out-contains-data")
def _(w):
    data = w.write("sub/d.jsonl", w.data.read_text())
    return (["train", "--model", str(w.m), "--data", str(data), "--out", str(data.parent), "--overwrite"],
            [f"{data.parent}: the output contains the --data input", str(data)])


@case("train/bad-mesh")
def _(w):
    return _train(w, "--mesh", "data=2,pipe=2"), ["--mesh 'data=2,pipe=2'"]


@case("repair/mesh-does-not-fit")
def _(w):
    return (["repair", "--base", str(w.m), "--finetuned", str(w.m), "--out", str(w.out), "--mesh", "data=3,model=5"],
            ["--mesh 'data=3,model=5': mesh {'data': 3, 'model': 5} does not fit"])


@case("eval/task-data-missing-field")
def _(w):
    bad = w.root / "task.jsonl"
    bad.write_text('{"prompt": "Q?", "response": "A"}\n{"prompt": "Q2?"}\n')
    return _eval(w, "--task-data", str(bad)), [f"{bad}:2", 'field "response"']


@case("compare/eval-dir-not-an-eval")
def _(w):
    return (["compare", "--eval-dir", str(w.m), "--eval-dir", str(w.m), "--out", str(w.out)],
            [f"{w.m}: not an `hcnr eval` output folder"])


@case("compare/task-data-missing-field")
def _(w):
    bad = w.root / "task.jsonl"
    bad.write_text('{"prompt": "Q?"}\n')
    return (["compare", "--model", str(w.m), "--model", str(w.m), "--task-data", str(bad), "--out", str(w.out)],
            [f"{bad}:1", 'field "response"'])


@case("eval/instruction-empty")
def _(w):
    return _eval(w, "--instruction", "  "), ["--instruction must not be empty"]


# --- calib, honesty-data, demo, plan -----------------------------------------------------------------

@case("calib/unknown-benchmark")
def _(w):
    return (["calib", "--kind", "honesty", "--benchmarks", "kuq,bogus", "--out", str(w.root / "c.jsonl")],
            ["--benchmarks: unknown benchmark 'bogus'; known: falseqa"])


@case("honesty-data/model-recipe-without-model")
def _(w):
    return (["honesty-data", "--recipe", "rait", "--out", str(w.root / "h.jsonl")],
            ["--recipe rait needs --model"])


@case("honesty-data/tau-out-of-range")
def _(w):
    return (["honesty-data", "--recipe", "absolute", "--model", str(w.m), "--tau", "1.5",
             "--out", str(w.root / "h.jsonl")], ["--tau must be in (0, 1], got 1.5"])


@case("honesty-data/existing-output")
def _(w):
    out = w.write("h.jsonl", '{"prompt": "mine"}\n')
    return ["honesty-data", "--recipe", "label", "--out", str(out)], [f"--out {out}: already exists", "--overwrite"]


@case("honesty-data/answers-file-is-out")
def _(w):
    out = w.root / "h.jsonl"
    return (["honesty-data", "--recipe", "absolute", "--model", str(w.m), "--answers", str(out), "--out", str(out)],
            ["--answers and --out must be different files"])


@case("demo/limit-0")
def _(w):
    return ["demo", "--limit", "0", "--out", str(w.out)], ["--limit=0: must be a positive integer"]


@case("plan/unsupported-architecture")
def _(w):
    w.edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    return ["plan", "--config", str(w.m / "config.json")], ["config.json", "unsupported architecture"]


# --- the test ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory):
    import tiny

    return tiny.save_hf(tiny.hf_model("llama"), tmp_path_factory.mktemp("sharded") / "m", max_shard_size="20KB")


@pytest.fixture
def ws(tmp_path, tiny_dirs, sharded_model):
    root = tmp_path / "ws"
    shutil.copytree(tiny_dirs["qwen2"][1], root / "m")
    shutil.copytree(sharded_model, root / "sharded")
    data = root / "data.jsonl"
    data.write_text('{"input_ids": [1, 5, 7, 9], "loss_mask": [0, 0, 1, 1]}\n'
                    '{"input_ids": [1, 8, 3], "loss_mask": [0, 1, 1]}\n')
    return Workspace(root, root / "m", data, root / "out", root / "sharded")


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) -> sha256 of its bytes, or "dir"."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def test_the_table_covers_every_command():
    from hcnr_jax.cli import COMMANDS

    covered = {name.split("/")[0] for name in CASES}
    # `data` only lists files; `cache` reads no input but $HCNR_CACHE_MAX_SIZE (tests/test_user_cache.py).
    assert covered == set(COMMANDS) - {"data", "cache"}, "every command but `data` and `cache` has cases"
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(ws, capsys, name):
    argv, needles = CASES[name](ws)
    assert argv[0] == name.split("/")[0]
    before = _snapshot(ws.root)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hcnr {argv[0]}: error: "), err
    missing = [n for n in needles if n not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert _snapshot(ws.root) == before, "inputs changed, or something was written"
