"""The training loop on tiny models: LoRA, accumulation, resume after SIGKILL, data parallelism,
DPO/ORPO runs, `hcnr train` outputs (PEFT adapter, chains, full HF dir), settings validation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

import hcnr_jax
from hcnr_jax.cli import main as cli_main
from hcnr_jax.data.samples import samples_from_records
from hcnr_jax.errors import HcnrError
from hcnr_jax.params import flatten
from hcnr_jax.train import TrainConfig, load_train_config, loop, train
from hcnr_jax.train import lora as lora_lib


def token_records(n: int, seed: int = 0, vocab: int = 97, targets: int | None = None) -> list[dict]:
    """Pre-tokenized samples; ``targets`` fixes every sample's number of target tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(8, 20))
        k = targets or t // 2
        out.append({"input_ids": rng.integers(3, vocab, t).tolist(), "loss_mask": [0] * (t - k) + [1] * k})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_hf(tiny.hf_model("llama", num_hidden_layers=2), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def model(model_dir):
    return hcnr_jax.load_pretrained(model_dir)


def samples(n=16, seed=0, **kw):
    return samples_from_records(token_records(n, seed, **kw), None)


def tc(**kw) -> TrainConfig:
    return TrainConfig(**{"learning_rate": 1e-2, "batch_size": 4, "max_steps": 6, "warmup_ratio": 0.0, **kw}).validate()


def test_lora_starts_at_the_base_and_changes_only_its_targets(model):
    adapter = lora_lib.init_adapter(jax.random.key(0), model.params, model.config, 4, ("q_proj", "down_proj"))
    assert sorted(adapter) == sorted(lora_lib.lora_modules(model.config, ("q_proj", "down_proj")))
    start = flatten(lora_lib.merged(model.params, adapter, 2.0))
    base = flatten(model.params)
    assert all(np.array_equal(start[k], base[k]) for k in base)

    res = train(model, samples(), tc(lora_targets=("q_proj", "down_proj"), lora_rank=4), progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    after = flatten(res.params)
    changed = {k for k in base if not np.array_equal(after[k], base[k])}
    assert changed == {m + ".weight" for m in adapter}
    a, b = res.trainable["model.layers.1.mlp.down_proj"]["A"], res.trainable["model.layers.1.mlp.down_proj"]["B"]
    w = base["model.layers.1.mlp.down_proj.weight"]
    scaling = 16.0 / 4  # lora_alpha / lora_rank
    np.testing.assert_allclose(after["model.layers.1.mlp.down_proj.weight"], w + scaling * (b @ a), rtol=0, atol=1e-6)


def test_full_finetuning_moves_every_weight_that_has_a_gradient(model):
    res = train(model, samples(), tc(method="full", max_steps=2), progress=False)
    base, after = flatten(model.params), flatten(res.params)
    assert not np.array_equal(after["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(after["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_gradient_accumulation_equals_one_big_batch(model):
    """Same 8 samples as one batch of 8 or 4 micro-batches of 2: the same gradient (SGD step), when
    every sample has the same number of targets (the loss is a token mean per micro-batch)."""
    data = samples(8, seed=3, targets=5)
    arrays = loop.data_arrays(data)
    cfg = model.config
    idx = np.arange(8)
    adapter = lora_lib.init_adapter(jax.random.key(1), model.params, cfg, 4, ("q_proj", "up_proj"))
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)  # B != 0: gradients reach A too
    outs = []
    for batch, accum in ((8, 1), (2, 4)):
        settings = tc(batch_size=batch, grad_accum=accum, lora_targets=("q_proj", "up_proj"), lora_rank=4)
        capacity = max(loop.target_capacity(arrays["loss_mask"]), 16)
        step = loop.make_step(cfg, settings, optax.sgd(1.0), capacity)
        mb = {k: jnp.asarray(v) for k, v in loop.micro_batch(arrays, idx, accum).items()}
        new, _, loss = step(jax.tree.map(jnp.copy, adapter), optax.sgd(1.0).init(adapter), model.params, mb)
        outs.append((jax.tree.map(np.asarray, new), float(loss)))
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-6)
    chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-7)


def test_data_order_is_a_function_of_the_step():
    first = [loop.step_indices(s, 10, 4, seed=7) for s in range(4)]
    again = [loop.step_indices(s, 10, 4, seed=7) for s in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(set(first[0]) | set(first[1])) == 8  # one epoch: no sample twice
    assert not np.array_equal(loop.step_indices(0, 10, 4, seed=8), first[0])


# Trains in a fresh interpreter and SIGKILLs itself right after the checkpoint of step 4 is on
# disk: no exception handler, no atexit, no orbax cleanup.
KILLED_WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import hcnr_jax
    from hcnr_jax.train import train
    from test_train import samples, tc
    model = hcnr_jax.load_pretrained({model_dir!r})
    ckpt = Path({ckpt!r})

    def die(step, loss):
        if step == 4:
            assert (ckpt / "4").exists(), "checkpoint 4 must be on disk before the kill"
            os.kill(os.getpid(), signal.SIGKILL)

    train(model, samples(), tc(checkpoint_every=2), checkpoint_dir=ckpt, progress=False, on_step=die)
    sys.exit(3)  # not reached
""")


def test_sigkilled_run_resumes_to_the_same_weights(model, model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER.format(tests=str(Path(__file__).parent), model_dir=str(model_dir), ckpt=str(ckpt)))
    res = subprocess.run([sys.executable, str(script)], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]

    seen: list[int] = []
    resumed = train(model, samples(), tc(checkpoint_every=2), checkpoint_dir=ckpt, progress=False,
                    on_step=lambda s, _: seen.append(s))
    assert seen == [5, 6], "the rerun must resume after the last checkpoint of the killed process"
    assert resumed.report["resumed_from"] == 4 and [h["step"] for h in resumed.history] == list(range(1, 7))
    full = train(model, samples(), tc(), progress=False)
    chex.assert_trees_all_equal(resumed.trainable, full.trainable)

    with pytest.raises(HcnrError, match="other settings"):
        train(model, samples(), tc(checkpoint_every=2, learning_rate=5e-3), checkpoint_dir=ckpt, progress=False)


DP_WORKER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np, hcnr_jax
    from hcnr_jax.train import train
    from test_train import samples, tc
    assert len(jax.devices()) == 8
    model = hcnr_jax.load_pretrained({model_dir!r})
    res = train(model, samples(), tc(batch_size=8, max_steps=3), mesh="data=8", progress=False)
    np.savez(os.environ["OUT"], *[np.asarray(x) for x in jax.tree.leaves(res.trainable)])
""")


def test_data_parallel_over_8_devices_equals_one_device(model, model_dir, tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(DP_WORKER.format(tests=str(Path(__file__).parent), model_dir=str(model_dir)))
    out = tmp_path / "dp.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "OUT": str(out)}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(out)
    single = train(model, samples(), tc(batch_size=8, max_steps=3), progress=False)
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise (~1e-7) moves the
    # update by up to ~1e-5, while a wrong gradient would move it by ~lr = 1e-2.
    for i, want in enumerate(jax.tree.leaves(single.trainable)):
        np.testing.assert_allclose(got[f"arr_{i}"], want, rtol=2e-4, atol=5e-5)


def pairs(model, n=8, seed=0):
    """Preference pairs as token arrays: chosen and rejected share a prompt, differ in the target."""
    from hcnr_jax.data.samples import PairSamples

    a, b = samples(n, seed, targets=4), samples(n, seed + 100, targets=4)
    t = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x):
        return np.pad(x, ((0, 0), (0, t - x.shape[1])))

    return PairSamples(pad(a.input_ids), pad(a.attention_mask), pad(a.loss_mask), pad(b.input_ids),
                       pad(b.attention_mask), pad(b.loss_mask), sha256=a.sha256 + b.sha256)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objectives_train(model, objective):
    res = train(model, pairs(model), tc(objective=objective, max_steps=5, learning_rate=5e-3), progress=False)
    losses = [h["loss"] for h in res.history]
    assert all(np.isfinite(losses))
    if objective == "dpo":
        # The policy starts at the reference: every pair's DPO loss is -log sigmoid(0) = log 2.
        np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)
    assert losses[-1] < losses[0]


def test_objective_must_match_the_data(model):
    with pytest.raises(HcnrError, match="pairs"):
        train(model, samples(), tc(objective="dpo"), progress=False)


def test_cli_writes_a_peft_adapter_that_loads_and_chains(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", token_records(12))
    a1 = tmp_path / "a1"
    assert cli_main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(a1), "--max-steps", "3",
                     "--batch-size", "4", "--learning-rate", "0.01", "--lora-rank", "4"]) == 0
    cfg = json.loads((a1 / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    report = json.loads((a1 / "train_report.json").read_text())
    assert report["steps"] == 3 and len(report["history"]) == 3
    merged = hcnr_jax.load_pretrained(f"{model_dir}+{a1}")
    base = hcnr_jax.load_pretrained(model_dir)
    assert not np.array_equal(flatten(merged.params)["model.layers.0.self_attn.q_proj.weight"],
                              flatten(base.params)["model.layers.0.self_attn.q_proj.weight"])
    # A second adapter trained on BASE+A1 chains as BASE+A1+A2.
    a2 = tmp_path / "a2"
    assert cli_main(["train", "--model", f"{model_dir}+{a1}", "--data", str(data), "--out", str(a2),
                     "--max-steps", "2", "--batch-size", "4", "--learning-rate", "0.01", "--seed", "1"]) == 0
    chained = hcnr_jax.load_pretrained(f"{model_dir}+{a1}+{a2}")
    ids = np.arange(3, 15)[None]
    assert np.all(np.isfinite(np.asarray(hcnr_jax.logits(chained, ids))))
    assert not np.allclose(hcnr_jax.logits(chained, ids), hcnr_jax.logits(merged, ids))
    # Refused before any work: existing output, output inside an input.
    with pytest.raises(HcnrError, match="already exists"):
        from hcnr_jax.commands import train as train_cmd
        train_cmd.run(train_cmd_args(model_dir, data, a1))
    assert cli_main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(model_dir / "x")]) == 2
    # --overwrite replaces --out as a whole: an output that contains the data (or a model) is refused too.
    args = train_cmd_args(model_dir, data, data.parent)
    args.overwrite = True
    with pytest.raises(HcnrError, match="--data"):
        train_cmd.run(args)
    assert data.exists()


def train_cmd_args(model_dir, data, out, **kw):
    from hcnr_jax.cli import build_parser

    return build_parser().parse_args(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
                                      *[x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]])


def test_cli_full_finetuning_writes_a_model_directory(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", token_records(8))
    out = tmp_path / "full"
    assert cli_main(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--method", "full",
                     "--max-steps", "2", "--batch-size", "4"]) == 0
    assert (out / "config.json").exists() and (out / "train_report.json").exists()
    assert hcnr_jax.load_pretrained(out).config == hcnr_jax.load_pretrained(model_dir).config


@pytest.mark.parametrize(("values", "match"), [
    ({"objective": "ppo"}, "objective"),
    ({"lora_targets": ["q_proj", "lm_head"]}, "lora_targets"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"batch_size": 0}, "batch_size"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"max_steps": 2.5}, "max_steps"),
    ({"epochs": [1]}, "epochs"),
    ({"lr": 1e-3}, "unknown setting"),
])
def test_bad_settings_name_the_field(values, match):
    with pytest.raises(HcnrError, match=match):
        TrainConfig.from_dict(values)


def test_yaml_settings_with_flag_overrides(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("learning_rate: 1e-4\nlora_targets: q_proj,v_proj\nepochs: 2\n")
    got = load_train_config(path, epochs=3.0)
    assert got.learning_rate == 1e-4 and got.lora_targets == ("q_proj", "v_proj") and got.epochs == 3.0
    repo = Path(__file__).resolve().parent.parent
    for name in ("train_honest.yaml", "train_task.yaml"):
        load_train_config(repo / "configs" / name)


@pytest.mark.parametrize(("yaml_text", "match"), [
    ("damping: [1]\n", "damping"),
    ("eps: .inf\n", "eps"),
    ("r_cw: .nan\n", "r_cw"),
    ("solver_options: 3\n", "solver_options"),
    ("- a list\n", "mapping"),
])
def test_repair_yaml_values_of_the_wrong_type_name_the_field(tmp_path, yaml_text, match):
    """RepairConfig goes through the same settings reader as TrainConfig (hcnr_jax.settings)."""
    from hcnr_jax.repair import load_config

    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    with pytest.raises(HcnrError, match=match):
        load_config(path)


def test_cli_turns_file_errors_and_bad_counts_into_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"learning_rate: caf\xe9\n")
    out = tmp_path / "o"
    assert cli_main(["train", "--model", "m", "--data", "d", "--out", str(out), "--config", str(bad)]) == 2
    assert "latin1.yaml" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "m", "--benchmarks", "kuq", "--limit", "0", "--out", str(out)]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert cli_main(["calib", "--kind", "task", "-n", "-5", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "-n -5" in capsys.readouterr().err and not (tmp_path / "c.jsonl").exists()
