"""Wall time and peak memory per stage of a repair (the report's ``timing_s`` and ``memory``).

Host memory is the process's RSS high-water mark, reset at the start of each stage where the
kernel allows it (Linux >= 4.0, ``/proc/self/clear_refs``), so that each stage reports its own
peak; elsewhere the peak of the process so far. The device peak is the first device's
``peak_bytes_in_use`` where the platform reports it (GPUs; not CPUs).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import jax

from hcnr_jax.offload import release_free_heap

log = logging.getLogger("hcnr_jax.repair")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
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
class StageClock:
    """Per-stage wall time (summed when a stage runs twice) and peak host / device memory.
    ``progress``: log each stage's start and end."""

    progress: bool = True
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    peak_device_mib: dict[str, float] = field(default_factory=dict)
    rss_method: str = "per-stage VmHWM"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as stage ``name``."""
        if self.progress:
            log.info("[%s] ...", name)
        release_free_heap()  # what earlier stages freed is not this stage's memory
        if not reset_peak_rss():
            self.rss_method = "process high-water mark so far"
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.peak_rss_mib[name] = peak_rss_mib()
        stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
        if stats and "peak_bytes_in_use" in stats:
            self.peak_device_mib[name] = stats["peak_bytes_in_use"] / 2**20
        if self.progress:
            log.info("[%s] done in %.1fs (peak RSS %.0f MiB)", name, self.seconds[name], self.peak_rss_mib[name])

    def report(self) -> dict[str, Any]:
        """The report's ``timing_s`` and ``memory`` entries (rounded; they vary between runs)."""
        return {
            "timing_s": {k: round(v, 3) for k, v in self.seconds.items()},
            "memory": {"peak_rss_mib": {k: round(v, 1) for k, v in self.peak_rss_mib.items()},
                       "rss_method": self.rss_method,
                       "peak_device_mib": {k: round(v, 1) for k, v in self.peak_device_mib.items()}},
        }


__all__ = ["StageClock", "peak_rss_mib", "reset_peak_rss"]
