"""PNG plots of a repair report: per-layer perturbation (kept layers marked) and restored
fraction per module type. Rendered with the Agg backend and no timestamp metadata, so the same
report gives byte-identical files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PERTURBATION_PNG = "hcnr_perturbation.png"
FRACTION_PNG = "hcnr_restored_fraction.png"
_METADATA = {"Software": None}  # no version string: identical bytes across matplotlib patch releases


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    layers = report["layers"]
    d = np.array([min(r["d_layer"], 1e30) for r in layers], float)
    kept = np.array([r["kept"] for r in layers])
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, len(layers) * 0.05 + 4), 3.5), dpi=100)
    ax.bar(x[~kept], d[~kept], color="#b0b0b0", width=1.0, label="not kept")
    ax.bar(x[kept], d[kept], color="#d62728", width=1.0, label="kept (restored)")
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel("perturbation d_j")
    ax.set_title(f"Fine-tuning perturbation per layer ({int(kept.sum())} of {len(layers)} kept, "
                 f"unit={report['settings']['layer_unit']})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    p1 = out_dir / PERTURBATION_PNG
    fig.savefig(p1, metadata=_METADATA)
    plt.close(fig)

    mods = report["restored_by_module"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    names = list(mods)
    ax.bar(names, [100 * mods[n]["restored_fraction"] for n in names], color="#1f77b4")
    ax.axhline(100 * report["summary"]["target_fraction"], color="k", ls="--", lw=1, label="r_iw x r_cw")
    ax.set_ylabel("restored parameters (%)")
    ax.set_title("Restored fraction per module type")
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / FRACTION_PNG
    fig.savefig(p2, metadata=_METADATA)
    plt.close(fig)
    return [p1, p2]
