"""What the Pallas kernels share: where a kernel may run compiled (``VERIFIED``, ``resolve_backend``)
and how its blocks are sized to fit a GPU's shared memory (powers of two, ``SMEM_BUDGET``).

Each kernel file (``fisher_norms``, ``gram``) keeps its own kernel body, its ``*_reference`` in
plain ``jax.numpy``, its shared-memory estimate and its block choice; the rules they have in
common live here, so neither kernel reaches into the other's private names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# Kernel -> platforms (``jax.default_backend()``) where its compiled (not interpreted) Pallas
# version has been checked against its reference; ``backend="auto"`` uses Pallas only there.
# Empty today: the kernels have not run on a GPU or TPU yet. Add a platform after
# ``experiments/gpu_check.py`` passes its "kernels" rows on it.
VERIFIED: dict[str, frozenset[str]] = {
    "fisher_norms": frozenset(),
    "gram": frozenset(),
}

BACKENDS = ("auto", "pallas", "reference")

# Shared memory the block choice may use per program (bytes); H100/H200 allow 227 KiB per block.
SMEM_BUDGET = 96 * 1024
MIN_BLOCK = 16  # Triton's dot needs every side >= 16


def resolve_backend(backend: str, kernel: str | None = None) -> str:
    """"pallas" or "reference" for ``backend``; "auto" is "pallas" only where ``VERIFIED[kernel]``
    holds the current platform (``kernel`` None: no kernel is verified)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be auto, pallas or reference, got {backend!r}")
    if backend == "auto":
        verified = VERIFIED.get(kernel, frozenset()) if kernel is not None else frozenset()
        return "pallas" if jax.default_backend() in verified else "reference"
    return backend


def pow2_block(dim: int, cap: int) -> int:
    """Smallest power of two >= ``dim`` (at least ``MIN_BLOCK``), at most ``cap``."""
    return min(cap, max(MIN_BLOCK, 1 << (max(dim, 1) - 1).bit_length()))


def check_block(block: int, name: str = "block") -> None:
    """Raise ValueError unless ``block`` is a power of two >= ``MIN_BLOCK``."""
    if block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {block}")


def shrink_to_budget(sizes: dict[str, int], smem: Callable[..., int], budget: int) -> dict[str, int]:
    """Halve the largest block (ties: the first key) until ``smem(**sizes) <= budget``."""
    sizes = dict(sizes)
    while smem(**sizes) > budget:
        key = max(sizes, key=lambda k: sizes[k])  # first of the largest
        if sizes[key] <= MIN_BLOCK:
            raise ValueError(f"no blocks >= {MIN_BLOCK} fit a shared-memory budget of {budget} bytes")
        sizes[key] //= 2
    return sizes


def pad_to(dim: int, block: int) -> int:
    """``dim`` rounded up to a multiple of ``block``."""
    return -(-dim // block) * block


def triton_params() -> Any:
    """Triton settings matching the kernels' shared-memory estimates (two pipeline stages); None
    where this jax has none."""
    try:
        from jax.experimental.pallas import triton as plgpu
        return plgpu.CompilerParams(num_warps=4, num_stages=2)
    except (ImportError, AttributeError, TypeError):
        return None


__all__ = ["BACKENDS", "MIN_BLOCK", "SMEM_BUDGET", "VERIFIED", "check_block", "pad_to", "pow2_block",
           "resolve_backend", "shrink_to_budget", "triton_params"]
