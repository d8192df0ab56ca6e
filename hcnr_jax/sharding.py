"""The one module that owns the device mesh and sharding API (it changes between JAX releases).

A mesh has two named axes: ``data`` (samples) and ``model`` (parameters, tensor-parallel /
fsdp-style). Rules, in one place:

- a batch ``[B, ...]`` is split over ``data``;
- a 2-D weight splits its first dimension (a linear layer's outputs, the vocabulary of an
  embedding) over ``model`` when it divides evenly, else stays replicated; with ``fsdp`` its second
  dimension is also split over ``data``;
- vectors and statistics follow the same first-dimension rule.

Axis types are ``Auto``: XLA's partitioner propagates shardings through the model, so the model
code needs no sharding annotations (jax 0.10's ``make_mesh`` defaults to ``Explicit``).
Multi-host works unchanged once ``jax.distributed.initialize`` has run: arrays are built with
``make_array_from_callback`` from host data every process holds, and results are gathered by
replicating them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hcnr_jax.errors import HcnrError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


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


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Any = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh(spec)
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise HcnrError("mesh: at most one axis may be -1")
    if free:
        rest = int(np.prod([v for v in shape.values() if v != -1]))
        shape[free[0]] = len(devices) // max(rest, 1)
    if shape[DATA] * shape[MODEL] != len(devices) or min(shape.values()) < 1:
        raise HcnrError(f"mesh {shape} does not fit {len(devices)} devices")
    return jax.make_mesh((shape[DATA], shape[MODEL]), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def _divides(mesh: Mesh, axis: str, n: int) -> bool:
    size = mesh.shape[axis]
    return size > 1 and n % size == 0


def spec_for(shape: tuple[int, ...], mesh: Mesh, fsdp: bool = False) -> P:
    """The partition spec of an array of ``shape`` under this module's rules."""
    if len(shape) == 0:
        return P()
    first = MODEL if _divides(mesh, MODEL, shape[0]) else None
    if len(shape) == 1:
        return P(first)
    second = DATA if fsdp and _divides(mesh, DATA, shape[1]) else None
    return P(first, second, *([None] * (len(shape) - 2)))


def param_shardings(params: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """A pytree of ``NamedSharding`` matching ``params`` (weights over ``model``, see module doc)."""
    return jax.tree.map(lambda a: NamedSharding(mesh, spec_for(tuple(a.shape), mesh, fsdp)), params)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (sample) dimension over ``data``."""
    return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full as a (possibly multi-host) global array."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree(tree: Any, shardings: Any) -> Any:
    """Place a tree (device or host arrays) with ``shardings``. One process: ``device_put``, which
    reshards device arrays without a round trip through host memory. Several processes: every
    process holds the tree in full and contributes its own shards."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(put, tree, shardings)


def tree_to_host(tree: Any) -> Any:
    """Global arrays as host arrays on every process, gathered in one collective across hosts."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` (arguments default to the cluster's environment)."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def microbatch_sharding(mesh: Mesh) -> Any:
    """``ndim -> NamedSharding`` for stacked micro-batches ``[accum, batch, ...]``: the batch axis
    (the second) over ``data``."""
    return lambda ndim: NamedSharding(mesh, P(None, DATA, *([None] * (ndim - 2))) if ndim >= 2 else P())
