"""`hcnr stats`: the files load in PyTorch, keys are HF names, values equal the library's; bad
input exits 2 and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data import tiny_tokenizer
from test_stats import random_samples

import hcnr_jax
from hcnr_jax import stats
from hcnr_jax.cli import main
from hcnr_jax.data.samples import load_samples
from hcnr_jax.params import linear_names
from hcnr_jax.stats import StatsOptions
from hcnr_jax.user_cache import user_cache_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-layer llama with a ChatML tokenizer saved beside it, and a prompt/response JSONL file."""
    import tiny

    d = tmp_path_factory.mktemp("cli")
    model_dir = tiny.save_hf(tiny.hf_model("llama", num_hidden_layers=2), d / "model")
    tiny_tokenizer().save_pretrained(str(model_dir))
    data = d / "data.jsonl"
    recs = [{"prompt": "what is the capital of france", "response": "paris"},
            {"prompt": "what is a", "response": "i do not know"},
            {"prompt": "a b c", "response": "c b a"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return model_dir, data, hcnr_jax.load_pretrained(model_dir)


def test_fisher_and_hessian_files_load_in_torch_with_library_values(setup, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model_dir, data, model = setup
    samples = load_samples(data, model.tokenizer)
    assert model.tokenizer is not None and samples.loss_mask.sum() == 2 + 5 + 4, "the tokenizer was not saved"
    names = linear_names(model.config)

    out = tmp_path / "fisher"
    assert main(["stats", "--model", str(model_dir), "--data", str(data), "--kind", "fisher", "--out", str(out),
                 "--batch-size", "2", "--no-progress"]) == 0
    got = load_file(str(out / "fisher.safetensors"))
    want = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=2))
    assert sorted(got) == sorted(names) and "model.layers.1.mlp.down_proj.weight" in got
    for n in names:
        np.testing.assert_array_equal(got[n].numpy(), want[n])
    record = json.loads((out / "stats.json").read_text())
    assert record["num_samples"] == 3 and record["num_tokens"] == samples.num_tokens
    assert record["settings"]["kind"] == "fisher" and record["settings"]["neuron_axis"] == "input"
    assert record["samples_sha256"] == samples.sha256 and len(record["data_file_sha256"]) == 64
    assert record["samples_per_s"] > 0
    assert "3 samples" in capsys.readouterr().out

    out = tmp_path / "hessian"
    assert main(["stats", "--model", str(model_dir), "--data", str(data), "--kind", "hessian", "--out", str(out),
                 "--batch-size", "2", "--no-progress", "--dedupe"]) == 0
    got = load_file(str(out / "hessian.safetensors"))
    want = stats.hessian(model.params, model.config, samples, StatsOptions(batch_size=2))
    record = json.loads((out / "stats.json").read_text())
    aliases = record["aliases"]
    assert aliases["model.layers.0.self_attn.v_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert sorted(got) == sorted(set(names) - set(aliases)) and len(aliases) == 3 * 2
    for n in names:
        np.testing.assert_array_equal(got[aliases.get(n, n)].numpy(), want[n])
    with safe_open(str(out / "hessian.safetensors"), "np") as f:
        assert json.loads(f.metadata()["aliases"]) == aliases


def test_output_axis_without_dedupe_and_pretokenized_data(setup, tmp_path):
    from safetensors.torch import load_file

    model_dir, _, model = setup
    samples = random_samples(n=3, seed=3)
    data = tmp_path / "tok.jsonl"
    data.write_text("".join(json.dumps({"input_ids": samples.input_ids[i, :int(samples.attention_mask[i].sum())]
                                        .tolist(), "loss_mask": samples.loss_mask[i, :int(samples.attention_mask[i]
                                        .sum())].astype(int).tolist()}) + "\n" for i in range(3)))
    out = tmp_path / "o"
    assert main(["stats", "--model", str(model_dir), "--data", str(data), "--kind", "fisher", "--out", str(out),
                 "--neuron-axis", "output", "--batch-size", "2", "--no-progress", "--limit", "2"]) == 0
    got = load_file(str(out / "fisher.safetensors"))
    want = stats.fisher(model.params, model.config, samples.select(slice(0, 2)), StatsOptions(batch_size=2),
                        neuron_axis="output")
    name = "model.layers.0.self_attn.k_proj.weight"
    assert got[name].shape == (model.config.num_kv_heads * model.config.head_dim,)
    for n in want:
        np.testing.assert_allclose(got[n].numpy(), want[n], rtol=1e-6)
    assert json.loads((out / "stats.json").read_text())["num_samples"] == 2


@pytest.mark.parametrize("case, match", [
    ("missing", "no such data file"),
    ("malformed", r"bad\.jsonl:2: invalid JSON"),
    ("empty", "empty data file"),
    ("oov", r"bad\.jsonl:1: token id 500 is outside the vocabulary"),
    ("axis", "--neuron-axis applies to --kind fisher only"),
    ("mesh", "--mesh 'data=2,pipe=2'"),
    ("exists", "output directory already exists"),
])
def test_bad_input_exits_2_and_writes_nothing(setup, tmp_path, capsys, case, match):
    model_dir = setup[0]
    bad = tmp_path / "bad.jsonl"
    lines = {"malformed": '{"prompt": "a", "response": "b"}\n{"prompt": \n', "empty": "\n",
             "oov": '{"input_ids": [1, 500], "loss_mask": [0, 1]}\n'}
    if case in lines:
        bad.write_text(lines[case])
    elif case != "missing":
        bad.write_text('{"prompt": "a", "response": "b"}\n')
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    extra = {"axis": ["--kind", "hessian", "--neuron-axis", "output"], "mesh": ["--kind", "fisher", "--mesh", "data=2,pipe=2"]}
    argv = ["stats", "--model", str(model_dir), "--data", str(bad), "--out", str(out), "--no-progress",
            *extra.get(case, ["--kind", "fisher"])]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hcnr stats: error:") and __import__("re").search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written"


def test_unknown_kind_is_a_usage_error(setup, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["stats", "--model", str(setup[0]), "--data", "x.jsonl", "--kind", "gradient", "--out",
              str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [[], ["--no-cache"]])
def test_non_finite_statistics_exit_2_and_write_nothing(setup, tmp_path, capsys, flags):
    """A model whose activations are NaN gives NaN statistics: refused, naming the tensor, before
    the output is written."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "nan_model"
    shutil.copytree(setup[0], model_dir)
    f = model_dir / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.1.post_attention_layernorm.weight"][0] = np.nan
    save_file(tensors, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    argv = ["stats", "--model", str(model_dir), "--data", str(setup[1]), "--kind", "hessian", "--out", str(out),
            "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Without --no-cache the statistic is refused on its way into the user cache, which the error names.
    where = f"{out}/hessian.safetensors" if flags else str(user_cache_dir() / "runs")
    assert err.startswith(f"hcnr stats: error: {where}") and " model.layers.1.mlp." in err and \
        "NaN or infinite" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["nan_model"]


def test_cache_entry_locked_by_another_run_exits_2_naming_it(setup, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    model_dir, data, _ = setup
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["stats", "--model", str(model_dir), "--data", str(data), "--kind", "fisher", "--no-progress",
            "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    [entry] = cache.glob("fisher-*.safetensors")
    entry.unlink()
    lock = entry.with_suffix(".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom hcnr_jax.io import file_lock\n"
                               "with file_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n",
                               str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([*argv, "--out", str(out), "--lock-timeout", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"hcnr stats: error: {lock}: cache entry {cache}/fisher-")
        assert f"locked by process {holder.pid} on host {socket.gethostname()}" in err and "--lock-timeout" in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main([*argv, "--out", str(out)]) == 0, "a lock left by a killed run is taken over"
