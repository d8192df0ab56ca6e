"""Planning by compilation: per-device memory, FLOPs and time of a repair, from a config.json alone.

No weights are read and nothing runs. The parameters are ``jax.ShapeDtypeStruct`` leaves (storage
dtype, bfloat16 for big models) carrying the shardings the statistics engine would give them on
the mesh, and the three device steps of ``hcnr repair`` are compiled ahead of time
(``jax.jit(...).lower(...).compile()``) on abstract inputs:

- ``fisher``: the statistics engine's jitted Fisher update (``stats.fisher_update``, the very step
  ``stats.fisher`` runs) for one batch ``[B, T]``, LM head at ``max_targets`` slots per row;
- ``hessian``: the Hessian update accumulating *all kept layers at once*, as the pipeline does;
  which layers are kept is only known after the Fisher, so the plan keeps the ``r_cw`` share of
  units with the largest Hessians (an upper bound: every down_proj first);
- ``solve``: one layer's compensation (the configured solver's device work: Cholesky, solve,
  objectives) for the largest kept layer, on one device, as the pipeline runs it.

What a step needs on the first device is its compiled peak plus what ``hcnr repair`` holds there
beside it (``resident["by_step"]``, `_resident`: nothing beside the statistics steps while the idle
model waits in host memory; the fine-tuned model, repaired in place, beside the solve).

XLA's ``compiled.memory_analysis()`` gives per-device argument, temp (activations, workspace) and
output bytes; ``compiled.cost_analysis()["flops"]`` per-device FLOPs. The expected time divides the
FLOPs of all runs of a step by an accelerator's peak at a stated utilisation (``PEAKS``), dot by
dot at the peak of its operand dtype (bfloat16 tensor cores for bf16 weights, plain FP32 for the
float32 statistics at ``precision=HIGHEST``, which never use TF32); communication is not modelled.

Simulated devices: XLA fixes the number of host (CPU) devices when its backend starts, from
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, once per process. A process with fewer
devices than the plan asks for therefore runs the plan in a fresh ``python -m hcnr_jax.plan``
subprocess with that flag (and ``JAX_PLATFORMS=cpu``), request and result as JSON on stdin/stdout.
Compiled for CPU devices the numbers are the CPU compiler's (measured within 3% on SmolLM2 in
float32, ``experiments/results/plan_smollm2.md``); fusion and scheduling differ on a GPU. The CPU
compiler has no bfloat16 dots: it converts bf16 weights to float32, as copies that jax 0.10's XLA
keeps live (0.11's fuses most converts into the dots), which a GPU does not make; the copies' bytes
are reported (``cpu_upcast_bytes``) and subtracted in ``accelerator_peak_bytes``,
a low estimate for an accelerator (in the Fisher step the copies live through the backward pass,
so the estimate is close; in the forward-only Hessian step they are transient and it understates):
an accelerator's peak lies between the two.

``layers="extrapolate"``: compile the Fisher step (forward + backward, the slow compile) for a
model cut to 2 and 3 transformer blocks (1 and 2 for a model of 3) and extrapolate every number
linearly to the full depth (``v(L) = v(2) + (L - 2) (v(3) - v(2))``); the output says so. The
Hessian step (forward only) is always compiled whole, since its kept set does not scale with depth. On Llama-3.1-70B over 8
simulated devices the extrapolated Fisher equals the full compile's memory to the byte and its
FLOPs within 0.002% (``experiments/results/plan_llama-3.1-70b_model8_60GB{,_extrapolated}.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hcnr_jax.errors import HcnrError

log = logging.getLogger(__name__)

# Dense peak TFLOP/s by dtype and memory (GB) of accelerators, from the vendors' datasheets.
# "fp32" is the non-tensor-core rate that precision=HIGHEST float32 matmuls run at.
PEAKS: dict[str, dict[str, Any]] = {
    "H100-SXM": {"bf16": 989.4, "fp32": 66.9, "memory_gb": 80,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity "
                           "= 989 dense; FP32 67 TFLOPS; 80 GB HBM3"},
    "H200-SXM": {"bf16": 989.4, "fp32": 66.9, "memory_gb": 141,
                 "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity; "
                           "FP32 67 TFLOPS; 141 GB HBM3e"},
    "A100-SXM-80GB": {"bf16": 312.0, "fp32": 19.5, "memory_gb": 80,
                      "source": "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (dense); FP32 19.5 "
                                "TFLOPS; 80 GB HBM2e"},
}
DEFAULT_ACCELERATOR = "H100-SXM"
DEFAULT_MFU = 0.4
STEPS = ("fisher", "hessian", "solve")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "f32": "float32",
          "float16": "float16", "fp16": "float16"}


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on (JSON-serialisable: it crosses into the subprocess)."""

    hf_config: Mapping[str, Any]
    devices: int = 1
    mesh_spec: str | None = None  # e.g. "data=2,model=4" (a spec: the plan makes the mesh on its own devices)
    fsdp: bool = False
    batch_size: int = 8
    seq_len: int = 512
    max_targets: int | None = None  # LM head slots per row (None: seq_len - 1, every position)
    dtype: str = "bfloat16"
    repair: Mapping[str, Any] = field(default_factory=dict)  # RepairConfig fields
    num_honesty: int = 128
    num_task: int = 128
    layers: str = "full"  # "full" or "extrapolate" (compile 1 and 2 blocks, scale to the depth)
    device_bytes: int | None = None  # memory per device; with auto_hessian_passes, the passes are chosen to fit it
    auto_hessian_passes: bool = False
    offload_idle: bool = True  # hcnr repair's default: the idle model waits in host memory (--no-offload: False)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.__dict__.items()}


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"80GB"``, ``"80GiB"``, ``"512MiB"``, ``1e9`` -> bytes (GB = 1e9, GiB = 2^30)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise HcnrError(f"memory size {text!r}: expected e.g. 80GB or 141GiB")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * ((1024 if m.group(3) else 1000) ** power))


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """A HF ``config.json`` (a file, a model directory holding one, a ``.gguf`` file's metadata, or
    a hub id's, from the hub cache or the hub; the base's for ``BASE+ADAPTER``) as a dict."""
    from hcnr_jax.source import ModelSource, hub_snapshot

    source = ModelSource.parse(path)
    p = hub_snapshot(source.base, source.revision) if source.hub else Path(source.base)
    if source.is_gguf:
        from hcnr_jax.conversion.gguf import read_gguf_config

        return read_gguf_config(p)
    if p.is_dir():
        p = p / "config.json"
    try:
        hf = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise HcnrError(f"{p}: config file not found") from e
    except json.JSONDecodeError as e:
        raise HcnrError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise HcnrError(f"{p}: expected a JSON object")
    return hf


def load_checked_hf_config(path: str | Path) -> dict[str, Any]:
    """`load_hf_config`, then rejected (`HcnrError`) unless it is a configuration hcnr supports,
    before anything is compiled."""
    from hcnr_jax.config import config_from_hf

    hf = load_hf_config(path)
    config_from_hf(hf, source=str(path))
    return hf


def devices_for(mesh_spec: str | None, devices: int | None) -> int:
    """``hcnr plan``'s device count: ``devices`` when given, else the product of the mesh's
    explicit sizes, else 1; checked against the mesh (``--mesh`` / ``--devices`` named)."""
    from hcnr_jax.sharding import mesh_shape, parse_mesh

    if devices is not None:
        if devices < 1:
            raise HcnrError(f"--devices {devices}: must be >= 1")
    else:
        sizes = parse_mesh(mesh_spec).values() if mesh_spec is not None else [1]
        if any(s < 1 for s in sizes):
            raise HcnrError(f"--mesh {mesh_spec}: give --devices with a -1 axis")
        devices = math.prod(sizes)
    mesh_shape(mesh_spec, devices)  # the mesh must fit the devices
    return devices


# --- dot FLOPs by operand dtype, from the lowered StableHLO ------------------------------------

_DOT = re.compile(r"stablehlo\.dot_general.*?contracting_dims = \[([0-9, ]*)\] x .*?: \(tensor<([^>]*)>, "
                  r"tensor<[^>]*>\) -> tensor<([^>]*)>")


def dot_flops_by_dtype(stablehlo: str) -> dict[str, float]:
    """``{lhs dtype: 2 * prod(output) * prod(contracted)}`` over every ``dot_general`` of a lowered
    module (global shapes, each dot once: only the ratio between dtypes is used)."""
    out: dict[str, float] = {}
    for m in _DOT.finditer(stablehlo):
        contract = [int(c) for c in m.group(1).split(",") if c.strip()]
        *lhs, dtype = m.group(2).split("x")
        *res, _ = m.group(3).split("x")
        k = math.prod(int(lhs[c]) for c in contract)
        out[dtype] = out.get(dtype, 0.0) + 2.0 * math.prod(int(d) for d in res) * k
    return out


def _memory(compiled: Any) -> dict[str, int]:
    m = compiled.memory_analysis()
    arg, temp, out = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes), int(m.output_size_in_bytes)
    alias = int(m.alias_size_in_bytes)
    return {"argument_bytes": arg, "temp_bytes": temp, "output_bytes": out, "alias_bytes": alias,
            "peak_bytes": arg + temp + out - alias}


def compiled_flops(compiled: Any) -> float:
    """XLA's count of floating-point operations of a compiled program (its ``cost_analysis``)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


_ENTRY_PARAM = re.compile(r"([\w.]+): (?:bf16|f16)\[")
_UPCAST = re.compile(r"= f32\[([0-9,]*)\][^\n]*? fusion\(%([\w.]+)\)[^\n]*wrapped_convert")


def cpu_upcast_bytes(hlo: str) -> int:
    """Bytes of the float32 copies a compiled CPU module makes of its bfloat16/float16 arguments
    (the CPU compiler has no bf16 dots and converts their operands; a GPU multiplies bf16 as it
    is). These copies stay live from the forward to the backward pass, so they inflate a CPU
    plan's temp by up to twice the weights' bytes."""
    if "ENTRY" not in hlo:
        return 0
    entry = hlo[hlo.index("ENTRY"):]
    header = entry[: entry.index("{")]
    low = set(_ENTRY_PARAM.findall(header))
    return sum(4 * math.prod(int(d) for d in m.group(1).split(",") if d) for m in _UPCAST.finditer(entry)
               if m.group(2) in low)


def _compile(fn: Any, *args: Any) -> dict[str, Any]:
    import jax

    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    info = {**_memory(compiled), "flops": compiled_flops(compiled),
            "dot_flops_by_dtype": dot_flops_by_dtype(lowered.as_text()),
            "compile_s": round(time.perf_counter() - t0, 2)}
    upcast = cpu_upcast_bytes(compiled.as_text()) if jax.default_backend() == "cpu" else 0
    if upcast:
        info["cpu_upcast_bytes"] = upcast
    return info


# --- the three steps ---------------------------------------------------------------------------

def _abstract_params(cfg: Any, dtype: str) -> Any:
    import jax
    import jax.numpy as jnp

    from hcnr_jax.params import param_specs, unflatten

    dt = jnp.dtype(DTYPES[dtype])
    flat = {k: jax.ShapeDtypeStruct(s, dt) for k, s in param_specs(cfg).items()}
    return unflatten(flat, cfg.num_layers)


def _abstract_batch(batch: int, seq: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    return {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
            "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_),
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_)}


def kept_worst_case(cfg: Any, rcfg: Any, size: Any) -> list[str]:
    """The weight names of the layers a repair keeps, in the worst case for ``size`` (a function of
    a weight's shape ``(out, in)``): the ``r_cw`` share of units for which it is largest (modules:
    the largest linears; blocks: any ``k`` blocks, all alike). Which layers are kept is only known
    after the Fisher."""
    from hcnr_jax.params import linear_names, param_specs
    from hcnr_jax.repair.selection import top_count

    names = linear_names(cfg)
    if rcfg.layer_unit == "block":
        blocks = top_count(rcfg.r_cw, cfg.num_layers)
        return [n for n in names if int(n.split(".")[2]) < blocks]
    specs = param_specs(cfg)
    return sorted(names, key=lambda n: -size(specs[n]))[: top_count(rcfg.r_cw, len(names))]


def kept_owners(cfg: Any, rcfg: Any) -> list[str]:
    """The Hessian accumulators of the kept layers in the worst case: those whose Hessians are
    largest (by input width)."""
    from hcnr_jax.stats.hessian_accum import owner

    return sorted({owner(n) for n in kept_worst_case(cfg, rcfg, lambda shape: shape[1])})


def _stat_step(update: Any, init: Any, cfg: Any, static: Mapping[str, Any], mesh: Any, fsdp: bool, dtype: str,
               batch: int, seq: int) -> dict[str, Any]:
    import jax

    from hcnr_jax import sharding
    from hcnr_jax.stats import engine

    params = _abstract_params(cfg, dtype)
    state0 = jax.eval_shape(init, params)
    step, state_sh, param_sh, batch_sh = engine.step_and_shardings(update, cfg, static, mesh, fsdp, state0, params)
    args = (sharding.abstract(state0, state_sh), sharding.abstract(params, param_sh),
            sharding.abstract(_abstract_batch(batch, seq), {k: batch_sh for k in ("input_ids", "attention_mask",
                                                                                   "loss_mask")}))
    return {**_compile(step, *args), "state_bytes": _shard_bytes(state0, state_sh)}


def _shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (abstract arrays) placed with ``shardings``."""
    import jax

    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(math.prod(sh.shard_shape(tuple(a.shape))) * a.dtype.itemsize for a, sh in zip(leaves, shs, strict=True))


def fisher_step(cfg: Any, rcfg: Any, mesh: Any, fsdp: bool, dtype: str, batch: int, seq: int,
                max_targets: int | None) -> dict[str, Any]:
    from hcnr_jax import stats
    from hcnr_jax.stats import fisher_accum

    cap = seq - 1 if max_targets is None else min(max_targets, seq - 1)
    # Planned as an accelerator runs it: blocks recomputed (stats.fisher does so off a CPU).
    static = stats.fisher_static(stats.StatsOptions(remat=True), rcfg.neuron_axis, cap)
    init = partial(fisher_accum.init, cfg=cfg, neuron_axis=rcfg.neuron_axis)
    info = _stat_step(stats.fisher_update, init, cfg, static, mesh, fsdp, dtype, batch, seq)
    return {**info, "what": f"one Fisher update, batch [{batch}, {seq}], LM head at {cap} target slots per row"}


def hessian_step(cfg: Any, rcfg: Any, mesh: Any, fsdp: bool, dtype: str, batch: int, seq: int) -> dict[str, Any]:
    import jax

    from hcnr_jax import sharding, stats
    from hcnr_jax.stats import hessian_accum

    owners = kept_owners(cfg, rcfg)
    passes = hessian_accum.split_passes(owners, cfg, rcfg.hessian_passes)
    largest = tuple(max(passes, key=lambda g: (sum(_in_dim(cfg, o) ** 2 for o in g), g))) if passes else ()
    init = partial(hessian_accum.init, cfg=cfg, owners=largest)
    static = stats.hessian_static(stats.StatsOptions())
    info = _stat_step(stats.hessian_update, init, cfg, static, mesh, fsdp, dtype, batch, seq)
    # Every pass's accumulators together (per device), for check_fit's advice on hessian_passes.
    every = jax.eval_shape(partial(hessian_accum.init, cfg=cfg, owners=tuple(owners)), _abstract_params(cfg, dtype))
    info["state_bytes_all_passes"] = _shard_bytes(every, sharding.stat_shardings(every, mesh, fsdp=fsdp))
    which = (f"all kept layers ({len(largest)} accumulators" if len(passes) <= 1 else
             f"the largest of {len(passes)} passes ({len(largest)} of {len(owners)} accumulators")
    return {**info, "passes": max(len(passes), 1),
            "what": f"one Hessian update of {which}, worst case: largest Hessians kept), batch [{batch}, {seq}]"}


def _in_dim(cfg: Any, name: str) -> int:
    from hcnr_jax.params import param_specs

    return param_specs(cfg)[name][1]


def solve_program(solver: str, out_dim: int, in_dim: int, n_hc: int) -> Any:
    """The device work of one layer's solve (``repair.solvers``), as one traced function of
    ``(w_orig, w_sft, h, hc, task, shift)``."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax.precision import HIGHEST
    from hcnr_jax.repair import solvers

    def program(w_orig, w_sft, h, hc, task, shift):
        w_hc = w_orig[:, hc]
        if solver == "none":
            e = jnp.zeros_like(w_hc)
        else:
            dw_task = w_sft[:, task] - w_orig[:, task]
            if solver == "paper":
                chol, _ = solvers.cholesky_shifted(h, shift)
                e = solvers.paper_update(chol, dw_task, task, hc)
            elif solver == "cg":
                h_hh = h[hc][:, hc] + shift * jnp.eye(n_hc, dtype=h.dtype)
                rhs = -jnp.matmul(dw_task, h[task][:, hc], precision=HIGHEST)
                e, _ = solvers.cg_rows(h_hh, rhs, 100, 1e-5)
            else:  # exact (and plug-ins: planned as exact)
                chol, _ = solvers.cholesky_shifted(h[hc][:, hc], shift)
                e = solvers.exact_update(chol, dw_task, h[task][:, hc])
        w_new = w_sft.at[:, hc].set(w_hc + e)
        before = solvers.objective(w_sft.at[:, hc].set(w_hc), w_orig, h)
        return w_new, before, solvers.objective(w_new, w_orig, h)

    return jax.jit(program)


def solve_step(cfg: Any, rcfg: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from hcnr_jax.params import linear_names, param_specs
    from hcnr_jax.repair.selection import top_count

    specs = param_specs(cfg)
    out_dim, in_dim = max((specs[n] for n in linear_names(cfg)), key=lambda s: (s[1], s[0]))
    n_hc = top_count(rcfg.r_iw, in_dim)
    # Output neurons (rows) decouple: the pipeline restores them and evaluates the objectives only.
    solver = rcfg.solver if rcfg.neuron_axis == "input" else "none"
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((out_dim, in_dim), f32), jax.ShapeDtypeStruct((out_dim, in_dim), f32),
            jax.ShapeDtypeStruct((in_dim, in_dim), f32), jax.ShapeDtypeStruct((n_hc,), jnp.int32),
            jax.ShapeDtypeStruct((in_dim - n_hc,), jnp.int32), jax.ShapeDtypeStruct((), f32))
    info = _compile(solve_program(solver, out_dim, in_dim, n_hc), *args)
    # Cholesky and triangular solves are library calls (LAPACK / cuSOLVER) that the cost analysis
    # does not count: n^3 / 3 for the factor, 2 n^2 per right-hand side for the two solves.
    n, rhs = {"none": (0, 0), "cg": (0, 0), "paper": (in_dim, in_dim)}.get(solver, (n_hc, out_dim))
    extra = n**3 / 3 + 2 * n**2 * rhs
    info["flops"] += extra
    info["dot_flops_by_dtype"]["f32"] = info["dot_flops_by_dtype"].get("f32", 0.0) + extra
    return {**info, "what": f"one layer's {solver} solve for the largest layer [{out_dim}, {in_dim}], "
                            f"{n_hc} restored neurons, on one device (float32)"}


# --- the plan ----------------------------------------------------------------------------------

def _cut(cfg: Any, layers: int) -> Any:
    return cfg.replace(num_layers=layers, sliding_windows=cfg.sliding_windows[:layers])


def _extrapolate(one: dict[str, Any], two: dict[str, Any], depth: int, base: int = 1) -> dict[str, Any]:
    """Numbers of ``base`` and ``base + 1`` blocks extrapolated linearly to ``depth`` blocks."""
    out: dict[str, Any] = {}
    for k, v in one.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "compile_s":
            x = v + (depth - base) * (two[k] - v)
            out[k] = round(x) if isinstance(v, int) else float(x)
        elif isinstance(v, dict):
            out[k] = {d: v.get(d, 0.0) + (depth - base) * (two[k].get(d, 0.0) - v.get(d, 0.0))
                      for d in set(v) | set(two[k])}
        elif k == "compile_s":
            out[k] = round(v + two[k], 2)
        else:
            out[k] = two[k]
    out["what"] = two["what"] + (f"; extrapolated linearly to {depth} layers from compiles of {base} and "
                                 f"{base + 1} layers")
    return out


def _runs(cfg: Any, rcfg: Any, req: PlanRequest, batch: int) -> dict[str, int]:
    """How often each step runs in a repair: batches of both Fisher passes and of the Hessian's
    calibration data, and one solve per kept layer."""
    from hcnr_jax.params import linear_names
    from hcnr_jax.repair.selection import top_count

    calib = {"hon": req.num_honesty, "task": req.num_task, "both": req.num_honesty + req.num_task}[rcfg.calib_data]
    units = len(linear_names(cfg)) if rcfg.layer_unit == "module" else cfg.num_layers
    kept = top_count(rcfg.r_cw, units) * (1 if rcfg.layer_unit == "module" else 7)
    from hcnr_jax.stats.hessian_accum import split_passes

    passes = max(len(split_passes(kept_owners(cfg, rcfg), cfg, rcfg.hessian_passes)), 1)
    return {"fisher": -(-req.num_honesty // batch) + -(-req.num_task // batch),
            "hessian": passes * -(-calib // batch), "solve": kept}


def compute_plan(req: PlanRequest, cfg: Any = None) -> dict[str, Any]:
    """Compile the three steps in this process (it must have ``req.devices`` devices) and return
    the plan dict (see ``format_plan`` / the module doc). ``cfg``: the ModelConfig, if already
    resolved (default: from ``req.hf_config``). Sharding warnings (tensors that cannot be split
    on this mesh) are returned under ``warnings``."""
    from hcnr_jax import sharding

    with sharding.unsplit_warnings() as warnings:  # every plan reports its own mesh's warnings
        result = _compute(req, cfg)
    result["warnings"] = sorted(set(warnings))
    return result


def _compute(req: PlanRequest, cfg: Any) -> dict[str, Any]:
    import jax

    from hcnr_jax import sharding
    from hcnr_jax.config import config_from_hf
    from hcnr_jax.repair.config import RepairConfig

    cfg = cfg or config_from_hf(req.hf_config, source="config.json")
    rcfg = RepairConfig.from_dict(dict(req.repair)) if req.repair else RepairConfig().validate()
    if len(jax.devices()) < req.devices:
        raise HcnrError(f"plan: {req.devices} devices asked, this process has {len(jax.devices())}")
    mesh = sharding.make_mesh(req.mesh_spec, jax.devices()[: req.devices])
    data = mesh.shape[sharding.DATA]
    batch = -(-req.batch_size // data) * data  # the engine rounds the batch up the same way
    steps: dict[str, dict[str, Any]] = {}
    for name in ("fisher", "hessian"):
        def one(c, name=name):
            if name == "fisher":
                return fisher_step(c, rcfg, mesh, req.fsdp, req.dtype, batch, req.seq_len, req.max_targets)
            return hessian_step(c, rcfg, mesh, req.fsdp, req.dtype, batch, req.seq_len)

        # The Hessian's kept set does not scale with depth (accumulators are shared and ranked by
        # size), and its forward-only step compiles quickly: it is always compiled whole.
        if req.layers == "extrapolate" and name == "fisher" and cfg.num_layers > 2:
            # From 2 and 3 blocks where the model has more: the first block's step is not yet
            # linear (Llama-70B on model=8: +0.30 GiB from 1 to 2 blocks, +0.06 per block after).
            base = 2 if cfg.num_layers > 3 else 1
            steps[name] = _extrapolate(one(_cut(cfg, base)), one(_cut(cfg, base + 1)), cfg.num_layers, base)
        else:
            steps[name] = one(cfg)
    passes_note = None
    if req.auto_hessian_passes and req.device_bytes is not None:
        rcfg, steps["hessian"], passes_note = _fit_hessian_passes(
            cfg, rcfg, steps["hessian"], _resident(cfg, rcfg, req, mesh)["by_step"]["hessian"], req.device_bytes,
            lambda r: hessian_step(cfg, r, mesh, req.fsdp, req.dtype, batch, req.seq_len))
    steps["solve"] = solve_step(cfg, rcfg)
    runs = _runs(cfg, rcfg, req, batch)
    for name, s in steps.items():
        if "cpu_upcast_bytes" in s:
            # The copies are counted whole, though the remat'd Fisher and the layer-by-layer Hessian
            # hold one layer's at a time: the low estimate never goes below the step's arguments.
            s["accelerator_peak_bytes"] = max(s["peak_bytes"] - s["cpu_upcast_bytes"], s["argument_bytes"])
        s["runs"] = runs[name]
        s["devices"] = 1 if name == "solve" else req.devices
    return {"devices": req.devices, "mesh": dict(mesh.shape), "platform": jax.devices()[0].platform,
            "model": {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                      "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                      "params": _num_params(cfg), "dtype": DTYPES[req.dtype]},
            "batch": {"batch_size": batch, "seq_len": req.seq_len,
                      "max_targets": req.seq_len - 1 if req.max_targets is None else req.max_targets,
                      "num_honesty": req.num_honesty, "num_task": req.num_task},
            "repair": rcfg.to_dict(), "layers": req.layers, "steps": steps,
            "resident": _resident(cfg, rcfg, req, mesh),
            **({"hessian_passes_chosen": passes_note} if passes_note else {})}


def passes_to_fit(step: Mapping[str, Any], resident: int, device_bytes: int, limit: int = 64) -> int | None:
    """The fewest Hessian passes whose largest pass fits ``device_bytes`` with ``resident`` bytes
    beside it, from a compiled Hessian step's numbers (its accumulators scale as 1/passes, the rest
    stays); None when no number up to ``limit`` does."""
    rest = step["peak_bytes"] + resident - step["state_bytes"]
    total = step["state_bytes_all_passes"]
    return next((n for n in range(1, limit + 1) if rest + total / n <= device_bytes), None)


def _fit_hessian_passes(cfg: Any, rcfg: Any, step: dict[str, Any], resident: int, device_bytes: int,
                        compile_with: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Choose ``hessian_passes`` so that the Hessian step fits ``device_bytes`` and recompile it
    with that number (the accumulators split unevenly, so the estimate is checked by compiling
    and raised while the compiled step is still over, up to three times)."""
    n = passes_to_fit(step, resident, device_bytes)
    tries = 0
    while n is not None and n != step.get("passes", 1) and tries < 3:
        rcfg = dataclasses.replace(rcfg, hessian_passes=n)
        step = compile_with(rcfg)
        tries += 1
        if step["peak_bytes"] + resident <= device_bytes:
            break
        n = n + 1
    fits = step["peak_bytes"] + resident <= device_bytes
    return rcfg, step, {"passes": step.get("passes", 1), "device_bytes": device_bytes, "fits": fits}


def _num_params(cfg: Any) -> int:
    from hcnr_jax.params import param_specs

    return sum(math.prod(s) for s in param_specs(cfg).values())


def _resident(cfg: Any, rcfg: Any, req: PlanRequest, mesh: Any) -> dict[str, Any]:
    """Device memory ``hcnr repair`` holds on the first device beside each step's own arguments
    (``by_step``, bytes):

    - ``fisher``, ``hessian``: the step's model is its argument; the other model waits in host
      memory (``req.offload_idle``, `hcnr_jax.offload`; the default) or, with ``--no-offload``,
      sits on the devices (in full without ``--mesh``, else its shard);
    - ``solve``: one layer's solve is the step; beside it the fine-tuned model, which ``hcnr
      repair`` repairs in place (each solved layer replaces its weight), and without offloading the
      base model. A caller's own models (from Python) keep their weights, and the repaired kept
      layers wait beside them: ``kept_layers_bytes`` more (worst case: the largest, `kept_worst_case`).

    Without ``--mesh`` the models are loaded whole onto the first device; on more than one device
    the step's replicated copy is its argument and the loaded model is one more."""
    import jax
    import jax.numpy as jnp

    from hcnr_jax import sharding
    from hcnr_jax.params import param_specs

    dtype = DTYPES[req.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    specs = param_specs(cfg)
    one = sum(math.prod(s) for s in specs.values()) * itemsize

    def here(names: list[str]) -> int:  # bytes of these tensors on the first device, as hcnr repair places them
        if req.mesh_spec is None:
            return sum(math.prod(specs[n]) for n in names) * itemsize
        sub = {n: specs[n] for n in names}
        return _shard_bytes({n: jax.ShapeDtypeStruct(s, dtype) for n, s in sub.items()},
                            sharding.tensor_shardings(sub, mesh, req.fsdp))

    model = here(list(specs))
    loaded_copy = one if req.mesh_spec is None and req.devices > 1 else 0
    other = 0 if req.offload_idle else model
    kept = here(kept_worst_case(cfg, rcfg, math.prod))
    by_step = {"fisher": loaded_copy + other, "hessian": loaded_copy + other, "solve": model + other}
    where = (f"both models placed by weight role{' (fsdp)' if req.fsdp else ''} (a device holds its shard, "
             f"{model / one:.1%} of a model)" if req.mesh_spec else "each model loaded whole onto the first device")
    idle = ("the idle model waits in host memory" if req.offload_idle else
            "no offloading (--no-offload): the idle model stays on the devices")
    note = (f"hcnr repair: {where}; {idle}; the solve also holds the fine-tuned model, repaired in place (a "
            f"caller's own models, from Python, keep their weights: + {_size(kept)} of repaired layers at most)")
    return {"model_bytes": one, "model_bytes_per_device": model, "kept_layers_bytes": kept,
            "offload_idle": req.offload_idle, "by_step": by_step, "note": note}


def resident_bytes(result: Mapping[str, Any], step: str) -> int:
    """Bytes ``hcnr repair`` holds on the first device beside step ``step``'s arguments."""
    return int(result["resident"]["by_step"][step])


def step_need(result: Mapping[str, Any], step: str) -> int:
    """A step's peak on the first device with what is resident beside it."""
    return int(result["steps"][step]["peak_bytes"]) + resident_bytes(result, step)


def plan_on_devices(req: PlanRequest, *, timeout: float | None = None) -> dict[str, Any]:
    """The plan on ``req.devices`` devices: ``compute_plan`` here if this process has enough,
    else in a subprocess with that many simulated CPU devices (module doc)."""
    import jax

    if len(jax.devices()) >= req.devices:
        return compute_plan(req)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={req.devices}".strip()}
    res = subprocess.run([sys.executable, "-m", "hcnr_jax.plan"], input=json.dumps(req.to_json()), env=env,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise HcnrError(f"plan subprocess ({req.devices} simulated devices) failed:\n{res.stderr[-3000:]}")
    result = json.loads(res.stdout)
    for msg in result.get("warnings", []):
        log.warning(msg)
    return result


# --- reading a plan ----------------------------------------------------------------------------

def fit_settings(req: PlanRequest, device_bytes: int, batch_sizes: tuple[int, ...] | None = None,
                 passes: int | None = None, *, timeout: float | None = None) -> tuple[PlanRequest, dict[str, Any]]:
    """The request with the largest batch size (of ``batch_sizes``, default ``req.batch_size``
    halved down to 1) whose plan fits ``device_bytes`` per device, its Hessian passes chosen to fit
    (``passes`` fixed when given), and that plan. Raises ``HcnrError`` naming each step's need at
    the smallest batch when nothing fits."""
    sizes = batch_sizes or tuple(sorted({max(req.batch_size >> k, 1) for k in range(req.batch_size.bit_length())},
                                        reverse=True))
    repair = dict(req.repair)
    if passes is not None:
        repair["hessian_passes"] = passes
    result, trial = None, req
    for b in sizes:
        trial = dataclasses.replace(req, batch_size=b, repair=repair, device_bytes=device_bytes,
                                    auto_hessian_passes=passes is None)
        result = plan_on_devices(trial, timeout=timeout)
        if not check_fit(result, device_bytes):
            passes_now = result.get("hessian_passes_chosen", {}).get("passes", repair.get("hessian_passes", 1))
            return dataclasses.replace(trial, repair={**repair, "hessian_passes": passes_now}), result
    over = check_fit(result, device_bytes) if result is not None else []
    raise HcnrError(f"no batch size of {', '.join(map(str, sizes))} fits {device_bytes / 1e9:.2f} GB per device "
                    f"on {req.devices} device(s){' (mesh ' + req.mesh_spec + ')' if req.mesh_spec else ''}; at batch "
                    f"{trial.batch_size}: " + "; ".join(over))


def fit_repair(hf_config: Mapping[str, Any], rcfg: Any, *, devices: int, mesh_spec: str | None, fsdp: bool,
               device_bytes: int, batch_fixed: bool, passes_fixed: bool, layers: str = "extrapolate",
               offload_idle: bool = True) -> tuple[Any, str]:
    """``hcnr repair`` on an accelerator, before any weight is read: the repair settings with the
    batch size and Hessian passes that fit ``device_bytes`` per device (those the user set stay
    fixed), planned from the model's config at the longest sequence (``max_length``) and every
    position a target (the worst case), and a line saying what was chosen. ``HcnrError`` when
    nothing fits, naming the steps and what they need. ``layers``: as ``PlanRequest.layers`` (the
    Fisher extrapolated from 1 and 2 blocks by default: each batch size tried is one compile).
    ``offload_idle``: as the repair will run (`PlanRequest.offload_idle`)."""
    dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    req = PlanRequest(hf_config=hf_config, devices=devices, mesh_spec=mesh_spec, fsdp=fsdp, batch_size=rcfg.batch_size,
                      seq_len=rcfg.max_length, dtype=dtype if dtype in DTYPES else "float32", repair=rcfg.to_dict(),
                      layers=layers, offload_idle=offload_idle)
    try:
        fitted, result = fit_settings(req, device_bytes, (rcfg.batch_size,) if batch_fixed else None,
                                      rcfg.hessian_passes if passes_fixed else None)
    except HcnrError as e:
        raise HcnrError(f"{e}. Fewer tokens (--max-length), more devices on --mesh model=N, or --fsdp would "
                        "shrink it (hcnr plan --config ... --device-memory ... checks a setting)") from None
    passes = fitted.repair["hessian_passes"]
    peak = max(step_need(result, n) for n in STEPS)
    line = (f"fits {device_bytes / 1e9:.1f} GB per device: --batch-size {fitted.batch_size} --hessian-passes {passes} "
            f"(planned peak {peak / 1e9:.1f} GB at {rcfg.max_length} tokens)")
    return rcfg.override(batch_size=fitted.batch_size, hessian_passes=passes), line


def fit_to_device(finetuned: str | Path, rcfg: Any, *, mesh_spec: str | None, fsdp: bool, batch_fixed: bool,
                  passes_fixed: bool, offload_idle: bool = True) -> tuple[Any, str | None]:
    """``hcnr repair`` on an accelerator: ``fit_repair`` for this process's devices and the
    fine-tuned model's config (read before any weight), returning the settings and the line saying
    what was chosen. On a CPU (no device memory to plan for) ``rcfg`` unchanged and None."""
    import jax

    device_bytes = local_device_bytes()
    if device_bytes is None:
        return rcfg, None
    return fit_repair(load_hf_config(finetuned), rcfg, devices=jax.device_count(), mesh_spec=mesh_spec, fsdp=fsdp,
                      device_bytes=device_bytes, batch_fixed=batch_fixed, passes_fixed=passes_fixed,
                      offload_idle=offload_idle)


def repair_dry_run(model: Any, rcfg: Any, honesty: Any, task: Any, *, mesh_spec: str | None = None,
                   fsdp: bool = False, offload_idle: bool = True) -> dict[str, Any]:
    """``hcnr repair --dry-run``: what a repair of ``model`` (a loaded `Pretrained`) with settings
    ``rcfg`` on these honesty / task `Samples` would change, and XLA's compiled per-device memory and
    FLOPs of its steps on this process's devices: the Fisher update, the Hessian update of the kept
    layers (worst case: the largest) and one layer's solve, compiled on abstract inputs of this
    model, data and settings; nothing is computed."""
    import jax
    import numpy as np

    from hcnr_jax.params import linear_names, param_specs
    from hcnr_jax.repair.selection import top_count
    from hcnr_jax.stats.fisher_accum import target_capacity

    mc = model.config
    names = linear_names(mc)
    specs = param_specs(mc)
    by_module: dict[str, dict[str, Any]] = {}
    for n in names:
        out_dim, in_dim = specs[n]
        n_neurons = in_dim if rcfg.neuron_axis == "input" else out_dim
        m = by_module.setdefault(n.rsplit(".", 2)[-2], {"layers": 0, "shape": [out_dim, in_dim], "neurons": n_neurons,
                                                        "candidates": top_count(rcfg.r_iw, n_neurons)})
        m["layers"] += 1
    units = len(names) if rcfg.layer_unit == "module" else mc.num_layers
    req = PlanRequest(
        hf_config=model.hf_config, devices=jax.device_count(), mesh_spec=mesh_spec, fsdp=fsdp,
        batch_size=rcfg.batch_size, seq_len=max(honesty.input_ids.shape[1], task.input_ids.shape[1]),
        max_targets=max(target_capacity(honesty.loss_mask), target_capacity(task.loss_mask)),
        dtype=str(np.dtype(model.dtype)), repair=rcfg.to_dict(), num_honesty=len(honesty), num_task=len(task),
        offload_idle=offload_idle)
    compiled = compute_plan(req, cfg=mc)
    mib = {name: {k.removesuffix("_bytes"): round(s[k] / 2**20, 1)
                  for k in ("argument_bytes", "temp_bytes", "output_bytes", "peak_bytes")}
           for name, s in compiled["steps"].items()}
    memory = {**mib, "resident": {n: round(resident_bytes(compiled, n) / 2**20, 1) for n in STEPS},
              "total": round(max(step_need(compiled, n) for n in STEPS) / 2**20, 1)}
    return {
        "layers": len(names), "units": units, "unit": rcfg.layer_unit, "units_kept": top_count(rcfg.r_cw, units),
        "modules": by_module, "linear_params": sum(int(np.prod(specs[n])) for n in names),
        "all_params": sum(int(np.prod(s)) for s in specs.values()),
        "expected_restored_fraction_of_linear": rcfg.r_iw * rcfg.r_cw,
        "memory_mib": memory,
        "compiled": {"devices": compiled["devices"], "platform": compiled["platform"], "mesh": compiled["mesh"],
                     "steps": {n: {k: v for k, v in s.items() if k != "dot_flops_by_dtype"}
                               for n, s in compiled["steps"].items()},
                     "warnings": compiled["warnings"],
                     "method": "XLA compiled memory_analysis()/cost_analysis() per device (hcnr_jax.plan); "
                               "total = the largest of each step's peak + what is resident beside it on the "
                               "first device"},
    }


def describe_dry_run(dry: Mapping[str, Any]) -> str:
    """The one-line summary ``hcnr repair --dry-run`` prints under the JSON of `repair_dry_run`."""
    m = dry["memory_mib"]
    return (f"dry run: would restore about {100 * dry['expected_restored_fraction_of_linear']:.1f}% of "
            f"{dry['linear_params']:,} block linear parameters in {dry['units_kept']} of {dry['units']} "
            f"{dry['unit']}s; compiled peak per device (step + resident beside it): "
            + ", ".join(f"{n} {m[n]['peak']:.0f} + {m['resident'][n]:.0f} MiB" for n in STEPS)
            + f"; at most {m['total']:.0f} MiB; nothing written")


def local_device_bytes() -> int | None:
    """Memory of this process's first accelerator (XLA's ``bytes_limit``); None on a CPU or when
    the platform does not report it."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # some platforms raise instead of returning None
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def estimate_time(steps: Mapping[str, Any], accelerator: str = DEFAULT_ACCELERATOR, mfu: float = DEFAULT_MFU
                  ) -> dict[str, float]:
    """Seconds per step kind (all its runs) on ``accelerator`` at utilisation ``mfu``: each step's
    per-device FLOPs split by dot operand dtype, bf16/f16 at the tensor-core peak, the rest at FP32."""
    if accelerator not in PEAKS:
        raise HcnrError(f"accelerator {accelerator!r}: choose one of {sorted(PEAKS)}")
    peak = PEAKS[accelerator]
    out = {}
    for name, s in steps.items():
        by = s.get("dot_flops_by_dtype") or {}
        total = sum(by.values())
        low = (by.get("bf16", 0.0) + by.get("f16", 0.0)) / total if total else 0.0
        seconds_per_flop = (low / peak["bf16"] + (1 - low) / peak["fp32"]) / 1e12 / mfu
        out[name] = s["flops"] * s["runs"] * seconds_per_flop
    return out


def check_fit(result: Mapping[str, Any], device_bytes: int) -> list[str]:
    """One line per step whose first-device peak (its own peak plus what ``hcnr repair`` keeps
    resident there beside it, `_resident`) exceeds ``device_bytes``; empty when everything fits."""
    lines = []
    for name, s in result["steps"].items():
        extra = resident_bytes(result, name)
        need = s["peak_bytes"] + extra
        if need > device_bytes:
            line = (f"{name}: needs {need / 1e9:.2f} GB on the first device ({s['peak_bytes'] / 1e9:.2f} GB step "
                    f"peak + {extra / 1e9:.2f} GB resident beside it) > {device_bytes / 1e9:.2f} GB: over by "
                    f"{(need - device_bytes) / 1e9:.2f} GB")
            accel = s.get("accelerator_peak_bytes", s["peak_bytes"]) + extra
            if accel != need:
                line += (f" (low estimate for an accelerator, without the CPU compiler's float32 weight "
                         f"copies: {accel / 1e9:.2f} GB, " + ("fits" if accel <= device_bytes else
                                                            f"over by {(accel - device_bytes) / 1e9:.2f} GB") + ")")
            lines.append(line + _advice(name, s, need, device_bytes))
    return lines


def _advice(step: str, s: Mapping[str, Any], need: int, device_bytes: int) -> str:
    """What would make ``step`` fit, from the plan's own numbers (at XLA's CPU peak)."""
    if step == "fisher":
        return (f"; its temporaries ({s['temp_bytes'] / 1e9:.2f} GB: activations and gradients of the batch) "
                "shrink with --batch-size and --max-targets")
    if step == "hessian" and "state_bytes_all_passes" in s:
        total, now, passes = s["state_bytes_all_passes"], s["state_bytes"], s.get("passes", 1)
        rest = need - now  # everything but the accumulators of the pass compiled
        for n in range(passes + 1, 65):
            if rest + total / n <= device_bytes:
                return (f"; --hessian-passes {n} would bring it to about {(rest + total / n) / 1e9:.2f} GB "
                        f"(accumulators {total / 1e9:.2f} GB in all, split over {n} passes)")
        return (f"; more Hessian passes alone cannot fit it ({rest / 1e9:.2f} GB without accumulators): "
                "more devices on model, or --fsdp")
    return ""


def summary_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The stable machine-readable core: ``{"devices", "steps": {step: {argument_bytes, temp_bytes,
    output_bytes, flops}}}`` plus the rest of the plan."""
    keys = ("argument_bytes", "temp_bytes", "output_bytes", "flops")
    core = {"devices": result["devices"],
            "steps": {n: {**{k: result["steps"][n][k] for k in keys},
                          **{k: v for k, v in result["steps"][n].items() if k not in keys}} for n in STEPS}}
    return {**core, **{k: v for k, v in result.items() if k not in core}}


def plan_document(result: Mapping[str, Any], accelerator: str = DEFAULT_ACCELERATOR, mfu: float = DEFAULT_MFU,
                  device_bytes: int | None = None) -> dict[str, Any]:
    """``hcnr plan --json``: `summary_json` with the expected time on ``accelerator`` at ``mfu``
    and, given ``device_bytes``, the fit check."""
    times = estimate_time(result["steps"], accelerator, mfu)
    doc = summary_json(result)
    doc["expected_time_s"] = {"accelerator": accelerator, "mfu": mfu, "source": PEAKS[accelerator]["source"],
                              **{k: float(f"{v:.4g}") for k, v in times.items()},
                              "total": float(f"{sum(times.values()):.4g}")}
    if device_bytes is not None:
        doc["fit"] = {"device_bytes": device_bytes, "over": check_fit(result, device_bytes)}
    return doc


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(result: Mapping[str, Any], accelerator: str = DEFAULT_ACCELERATOR, mfu: float = DEFAULT_MFU,
                device_bytes: int | None = None) -> str:
    """A human-readable table of the plan, the expected time and the fit check."""
    m, b = result["model"], result["batch"]
    times = estimate_time(result["steps"], accelerator, mfu)
    mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"plan: {m['model_type']} {m['params'] / 1e9:.2f}B params ({m['dtype']}), {m['num_layers']} layers; "
             f"{result['devices']} {result['platform']} device(s), mesh {mesh}; batch [{b['batch_size']}, "
             f"{b['seq_len']}]; memory per device from XLA's compiled memory_analysis()",
             f"{'step':8} {'argument':>11} {'temp':>11} {'output':>11} {'peak':>11} {'accel. low':>11} "
             f"{'GFLOP/device':>13} {'runs':>5} {'time':>9}"]
    for name in STEPS:
        s = result["steps"][name]
        lines.append(f"{name:8} {_size(s['argument_bytes']):>11} {_size(s['temp_bytes']):>11} "
                     f"{_size(s['output_bytes']):>11} {_size(s['peak_bytes']):>11} "
                     f"{_size(s.get('accelerator_peak_bytes', s['peak_bytes'])):>11} {s['flops'] / 1e9:13.1f} "
                     f"{s['runs']:5d} {times[name]:8.1f}s")
    for name in STEPS:
        lines.append(f"  {name}: {result['steps'][name]['what']}")
    if any("cpu_upcast_bytes" in s for s in result["steps"].values()):
        lines.append("  accel. low: peak without the float32 copies the CPU compiler makes of bfloat16 weights (a "
                     "GPU multiplies bfloat16 as it is): an accelerator's peak lies between it and XLA's CPU peak")
    lines.append(f"time: {sum(times.values()):.1f} s on {accelerator} at {mfu:.0%} of peak "
                 f"(bf16 {PEAKS[accelerator]['bf16']} / fp32 {PEAKS[accelerator]['fp32']} TFLOP/s, "
                 f"{PEAKS[accelerator]['source']}); communication not modelled")
    r = result["resident"]
    lines.append("resident beside each step on the first device: "
                 + ", ".join(f"{n} {_size(r['by_step'][n])}" for n in STEPS) + f" ({r['note']})")
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    chosen = result.get("hessian_passes_chosen")
    if chosen:
        lines.append(f"hessian passes: {chosen['passes']}, chosen to fit {chosen['device_bytes'] / 1e9:.2f} GB per "
                     f"device" + ("" if chosen["fits"] else " (no number of passes fits)"))
    if device_bytes is not None:
        over = check_fit(result, device_bytes)
        lines += over or [f"fits: every step within {device_bytes / 1e9:.2f} GB per device"]
    return "\n".join(lines)


def _worker() -> None:
    req = PlanRequest(**json.loads(sys.stdin.read()))
    json.dump(compute_plan(req), sys.stdout)


if __name__ == "__main__":
    _worker()
