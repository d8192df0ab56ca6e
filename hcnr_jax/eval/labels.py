"""Hand labels of SmolLM2 responses and the refusal detector's agreement with them.

``python -m hcnr_jax.eval.labels [--embedding]`` prints precision / recall (class "refused") of
each rule set against ``hcnr_jax/bundled/labels/refusal_labels.jsonl``: on all labels, on the
held-out half, per source (``system``: "none" = SmolLM2 without a system prompt, "cautious" = with
the in-context honesty prompt of experiments/label_refusals.py) and per benchmark.

Development / held-out halves: a fixed seeded hash of each record's id (:func:`half_of`). Rules
are changed looking only at the development half's errors; the held-out half measures them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from hcnr_jax.data import read_jsonl
from hcnr_jax.embedded import LABELS_FILE
from hcnr_jax.errors import DataError
from hcnr_jax.eval.metrics import detector_agreement
from hcnr_jax.eval.refusal import VERDICTS, RefusalDetector

LABELS = LABELS_FILE
SPLIT_SEED = 20240611  # fixed: changing it would let rule changes have seen the held-out half
HALVES = ("development", "held_out")


def load_labels(path: str | Path = LABELS) -> list[dict]:
    """Records ``{benchmark, id, question, unanswerable, response, label[, system]}``; labels are verdicts.

    ``system`` names the system prompt the response was generated with (absent: none); the same
    question can be labelled under several (see hcnr_jax/bundled/labels/README.md)."""
    rows = [r for _, r in read_jsonl(path)]
    for i, r in enumerate(rows, 1):
        if r.get("label") not in VERDICTS:
            raise DataError(f"{path}:{i}: label {r.get('label')!r} is not one of {VERDICTS}")
    return rows


def source_of(row: dict) -> str:
    """The generation setting of a labelled response: its ``system`` field, "none" when absent."""
    return row.get("system", "none")


def half_of(row: dict, seed: int = SPLIT_SEED) -> str:
    """"development" or "held_out", by a seeded hash of ``benchmark/id`` (stable across runs and files)."""
    h = hashlib.sha256(f"{seed}:{row['benchmark']}/{row['id']}".encode()).digest()
    return HALVES[h[0] & 1]


def halves(rows: list[dict], seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {h: [] for h in HALVES}
    for r in rows:
        out[half_of(r, seed)].append(r)
    return out


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
    groups = {f"half={h}": sub for h, sub in halves(rows).items()}
    groups |= {f"system={s}": [r for r in rows if source_of(r) == s] for s in sorted({source_of(r) for r in rows})}
    groups |= {f"benchmark={b}": [r for r in rows if r["benchmark"] == b] for b in sorted({r["benchmark"] for r in rows})}
    print("default rules by subset:")
    print("| subset | n | refused | precision | recall | F1 | 3-way accuracy |\n|---|---|---|---|---|---|---|")
    for name, sub in groups.items():
        s = agreement(sub, dets["default"])
        n_ref = sum(r["label"] == "refused" for r in sub)
        print(f"| {name} | {s['n']} | {n_ref} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} "
              f"| {s['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
