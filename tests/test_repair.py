"""HCNR repair end to end on tiny base/fine-tuned pairs: invariants, determinism, HF parity, errors."""

import json

import jax
import numpy as np
import pytest
import tiny
import torch

import hcnr_jax
from hcnr_jax.cli import main as cli_main
from hcnr_jax.errors import CheckpointError, DataError, HcnrError
from hcnr_jax.params import flatten, linear_names
from hcnr_jax.repair import RepairConfig, check_compatible, plots, repair, write_repair
from hcnr_jax.repair.pipeline import VOLATILE_KEYS
from hcnr_jax.repair.selection import top_count


def fine_tune(model, seed=1):
    """A 'fine-tuned' copy: every block linear weight moved, by a different amount per layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, (n, p) in enumerate(model.named_parameters()):
            if n.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (1 + i % 5))
    return model


def write_jsonl(path, n=6, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            t = int(rng.integers(6, 14))
            f.write(json.dumps({"input_ids": rng.integers(3, vocab, t).tolist(),
                                "loss_mask": [0] * (t // 2) + [1] * (t - t // 2)}) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """family -> (base dir, fine-tuned dir); plus the two data files under key 'data'."""
    root = tmp_path_factory.mktemp("repair")
    out = {}
    for fam in tiny.FAMILIES:
        base = tiny.save_hf(tiny.hf_model(fam, seed=0), root / f"{fam}_base")
        ft = tiny.save_hf(fine_tune(tiny.hf_model(fam, seed=0)), root / f"{fam}_ft")
        out[fam] = (base, ft)
    out["data"] = (write_jsonl(root / "hon.jsonl", seed=0), write_jsonl(root / "task.jsonl", seed=1))
    return out


@pytest.fixture(scope="module")
def llama(pair_dirs):
    base, ft = pair_dirs["llama"]
    return hcnr_jax.load_pretrained(base), hcnr_jax.load_pretrained(ft)


def run(pair_dirs, llama, **overrides):
    hon, task = pair_dirs["data"]
    return repair(*llama, hon, task, RepairConfig(**overrides), progress=False)


@pytest.fixture(scope="module")
def exact_result(pair_dirs, llama):
    return run(pair_dirs, llama)


def np_flat(params):
    return {k: np.asarray(v) for k, v in flatten(params).items()}


def check_invariants(result, base, ft, axis="input"):
    b, f, r = np_flat(base.params), np_flat(ft.params), np_flat(result.model.params)
    layers = {rec["name"]: rec for rec in result.report["layers"]}
    for name in r:
        if name not in layers or not layers[name]["kept"]:
            np.testing.assert_array_equal(r[name], f[name], err_msg=name)  # untouched: bit-identical
            continue
        changed = r[name] != f[name]
        moved = changed.any(axis=0) if axis == "input" else changed.any(axis=1)
        # Only restored neurons may differ from the fine-tuned weight; their count is the record's.
        assert moved.sum() <= layers[name]["restored_neurons"], name
    return b, f, r, layers


def test_invariants_exact(exact_result, llama):
    base, ft = llama
    _, _, r, layers = check_invariants(exact_result, base, ft)
    s = exact_result.report["summary"]
    kept = [n for n, rec in layers.items() if rec["kept"]]
    assert len(kept) == s["layers_kept"] == top_count(0.4, len(linear_names(ft.config)))
    assert s["restored_params"] == sum(layers[n]["restored_neurons"] * layers[n]["shape"][0] for n in kept)
    for n in kept:
        rec = layers[n]
        assert rec["restored_neurons"] == top_count(0.5, rec["shape"][1])
        # exact: compensation lowers the objective below restore-only, which is below fine-tuned here
        assert rec["objective_after"] <= rec["objective_before"] * (1 + 1e-5) + 1e-6
    assert s["objective_after"] < s["objective_before"] < s["objective_sft"]
    assert r[kept[0]].dtype == np.float32


def test_none_restores_base_bit_exactly(pair_dirs, llama, exact_result):
    base, ft = llama
    res = run(pair_dirs, llama, solver="none")
    b, f, r, layers = check_invariants(res, base, ft)
    # Same selection as exact (solver does not change Stage 1).
    assert [x["kept"] for x in res.report["layers"]] == [x["kept"] for x in exact_result.report["layers"]]
    for n, rec in layers.items():
        if rec["kept"]:
            restored = r[n] == b[n]
            cols = restored.all(axis=0)
            assert cols.sum() >= rec["restored_neurons"]  # restored columns are base, bit for bit
            task = ~cols
            np.testing.assert_array_equal(r[n][:, task], f[n][:, task])


def test_output_axis_restores_rows(pair_dirs, llama):
    base, ft = llama
    res = run(pair_dirs, llama, neuron_axis="output", solver="paper")
    b, f, r, layers = check_invariants(res, base, ft, axis="output")
    assert res.report["summary"]["compensation"].startswith("restore-only")
    for n, rec in layers.items():
        if rec["kept"]:
            rows = (r[n] == b[n]).all(axis=1)
            assert rows.sum() >= rec["restored_neurons"] == top_count(0.5, rec["shape"][0])
            np.testing.assert_array_equal(r[n][~rows], f[n][~rows])
            assert rec["restored_params"] == rec["restored_neurons"] * rec["shape"][1]


def test_restored_fraction_within_rounding(pair_dirs, llama):
    # Blocks are equal in size, so the fraction by parameters is r_iw x r_cw up to rounding of
    # the counts: 3 blocks, r_cw = 2/3 -> 2 blocks; r_iw = 0.5 of 48 or 72 inputs is exact.
    res = run(pair_dirs, llama, layer_unit="block", r_cw=2 / 3)
    s = res.report["summary"]
    assert s["restored_fraction_of_linear"] == pytest.approx(0.5 * 2 / 3, abs=1e-9)
    kept_blocks = {rec["name"].split(".")[2] for rec in res.report["layers"] if rec["kept"]}
    assert len(kept_blocks) == 2
    # Parameter budget: the kept prefix is within half the largest layer of r_cw of the total.
    res = run(pair_dirs, llama, layer_budget="params", r_iw=0.5, r_cw=0.3)
    s = res.report["summary"]
    largest = max(rec["params"] for rec in res.report["layers"])
    assert abs(s["restored_fraction_of_linear"] - 0.15) <= 0.5 * (0.5 * largest) / s["linear_params"] + 1e-9
    by_mod = res.report["restored_by_module"]
    assert sum(m["restored_params"] for m in by_mod.values()) == s["restored_params"]


# --- the [ours] options of Stage 1 and 2, checked against statistics computed here -----------------

def _samples(pair_dirs):
    from hcnr_jax.data.samples import load_samples

    return tuple(load_samples(p, None, max_length=512, vocab_size=97) for p in pair_dirs["data"])


def _kept_objectives(res):
    return {r["name"]: r["objective_sft"] for r in res.report["layers"] if r["kept"]}


def test_hessian_passes_give_the_same_repair(pair_dirs, llama, monkeypatch):
    """The kept layers' Hessians accumulated in 3 passes (each a share of the accumulators, less
    device memory) give the repair of one pass: same neurons, same weights to float32 rounding."""
    from hcnr_jax import stats
    from hcnr_jax.stats.hessian_accum import owner

    calls: list[list[str]] = []
    real = stats.hessian

    def spy(*args, layers=None, **kwargs):
        calls.append(list(layers))
        return real(*args, layers=layers, **kwargs)

    monkeypatch.setattr(stats, "hessian", spy)
    three = run(pair_dirs, llama, hessian_passes=3, calib_data="both")
    # 3 passes x 2 calibration sets, the passes disjoint, sharing no accumulator, covering the kept layers.
    assert len(calls) == 6 and calls[0::2] == calls[1::2]
    passes = calls[0::2]
    kept = sorted(r["name"] for r in three.report["layers"] if r["kept"])
    assert sorted(n for p in passes for n in p) == kept
    assert all({owner(n) for n in a}.isdisjoint({owner(n) for n in b}) for a in passes for b in passes if a is not b)
    calls.clear()
    one = run(pair_dirs, llama, calib_data="both")
    assert len(calls) == 2 and sorted(calls[0]) == kept
    a, b = np_flat(one.model.params), np_flat(three.model.params)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-6, err_msg=name)
    def strip(report):
        return [{k: v for k, v in rec.items() if not k.startswith("objective")} for rec in report["layers"]]

    assert strip(three.report) == strip(one.report)
    assert three.report["settings"]["hessian_passes"] == 3
    assert _kept_objectives(three) == pytest.approx(_kept_objectives(one), rel=1e-5)


def test_split_passes_balances_and_keeps_shared_inputs_together(llama):
    from hcnr_jax.params import param_specs
    from hcnr_jax.stats.hessian_accum import owner, split_passes

    cfg = llama[1].config
    names = linear_names(cfg)
    specs = param_specs(cfg)
    groups = split_passes(names, cfg, 3)
    assert len(groups) == 3 and sorted(n for g in groups for n in g) == sorted(names)
    for g in groups:  # q/k/v and gate/up read one accumulator: never split between passes
        assert all(any(owner(n) == owner(m) for m in g) for n in g)
        assert {n for n in names if owner(n) in {owner(m) for m in g}} == set(g)
    sizes = [sum(specs[o][1] ** 2 for o in {owner(n) for n in g}) for g in groups]
    biggest = max(specs[owner(n)][1] ** 2 for n in names)
    assert max(sizes) - min(sizes) <= biggest  # greedy largest-first: within one accumulator
    assert split_passes(names, cfg, 1) == [sorted(names)]
    assert len(split_passes(names[:3], cfg, 5)) == len({owner(n) for n in names[:3]})


def test_calib_data_both_adds_the_two_hessians(pair_dirs, llama):
    """objective_sft = tr(dW H dW^T) is linear in H, so with H = H_hon + H_task it is the sum of the
    objectives on each; the selection does not depend on the calibration data."""
    objs = {c: _kept_objectives(run(pair_dirs, llama, solver="none", calib_data=c)) for c in ("hon", "task", "both")}
    assert objs["hon"].keys() == objs["task"].keys() == objs["both"].keys()
    for n, both in objs["both"].items():
        assert both == pytest.approx(objs["hon"][n] + objs["task"][n], rel=1e-5), n
        assert min(objs["hon"][n], objs["task"][n]) > 0.1 * both, n  # each data set contributes


def test_calib_model_takes_the_layer_inputs_from_that_model(pair_dirs, llama):
    from hcnr_jax import stats
    from hcnr_jax.params import get
    from hcnr_jax.repair.solvers import layer_objective

    base, ft = llama
    hon, _ = _samples(pair_dirs)
    moved = 0
    for model, params in (("orig", base.params), ("sft", ft.params)):
        got = _kept_objectives(run(pair_dirs, llama, solver="none", calib_model=model))
        h = stats.hessian(params, ft.config, hon, layers=sorted(got))
        for n, obj in got.items():
            want = layer_objective(get(ft.params, n), get(base.params, n), h[n])
            assert obj == pytest.approx(want, rel=1e-5), (model, n)
        if model == "orig":
            h_orig = h
        else:  # inputs of layers after the first block's attention differ between the two models
            moved = sum(not np.allclose(h[n], h_orig[n], rtol=1e-3) for n in got)
    assert moved > 0


def test_fisher_models_choose_where_each_score_is_taken(pair_dirs, llama):
    from hcnr_jax import stats
    from hcnr_jax.repair import selection

    base, ft = llama
    hon, task = _samples(pair_dirs)
    names = linear_names(ft.config)
    params = {"orig": base.params, "sft": ft.params}
    b, f = np_flat(base.params), np_flat(ft.params)
    chosen = {}
    for hon_model, task_model in (("orig", "sft"), ("sft", "orig")):
        res = run(pair_dirs, llama, solver="none", fisher_hon_model=hon_model, fisher_task_model=task_model)
        s_hon = stats.fisher(params[hon_model], ft.config, hon)
        s_task = stats.fisher(params[task_model], ft.config, task)
        want = selection.select(names, lambda n: (b[n], f[n]), s_hon, s_task, r_iw=0.5, r_cw=0.4)
        r = np_flat(res.model.params)
        for rec, sl in zip(res.report["layers"], want, strict=True):
            assert (rec["name"], rec["kept"]) == (sl.name, sl.kept) and rec["d"] == pytest.approx(sl.d, rel=1e-5)
            # solver none: exactly the honesty-critical columns hold the base weights
            restored = (r[sl.name] == b[sl.name]).all(axis=0) & (r[sl.name] != f[sl.name]).any(axis=0)
            np.testing.assert_array_equal(restored, sl.restored, err_msg=sl.name)
        chosen[hon_model] = [sl.candidates for sl in want]
    assert any(not np.array_equal(a, c) for a, c in zip(chosen["orig"], chosen["sft"], strict=True))


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_byte_identical(pair_dirs, llama, tmp_path):
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        res = run(pair_dirs, llama, priority="random", seed=seed, solver="paper")
        outs.append(write_repair(res, tmp_path / f"o{i}"))
    a, b, c = (_files(o) for o in outs)
    assert set(a) == set(b)
    for name in a:
        if name == "hcnr_report.json":
            ra, rb = json.loads(a[name]), json.loads(b[name])
            for k in VOLATILE_KEYS:
                ra.pop(k), rb.pop(k)
            assert ra == rb
        elif name == "hcnr_report.md":  # identical up to its last section, the timings
            cut = "## Time and memory"
            assert a[name].decode().split(cut)[0] == b[name].decode().split(cut)[0]
        else:
            assert a[name] == b[name], name
    assert a["model.safetensors"] != c["model.safetensors"]  # another seed, another selection
    assert {plots.PERTURBATION_PNG, plots.FRACTION_PNG, "hcnr_report.md", "config.json"} <= set(a)


def _check_hf_parity(result, out):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(3, 97, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(hcnr_jax.logits(result.model, ids))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    # The HF model holds the repaired weights, not the fine-tuned ones.
    name = next(r["name"] for r in result.report["layers"] if r["kept"])
    np.testing.assert_array_equal(hf.state_dict()[name].numpy(), np.asarray(hcnr_jax.params.get(result.model.params, name)))


def test_llama_end_to_end_loads_in_transformers(exact_result, tmp_path):
    out = write_repair(exact_result, tmp_path / "out")
    _check_hf_parity(exact_result, out)
    rep = json.loads((out / "hcnr_report.json").read_text())
    assert set(rep["timing_s"]) == {"load", "fisher", "select", "hessian", "solve"}
    assert rep["data"]["honesty"]["file_sha256"] and rep["settings"]["solver"] == "exact"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_end_to_end(pair_dirs, family, tmp_path):
    base, ft = pair_dirs[family]
    hon, task = pair_dirs["data"]
    res = hcnr_jax.repair(base, ft, hon, task, progress=False)
    out = write_repair(res, tmp_path / "out")
    _check_hf_parity(res, out)
    check_invariants(res, hcnr_jax.load_pretrained(base), hcnr_jax.load_pretrained(ft))


def test_bfloat16_keeps_dtype_and_restores_bit_exactly(pair_dirs, tmp_path):
    base_dir, ft_dir = pair_dirs["llama"]
    hon, task = pair_dirs["data"]
    base = hcnr_jax.load_pretrained(base_dir, dtype="bfloat16")
    ft = hcnr_jax.load_pretrained(ft_dir, dtype="bfloat16")
    res = repair(base, ft, hon, task, RepairConfig(solver="none"), progress=False)
    b, _f, r, layers = check_invariants(res, base, ft)
    assert res.model.dtype == ft.dtype
    for n, rec in layers.items():
        if rec["kept"]:
            assert (r[n] == b[n]).all(axis=0).sum() >= rec["restored_neurons"]


# --- bad input: a clear error and nothing written ----------------------------------------------

def _cli(pair_dirs, tmp_path, *extra, base=None, ft=None, hon=None, task=None):
    b, f = pair_dirs["llama"]
    h, t = pair_dirs["data"]
    out = tmp_path / "out"
    argv = ["repair", "--base", str(base or b), "--finetuned", str(ft or f), "--honesty-data", str(hon or h),
            "--task-data", str(task or t), "--out", str(out), *extra]
    return cli_main(argv), out


@pytest.fixture(scope="module")
def odd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return {
        "arch": tiny.save_hf(tiny.hf_model("qwen3"), root / "qwen3"),
        "shape": tiny.save_hf(tiny.hf_model("llama", intermediate_size=64), root / "shape"),
        "vocab": tiny.save_hf(tiny.hf_model("llama", vocab_size=101), root / "vocab"),
    }


@pytest.mark.parametrize("kind", ["arch", "shape", "vocab"])
def test_incompatible_models(pair_dirs, odd_dirs, tmp_path, kind, capsys):
    rc, out = _cli(pair_dirs, tmp_path, ft=odd_dirs[kind])
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())
    msg = capsys.readouterr().err
    # The fields that differ, by their config.json names, before any weight is read.
    assert {"arch": "architectures differ: model_type llama vs qwen3", "shape": "intermediate_size 72 vs 64",
            "vocab": "vocab_size 97 vs 101"}[kind] in msg


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ("{not json\n", "invalid JSON"),
    ('{"input_ids": [1, 2], "loss_mask": [0]}\n', "loss_mask"),
    ('{"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}\n', "no target"),
    ('{"input_ids": [1, 2, 300], "loss_mask": [0, 1, 1]}\n', "vocabulary"),
])
def test_bad_data(pair_dirs, tmp_path, content, match, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    rc, out = _cli(pair_dirs, tmp_path, hon=bad)
    assert rc == 2 and not out.exists()
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("flags, match", [
    (["--r-iw", "0"], "r_iw"), (["--r-iw", "1.5"], "r_iw"), (["--r-cw", "-0.1"], "r_cw"),
    (["--solver", "magic"], "unknown solver"), (["--damping", "-1"], "damping"),
    (["--hessian-passes", "0"], "hessian_passes"),
])
def test_bad_settings(pair_dirs, tmp_path, flags, match, capsys):
    rc, out = _cli(pair_dirs, tmp_path, *flags)
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert match in capsys.readouterr().err


def test_yaml_config_and_flag_override(tmp_path):
    from hcnr_jax.repair import load_config

    y = tmp_path / "c.yaml"
    y.write_text("r_iw: 0.3\nsolver: paper\neps: 1e-6\nsolver_options: {iters: 5}\n")
    cfg = load_config(y, solver="cg")
    assert (cfg.r_iw, cfg.solver, cfg.eps, dict(cfg.solver_options)) == (0.3, "cg", 1e-6, {"iters": 5})
    y.write_text("r_iw: 0.3\ncolour: red\n")
    with pytest.raises(HcnrError, match="colour"):
        load_config(y)
    y.write_text("- 1\n")
    with pytest.raises(HcnrError, match="mapping"):
        load_config(y)


@pytest.mark.parametrize("yaml_text, flags, match", [
    ("solver: cg\nsolver_options: {iters: 5, tolerance: 1.0e-6}\n", (),
     "unknown option 'tolerance' for solver 'cg'; it accepts iters, tol"),
    ("solver_options: {iters: 5}\n", (), "unknown option 'iters' for solver 'exact'; it accepts no options"),
    ("solver: cg\nsolver_options: {iters: 5}\n", ("--solver", "paper"), "unknown option 'iters' for solver 'paper'"),
    ("solver: cg\nsolver_options: {iters: 0}\n", (), "iters=0 for solver 'cg' must be a positive integer"),
    ("solver: cg\nsolver_options: {tol: .inf}\n", (), "tol=inf for solver 'cg' must be a finite number > 0"),
])
def test_unknown_solver_options_are_rejected_before_any_work(tmp_path, capsys, yaml_text, flags, match):
    """Checked with the settings, before a model is looked at (the model paths do not exist)."""
    y = tmp_path / "c.yaml"
    y.write_text(yaml_text)
    out = tmp_path / "out"
    rc = cli_main(["repair", "--base", "no/base", "--finetuned", "no/ft", "--out", str(out), "--config", str(y), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err and not out.exists()
    with pytest.raises(HcnrError, match="unknown option 'iter'"):
        RepairConfig(solver="cg", solver_options={"iter": 5}).validate()


def test_solver_option_table_matches_the_solvers(monkeypatch):
    """config.SOLVER_OPTIONS lists exactly each built-in solver's keyword-only arguments."""
    import inspect

    from hcnr_jax.repair.config import SOLVER_OPTIONS
    from hcnr_jax.repair.solvers import SOLVERS

    for name, options in SOLVER_OPTIONS.items():
        params = inspect.signature(SOLVERS[name]).parameters.values()
        assert {p.name for p in params if p.kind is p.KEYWORD_ONLY} == set(options), name
    RepairConfig(solver="cg", solver_options={"iters": 7, "tol": "1e-6"}).validate()  # YAML reads 1e-6 as text
    monkeypatch.setitem(SOLVERS, "custom_for_test", SOLVERS["exact"])
    RepairConfig(solver="custom_for_test", solver_options={"anything": 1}).validate()  # a user's solver: not checked


def test_dry_run_writes_nothing(pair_dirs, tmp_path, capsys):
    rc, out = _cli(pair_dirs, tmp_path, "--dry-run")
    assert rc == 0 and not out.exists()
    text = capsys.readouterr().out
    plan = json.loads(text[: text.rindex("}") + 1])["plan"]
    assert plan["layers"] == 21 and plan["units_kept"] == top_count(0.4, 21)
    # Compiled, not estimated: XLA's per-device numbers of each step (hcnr_jax.plan).
    mem, steps = plan["memory_mib"], plan["compiled"]["steps"]
    assert set(steps) == {"fisher", "hessian", "solve"} and plan["compiled"]["devices"] == jax.device_count()
    # The Fisher step's arguments hold the float32 model (the state and batch are small).
    assert 4 * plan["all_params"] <= steps["fisher"]["argument_bytes"] < 4 * plan["all_params"] + 2**20
    for name, s in steps.items():
        assert s["flops"] > 0 and s["peak_bytes"] == (s["argument_bytes"] + s["temp_bytes"] + s["output_bytes"]
                                                      - s["alias_bytes"]), name
        assert mem[name]["peak"] == round(s["peak_bytes"] / 2**20, 1)
    assert mem["total"] >= max(m["peak"] for m in (mem["fisher"], mem["hessian"], mem["solve"]))
    # Beside the statistics steps nothing (the idle model waits in host memory); beside the solve the
    # fine-tuned model, repaired in place.
    assert mem["resident"]["fisher"] == mem["resident"]["hessian"] == 0
    assert mem["resident"]["solve"] == round(4 * plan["all_params"] / 2**20, 1)
    assert mem["total"] == pytest.approx(max(mem[n]["peak"] + mem["resident"][n] for n in steps), abs=0.2)
    assert "compiled peak per device" in text and "nothing written" in text


def test_existing_output_refused(pair_dirs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    rc, _ = _cli(pair_dirs, tmp_path)
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_python_api_errors(llama):
    base, ft = llama
    with pytest.raises(DataError):
        repair(base, ft, "/nonexistent.jsonl", "/nonexistent.jsonl", progress=False)
    with pytest.raises(HcnrError, match="r_cw"):
        repair(base, ft, None, None, RepairConfig(r_cw=2.0), progress=False)
    with pytest.raises(CheckpointError, match=r"configurations differ: num_hidden_layers 3 vs 2"):
        check_compatible(base, ft.replace(config=ft.config.replace(num_layers=2)))
    check_compatible(base, ft)  # the real pair passes: the error came from the edit
    assert ft.config.num_layers == base.config.num_layers == 3  # replace() left ft untouched


def test_example_config_holds_the_defaults():
    from pathlib import Path

    from hcnr_jax.repair import load_config

    configs = Path(__file__).parent.parent / "configs"
    assert load_config(configs / "hcnr_default.yaml") == RepairConfig()
    for f in configs.glob("hcnr_*.yaml"):
        load_config(f)  # every repair example is valid (train_*.yaml are training settings: test_train.py)


def test_cli_repair_with_config_and_flags(pair_dirs, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("solver: paper\nr_cw: 0.2\nlayer_unit: block\n")
    rc, out = _cli(pair_dirs, tmp_path, "--config", str(y), "--solver", "cg", "--r-iw", "0.25", "--no-plots")
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((out / "hcnr_report.json").read_text())
    st = rep["settings"]
    assert (st["solver"], st["r_iw"], st["r_cw"], st["layer_unit"]) == ("cg", 0.25, 0.2, "block")
    assert rep["summary"]["layers_kept"] == 7  # one block of 7 linear layers
    assert not (out / plots.PERTURBATION_PNG).exists()
    assert capsys.readouterr().out.startswith("Restored ")  # the repair's closing lines


@pytest.mark.parametrize("kind", ["honesty", "task"])
def test_default_data_is_the_bundled_calibration_file(kind):
    """Without --honesty-data/--task-data the repair reads the shipped 128-sample files."""
    from types import SimpleNamespace

    from test_data import tiny_tokenizer

    from hcnr_jax.embedded import calibration_file
    from hcnr_jax.io import sha256_file
    from hcnr_jax.repair.pipeline import load_repair_data

    tok = tiny_tokenizer()
    model = SimpleNamespace(tokenizer=tok, config=SimpleNamespace(vocab_size=len(tok)))
    samples, info = load_repair_data(None, kind, model, RepairConfig())
    assert len(samples) == 128
    assert info["path"] == f"<bundled>/{kind}.jsonl"
    assert info["file_sha256"] == sha256_file(calibration_file(kind))
    assert samples.loss_mask.sum(axis=1).min() > 0  # every sample has assistant-turn targets


def test_cli_repair_on_a_mesh_of_4_devices_equals_one_device(pair_dirs, tmp_path, capsys):
    """`hcnr repair --mesh data=2,model=2 --fsdp` on 4 simulated devices (a subprocess): models
    loaded onto the mesh, statistics and solves sharded; the same neurons restored and the same
    weights, to float32 reduction-order noise, as the single-device run here."""
    import os
    import subprocess
    import sys

    from safetensors.numpy import load_file

    rc, one = _cli(pair_dirs, tmp_path, "--no-plots")
    assert rc == 0, capsys.readouterr().err
    b, f = pair_dirs["llama"]
    h, t = pair_dirs["data"]
    four = tmp_path / "four"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "hcnr_jax.cli", "repair", "--base", str(b), "--finetuned", str(f),
                          "--honesty-data", str(h), "--task-data", str(t), "--out", str(four), "--no-plots",
                          "--mesh", "data=2,model=2", "--fsdp"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rep1, rep4 = (json.loads((d / "hcnr_report.json").read_text()) for d in (one, four))
    assert [r["restored_neurons"] for r in rep1["layers"]] == [r["restored_neurons"] for r in rep4["layers"]]
    w1, w4 = load_file(one / "model.safetensors"), load_file(four / "model.safetensors")
    assert w1.keys() == w4.keys()
    for k in w1:
        # Sharded sums change the float32 reduction order (~1e-7); the solve amplifies that by the
        # conditioning of H (6 random samples: o_proj's inputs are the worst, ~4e-5 measured).
        err = np.linalg.norm(w4[k] - w1[k]) / np.linalg.norm(w1[k])
        assert err <= 1e-4, (k, err)
    # A mesh that does not fit the devices: one line, before any work.
    assert cli_main(["repair", "--base", str(b), "--finetuned", str(f), "--out", str(tmp_path / "x"),
                     "--mesh", "data=3"]) == 2
    assert "--mesh 'data=3': mesh {'data': 3, 'model': 1} does not fit" in capsys.readouterr().err


def test_the_api_entry_point_is_the_repair_function():
    """``hcnr_jax.repair`` is the function itself (help shows its real signature), and the
    subpackage's modules stay importable by name."""
    import inspect

    from hcnr_jax.repair import pipeline, solvers

    assert hcnr_jax.repair is pipeline.repair
    params = inspect.signature(hcnr_jax.repair).parameters
    assert list(params)[:5] == ["base", "finetuned", "honesty_data", "task_data", "config"]
    assert "stats_options" in params and solvers.SOLVERS

