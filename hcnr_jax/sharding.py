"""The one module that owns the device mesh and sharding API (it changes between JAX releases).

A mesh has two named axes: ``data`` (samples) and ``model`` (parameters, tensor-parallel /
fsdp-style). Shardings are decided by role, in three small steps, as in jax-llm-examples'
``ShardingRules``:

1. a tensor's *role* comes from its HF name (``model.layers.3.mlp.down_proj.weight`` is a
   ``down_proj`` weight), also inside a LoRA adapter (``...down_proj`` -> ``{"A", "B"}``) or an
   optimizer state (``mu`` / ``nu`` mirror the parameter tree);
2. ``ROLES`` gives each dimension of that role a *logical axis* (``[out, in]`` for linears):
   q/k/v/gate/up are split over their output (heads, kv_heads, ffw), o/down over their input
   (the Megatron pairing: a block's two matmuls need one all-reduce), embeddings and the LM head
   over the vocabulary, norms replicated;
3. a `ShardingRules` maps logical axes to mesh axes (``fsdp`` also maps a weight's ``embed``
   dimension to ``data``).

Per-neuron statistics (Fisher ``[n]``) and Hessians (``[in, in]``, first dimension) are sharded
like their weight's neuron axis (`stat_shardings`); a Hessian whose weight keeps its input whole
splits its rows over ``model`` all the same (``ShardingRules.hessian_rows``). A dimension whose
mesh axis does not divide it is replicated and a warning names the tensor; nothing is replicated
silently. Tensors of no known role (an optimizer's step count) are replicated with a debug log.

Axis types are ``Auto``: XLA's partitioner propagates shardings through the model, so the model
code needs no sharding annotations (jax 0.10's ``make_mesh`` defaults to ``Explicit``).
Multi-host works unchanged once ``jax.distributed.initialize`` has run: arrays are built with
``make_array_from_callback`` from host data every process holds, and results are gathered by
replicating them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hcnr_jax.errors import HcnrError

log = logging.getLogger(__name__)

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# Role -> logical axis of each weight dimension (HF layout: linears [out, in]).
ROLES: dict[str, tuple[str, ...]] = {
    "q_proj": ("heads", "embed"),
    "k_proj": ("kv_heads", "embed"),
    "v_proj": ("kv_heads", "embed"),
    "o_proj": ("embed", "heads"),
    "gate_proj": ("ffw", "embed"),
    "up_proj": ("ffw", "embed"),
    "down_proj": ("embed", "ffw"),
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "norm": ("norm",),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_LINEAR_RE = re.compile(r"(?:^|\.)(" + "|".join(LINEAR) + r")\.(weight|bias|A|B)$")
# Norms (Llama's two per block, Gemma's four, q/k norms, the final one) are replicated.
_OTHER_RE = re.compile(r"(?:^|\.)(embed_tokens|lm_head|input_layernorm|post_attention_layernorm|"
                       r"pre_feedforward_layernorm|post_feedforward_layernorm|norm|q_norm|k_norm)\.weight$")


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: replicated). Weight axes: ``vocab``, ``embed``, ``heads``,
    ``kv_heads``, ``ffw``, ``norm``, ``lora_rank``; activation axes: ``batch``, ``seq``,
    ``act_embed``, ``act_heads``, ``act_kv_heads``, ``act_ffw``, ``act_vocab``."""

    vocab: str | None = MODEL
    embed: str | None = None
    heads: str | None = MODEL
    kv_heads: str | None = MODEL
    ffw: str | None = MODEL
    norm: str | None = None
    lora_rank: str | None = None
    batch: str | None = DATA
    seq: str | None = None
    act_embed: str | None = None
    act_heads: str | None = MODEL
    act_kv_heads: str | None = MODEL
    act_ffw: str | None = MODEL
    act_vocab: str | None = MODEL
    # Rows of a Hessian whose weight does not split its input (q/k/v/gate/up without fsdp): that
    # input (the residual stream) is replicated over ``model``, so each device accumulates its own
    # rows of X^T X with no communication, and the accumulators (most of the Hessian step's memory:
    # Llama-3.1-70B, 8 devices) are split instead of replicated.
    hessian_rows: str | None = MODEL

    @classmethod
    def default(cls, fsdp: bool = False) -> ShardingRules:
        """Tensor parallel over ``model``; ``fsdp`` also splits weights' ``embed`` over ``data``."""
        return cls(embed=DATA) if fsdp else cls()

    def mesh_axis(self, logical: str | None) -> str | None:
        return None if logical is None else getattr(self, logical)

    def spec(self, *logical: str | None) -> P:
        """The partition spec of an array whose dimensions have these logical axes (ignoring
        divisibility; see `fit_spec`)."""
        return P(*(self.mesh_axis(a) for a in logical))


def role_of(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(role, logical axes) of a tensor from its dotted name, or None if it has no known role.
    LoRA factors: ``A [r, in]``, ``B [out, r]``; biases follow their weight's output."""
    m = _LINEAR_RE.search(name)
    if m:
        role, leaf = m.groups()
        out_ax, in_ax = ROLES[role]
        return role, {"weight": (out_ax, in_ax), "bias": (out_ax,), "A": ("lora_rank", in_ax),
                      "B": (out_ax, "lora_rank")}[leaf]
    m = _OTHER_RE.search(name)
    if m:
        role = m.group(1) if m.group(1) in ROLES else "norm"
        return role, ROLES[role]
    return None


def _key_str(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _named_leaves(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(".".join(_key_str(k) for k in path), leaf) for path, leaf in leaves], treedef


def _group(names: list[str]) -> str:
    """``model.layers.{0-2,5}.mlp.down_proj.weight``-style summary of many names."""
    groups: dict[str, list[int]] = {}
    singles = []
    for n in names:
        m = re.search(r"\.layers\.(\d+)\.", n)
        if m:
            groups.setdefault(n[: m.start(1)] + "{}" + n[m.end(1):], []).append(int(m.group(1)))
        else:
            singles.append(n)

    def ranges(xs: list[int]) -> str:
        xs, out, start = sorted(set(xs)), [], None
        for i, x in enumerate(xs):
            start = x if start is None else start
            if i + 1 == len(xs) or xs[i + 1] != x + 1:
                out.append(str(start) if start == x else f"{start}-{x}")
                start = None
        return ",".join(out)

    return ", ".join([p.replace("{}", "{" + ranges(ix) + "}") for p, ix in groups.items()] + singles)


# Warnings already given (each is logged once per process, or once per `unsplit_warnings` block),
# and the lists of the `unsplit_warnings` blocks open now.
_WARNED: set[str] = set()
_COLLECTORS: list[list[str]] = []


@contextmanager
def unsplit_warnings() -> Iterator[list[str]]:
    """Collect the "replicated instead" warnings of the shardings decided inside the block, each
    once, including those already logged earlier in this process (``hcnr_jax.plan`` reports every
    plan's own); they are still logged as they come."""
    global _WARNED
    outer, _WARNED = _WARNED, set()
    found: list[str] = []
    _COLLECTORS.append(found)
    try:
        yield found
    finally:
        _COLLECTORS.remove(found)
        _WARNED = outer | _WARNED


class _Report:
    """Collects the tensors that could not be split, and those of unknown role, for one call."""

    def __init__(self) -> None:
        self.unsplit: dict[str, list[str]] = {}
        self.unknown: list[str] = []

    def emit(self) -> None:
        for reason, names in self.unsplit.items():
            msg = f"sharding: {reason}; replicated instead: {_group(names)}"
            if msg not in _WARNED:
                _WARNED.add(msg)
                log.warning(msg)
                for found in _COLLECTORS:
                    found.append(msg)
        if self.unknown:
            log.debug("sharding: no known role, replicated: %s", _group(self.unknown))


def fit_spec(name: str, shape: tuple[int, ...], logical: tuple[str | None, ...], mesh: Mesh,
             rules: ShardingRules, report: _Report | None = None) -> P:
    """``rules.spec(*logical)`` with every dimension its mesh axis does not divide replicated (and
    reported); an axis already used by an earlier dimension is not used twice."""
    axes, used = [], set()
    for dim, (size, ax) in enumerate(zip(shape, logical, strict=True)):
        mesh_ax = rules.mesh_axis(ax)
        if mesh_ax is None or mesh.shape[mesh_ax] == 1 or mesh_ax in used:
            axes.append(None)
            continue
        if size % mesh.shape[mesh_ax]:
            if report is not None:
                reason = f"{ax} dimension {dim} ({size}) not divisible by {mesh_ax}={mesh.shape[mesh_ax]}"
                report.unsplit.setdefault(reason, []).append(name)
            axes.append(None)
            continue
        axes.append(mesh_ax)
        used.add(mesh_ax)
    return P(*axes)


def parse_mesh(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,model=4"`` (or a mapping) -> ``{"data": 2, "model": 4}``; missing axes are 1, and a
    single ``-1`` takes the remaining devices. None: every device on ``data``."""
    if spec is None:
        return {DATA: -1, MODEL: 1}
    if isinstance(spec, str):
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, size = part.partition("=")
            if name not in AXES or not size.lstrip("-").isdigit():
                raise HcnrError(f"--mesh {spec!r}: expected e.g. data=2,model=4 with axes {AXES}")
            out[name] = int(size)
        spec = out
    unknown = set(spec) - set(AXES)
    if unknown:
        raise HcnrError(f"mesh: unknown axes {sorted(unknown)}; use {AXES}")
    return {DATA: int(spec.get(DATA, 1)), MODEL: int(spec.get(MODEL, 1))}


def mesh_shape(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """The resolved ``{"data": d, "model": m}`` of ``spec`` on ``num_devices`` devices."""
    shape = parse_mesh(spec)
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise HcnrError("mesh: at most one axis may be -1")
    if free:
        rest = int(np.prod([v for v in shape.values() if v != -1]))
        shape[free[0]] = num_devices // max(rest, 1)
    if shape[DATA] * shape[MODEL] != num_devices or min(shape.values()) < 1:
        raise HcnrError(f"mesh {shape} does not fit {num_devices} devices")
    return shape


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Any = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh((shape[DATA], shape[MODEL]), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def mesh_from_flag(spec: str | None, flag: str = "--mesh") -> Mesh | None:
    """The mesh a command line's ``spec`` asks for, over every device (None without one: the
    statistics then put every device on ``data``). The one place a spec becomes a `Mesh` for a
    run; errors name ``flag``."""
    if spec is None:
        return None
    parse_mesh(spec)  # its errors name the flag already
    try:
        return make_mesh(spec)
    except HcnrError as e:
        raise HcnrError(f"{flag} {spec!r}: {e}") from None


def _by_role(named: list[tuple[str, tuple[int, ...]]], mesh: Mesh, rules: ShardingRules) -> list[NamedSharding]:
    """The sharding of each ``(name, shape)`` by its role (module doc), reporting what is replicated."""
    report = _Report()
    out = []
    for name, shape in named:
        found = role_of(name)
        if found is None or len(found[1]) != len(shape):
            report.unknown.append(name or "<root>")
            out.append(NamedSharding(mesh, P()))
        else:
            out.append(NamedSharding(mesh, fit_spec(name, shape, found[1], mesh, rules, report)))
    report.emit()
    return out


def param_shardings(params: Any, mesh: Mesh, fsdp: bool = False, rules: ShardingRules | None = None) -> Any:
    """A pytree of ``NamedSharding`` matching ``params`` by role (module doc): a parameter pytree,
    a LoRA adapter ``{module: {"A", "B"}}`` or an optimizer state holding such trees. ``rules``
    defaults to ``ShardingRules.default(fsdp)``."""
    named, treedef = _named_leaves(params)
    out = _by_role([(name, tuple(np.shape(leaf))) for name, leaf in named], mesh,
                   rules or ShardingRules.default(fsdp))
    return jax.tree_util.tree_unflatten(treedef, out)


def tensor_shardings(shapes: Mapping[str, tuple[int, ...]], mesh: Mesh, fsdp: bool = False,
                     rules: ShardingRules | None = None) -> dict[str, NamedSharding]:
    """HF tensor name -> the ``NamedSharding`` `param_shardings` gives that tensor, from names and
    shapes alone (e.g. ``params.param_specs(cfg)``): for placing tensors as they are loaded."""
    names = list(shapes)
    out = _by_role([(n, tuple(shapes[n])) for n in names], mesh, rules or ShardingRules.default(fsdp))
    return dict(zip(names, out, strict=True))


def stat_shardings(stats: Mapping[str, Any], mesh: Mesh, neuron_axis: str = "input", fsdp: bool = False,
                   rules: ShardingRules | None = None) -> dict[str, NamedSharding]:
    """Shardings of statistics keyed by HF linear weight name: a per-neuron vector ``[n]`` follows
    the weight's ``neuron_axis`` dimension, a Hessian ``[in, in]`` its input dimension (first
    dimension split, second whole), or ``hessian_rows`` where that dimension is not split."""
    rules = rules or ShardingRules.default(fsdp)
    report = _Report()
    out = {}
    for name, leaf in stats.items():
        shape = tuple(np.shape(leaf))
        found = role_of(name)
        if found is None or len(found[1]) != 2 or len(shape) not in (1, 2):
            report.unknown.append(name)
            out[name] = NamedSharding(mesh, P())
            continue
        out_ax, in_ax = found[1]
        ax = in_ax if len(shape) == 2 or neuron_axis == "input" else out_ax
        if len(shape) == 2 and rules.mesh_axis(ax) is None:
            ax = "hessian_rows"
        logical = (ax,) if len(shape) == 1 else (ax, None)
        out[name] = NamedSharding(mesh, fit_spec(name, shape, logical, mesh, rules, report))
    report.emit()
    return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (sample) dimension over ``data``."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def put(x: Any, sharding: NamedSharding, *, shape: tuple[int, ...] | None = None, row0: int = 0) -> jax.Array:
    """Place a host array as a (possibly multi-host) global array. ``x`` is the whole array, or,
    with ``shape`` (the global shape) and ``row0``, the rows ``row0 : row0 + len(x)`` of it, which
    must cover every row this process's devices hold (`local_rows`)."""
    x = np.asarray(x)
    if shape is None or tuple(shape) == x.shape:
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def local(idx: tuple[slice, ...]) -> np.ndarray:
        first = idx[0]
        start = 0 if first.start is None else first.start
        stop = shape[0] if first.stop is None else first.stop
        return x[(slice(start - row0, stop - row0), *idx[1:])]

    return jax.make_array_from_callback(tuple(shape), sharding, local)


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """The range ``(r0, r1)`` of first-axis rows that this process's devices hold of an array of
    ``shape`` placed with ``sharding`` (the whole range for a 0-d array or when they hold it all)."""
    if not shape:
        return 0, 1
    starts, stops = [], []
    for idx in sharding.addressable_devices_indices_map(tuple(shape)).values():
        first = idx[0] if idx else slice(None)
        starts.append(0 if first.start is None else first.start)
        stops.append(shape[0] if first.stop is None else first.stop)
    return min(starts), max(stops)


def put_tree(tree: Any, shardings: Any) -> Any:
    """Place a tree (device or host arrays) with ``shardings``. One process: ``device_put``, which
    reshards device arrays without a round trip through host memory. Several processes: every
    process holds the tree in full and contributes its own shards; a leaf already placed as asked
    (e.g. loaded with ``load_pretrained(..., mesh=)``) is kept as it is."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def place(x: Any, sh: NamedSharding) -> Any:
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim):
            return x
        return put(x, sh)

    return jax.tree.map(place, tree, shardings)


def tree_to_host(tree: Any) -> Any:
    """Global arrays as host arrays on every process, gathered in one collective across hosts."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def abstract(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (for ``jit(...).lower`` without data)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree, shardings)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` (arguments default to the cluster's environment)."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def microbatch_sharding(mesh: Mesh) -> Any:
    """``ndim -> NamedSharding`` for stacked micro-batches ``[accum, batch, ...]``: the batch axis
    (the second) over ``data``."""
    return lambda ndim: NamedSharding(mesh, P(None, DATA, *([None] * (ndim - 2))) if ndim >= 2 else P())


__all__ = ["AXES", "DATA", "MODEL", "ROLES", "ShardingRules", "abstract", "batch_sharding", "fit_spec",
           "initialize_distributed", "make_mesh", "mesh_from_flag", "mesh_shape", "microbatch_sharding", "param_shardings",
           "parse_mesh", "put", "put_tree", "role_of", "stat_shardings", "tensor_shardings", "tree_to_host",
           "unsplit_warnings"]
