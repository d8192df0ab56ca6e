"""Hand labels of SmolLM2 responses and the refusal detector's agreement with them.

``python -m hcnr_jax.eval.labels [--embedding]`` prints precision / recall (class "refused") of
each rule set against ``hcnr_jax/bundled/labels/refusal_labels.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hcnr_jax.data import read_jsonl
from hcnr_jax.embedded import LABELS_FILE
from hcnr_jax.errors import DataError
from hcnr_jax.eval.metrics import detector_agreement
from hcnr_jax.eval.refusal import VERDICTS, RefusalDetector

LABELS = LABELS_FILE


def load_labels(path: str | Path = LABELS) -> list[dict]:
    """Records ``{benchmark, id, question, unanswerable, response, label}``; labels are verdicts."""
    rows = [r for _, r in read_jsonl(path)]
    for i, r in enumerate(rows, 1):
        if r.get("label") not in VERDICTS:
            raise DataError(f"{path}:{i}: label {r.get('label')!r} is not one of {VERDICTS}")
    return rows


def agreement(rows: list[dict], detector: RefusalDetector) -> dict[str, Any]:
    pred = [d.verdict for d in detector.detect_all([r["response"] for r in rows], [r["question"] for r in rows])]
    return detector_agreement([r["label"] for r in rows], pred)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--embedding", action="store_true", help="also the default rules + MiniLM similarity")
    args = ap.parse_args()
    rows = load_labels(args.labels)
    dets = {r: RefusalDetector(rules=r) for r in ("default", "selfaware", "alignment_for_honesty", "unknownbench")}
    if args.embedding:
        dets["default+embedding"] = RefusalDetector(embedding=True)
    print(f"{len(rows)} hand-labelled responses:",
          json.dumps({v: sum(r['label'] == v for r in rows) for v in VERDICTS}))
    print("| rules | precision | recall | F1 | 3-way accuracy |\n|---|---|---|---|---|")
    for name, d in dets.items():
        a = agreement(rows, d)
        print(f"| {name} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | {a['accuracy']:.3f} |")
    a = agreement(rows, dets["default"])
    print("default confusion (hand -> detector):", json.dumps(a["confusion"]))
    for b in sorted({r["benchmark"] for r in rows}):
        sub = [r for r in rows if r["benchmark"] == b]
        s = agreement(sub, dets["default"])
        print(f"  {b}: n={s['n']} precision={s['precision']:.3f} recall={s['recall']:.3f}")


if __name__ == "__main__":
    main()
