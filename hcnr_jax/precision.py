"""The matmul precision of the float32 statistics and solves, in one place.

A float32 matmul runs by default as TF32 on NVIDIA tensor cores (a 10-bit mantissa) and in
bfloat16 passes on TPUs. The Fisher norms, the Hessians ``X^T X`` and the compensation solve are
compared against float64 references to ~1e-5 and must not lose those bits, so every matmul of
theirs passes ``precision=HIGHEST`` (exact float32 on every backend). The kernels, the statistics,
the solvers and the planner all import it from here, the lowest module they share.
"""

from __future__ import annotations

import jax

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["HIGHEST"]
