"""HCNR end to end, as named stages over one `RepairState`:

``load`` -> ``fisher_scores`` -> ``select_layers`` -> ``layer_hessians`` -> ``solve_layers`` ->
``build_report``, then ``write_repair`` (the caller's, with an output path).

`repair` is the library entry point (``hcnr_jax.repair``); it runs the stages in order, each timed
by a `StageClock`. `write_repair` writes its result atomically as a HF directory with
``hcnr_report.json``, ``hcnr_report.md`` and PNG plots beside the weights. Side effects (loading,
logging, timing) stay here; the math lives in the pure functions of `selection` and `solvers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hcnr_jax import interrupt, offload
from hcnr_jax.data.samples import Samples, load_samples
from hcnr_jax.embedded import calibration_file
from hcnr_jax.errors import CheckpointError, DataError
from hcnr_jax.offload import Offloaded, release_free_heap
from hcnr_jax.params import Params, get, linear_names, param_specs, set_leaves
from hcnr_jax.pretrained import Pretrained, load_pretrained
from hcnr_jax.repair import selection
from hcnr_jax.repair.clock import StageClock
from hcnr_jax.repair.config import RepairConfig
from hcnr_jax.repair.selection import LayerSelection
from hcnr_jax.repair.solvers import as_float32, layer_objective, restore_only, solve
from hcnr_jax.stats import StatsOptions
from hcnr_jax.stats.hessian_accum import split_passes

_ATTR = {"orig": "base", "sft": "finetuned"}  # a model's name in the settings -> its RepairState field


@dataclass
class RepairResult:
    """The repaired model (fine-tuned input's dtype, config, tokenizer) and the report dict."""

    model: Pretrained
    report: dict[str, Any]


@dataclass
class RepairState:
    """What the stages share: the validated inputs (``load``) and what the later stages add
    (``layers`` from ``select_layers``; ``records`` and ``params`` from ``solve_layers``). The
    Fisher scores and the Hessians are passed from stage to stage instead, so that each is freed
    as soon as its last stage is done."""

    cfg: RepairConfig
    options: StatsOptions  # how the statistics run (batch size from cfg, mesh, result folder, ...)
    base: Pretrained
    finetuned: Pretrained
    honesty: Samples
    task: Samples
    data: dict[str, dict[str, Any]]  # {"honesty": record, "task": record}: the report's "data"
    layers: list[LayerSelection] = dataclasses.field(default_factory=list)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    params: Params | None = None  # the repaired parameters
    # The models this repair loaded itself ("orig", "sft"): only those can leave device memory while
    # the stages work on the other (a caller's `Pretrained` stays referenced by the caller).
    owned: frozenset[str] = frozenset()
    offload_idle: bool = False
    away: dict[str, Offloaded] = dataclasses.field(default_factory=dict)  # models out of device memory

    def model(self, name: str) -> Pretrained:
        """Model ``name`` ("orig" or "sft"); its ``params`` are None while it is away."""
        return getattr(self, _ATTR[name])

    def models(self) -> dict[str, Params]:
        """The two parameter sets by the names settings use ("orig", "sft")."""
        return {"orig": self.base.params, "sft": self.finetuned.params}

    def use(self, name: str) -> None:
        """Make model ``name`` the one in device memory: with ``offload_idle``, the other (if this
        repair loaded it) waits in host memory, or on a CPU in files of the statistics folder
        (`hcnr_jax.offload`), and comes back, bit for bit, when it is used. A statistics pass runs
        on one model and the solve needs the other one layer at a time (`weights`): without this
        the idle model sits beside each pass's activations."""
        release_free_heap()  # the last pass's temporaries, before a model moves
        other = "sft" if name == "orig" else "orig"
        idle = self.model(other)
        if (self.offload_idle and other in self.owned and other not in self.away
                and offload.can_offload(idle.params)):
            self.away[other] = offload.offload(idle.params, self.options.cache_dir)
            setattr(self, _ATTR[other], idle.replace(params=None))  # the last reference goes
        del idle
        if name in self.away:  # after the other left: never both at once on the way
            setattr(self, _ATTR[name], self.model(name).replace(params=offload.restore(self.away.pop(name))))

    def release(self) -> None:
        """Drop the models that are away (their files deleted); the end of a repair."""
        for off in self.away.values():
            offload.discard(off)
        self.away.clear()

    def layer(self, model: str, name: str) -> jax.Array:
        """Weight ``name`` of model ``model``, from device memory or, while the model is away, alone."""
        return self.away[model].get(name) if model in self.away else get(self.model(model).params, name)

    def weights(self, name: str) -> tuple[jax.Array, jax.Array]:
        """Device float32 copies of one layer, base and fine-tuned (only norms and objectives come
        to the host)."""
        return as_float32(self.layer("orig", name)), as_float32(self.layer("sft", name))


# --- load -----------------------------------------------------------------------------------------

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


def load_model(src: Pretrained | str | Path, options: StatsOptions) -> Pretrained:
    """``src`` loaded (onto ``options.mesh``'s devices, placed by weight role, when it has one)."""
    if isinstance(src, Pretrained):
        return src
    return load_pretrained(src) if options.mesh is None else load_pretrained(src, mesh=options.mesh,
                                                                               fsdp=options.fsdp)


def load_repair_data(data: Samples | str | Path | None, kind: str, model: Pretrained,
                     cfg: RepairConfig) -> tuple[Samples, dict[str, Any]]:
    """``data``: Samples, a JSONL path, or None (the bundled file). Returns samples and their record."""
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


def resolve_config(config: RepairConfig | None, overrides: Mapping[str, Any]) -> RepairConfig:
    """``config`` (default `RepairConfig()`) with keyword ``overrides``, validated."""
    cfg = config or RepairConfig()
    return cfg.override(**overrides) if overrides else cfg.validate()


def load(base: Pretrained | str | Path, finetuned: Pretrained | str | Path, honesty_data: Any, task_data: Any,
         cfg: RepairConfig, options: StatsOptions | None = None, *, offload_idle: bool = False) -> RepairState:
    """Stage "load": validate and load everything a repair needs, computing nothing; raises on any
    bad input (the data files, then the models' configs, before any weight is read). With
    ``options.mesh`` the models are loaded straight onto its devices. ``offload_idle``: the base
    model waits outside device memory while the fine-tuned one loads (`RepairState.use`); the
    caller then owns the state's `RepairState.release`."""
    from hcnr_jax.preflight import check_pair_inputs

    options = options or StatsOptions(batch_size=cfg.batch_size)
    check_pair_inputs(base, finetuned, (honesty_data, task_data))
    owned = frozenset(n for n, src in (("orig", base), ("sft", finetuned)) if not isinstance(src, Pretrained))
    away: dict[str, Offloaded] = {}
    base_m = load_model(base, options)
    if offload_idle and "orig" in owned and offload.can_offload(base_m.params):
        away["orig"] = offload.offload(base_m.params, options.cache_dir)
        base_m = base_m.replace(params=None)
    release_free_heap()  # the first model's conversion buffers, before the second's
    try:
        ft_m = load_model(finetuned, options)
        check_compatible(base_m, ft_m)  # configs, tensor shapes and vocabularies: no weights needed
        hon, hon_info = load_repair_data(honesty_data, "honesty", ft_m, cfg)
        task, task_info = load_repair_data(task_data, "task", ft_m, cfg)
    except BaseException:
        for off in away.values():
            offload.discard(off)
        raise
    return RepairState(cfg, options, base_m, ft_m, hon, task, {"honesty": hon_info, "task": task_info}, owned=owned,
                       offload_idle=offload_idle, away=away)


# --- statistics and selection ---------------------------------------------------------------------

def fisher_scores(state: RepairState) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Stage "fisher": per-neuron Fisher scores ``s_hon``, ``s_task`` (name -> float32 [n_neurons]),
    each on the model the settings name (``fisher_hon_model``, ``fisher_task_model``)."""
    from hcnr_jax import stats

    cfg, mc = state.cfg, state.finetuned.config
    # Both sets at one length: one compiled step serves both passes (the second compile and its
    # program, a few hundred MB on a CPU, cost more than the shorter set's padding).
    length = max(state.honesty.input_ids.shape[1], state.task.input_ids.shape[1])
    state.use(cfg.fisher_hon_model)
    s_hon = stats.fisher(state.models()[cfg.fisher_hon_model], mc, state.honesty.padded_to(length), state.options,
                         neuron_axis=cfg.neuron_axis)
    state.use(cfg.fisher_task_model)
    s_task = stats.fisher(state.models()[cfg.fisher_task_model], mc, state.task.padded_to(length), state.options,
                          neuron_axis=cfg.neuron_axis)
    return s_hon, s_task


def select_layers(state: RepairState, s_hon: Mapping[str, np.ndarray],
                  s_task: Mapping[str, np.ndarray]) -> list[LayerSelection]:
    """Stage "select": each layer's candidate neurons and whether it is kept (docs/method.md, Stage 1)."""
    cfg = state.cfg
    return selection.select(
        linear_names(state.finetuned.config), state.weights, s_hon, s_task, r_iw=cfg.r_iw, r_cw=cfg.r_cw,
        priority=cfg.priority, layer_unit=cfg.layer_unit, layer_budget=cfg.layer_budget,
        neuron_axis=cfg.neuron_axis, eps=cfg.eps, seed=cfg.seed)


class DeviceHessians:
    """Each kept layer's H on the device, summed there over the calibration sets, built when the
    solve reaches the layer. The statistics return host arrays, and layers that read the same
    input share one object (q/k/v, gate/up: consecutive in model order); the last device H is
    kept for the next layer while its parts are the same objects, so each distinct H is copied
    (and summed) once, and only one lives on the device at a time."""

    def __init__(self) -> None:
        self.parts: dict[str, list[Any]] = {}
        self._key: tuple[int, ...] | None = None
        self._dev: jax.Array | None = None

    def add(self, hess: Mapping[str, Any]) -> None:
        """Add one calibration set's host Hessians (name -> [in, in])."""
        for n, h in hess.items():
            self.parts.setdefault(n, []).append(h)

    def pop(self, name: str) -> jax.Array:
        """Layer ``name``'s float32 ``[in, in]`` on the device, summed over the sets; its host parts go."""
        parts = self.parts.pop(name)  # the host arrays go once their last layer is solved
        key = tuple(id(p) for p in parts)  # unique while `parts` holds them
        if key != self._key:
            self._key, self._dev = None, None  # free the previous one before copying the next
            dev = jnp.asarray(parts[0], jnp.float32)
            for p in parts[1:]:
                dev = dev + jnp.asarray(p, jnp.float32)
            self._key, self._dev = key, dev
        return self._dev


def layer_hessians(state: RepairState) -> DeviceHessians:
    """Stage "hessian": ``H = X^T X`` of the kept layers' inputs on the calibration data
    (``calib_data``, through ``calib_model``), as host arrays handed to the solve on the device."""
    from hcnr_jax import stats

    cfg, mc = state.cfg, state.finetuned.config
    calib = {"hon": [state.honesty], "task": [state.task], "both": [state.honesty, state.task]}[cfg.calib_data]
    kept_names = [sl.name for sl in state.layers if sl.kept]
    hess = DeviceHessians()
    # Only the kept layers' H are accumulated, in hessian_passes groups (the results come back to
    # the host, so a pass's accumulators leave the device before the next); layers sharing an
    # input share one array object. The sum over sets is taken on the device in the solve.
    state.use(cfg.calib_model)
    for group in split_passes(kept_names, mc, cfg.hessian_passes):
        for samples in calib:
            hess.add(stats.hessian(state.models()[cfg.calib_model], mc, samples, state.options, layers=group))
    return hess


# --- solve ----------------------------------------------------------------------------------------

def _module(name: str) -> str:
    return name.rsplit(".", 2)[-2]


def solve_layer(state: RepairState, sl: LayerSelection, h: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """One kept layer: its repaired weight (the fine-tuned dtype, on the device) and the report
    entries of its objectives and damping. ``h``: its float32 ``[in, in]`` Hessian on the device."""
    cfg = state.cfg
    w_orig, w_sft = state.weights(sl.name)
    if cfg.neuron_axis == "input":
        res = solve(cfg.solver, w_orig, w_sft, h, sl.restored, cfg.damping, **dict(cfg.solver_options))
        w_new, before, after, lam = res.w_new, res.objective_before, res.objective_after, res.damping
    else:
        # Rows decouple in tr(D H D^T): restoring a row zeroes its error, which is already the
        # optimum, so every solver reduces to restore-only here.
        w_new = restore_only(w_orig.T, w_sft.T, sl.restored).T
        before = after = layer_objective(w_new, w_orig, h)
        lam = cfg.damping
    w_ft = get(state.finetuned.params, sl.name)
    # Cast on the device and placed like the weight it replaces, so that each device holds its shard
    # of it (in place of the old weight, or beside a caller's model until the end: `solve_layers`).
    update = jax.device_put(jnp.asarray(w_new).astype(w_ft.dtype), w_ft.sharding)
    return update, {"objective_sft": layer_objective(w_sft, w_orig, h), "objective_before": before,
                    "objective_after": after, "damping": lam}


def solve_layers(state: RepairState, hess: DeviceHessians) -> tuple[Params, list[dict[str, Any]]]:
    """Stage "solve": restore and compensate every kept layer, in model order. Returns the repaired
    parameters and one report record per layer (kept or not).

    A fine-tuned model this repair loaded itself is repaired in place: each solved layer replaces
    its weight at once, so the old weight is freed and the repaired layers never wait beside the
    whole model (Llama-3.1-8B at the defaults: up to 9.8 GiB). A caller's model keeps its weights
    (they are the caller's): its repaired layers wait on the devices until the last one."""
    from tqdm.auto import tqdm

    state.use("sft")  # the base is read one layer at a time (`RepairState.weights`)
    in_place = "sft" in state.owned
    updates: dict[str, Any] = {}
    # The latest repaired layer, maybe still being computed: a device runs its work in order, so an
    # interrupt that waits for it waits for every earlier one.
    last: Any = None
    records: list[dict[str, Any]] = []
    for sl in tqdm(state.layers, desc="solve", disable=not state.options.progress, dynamic_ncols=True):
        interrupt.check(last, where=f"solve: before layer {sl.name}")
        rec: dict[str, Any] = {
            "name": sl.name, "module": _module(sl.name), "shape": list(sl.shape), "d": sl.d,
            "d_layer": sl.d_layer, "kept": sl.kept, "restored_neurons": int(sl.restored.sum()),
            "restored_params": sl.restored_params, "params": int(np.prod(sl.shape)),
        }
        if sl.kept:
            # The next layer's device H may replace this one once it is dropped here.
            last, objectives = solve_layer(state, sl, hess.pop(sl.name))
            if in_place:  # the old weight's last reference goes with the old tree
                state.finetuned = state.finetuned.replace(params=set_leaves(state.finetuned.params, {sl.name: last}))
            else:
                updates[sl.name] = last
            rec.update(objectives)
        records.append(rec)
    params = state.finetuned.params
    return (set_leaves(params, updates) if updates else params), records


# --- the pipeline ---------------------------------------------------------------------------------

def repair(
    base: Pretrained | str | Path,
    finetuned: Pretrained | str | Path,
    honesty_data: Any = None,
    task_data: Any = None,
    config: RepairConfig | None = None,
    *,
    progress: bool = True,
    stats_options: StatsOptions | None = None,
    offload_idle: bool = True,
    **overrides: Any,
) -> RepairResult:
    """Repair ``finetuned`` towards ``base`` with HCNR (docs/method.md) and return the model + report.

    ``base``/``finetuned``: `Pretrained` or a source as in ``hcnr convert``. ``honesty_data`` /
    ``task_data``: `Samples`, a JSONL path, or None for the bundled calibration files.
    ``config`` (default `RepairConfig()`) with keyword ``overrides`` (e.g. ``r_iw=0.3``).
    ``stats_options`` (`hcnr_jax.stats.StatsOptions`): how the statistics run (mesh, fsdp, kernel
    backend, result folder, ...); its batch size and progress bar are this repair's
    (``config.batch_size``, ``progress``). With a ``mesh`` the models are loaded onto it and the
    statistics, Hessians and solves run sharded by weight role. ``offload_idle``: one model in
    device memory at a time; the other (if loaded here from a source) waits outside it, and the
    solve reads the base one layer at a time (`RepairState.use`).
    The result has the fine-tuned model's dtype, config and tokenizer.
    """
    clock = StageClock(progress)
    with clock.stage("load"):
        cfg = resolve_config(config, overrides)
        options = dataclasses.replace(stats_options or StatsOptions(), batch_size=cfg.batch_size, progress=progress)
        state = load(base, finetuned, honesty_data, task_data, cfg, options, offload_idle=offload_idle)
    try:
        with clock.stage("fisher"):
            s_hon, s_task = fisher_scores(state)
        with clock.stage("select"):
            state.layers = select_layers(state, s_hon, s_task)
            del s_hon, s_task  # [n_neurons] per weight, twice: not needed past the selection
        with clock.stage("hessian"):
            hess = layer_hessians(state)
        with clock.stage("solve"):
            state.params, state.records = solve_layers(state, hess)
            del hess
    finally:
        state.release()  # the base, if away, is not needed any more
    return RepairResult(state.finetuned.replace(params=state.params), build_report(state, clock))


# --- report and write -----------------------------------------------------------------------------

def build_report(state: RepairState, clock: StageClock) -> dict[str, Any]:
    """The report dict. Everything except ``timing_s`` and ``memory`` depends only on the inputs."""
    import hcnr_jax

    cfg, ft, records = state.cfg, state.finetuned, state.records
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
        "models": {"base": state.base.source, "finetuned": ft.source, "model_type": ft.config.model_type,
                   "dtype": str(ft.dtype), "num_layers": ft.config.num_layers},
        "data": state.data,
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
        **clock.report(),
    }


# Report keys that vary between identical runs (kept out of the determinism guarantee).
VOLATILE_KEYS = ("timing_s", "memory")


def write_repair(result: RepairResult, out_dir: str | Path, *, plots: bool = True, overwrite: bool = False,
                 dtype: str | None = None) -> Path:
    """Stage "write": the repaired model as a HF directory, with ``hcnr_report.json``/``.md`` and
    PNG plots beside the weights; the directory appears only once complete. ``dtype`` ("bfloat16",
    "float16", "float32"): cast the written weights (default: the model's own, the fine-tuned input's)."""
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


__all__ = ["VOLATILE_KEYS", "DeviceHessians", "RepairResult", "RepairState", "build_report", "check_compatible",
           "fisher_scores", "layer_hessians", "load", "load_repair_data", "repair", "resolve_config",
           "select_layers", "solve_layers", "write_repair"]
