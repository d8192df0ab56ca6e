"""Ctrl-C under `hcnr_jax.interrupt.deferred`: the run stops at the next step boundary, saves its
progress where it can, and a rerun resumes to the same result; a second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest
from test_stats import random_samples
from test_train import samples as train_samples
from test_train import tc

import hcnr_jax
from hcnr_jax import interrupt, stats
from hcnr_jax.stats import StatsOptions
from hcnr_jax.train import train


@pytest.fixture(scope="module")
def model(llama2_dir):
    return hcnr_jax.load_pretrained(llama2_dir)


def test_first_ctrl_c_waits_for_check_second_stops_at_once():
    said: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    with interrupt.deferred(announce=said.append):
        interrupt.check()  # nothing requested: returns
        signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt here without deferred
        assert interrupt.requested() and "Ctrl-C again" in said[0]
        with pytest.raises(interrupt.Interrupted, match="step 3"):
            interrupt.check(where="step 3")
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.requested()
    interrupt.check()  # outside the block: a no-op


def test_interrupted_statistics_save_progress_and_resume_bit_identical(model, tmp_path):
    samples = random_samples(n=8, seed=21)
    full = stats.fisher(model.params, model.config, samples, StatsOptions(batch_size=2))

    def ctrl_c_after_two(done):
        if done == 2:
            signal.raise_signal(signal.SIGINT)

    # checkpoint_every=16 never comes due in 4 batches: the save is the interrupt's own.
    with interrupt.deferred(announce=lambda m: None), pytest.raises(interrupt.Interrupted) as e:
        stats.fisher(model.params, model.config, samples, StatsOptions(
            batch_size=2, cache_dir=tmp_path, checkpoint_every=16, on_batch=ctrl_c_after_two))
    assert "after batch 2 of 4" in str(e.value) and "progress saved" in str(e.value)
    assert [p.name for p in tmp_path.glob("*.ckpt/*") if p.name.isdigit()] == ["2"]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("*.safetensors"))

    seen: list[int] = []
    resumed = stats.fisher(model.params, model.config, samples, StatsOptions(
        batch_size=2, cache_dir=tmp_path, checkpoint_every=16, on_batch=seen.append))
    assert seen == [3, 4]
    for n in full:
        np.testing.assert_array_equal(resumed[n], full[n])


def test_interrupted_training_saves_and_resumes_to_the_same_weights(model, tmp_path):
    def ctrl_c_at_three(step, loss):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    with interrupt.deferred(announce=lambda m: None), pytest.raises(interrupt.Interrupted, match="after step 3 of 6"):
        train(model, train_samples(), tc(checkpoint_every=100), checkpoint_dir=tmp_path / "ckpt", progress=False,
              on_step=ctrl_c_at_three)
    seen: list[int] = []
    resumed = train(model, train_samples(), tc(checkpoint_every=100), checkpoint_dir=tmp_path / "ckpt",
                    progress=False, on_step=lambda s, _: seen.append(s))
    assert seen == [4, 5, 6] and resumed.report["resumed_from"] == 3
    full = train(model, train_samples(), tc(), progress=False)
    chex.assert_trees_all_equal(resumed.trainable, full.trainable)


# A real SIGINT from outside Python's control flow, in a fresh `hcnr stats` process: its step
# function sends the signal to the process after the second batch's computation is dispatched,
# while XLA may still be running it (where Python's own handler used to crash or be ignored).
CLI_WORKER = textwrap.dedent("""
    import os, signal, sys
    from hcnr_jax.stats import engine
    from hcnr_jax.cli import main

    real = engine.step_and_shardings
    calls = []

    def patched(*a, **k):
        step, *rest = real(*a, **k)

        def step_then_ctrl_c(*args):
            out = step(*args)
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return out

        return (step_then_ctrl_c, *rest)

    engine.step_and_shardings = patched
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("where", ["user cache", "--cache-dir"])
def test_ctrl_c_in_hcnr_stats_exits_130_and_the_rerun_resumes(llama2_dir, tmp_path, where):
    """Without any flag the checkpoints go to the user cache's run folder (removed once --out is
    written); with --cache-dir they go there and the folder stays."""
    data = tmp_path / "d.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"input_ids": rng.integers(3, 90, 12).tolist(), "loss_mask": [0] * 6 + [1] * 6})
                            + "\n" for _ in range(8)))
    script = tmp_path / "worker.py"
    script.write_text(CLI_WORKER)
    args = ["--model", str(llama2_dir), "--data", str(data), "--kind", "fisher", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1", "HCNR_CACHE": str(tmp_path / "user")}
    if where == "--cache-dir":
        args += ["--cache-dir", str(tmp_path / "cache")]
    cache = tmp_path / "cache" if where == "--cache-dir" else tmp_path / "user" / "runs"
    res = subprocess.run([sys.executable, str(script), "stats", *args, "--out", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 130, res.stderr[-3000:]
    assert "hcnr stats: interrupted (fisher: after batch 2 of 4; progress saved in" in res.stderr, res.stderr[-3000:]
    assert "Segmentation fault" not in res.stderr and "Fatal Python error" not in res.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not list(cache.rglob("*.lock")) and len(list(cache.rglob("*.ckpt"))) == 1
    if where == "user cache":
        info = subprocess.run([sys.executable, "-m", "hcnr_jax.cli", "cache", "info"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert "runs/: 1," in info.stdout and "hcnr stats --kind fisher" in info.stdout, info.stdout

    done = subprocess.run([sys.executable, "-m", "hcnr_jax.cli", "stats", *args, "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "after 2 of 4 batches" in done.stderr
    assert (tmp_path / "out").is_dir() and not list(cache.rglob("*.ckpt"))
    # The user cache's run folder goes with the run; a --cache-dir keeps its result for reuse.
    assert list(cache.iterdir()) == [] if where == "user cache" else len(list(cache.glob("fisher-*.safetensors"))) == 1


def test_deferred_does_nothing_outside_the_main_thread():
    import threading

    seen: list[bool] = []

    def worker():
        with interrupt.deferred():
            seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGINT) is signal.default_int_handler]


def test_ctrl_c_during_the_last_step_lets_it_finish_and_says_so(monkeypatch, capsys):
    """A command with no step boundary left completes (exit 0) and says the Ctrl-C came too late."""
    from hcnr_jax.cli import main
    from hcnr_jax.commands import benchmarks as data_cmd

    def last_step(args):
        signal.raise_signal(signal.SIGINT)
        return 0

    monkeypatch.setattr(data_cmd, "run", last_step)
    assert main(["data"]) == 0
    assert "hcnr data: finished; Ctrl-C came during its last step" in capsys.readouterr().err
    assert not interrupt.requested()
