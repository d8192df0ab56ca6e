"""`hcnr plan`: compiled per-device memory and FLOPs of a repair's steps from a config.json alone."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest
import tiny

from hcnr_jax import plan as planlib
from hcnr_jax.cli import main as cli_main

TINY = {**tiny.BASE, **tiny.FEATURES["qwen2"], "model_type": "qwen2", "num_hidden_layers": 3, "vocab_size": 96}
KEYS = {"argument_bytes", "temp_bytes", "output_bytes", "flops"}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def one_device(config_file):
    return planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32"))


def test_cli_json_has_the_documented_keys(config_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", "--config", str(config_file), "--batch-size", "4", "--seq-len", "16", "--dtype", "float32",
                    "--json", "--out", str(out), "--device-memory", "1GB"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert doc["devices"] == 1 and set(doc["steps"]) == {"fisher", "hessian", "solve"}
    for name, step in doc["steps"].items():
        assert set(step) >= KEYS, name
        assert step["argument_bytes"] > 0 and step["flops"] > 0, name
    assert doc["fit"]["device_bytes"] == 10**9 and doc["fit"]["over"] == []
    assert doc["expected_time_s"]["total"] > 0 and doc["expected_time_s"]["accelerator"] == "H100-SXM"


def test_numbers_follow_the_model(one_device):
    """The Fisher step's arguments are the float32 model (+ a small state and batch); its FLOPs are
    at least those of a forward and a backward pass through the block linears."""
    from hcnr_jax.config import config_from_hf

    cfg = config_from_hf(TINY)
    f = one_device["steps"]["fisher"]
    params = one_device["model"]["params"]
    assert 4 * params <= f["argument_bytes"] < 4 * params + 2**16
    d, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    linear = cfg.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * i)
    assert f["flops"] >= 4 * linear * 4 * 16
    h = one_device["steps"]["hessian"]
    # The accumulators are donated and updated in place (the output's tuple index is not aliased).
    assert 0 < h["output_bytes"] - h["alias_bytes"] < 1024
    assert one_device["steps"]["solve"]["runs"] == 8  # top_count(0.4, 21) kept layers
    assert one_device["steps"]["fisher"]["runs"] == 2 * 32  # 128 / 4 batches of each data set


def test_hessian_passes_shrink_the_hessian_step(one_device):
    """Two passes: the step holds about half the accumulators and runs twice as often."""
    two = planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32",
                                                   repair={"hessian_passes": 2}))
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.repair import RepairConfig
    from hcnr_jax.stats.hessian_accum import split_passes

    cfg = config_from_hf(TINY)
    groups = split_passes(planlib.kept_owners(cfg, RepairConfig()), cfg, 2)
    sizes = sorted(sum(4 * planlib._in_dim(cfg, o) ** 2 for o in g) for g in groups)
    assert len(sizes) == 2 and sizes[0] > 0.8 * sizes[1]  # balanced
    h1, h2 = one_device["steps"]["hessian"], two["steps"]["hessian"]
    assert h1["argument_bytes"] - h2["argument_bytes"] == sizes[0]  # the smaller pass's accumulators are gone
    assert h2["runs"] == 2 * h1["runs"] and h2["passes"] == 2 and h1["passes"] == 1
    assert "largest of 2 passes" in h2["what"]
    fisher = [{k: v for k, v in p["steps"]["fisher"].items() if k != "compile_s"} for p in (two, one_device)]
    assert fisher[0] == fisher[1]


def test_advice_on_hessian_passes_is_what_fits(one_device):
    """A Hessian step just over the device's memory: the plan names the number of passes, and the plan
    with that many passes does fit."""
    import re

    h = one_device["steps"]["hessian"]
    extra = planlib.resident_bytes(one_device, "hessian")
    device = h["peak_bytes"] + extra - 1
    line = next(x for x in planlib.check_fit(one_device, device) if x.startswith("hessian:"))
    n = int(re.search(r"--hessian-passes (\d+) would", line).group(1))
    assert n == 2
    fewer = planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32",
                                                     repair={"hessian_passes": n}))
    assert not any(x.startswith("hessian:") for x in planlib.check_fit(fewer, device))
    assert h["state_bytes"] == h["state_bytes_all_passes"] > 0
    fisher = next(x for x in planlib.check_fit(one_device, 1000) if x.startswith("fisher:"))
    assert "--batch-size" in fisher and "--max-targets" in fisher


def test_device_memory_names_the_step_and_the_excess(one_device):
    f = planlib.step_need(one_device, "fisher")
    over = planlib.check_fit(one_device, f - 1000)
    assert over and over[0].startswith("fisher: needs") and "over by" in over[0]
    assert planlib.check_fit(one_device, 10**12) == []
    text = planlib.format_plan(one_device, device_bytes=f - 1000)
    assert "fisher: needs" in text and "H100" in text


def test_simulated_devices_in_a_subprocess(one_device):
    """More devices than this process has: the plan runs in a subprocess with simulated devices,
    and the model axis divides each device's share of the weights."""
    assert len(jax.devices()) < 4
    four = planlib.plan_on_devices(planlib.PlanRequest(hf_config=TINY, devices=4, mesh_spec="data=1,model=4",
                                                       batch_size=4, seq_len=16, dtype="float32"))
    assert four["devices"] == 4 and four["mesh"] == {"data": 1, "model": 4}
    one, split = one_device["steps"]["fisher"], four["steps"]["fisher"]
    assert split["argument_bytes"] < 0.5 * one["argument_bytes"]
    assert split["flops"] < 0.5 * one["flops"]
    assert four["warnings"] == []  # every tiny dimension divides by 4
    # hcnr repair --mesh places a model in the same sharding as the step's own model argument (+ a
    # small state and batch); without --mesh, whole on the first device.
    r4, r1 = four["resident"], one_device["resident"]
    model, per = r4["model_bytes"], r4["model_bytes_per_device"]
    assert per <= split["argument_bytes"] < per + 2**16 and per < 0.5 * model
    assert r1["model_bytes_per_device"] == r1["model_bytes"] == model == 4 * one_device["model"]["params"]
    # The idle model waits in host memory: nothing beside the statistics steps; beside the solve the
    # fine-tuned model (repaired in place), each device with its shard.
    for r, m in ((r4, per), (r1, model)):
        assert r["by_step"]["fisher"] == r["by_step"]["hessian"] == 0
        assert r["by_step"]["solve"] == m
    assert 0 < r4["kept_layers_bytes"] < 0.5 * r1["kept_layers_bytes"]


def test_resident_beside_each_step(one_device):
    """What hcnr repair holds beside each step: with --no-offload the idle model beside every step;
    the repaired kept layers a caller's models keep beside the solve (``kept_layers_bytes``) are the
    r_cw share of the largest linears (worst case)."""
    import math

    from hcnr_jax.config import config_from_hf
    from hcnr_jax.params import linear_names, param_specs
    from hcnr_jax.repair import RepairConfig
    from hcnr_jax.repair.selection import top_count

    r = one_device["resident"]
    cfg, rcfg = config_from_hf(TINY), RepairConfig()
    specs = param_specs(cfg)
    sizes = sorted((math.prod(specs[n]) for n in linear_names(cfg)), reverse=True)
    assert r["kept_layers_bytes"] == 4 * sum(sizes[: top_count(rcfg.r_cw, len(sizes))])
    assert sorted(planlib.kept_worst_case(cfg, rcfg, math.prod)) == sorted(
        sorted(linear_names(cfg), key=lambda n: -math.prod(specs[n]))[: top_count(rcfg.r_cw, len(sizes))])
    stay = planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32",
                                                    offload_idle=False))
    model = r["model_bytes"]
    assert stay["resident"]["by_step"] == {"fisher": model, "hessian": model, "solve": 2 * model}
    assert {n: planlib.step_need(stay, n) - planlib.step_need(one_device, n) for n in planlib.STEPS} == {
        "fisher": model, "hessian": model, "solve": model}
    assert "idle model waits in host memory" in planlib.format_plan(one_device)
    assert "--no-offload" in planlib.format_plan(stay)


def test_extrapolated_layers_match_the_full_compile(one_device):
    """The Fisher compiled at 1 and 2 layers and extrapolated to 3; the Hessian is compiled whole."""
    ext = planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32",
                                                   layers="extrapolate"))
    full, est = one_device["steps"]["fisher"], ext["steps"]["fisher"]
    assert "extrapolated" in est["what"]
    assert est["argument_bytes"] == pytest.approx(full["argument_bytes"], rel=0.01)
    assert est["flops"] == pytest.approx(full["flops"], rel=0.01)
    assert est["peak_bytes"] == pytest.approx(full["peak_bytes"], rel=0.1)
    h = ext["steps"]["hessian"]
    assert "extrapolated" not in h["what"] and h["peak_bytes"] == one_device["steps"]["hessian"]["peak_bytes"]


def test_bfloat16_weight_copies_of_the_cpu_compiler_are_reported(one_device):
    """The CPU compiler multiplies bfloat16 in float32: the plan reports the float32 weight copies
    the compiled module makes of its arguments and a low estimate without them. The Fisher's blocks
    convert their weights only when they run (``model.after``), inside fusions, so of the whole-weight
    copies jax 0.10's XLA used to make (every block linear and the LM head) at most the LM head's
    is left."""
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.params import param_specs

    bf16 = planlib.compute_plan(planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="bfloat16"))
    f = bf16["steps"]["fisher"]
    specs = param_specs(config_from_hf(TINY))
    upcast = f.get("cpu_upcast_bytes", 0)
    assert 0 <= upcast <= 4 * specs["lm_head.weight"][0] * specs["lm_head.weight"][1]
    assert f.get("accelerator_peak_bytes", f["peak_bytes"]) == max(f["peak_bytes"] - upcast, f["argument_bytes"])
    # Half-size weights cannot need more than the float32 model does.
    assert f["peak_bytes"] - upcast <= one_device["steps"]["fisher"]["peak_bytes"]


def test_passes_chosen_to_fit_and_batch_size_that_fits(one_device):
    """With a device size and no passes set, the plan picks the fewest Hessian passes that fit, and
    its compiled step does fit; ``fit_settings`` halves the batch until every step fits, and names
    the steps when nothing does."""
    h = one_device["steps"]["hessian"]
    extra = planlib.resident_bytes(one_device, "hessian")
    device = h["peak_bytes"] + extra - 1  # one pass is one byte too many
    req = planlib.PlanRequest(hf_config=TINY, batch_size=4, seq_len=16, dtype="float32", device_bytes=device,
                              auto_hessian_passes=True)
    auto = planlib.compute_plan(req)
    chosen = auto["hessian_passes_chosen"]
    assert chosen["passes"] == 2 and chosen["fits"] and auto["steps"]["hessian"]["passes"] == 2
    assert auto["steps"]["hessian"]["peak_bytes"] + extra <= device
    assert "hessian passes: 2, chosen to fit" in planlib.format_plan(auto, device_bytes=device)

    f = planlib.step_need(one_device, "fisher")  # batch 4 is one byte over in the Fisher
    fitted, result = planlib.fit_settings(dataclasses.replace(req, device_bytes=None, auto_hessian_passes=False),
                                          f - 1)
    assert fitted.batch_size == 2 and planlib.check_fit(result, f - 1) == []
    assert fitted.repair["hessian_passes"] == result["steps"]["hessian"]["passes"]
    with pytest.raises(planlib.HcnrError, match=r"no batch size of 4, 2, 1 fits .*fisher: needs"):
        planlib.fit_settings(req, 1000)


def test_helpers_and_errors(config_file, tmp_path, capsys):
    assert planlib.parse_bytes("80GB") == 80 * 10**9 and planlib.parse_bytes("1GiB") == 2**30
    text = ("%0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0], precision = [HIGHEST, HIGHEST] : "
            "(tensor<4x8xbf16>, tensor<8x3xbf16>) -> tensor<4x3xf32>")
    assert planlib.dot_flops_by_dtype(text) == {"bf16": 2 * 4 * 3 * 8}
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    assert cli_main(["plan", "--config", str(bad)]) == 2
    assert cli_main(["plan", "--config", str(config_file), "--mesh", "data=3", "--devices", "4"]) == 2
    assert "hcnr plan: error" in capsys.readouterr().err


def test_repair_settings_fitted_to_a_device(one_device):
    """``hcnr repair`` on an accelerator: the batch is halved to fit, a batch the user set stays and
    fails with the steps named; on a CPU nothing is planned."""
    from hcnr_jax.repair import RepairConfig

    rcfg = RepairConfig().override(batch_size=4, max_length=16)
    device = planlib.step_need(one_device, "fisher") - 1  # batch 4 is just over (float32)
    tiny32 = {**TINY, "torch_dtype": "float32"}
    fitted, line = planlib.fit_repair(tiny32, rcfg, devices=1, mesh_spec=None, fsdp=False, device_bytes=device,
                                      batch_fixed=False, passes_fixed=False, layers="full")
    assert fitted.batch_size == 2 and f"--batch-size 2 --hessian-passes {fitted.hessian_passes}" in line
    with pytest.raises(planlib.HcnrError, match=r"no batch size of 4 fits .*--mesh model=N"):
        planlib.fit_repair(tiny32, rcfg, devices=1, mesh_spec=None, fsdp=False, device_bytes=device, batch_fixed=True,
                           passes_fixed=False, layers="full")
    assert jax.devices()[0].platform != "cpu" or planlib.local_device_bytes() is None
