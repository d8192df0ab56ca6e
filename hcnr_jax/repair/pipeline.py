"""HCNR end to end: statistics -> selection -> restoration + compensation -> repaired model.

`repair` is the library entry point (``hcnr_jax.repair``); `write_repair` writes its result
atomically as a HF directory with ``hcnr_report.json``, ``hcnr_report.md`` and PNG plots beside
the weights. Side effects (loading, logging, timing) stay here; the math lives in the pure
functions of `selection` and `solvers`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax import interrupt
from hcnr_jax.embedded import calibration_file
from hcnr_jax.errors import CheckpointError, DataError
from hcnr_jax.params import get, linear_names, param_specs, set_leaves
from hcnr_jax.pretrained import Pretrained, load_pretrained
from hcnr_jax.repair import selection
from hcnr_jax.repair.config import RepairConfig
from hcnr_jax.repair.solvers import as_float32, layer_objective, restore_only, solve
from hcnr_jax.stats.hessian_accum import split_passes

log = logging.getLogger("hcnr_jax.repair")

@dataclass
class RepairResult:
    """The repaired model (fine-tuned input's dtype, config, tokenizer) and the report dict."""

    model: Pretrained
    report: dict[str, Any]


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """Peak RSS of this process since the last reset: VmHWM on Linux (per address space, so not
    inherited from a parent across exec, unlike ru_maxrss), else the lifetime ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class _Clock:
    """Per-stage wall time and peak memory: host RSS peak within the stage where the kernel lets
    us reset the high-water mark (else the process peak so far), and the device peak if known."""

    progress: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    peak_device_mib: dict[str, float] = field(default_factory=dict)
    rss_method: str = "per-stage VmHWM"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            log.info("[%s] ...", name)
        if not _reset_peak_rss():
            self.rss_method = "process high-water mark so far"
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.peak_rss_mib[name] = _peak_rss_mib()
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:
            self.peak_device_mib[name] = stats["peak_bytes_in_use"] / 2**20
        if self.progress:
            log.info("[%s] done in %.1fs (peak RSS %.0f MiB)", name, self.seconds[name], self.peak_rss_mib[name])


def check_compatible(base: Pretrained, finetuned: Pretrained) -> None:
    """Raise `CheckpointError` if the two models differ in architecture, shapes or vocabulary."""
    from hcnr_jax.preflight import check_same_architecture

    a, b = base.config, finetuned.config
    where = f"base {base.source} vs fine-tuned {finetuned.source}"
    # Sizes by name first ("hidden_size 576 vs 64"), rather than the tensor sets they imply.
    check_same_architecture([("base", base.source, a), ("fine-tuned", finetuned.source, b)])
    sa, sb = param_specs(a), param_specs(b)
    if set(sa) != set(sb):
        diff = sorted(set(sa) ^ set(sb))
        raise CheckpointError(f"{where}: tensor sets differ (e.g. {diff[:3]})")
    for name in sa:
        if sa[name] != sb[name]:
            raise CheckpointError(f"{where}: {name} has shape {sa[name]} vs {sb[name]}")
    if a != b:
        fields = [f for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]
        raise CheckpointError(f"{where}: configurations differ in {fields}")
    ta, tb = base.tokenizer, finetuned.tokenizer
    if ta is not None and tb is not None and ta.get_vocab() != tb.get_vocab():
        raise CheckpointError(f"{where}: tokenizer vocabularies differ")


def _load_model(src: Pretrained | str | Path, what: str, mesh: Any = None, fsdp: bool = False) -> Pretrained:
    """``src`` loaded (onto ``mesh``'s devices, placed by weight role, when given)."""
    if isinstance(src, Pretrained):
        return src
    return load_pretrained(src) if mesh is None else load_pretrained(src, mesh=mesh, fsdp=fsdp)


def _load_data(data: Any, kind: str, model: Pretrained, cfg: RepairConfig) -> tuple[Any, dict[str, Any]]:
    """``data``: Samples, a JSONL path, or None (the bundled file). Returns samples and their record."""
    from hcnr_jax.data import Samples, load_samples
    from hcnr_jax.io import sha256_file

    if isinstance(data, Samples):
        samples = data if cfg.limit is None else data.select(slice(0, cfg.limit))
        info: dict[str, Any] = {"path": None, "file_sha256": None}
    else:
        path = Path(data) if data is not None else calibration_file(kind)
        samples = load_samples(path, model.tokenizer, max_length=cfg.max_length, limit=cfg.limit,
                               vocab_size=model.config.vocab_size)
        info = {"path": str(path) if data is not None else f"<bundled>/{path.name}", "file_sha256": sha256_file(path)}
    if len(samples) == 0:
        raise DataError(f"{kind} data: no samples")
    if int(np.max(samples.input_ids)) >= model.config.vocab_size:
        raise DataError(f"{kind} data: token id {int(np.max(samples.input_ids))} is outside the vocabulary "
                        f"of {model.config.vocab_size}")
    info.update(samples_sha256=samples.sha256, samples=len(samples), tokens=samples.num_tokens,
                target_tokens=int(samples.loss_mask.sum()), max_length=int(samples.input_ids.shape[1]))
    return samples, info


def _module(name: str) -> str:
    return name.rsplit(".", 2)[-2]


class _DeviceHessians:
    """Each kept layer's H on the device, summed there over the calibration sets, built when the
    solve reaches the layer. The statistics return host arrays, and layers that read the same
    input share one object (q/k/v, gate/up: consecutive in model order); the last device H is
    kept for the next layer while its parts are the same objects, so each distinct H is copied
    (and summed) once, and only one lives on the device at a time, as before."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}
        self._key: tuple[int, ...] | None = None
        self._dev: jax.Array | None = None

    def add(self, hess: Mapping[str, Any]) -> None:
        for n, h in hess.items():
            self.parts.setdefault(n, []).append(h)

    def pop(self, name: str) -> jax.Array:
        parts = self.parts.pop(name)  # the host arrays go once their last layer is solved
        key = tuple(id(p) for p in parts)  # unique while `parts` holds them
        if key != self._key:
            self._key, self._dev = None, None  # free the previous one before copying the next
            dev = jnp.asarray(parts[0], jnp.float32)
            for p in parts[1:]:
                dev = dev + jnp.asarray(p, jnp.float32)
            self._key, self._dev = key, dev
        return self._dev


def prepare(base: Pretrained | str | Path, finetuned: Pretrained | str | Path, honesty_data: Any = None,
            task_data: Any = None, config: RepairConfig | None = None, *, mesh: Any = None, fsdp: bool = False,
            **overrides: Any):
    """Load and validate everything a repair needs, computing nothing. Raises on any bad input.
    ``mesh`` (a Mesh) / ``fsdp``: load the models straight onto its devices."""
    from hcnr_jax.preflight import check_pair_inputs

    cfg = (config or RepairConfig()).override(**overrides) if overrides else (config or RepairConfig()).validate()
    check_pair_inputs(base, finetuned, (honesty_data, task_data))  # data, then configs: before any weight
    base_m = _load_model(base, "base", mesh, fsdp)
    ft_m = _load_model(finetuned, "fine-tuned", mesh, fsdp)
    check_compatible(base_m, ft_m)
    hon, hon_info = _load_data(honesty_data, "honesty", ft_m, cfg)
    task, task_info = _load_data(task_data, "task", ft_m, cfg)
    return cfg, base_m, ft_m, hon, hon_info, task, task_info


def plan(base: Pretrained, cfg: RepairConfig, hon: Any, task: Any, *, mesh: str | None = None,
         fsdp: bool = False) -> dict[str, Any]:
    """What a repair would change, and XLA's compiled per-device memory and FLOPs of its steps
    (``--dry-run``): the Fisher update, the Hessian update of the kept layers (worst case: the
    largest) and one layer's solve are compiled on abstract inputs of this model, data and
    settings (``hcnr_jax.plan``); nothing is computed."""
    from hcnr_jax import plan as planlib
    from hcnr_jax.stats.fisher_accum import target_capacity

    mc = base.config
    names = linear_names(mc)
    specs = param_specs(mc)
    by_module: dict[str, dict[str, Any]] = {}
    for n in names:
        out_dim, in_dim = specs[n]
        n_neurons = in_dim if cfg.neuron_axis == "input" else out_dim
        m = by_module.setdefault(_module(n), {"layers": 0, "shape": [out_dim, in_dim], "neurons": n_neurons,
                                              "candidates": selection.top_count(cfg.r_iw, n_neurons)})
        m["layers"] += 1
    units = len(names) if cfg.layer_unit == "module" else mc.num_layers
    kept = selection.top_count(cfg.r_cw, units)
    linear_params = sum(int(np.prod(specs[n])) for n in names)
    all_params = sum(int(np.prod(s)) for s in specs.values())
    req = planlib.PlanRequest(
        hf_config=base.hf_config, devices=jax.device_count(), mesh=mesh, fsdp=fsdp, batch_size=cfg.batch_size,
        seq_len=max(hon.input_ids.shape[1], task.input_ids.shape[1]),
        max_targets=max(target_capacity(hon.loss_mask), target_capacity(task.loss_mask)),
        dtype=str(np.dtype(base.dtype)), repair=cfg.to_dict(), num_honesty=len(hon), num_task=len(task))
    compiled = planlib.compute_plan(req, cfg=mc)
    mib = {name: {k.removesuffix("_bytes"): round(s[k] / 2**20, 1)
                  for k in ("argument_bytes", "temp_bytes", "output_bytes", "peak_bytes")}
           for name, s in compiled["steps"].items()}
    resident = compiled["resident"]["first_device_extra_bytes"]
    memory = {**mib, "resident_models": round(resident / 2**20, 1),
              "total": round((max(s["peak_bytes"] for s in compiled["steps"].values()) + resident) / 2**20, 1)}
    return {
        "layers": len(names), "units": units, "unit": cfg.layer_unit, "units_kept": kept,
        "modules": by_module, "linear_params": linear_params, "all_params": all_params,
        "expected_restored_fraction_of_linear": cfg.r_iw * cfg.r_cw,
        "memory_mib": memory,
        "compiled": {"devices": compiled["devices"], "platform": compiled["platform"], "mesh": compiled["mesh"],
                     "steps": {n: {k: v for k, v in s.items() if k != "dot_flops_by_dtype"}
                               for n, s in compiled["steps"].items()},
                     "warnings": compiled["warnings"],
                     "method": "XLA compiled memory_analysis()/cost_analysis() per device (hcnr_jax.plan); "
                               "total = the largest step peak + the models resident on the first device"},
    }


def repair(
    base: Pretrained | str | Path,
    finetuned: Pretrained | str | Path,
    honesty_data: Any = None,
    task_data: Any = None,
    config: RepairConfig | None = None,
    *,
    progress: bool = True,
    stats_options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> RepairResult:
    """Repair ``finetuned`` towards ``base`` with HCNR (docs/method.md) and return the model + report.

    ``base``/``finetuned``: `Pretrained` or a source as in ``hcnr convert``. ``honesty_data`` /
    ``task_data``: `Samples`, a JSONL path, or None for the bundled calibration files.
    ``config`` (default `RepairConfig()`) with keyword ``overrides`` (e.g. ``r_iw=0.3``).
    ``stats_options`` are passed to the statistics engine (mesh, fsdp, backend, cache_dir, ...); with
    a ``mesh`` (a Mesh or a spec like ``"data=2,model=4"``) the models are loaded onto it and the
    statistics, Hessians and solves run sharded by weight role.
    The result has the fine-tuned model's dtype, config and tokenizer.
    """
    from hcnr_jax import sharding, stats

    clock = _Clock(progress)
    stats_options = dict(stats_options or {})
    if stats_options.get("mesh") is not None and not isinstance(stats_options["mesh"], jax.sharding.Mesh):
        stats_options["mesh"] = sharding.make_mesh(stats_options["mesh"])
    with clock.stage("load"):
        cfg, base_m, ft_m, hon, hon_info, task, task_info = prepare(
            base, finetuned, honesty_data, task_data, config, mesh=stats_options.get("mesh"),
            fsdp=bool(stats_options.get("fsdp")), **overrides)
    mc = ft_m.config
    names = linear_names(mc)
    models = {"orig": base_m.params, "sft": ft_m.params}
    sopts = {"batch_size": cfg.batch_size, "progress": progress, **stats_options}

    with clock.stage("fisher"):
        s_hon = stats.fisher(models[cfg.fisher_hon_model], mc, hon, neuron_axis=cfg.neuron_axis, **sopts)
        s_task = stats.fisher(models[cfg.fisher_task_model], mc, task, neuron_axis=cfg.neuron_axis, **sopts)

    def weights(name: str) -> tuple[jax.Array, jax.Array]:
        # Device float32 copies of one layer; only norms and objectives come to the host.
        return as_float32(get(base_m.params, name)), as_float32(get(ft_m.params, name))

    with clock.stage("select"):
        layers = selection.select(
            names, weights, s_hon, s_task, r_iw=cfg.r_iw, r_cw=cfg.r_cw, priority=cfg.priority,
            layer_unit=cfg.layer_unit, layer_budget=cfg.layer_budget, neuron_axis=cfg.neuron_axis,
            eps=cfg.eps, seed=cfg.seed)
        del s_hon, s_task

    with clock.stage("hessian"):
        calib = {"hon": [hon], "task": [task], "both": [hon, task]}[cfg.calib_data]
        kept_names = [sl.name for sl in layers if sl.kept]
        hess = _DeviceHessians()
        # Only the kept layers' H are accumulated, in hessian_passes groups (the results come back to
        # the host, so a pass's accumulators leave the device before the next); layers sharing an
        # input share one array object. The sum over sets is taken on the device in the solve.
        for group in split_passes(kept_names, mc, cfg.hessian_passes):
            for samples in calib:
                hess.add(stats.hessian(models[cfg.calib_model], mc, samples, layers=group, **sopts))

    updates: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    with clock.stage("solve"):
        from tqdm.auto import tqdm

        for sl in tqdm(layers, desc="solve", disable=not progress, dynamic_ncols=True):
            interrupt.check(updates, where=f"solve: before layer {sl.name}")
            rec: dict[str, Any] = {
                "name": sl.name, "module": _module(sl.name), "shape": list(sl.shape), "d": sl.d,
                "d_layer": sl.d_layer, "kept": sl.kept, "restored_neurons": int(sl.restored.sum()),
                "restored_params": sl.restored_params, "params": int(np.prod(sl.shape)),
            }
            if sl.kept:
                w_orig, w_sft = weights(sl.name)
                h = hess.pop(sl.name)  # float32 on the device
                if cfg.neuron_axis == "input":
                    res = solve(cfg.solver, w_orig, w_sft, h, sl.restored, cfg.damping, **dict(cfg.solver_options))
                    w_new, before, after, lam = res.w_new, res.objective_before, res.objective_after, res.damping
                else:
                    # Rows decouple in tr(D H D^T): restoring a row zeroes its error, which is
                    # already the optimum, so every solver reduces to restore-only here.
                    w_new = restore_only(w_orig.T, w_sft.T, sl.restored).T
                    before = after = layer_objective(w_new, w_orig, h)
                    lam = cfg.damping
                updates[sl.name] = jnp.asarray(w_new).astype(get(ft_m.params, sl.name).dtype)  # cast on device
                rec.update(objective_sft=layer_objective(w_sft, w_orig, h), objective_before=before,
                           objective_after=after, damping=lam)
                del w_orig, w_sft, h  # the next layer's device H may replace this one
            records.append(rec)
        del hess
        new_params = set_leaves(ft_m.params, updates) if updates else ft_m.params

    report = build_report(cfg, base_m, ft_m, hon_info, task_info, records, clock)
    return RepairResult(ft_m.replace(params=new_params), report)


def build_report(cfg: RepairConfig, base: Pretrained, ft: Pretrained, hon_info: dict[str, Any],
                 task_info: dict[str, Any], records: list[dict[str, Any]], clock: _Clock) -> dict[str, Any]:
    """The report dict. Everything except ``timing_s`` and ``memory`` depends only on the inputs."""
    import hcnr_jax

    specs = param_specs(ft.config)
    linear = sum(r["params"] for r in records)
    total = sum(int(np.prod(s)) for s in specs.values())
    restored = sum(r["restored_params"] for r in records)
    per_module: dict[str, dict[str, float]] = {}
    for r in records:
        m = per_module.setdefault(r["module"], {"params": 0, "restored_params": 0, "layers": 0, "kept": 0})
        m["params"] += r["params"]
        m["restored_params"] += r["restored_params"]
        m["layers"] += 1
        m["kept"] += int(r["kept"])
    for m in per_module.values():
        m["restored_fraction"] = m["restored_params"] / m["params"]
    kept = [r for r in records if r["kept"]]
    return {
        "hcnr_jax_version": hcnr_jax.__version__,
        "settings": cfg.to_dict(),
        "models": {"base": base.source, "finetuned": ft.source, "model_type": ft.config.model_type,
                   "dtype": str(ft.dtype), "num_layers": ft.config.num_layers},
        "data": {"honesty": hon_info, "task": task_info},
        "summary": {
            "layers": len(records), "layers_kept": len(kept), "linear_params": linear, "model_params": total,
            "restored_params": restored, "restored_fraction_of_linear": restored / linear,
            "restored_fraction_of_model": restored / total, "target_fraction": cfg.r_iw * cfg.r_cw,
            "objective_sft": sum(r["objective_sft"] for r in kept),
            "objective_before": sum(r["objective_before"] for r in kept),
            "objective_after": sum(r["objective_after"] for r in kept),
            "compensation": "restore-only (rows decouple)" if cfg.neuron_axis == "output" else cfg.solver,
        },
        "restored_by_module": per_module,
        "layers": records,
        "timing_s": {k: round(v, 3) for k, v in clock.seconds.items()},
        "memory": {"peak_rss_mib": {k: round(v, 1) for k, v in clock.peak_rss_mib.items()},
                   "rss_method": clock.rss_method,
                   "peak_device_mib": {k: round(v, 1) for k, v in clock.peak_device_mib.items()}},
    }


# Report keys that vary between identical runs (kept out of the determinism guarantee).
VOLATILE_KEYS = ("timing_s", "memory")


def write_repair(result: RepairResult, out_dir: str | Path, *, plots: bool = True, overwrite: bool = False,
                 dtype: str | None = None) -> Path:
    """Write the repaired model as a HF directory, with ``hcnr_report.json``/``.md`` and PNG plots
    beside the weights; the directory appears only once complete. ``dtype`` ("bfloat16", "float16",
    "float32"): cast the written weights (default: the model's own, the fine-tuned input's)."""
    from hcnr_jax.io import atomic_output_dir, strict_json
    from hcnr_jax.pretrained import save_pretrained
    from hcnr_jax.repair.output import cast
    from hcnr_jax.repair.report import render_markdown

    # A NaN or infinity in the report (an objective that overflowed) is refused before anything is written.
    report_json = strict_json(result.report, Path(out_dir) / "hcnr_report.json", indent=2) + "\n"
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_pretrained(result.model if dtype is None else cast(result.model, dtype), tmp, overwrite=True)
        (tmp / "hcnr_report.json").write_text(report_json)
        (tmp / "hcnr_report.md").write_text(render_markdown(result.report))
        if plots:
            from hcnr_jax.repair.plots import write_plots

            write_plots(result.report, tmp)
    return Path(out_dir)


__all__ = ["VOLATILE_KEYS", "RepairResult", "check_compatible", "plan",
           "prepare", "repair", "write_repair"]
