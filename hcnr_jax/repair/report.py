"""``hcnr_report.md``: the report dict rendered for people (the JSON file is the full record)."""

from __future__ import annotations

from typing import Any


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render_markdown(report: dict[str, Any]) -> str:
    """Settings, data, summary, per-module restored fraction, per-layer table, timings, memory."""
    s, m = report["summary"], report["models"]
    lines = [
        "# HCNR repair report",
        "",
        f"- base: `{m['base']}`",
        f"- fine-tuned: `{m['finetuned']}` ({m['model_type']}, {m['num_layers']} blocks, {m['dtype']})",
        f"- restored parameters: {s['restored_params']:,} = {100 * s['restored_fraction_of_linear']:.2f}% of "
        f"block linear weights ({100 * s['restored_fraction_of_model']:.2f}% of the model; "
        f"target r_iw x r_cw = {100 * s['target_fraction']:.2f}%)",
        f"- layers kept: {s['layers_kept']} of {s['layers']}; compensation: {s['compensation']}",
        f"- layer objective tr(dW H dW^T) summed over kept layers: fine-tuned {_fmt(s['objective_sft'])}, "
        f"restored {_fmt(s['objective_before'])}, compensated {_fmt(s['objective_after'])}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {_fmt(v)} |" for k, v in report["settings"].items()],
        "",
        "## Data",
        "",
        "| set | file | samples | tokens | target tokens | file sha256 | samples sha256 |",
        "|---|---|---|---|---|---|---|",
        *[f"| {k} | `{d['path']}` | {d['samples']} | {d['tokens']} | {d['target_tokens']} | "
          f"`{(d['file_sha256'] or '-')[:16]}` | `{d['samples_sha256'][:16]}` |" for k, d in report["data"].items()],
        "",
        "## Restored fraction by module type",
        "",
        "| module | layers kept | restored params | fraction |",
        "|---|---|---|---|",
        *[f"| {k} | {v['kept']}/{v['layers']} | {v['restored_params']:,} | {100 * v['restored_fraction']:.2f}% |"
          for k, v in report["restored_by_module"].items()],
        "",
        "## Layers",
        "",
        "| layer | d | kept | restored neurons | objective sft | before comp. | after comp. | damping |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["layers"]:
        obj = [_fmt(r[k]) if k in r else "" for k in ("objective_sft", "objective_before", "objective_after", "damping")]
        lines.append(f"| {r['name']} | {r['d']:.4g} | {'yes' if r['kept'] else ''} | {r['restored_neurons']} | "
                     + " | ".join(obj) + " |")
    lines += ["", "## Time and memory per stage", "", "| stage | seconds | peak RSS MiB | peak device MiB |",
              "|---|---|---|---|"]
    mem = report["memory"]
    for k, v in report["timing_s"].items():
        lines.append(f"| {k} | {v:.2f} | {mem['peak_rss_mib'].get(k, '')} | {mem['peak_device_mib'].get(k, '')} |")
    return "\n".join(lines) + "\n"
