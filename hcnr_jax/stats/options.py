"""How the statistics run (`StatsOptions`): one frozen value passed from the command line or the
caller through ``repair`` and ``stats`` to the engine, instead of keyword arguments threaded through
four layers.

None of these options changes what a statistic *is*, only how it is computed, stored and shown:
results agree across them to float32 summation order. What a statistic is (``neuron_axis``, the
Hessian's ``layers``) stays an argument of ``stats.fisher`` / ``stats.hessian``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jax.sharding import Mesh

from hcnr_jax.stats.fisher_accum import LM_CHUNK


@dataclass(frozen=True)
class StatsOptions:
    """Options of ``stats.fisher`` / ``stats.hessian`` (and of ``repair``'s statistics).

    - ``batch_size``: samples per step (rounded up to a multiple of the mesh's ``data`` axis).
    - ``backend``: "auto" (a Pallas kernel only where ``hcnr_jax.kernels.backend.VERIFIED`` lists
      this platform, jax.numpy elsewhere), "pallas" or "reference".
    - ``remat``: recompute blocks in the Fisher's backward pass: one block's activations live, for
      one more forward pass. It is what lets a large model fit a device at all, and on a CPU it keeps
      long sequences in a laptop's memory (SmolLM2 at 8 x 512: 850 MiB of temporaries against
      12,115 MiB) for about a fifth more Fisher time (experiments/fisher_rss.py; docs/scale.md).
    - ``lm_chunk``: the Fisher's LM head runs over this many target slots at a time.
    - ``mesh``: the device mesh (`hcnr_jax.sharding.make_mesh`; parse a ``"data=2,model=4"`` spec
      there, once); None: every device on ``data``. ``fsdp``: also split weights over ``data``.
    - ``cache_dir``: the result folder (``--cache-dir``): results are reused for identical weights,
      data and settings, and checkpoints go there (every ``checkpoint_every`` batches) so that a
      killed run resumes. Each entry is computed under a lock: another run needing it waits up to
      ``lock_timeout`` seconds (None: ``hcnr_jax.io.LOCK_TIMEOUT_S``).
    - ``progress``: a progress bar (samples/s); ``on_batch(batches_done)``: called after each batch.
    """

    batch_size: int = 8
    backend: Literal["auto", "pallas", "reference"] = "auto"
    remat: bool = True
    lm_chunk: int = LM_CHUNK
    mesh: Mesh | None = None
    fsdp: bool = False
    cache_dir: str | Path | None = None
    checkpoint_every: int = 16
    lock_timeout: float | None = None
    progress: bool = False
    on_batch: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        # A mesh spec string is parsed at the edge (the command, or the caller), never down here.
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise TypeError(f"StatsOptions.mesh must be a jax.sharding.Mesh (hcnr_jax.sharding.make_mesh(spec)) "
                            f"or None, got {type(self.mesh).__name__}")


__all__ = ["StatsOptions"]
