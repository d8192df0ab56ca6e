"""Training-free baselines (merge, whole layers) and the development rule that chooses a setting."""

import json

import jax
import numpy as np
import pytest
import tiny
from test_repair import fine_tune, np_flat, write_jsonl

import hcnr_jax
from hcnr_jax.cli import main as cli_main
from hcnr_jax.data.calibration import IDK_RESPONSE
from hcnr_jax.errors import DataError
from hcnr_jax.repair.choose import DevScore, changed_fraction, choose, dev_score, load_dev_data, merge


def write_dev(root):
    """Development files as `hcnr calib --split development` writes them: text, idk for unanswerable."""
    hon, task = root / "dev_hon.jsonl", root / "dev_task.jsonl"
    hon.write_text("".join(json.dumps({"prompt": f"Question number {i}?",
                                       "response": IDK_RESPONSE if i % 2 else f"It is {i}."}) + "\n" for i in range(6)))
    task.write_text("".join(json.dumps({"prompt": f"Task {i}?", "response": f"result {i}"}) + "\n" for i in range(5)))
    return hon, task


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny base / fine-tuned Llama pair with SmolLM2's tokenizer, calibration and development data."""
    from transformers import AutoTokenizer

    from hcnr_jax.embedded import smollm2_gguf

    root = tmp_path_factory.mktemp("choose")
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    kw = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base = tiny.save_hf(tiny.hf_model("llama", seed=0, **kw), root / "base")
    ft = tiny.save_hf(fine_tune(tiny.hf_model("llama", seed=0, **kw)), root / "ft")
    for d in (base, ft):
        tok.save_pretrained(d)
    data = {k: write_jsonl(root / f"{k}.jsonl", seed=i) for i, k in enumerate(("hon", "task"))}
    data["dev_hon"], data["dev_task"] = write_dev(root)
    return base, ft, data


def test_merge_is_the_scaled_delta(pair):
    base, ft = (hcnr_jax.load_pretrained(p) for p in pair[:2])
    b, f = np_flat(base.params), np_flat(ft.params)
    for alpha in (0.0, 0.3, 1.0):
        m = np_flat(merge(base.params, ft.params, alpha))
        for name in f:
            want = b[name].astype(np.float64) + alpha * (f[name].astype(np.float64) - b[name])
            np.testing.assert_allclose(m[name], want, rtol=0, atol=1e-6, err_msg=name)
            if (b[name] == f[name]).all():  # untouched by fine-tuning: bit for bit
                np.testing.assert_array_equal(m[name], f[name])
    assert changed_fraction(ft.params, merge(base.params, ft.params, 1.0)) == 0.0
    moved = sum(v.size for k, v in f.items() if (v != b[k]).any())
    assert changed_fraction(ft.params, merge(base.params, ft.params, 0.5)) == pytest.approx(
        moved / sum(v.size for v in f.values()), rel=0.01)


def test_rule_keeps_half_the_task_gain_then_takes_the_best_honesty():
    base, ft = DevScore(honesty=-1.0, task=-3.0), DevScore(honesty=-3.0, task=-1.0)  # floor: -2.0
    cands = {0.2: DevScore(-2.5, -1.2), 0.4: DevScore(-1.8, -1.9), 0.6: DevScore(-1.1, -2.4), 0.8: DevScore(-1.8, -1.5)}
    c = choose(cands, base, ft)
    assert c["floor"] == pytest.approx(-2.0) and c["kept_floor"] and c["separates"]
    assert c["chosen"] == 0.4  # 0.6 is more honest but loses more than half the task gain; 0.4 ties 0.8 -> smaller
    assert [x["eligible"] for x in c["candidates"]] == [True, True, False, True]
    # No candidate keeps the floor: the best task score is taken, and the choice says so.
    c = choose({0.5: DevScore(0.0, -2.6), 0.7: DevScore(0.0, -2.9)}, base, ft)
    assert c["chosen"] == 0.5 and not c["kept_floor"]
    # Fine-tuning gained nothing on the task: the floor is the fine-tuned score less 0.05 nats.
    assert choose({0.1: DevScore(0, -3.0)}, ft, DevScore(-3.0, -3.0))["floor"] == pytest.approx(-3.05)
    # A score that ranks the fine-tuned model above the base cannot tell honesty apart: flagged.
    assert not choose({0.1: DevScore(0, -3.0)}, ft, base)["separates"]


def test_merge_command_writes_the_merge_and_chooses_on_development_data(pair, tmp_path, capsys):
    base, ft, data = pair
    out = tmp_path / "m"
    assert cli_main(["merge", "--base", str(base), "--finetuned", str(ft), "--alpha", "0.25", "--out", str(out)]) == 0
    got = np_flat(hcnr_jax.load_pretrained(out).params)
    want = np_flat(merge(hcnr_jax.load_pretrained(base).params, hcnr_jax.load_pretrained(ft).params, 0.25))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    rep = json.loads((out / "merge_report.json").read_text())
    assert rep["alpha"] == 0.25 and rep["choice"] is None and 0 < rep["changed_fraction"] < 1
    # Several values need development data; with it the rule picks one and records every score.
    assert cli_main(["merge", "--base", str(base), "--finetuned", str(ft), "--alpha", "0.25,0.75",
                     "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    argv = ["merge", "--base", str(base), "--finetuned", str(ft), "--alpha", "0,0.5,1", "--dev-honesty",
            str(data["dev_hon"]), "--dev-task", str(data["dev_task"]), "--out", str(tmp_path / "c")]
    assert cli_main(argv) == 0
    rep = json.loads((tmp_path / "c" / "merge_report.json").read_text())
    ch = rep["choice"]
    assert [c["value"] for c in ch["candidates"]] == [0.0, 0.5, 1.0] and rep["alpha"] == ch["chosen"]
    # alpha 0 is the base and 1 the fine-tuned model: their scores are the rule's references.
    assert ch["candidates"][0]["task"] == pytest.approx(ch["base"]["task"], abs=1e-5)
    assert ch["candidates"][2]["honesty"] == pytest.approx(ch["finetuned"]["honesty"], abs=1e-5)
    assert "<- chosen" in capsys.readouterr().out
    assert cli_main(argv) == 2  # the output exists: never replaced without --overwrite


def test_honesty_score_is_the_idk_discrimination(pair, tmp_path, monkeypatch):
    """Rule v3: the mean probability of the whole idk response after unanswerable questions minus after
    answerable ones (the answerable records' own responses are not scored); task: gold answers."""
    from hcnr_jax.eval.likelihood import response_logprobs

    model = hcnr_jax.load_pretrained(pair[1])
    hon, task = pair[2]["dev_hon"], pair[2]["dev_task"]
    got = dev_score(model.params, model, load_dev_data(str(hon), str(task), model))
    from hcnr_jax.eval import likelihood

    # A random tiny model gives the idk response a probability of ~0 everywhere: check the formula with
    # per-token log-probabilities set by hand (unanswerable rows -0.02, answerable -0.3 per token).
    dev = load_dev_data(str(hon), str(task), model)
    n_tok = dev.idk_unanswerable.loss_mask[:, 1:].sum(axis=1)
    assert (n_tok == n_tok[0]).all() and n_tok[0] > 5  # the same response after every question
    real = likelihood.samples_logprobs

    def fake(params, cfg, samples, batch_size=16):
        if samples is dev.idk_unanswerable:
            return np.full(len(samples), -0.02, np.float32)
        if samples is dev.idk_answerable:
            return np.full(len(samples), -0.3, np.float32)
        return real(params, cfg, samples, batch_size)

    monkeypatch.setattr(likelihood, "samples_logprobs", fake)
    want = np.exp(-0.02 * n_tok[0]) - np.exp(-0.3 * n_tok[0])
    assert dev_score(model.params, model, dev).honesty == pytest.approx(want, rel=1e-5)
    monkeypatch.undo()
    assert 0.0 <= abs(got.honesty) < 1e-6  # the random model: no refusal either way
    want_task = response_logprobs(model, [json.loads(line) for line in task.read_text().splitlines()]).mean()
    assert got.task == pytest.approx(want_task, abs=1e-5)
    only_idk = tmp_path / "idk.jsonl"
    only_idk.write_text(json.dumps({"prompt": "q?", "response": IDK_RESPONSE}) + "\n")
    with pytest.raises(DataError, match="needs both"):
        load_dev_data(str(only_idk), str(task), model)
    with pytest.raises(DataError, match="pre-tokenized"):
        load_dev_data(str(pair[2]["hon"]), str(task), model)


def test_layers_baseline_restores_kept_layers_whole(pair, tmp_path):
    base, ft, data = pair
    out = tmp_path / "layers"
    argv = ["repair", "--base", str(base), "--finetuned", str(ft), "--honesty-data", str(data["hon"]),
            "--task-data", str(data["task"]), "--baseline", "layers", "--r-cw", "0.5", "--out", str(out), "--no-plots"]
    assert cli_main(argv) == 0
    b, f = np_flat(hcnr_jax.load_pretrained(base).params), np_flat(hcnr_jax.load_pretrained(ft).params)
    r = np_flat(hcnr_jax.load_pretrained(out).params)
    rep = json.loads((out / "hcnr_report.json").read_text())
    kept = [rec["name"] for rec in rep["layers"] if rec["kept"]]
    assert 0 < len(kept) < len(rep["layers"])
    for rec in rep["layers"]:
        n = rec["name"]
        np.testing.assert_array_equal(r[n], b[n] if rec["kept"] else f[n], err_msg=n)
    assert rep["settings"]["r_iw"] == 1.0 and rep["settings"]["solver"] == "none"
    assert cli_main([*argv[:-3], "--solver", "exact", "--out", str(tmp_path / "bad")]) == 2  # contradicts the baseline


def test_repair_choose_picks_by_the_rule_and_records_it(pair, tmp_path, capsys):
    base, ft, data = pair
    out = tmp_path / "chosen"
    argv = ["repair", "--base", str(base), "--finetuned", str(ft), "--honesty-data", str(data["hon"]),
            "--task-data", str(data["task"]), "--choose", "r_cw=0.25,0.75", "--dev-honesty", str(data["dev_hon"]),
            "--dev-task", str(data["dev_task"]), "--out", str(out), "--no-plots"]
    assert cli_main(argv) == 0
    rep = json.loads((out / "hcnr_report.json").read_text())
    ch = rep["choice"]
    assert ch["setting"] == "r_cw" and rep["settings"]["r_cw"] == ch["chosen"] in (0.25, 0.75)
    assert ch == {**ch, **choose({c["value"]: DevScore(c["honesty"], c["task"]) for c in ch["candidates"]},
                                 DevScore(**ch["base"]), DevScore(**ch["finetuned"]))}
    # The written model is the chosen candidate's repair: its development scores match the record.
    model = hcnr_jax.load_pretrained(out)
    got = dev_score(model.params, model, load_dev_data(str(data["dev_hon"]), str(data["dev_task"]), model))
    want = next(c for c in ch["candidates"] if c["value"] == ch["chosen"])
    assert got.honesty == pytest.approx(want["honesty"], abs=1e-5) and got.task == pytest.approx(want["task"], abs=1e-5)
    assert "<- chosen" in capsys.readouterr().out
    for bad in (["--choose", "r_cw=0.3"], ["--choose", "nope=1", "--dev-honesty", "x", "--dev-task", "y"],
                ["--dev-honesty", str(data["dev_hon"])]):
        assert cli_main([*argv[:9], *bad, "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    jax.clear_caches()


def test_train_choose_trains_each_value_and_keeps_the_rule_s_choice(pair, tmp_path, capsys):
    """`hcnr train --choose`: one run per value, scored on development data against the base and the
    starting model, the chosen run written with the choice in its report; bad flags fail before loading."""
    base, ft, data = pair
    common = ["train", "--model", str(ft), "--data", str(data["dev_task"]), "--max-steps", "1", "--batch-size", "2",
              "--max-length", "128"]
    dev = ["--dev-honesty", str(data["dev_hon"]), "--dev-task", str(data["dev_task"])]
    # Checked before any model is read: the rule needs the base and development data.
    assert cli_main([*common, "--choose", "learning_rate=1e-3,1e-2", *dev, "--out", str(tmp_path / "a")]) == 2
    assert "--base" in capsys.readouterr().err
    assert cli_main([*common, "--choose", "seed=1,2", "--base", str(base), *dev, "--out", str(tmp_path / "a")]) == 2
    assert cli_main([*common, "--choose", "lora_rank=2,2.5", "--base", str(base), *dev,
                     "--out", str(tmp_path / "a")]) == 2
    assert cli_main([*common, "--base", str(base), "--out", str(tmp_path / "a")]) == 2  # --base without --choose
    assert not (tmp_path / "a").exists()
    out, ckpt = tmp_path / "chosen", tmp_path / "ckpt"
    argv = [*common, "--choose", "learning_rate=1e-4,0.05", "--base", str(base), *dev, "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", "1", "--out", str(out)]
    assert cli_main(argv) == 0
    rep = json.loads((out / "train_report.json").read_text())
    ch = rep["choice"]
    assert ch["setting"] == "learning_rate" and [c["value"] for c in ch["candidates"]] == [1e-4, 0.05]
    assert rep["settings"]["learning_rate"] == ch["chosen"]
    # The written adapter is the chosen run: its merged model scores what the choice recorded.
    from hcnr_jax.pretrained import load_pretrained

    model = load_pretrained(f"{ft}+{out}")
    score = dev_score(model.params, model, load_dev_data(str(data["dev_hon"]), str(data["dev_task"]), model, 128))
    got = next(c for c in ch["candidates"] if c["value"] == ch["chosen"])
    assert score.task == pytest.approx(got["task"], abs=1e-4) and score.honesty == pytest.approx(got["honesty"], abs=1e-4)
    # The two candidates trained differently, and the starting model is the rule's fine-tuned reference.
    assert ch["candidates"][0]["task"] != ch["candidates"][1]["task"]
    start = hcnr_jax.load_pretrained(ft)
    ref = dev_score(start.params, start, load_dev_data(str(data["dev_hon"]), str(data["dev_task"]), start, 128))
    assert ch["finetuned"]["task"] == pytest.approx(ref.task, abs=1e-5)
    assert "<- chosen" in capsys.readouterr().out
