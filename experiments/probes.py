"""Linear probes for answerability on hidden states (the HCNR paper's "Observation 2").

After fine-tuning, a model stops saying "I don't know", yet its hidden states may still separate
answerable from unanswerable questions. This script measures that: for M0 (the honest model) and
M1 (its fine-tune), the residual stream at the last prompt token (the position right before the
answer is generated) of a few layers, and per layer a logistic-regression probe for "unanswerable".

    python experiments/probes.py [--model M0 --model M1] [--data-dir DIR] [--limit 200] [--layers 6,12,30]

Models: ``BASE+ADAPTER[+ADAPTER]`` specs as ``hcnr`` reads them; by default the shipped pair
(M0 = ``GGUF+honest``, M1 = ``GGUF+honest+finetuned``, as ``experiments/reproduce.py`` uses).
Data: the refusal benchmarks' evaluation splits, ``--limit`` examples per benchmark balanced
between answerable and unanswerable, selected and chat-formatted exactly as ``hcnr eval`` does.

Features: layer ``l`` is the residual stream after ``l`` decoder blocks (0: the token embedding, as
Hugging Face's ``hidden_states[l]``; the last layer is before the final norm), float32, read off
the model's own forward (``hidden_states=True``), see `last_token_states`.

Probes: scikit-learn, standardised features then ``LogisticRegression(C=1)``, one per layer, in
two protocols: (1) a seeded 50/50 split of the examples, stratified by benchmark and label; (2)
leave one benchmark out (train on the others, test on it; the mean over benchmarks). Each reports
the test AUROC of the probe trained on M0 and tested on M0, trained on M1 tested on M1, and trained
on M0 tested on M1 (transfer), with 95% percentile bootstrap intervals over test examples (1000
resamples, within the answerable / unanswerable halves). A TF-IDF probe on the question text, on
the same split, shows how much is readable from the words alone.

Writes ``<out-dir>/probes.json`` and ``<out-dir>/probes.md`` (default ``experiments/results``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
LIMIT, BATCH, SEED, C, RESAMPLES = 200, 16, 0, 1.0, 1000
TAGS = ("M0", "M1")
SETTINGS = (("M0", "M0"), ("M1", "M1"), ("M0", "M1"))  # (trained on, tested on)

log = logging.getLogger("probes")


def default_models() -> list[str]:
    """M0 and M1 as `experiments/reproduce.py` names them (its ``models()``)."""
    from hcnr_jax.embedded import BUNDLED, smollm2_gguf

    m0 = f"{smollm2_gguf()}+{BUNDLED / 'models' / 'honest'}"
    return [m0, f"{m0}+{BUNDLED / 'models' / 'finetuned'}"]


def default_layers(num_layers: int, spaced: int = 4) -> tuple[int, ...]:
    """``spaced`` evenly spaced layers plus the last: 30 layers -> (6, 12, 18, 24, 30)."""
    return tuple(sorted({round(num_layers * k / (spaced + 1)) for k in range(1, spaced + 1)} | {num_layers}))


# ---------------------------------------------------------------------------------------------
# Features


@partial(jax.jit, static_argnames=("cfg", "layers"))
def _last_token_states(params: Any, cfg: Any, ids: jax.Array, mask: jax.Array,
                       layers: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``([B, len(layers), D], [B, D])``: the residual stream after each of ``layers`` blocks
    (``Output.states`` of the model's forward), and the final-norm hidden state, at each row's last
    real token (left or right padding)."""
    from hcnr_jax.model import forward

    out = forward(params, cfg, ids, mask, return_logits=False, precision=jax.lax.Precision.HIGHEST,
                  hidden_states=True)
    t = ids.shape[1]
    last = jnp.max(jnp.where(mask, jnp.arange(t, dtype=jnp.int32)[None], -1), axis=1)  # [B]

    def at_last(a: jax.Array) -> jax.Array:
        return jnp.take_along_axis(a, last[:, None, None], axis=1)[:, 0]

    states = [at_last(out.states[layer]) for layer in layers]
    picked = jnp.stack(states, axis=1)
    return picked.astype(jnp.float32), at_last(out.hidden).astype(jnp.float32)


def last_token_states(model: Any, prompt_ids: Sequence[Sequence[int]], layers: Sequence[int],
                      batch_size: int = BATCH, pad_side: str = "left", width_multiple: int = 64,
                      with_final: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Residual streams ``[N, len(layers), D]`` (float32) at the last token of each prompt.

    ``model``: a loaded model (``hcnr_jax.load_pretrained``), float32 for exact features.
    Prompts are sorted by length and batched (``batch_size`` rows, padding rows included, widths
    rounded up to ``width_multiple`` so that few shapes compile); results come back in the input
    order. ``with_final``: also return the final-norm hidden states ``[N, D]``.
    """
    n_layers = model.config.num_layers
    layers = tuple(int(x) for x in layers)
    if not layers or any(not 0 <= x <= n_layers for x in layers):
        raise ValueError(f"layers must be in 0..{n_layers}, got {layers}")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    pad = getattr(model.tokenizer, "pad_token_id", None) or 0
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    d = model.config.hidden_size
    states = np.zeros((len(prompt_ids), len(layers), d), np.float32)
    final = np.zeros((len(prompt_ids), d), np.float32)
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        width = -(-max(len(prompt_ids[i]) for i in rows) // width_multiple) * width_multiple
        ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), bool)
        for r, i in enumerate(rows):
            p = prompt_ids[i]
            sl = slice(width - len(p), width) if pad_side == "left" else slice(0, len(p))
            ids[r, sl], mask[r, sl] = p, True
        mask[len(rows) :, 0] = True  # padding rows: one token, results dropped
        st, fi = _last_token_states(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask), layers)
        states[rows], final[rows] = np.asarray(st)[: len(rows)], np.asarray(fi)[: len(rows)]
    return (states, final) if with_final else states


def prompt_ids(model: Any, rows: Sequence[dict]) -> list[list[int]]:
    """Token ids of each row's question as `hcnr eval` prompts it (chat template, generation prompt)."""
    from hcnr_jax.eval.runner import _prompt_ids

    return _prompt_ids(model, list(rows))


def load_rows(benchmarks: Sequence[str], data_dir: str | None, limit: int | None, seed: int) -> list[dict]:
    """The evaluation rows `hcnr eval --limit` would score, benchmark after benchmark."""
    from hcnr_jax.data.benchmarks import load_benchmark, select

    rows = []
    for bench in benchmarks:
        ds = load_benchmark(bench, data_dir)
        rows += list(select(ds, "evaluation", limit, seed))
    return rows


# ---------------------------------------------------------------------------------------------
# Probes and AUROC


def make_probe(c: float = C, seed: int = SEED) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=10000, random_state=seed))


def probe_scores(x_train: np.ndarray, y_train: np.ndarray, x_tests: Sequence[np.ndarray], c: float = C,
                 seed: int = SEED) -> list[np.ndarray]:
    """Fit a probe on ``(x_train, y_train)``; its decision scores on each of ``x_tests``."""
    probe = make_probe(c, seed).fit(x_train, y_train)
    return [probe.decision_function(x) for x in x_tests]


def weighted_auroc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """AUROC of scores ``pos`` (unanswerable) against ``neg`` (answerable) where each example counts
    ``w`` times (``w_pos [R, P]``, ``w_neg [R, N]``: one row per resample) -> ``[R]``. Exact, ties
    count 1/2: the weighted Mann-Whitney statistic of all (unanswerable, answerable) pairs."""
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [P, N]
    return np.einsum("rp,pn,rn->r", w_pos, wins, w_neg) / (w_pos.sum(1) * w_neg.sum(1))


def bootstrap_auroc(y: np.ndarray, scores: np.ndarray, resamples: int = RESAMPLES, seed: Any = SEED) -> np.ndarray:
    """AUROC of ``resamples`` bootstrap resamples of the examples, drawn within each class (so every
    resample has both, in the original numbers); a resample is a vector of counts per example."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, float)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return np.full(resamples, np.nan)
    rng = np.random.default_rng(seed)
    w_pos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=resamples).astype(float)
    w_neg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=resamples).astype(float)
    return weighted_auroc(pos, neg, w_pos, w_neg)


def auroc(y: np.ndarray, scores: np.ndarray, resamples: int = RESAMPLES, seed: Any = SEED) -> dict[str, Any]:
    """``{"auroc", "ci", "n", "n_unanswerable"}``: sklearn's AUROC with its 95% bootstrap interval."""
    from sklearn.metrics import roc_auc_score

    from hcnr_jax.eval.metrics import percentile_interval

    y = np.asarray(y).astype(int)
    res: dict[str, Any] = dict(n=len(y), n_unanswerable=int(y.sum()))
    if len(set(y.tolist())) < 2:
        return {**res, "auroc": float("nan"), "ci": [float("nan")] * 2}
    res["auroc"] = float(roc_auc_score(y, scores))
    if resamples:
        res["ci"] = percentile_interval(bootstrap_auroc(y, scores, resamples, seed))
    return res


def split(benchmarks: np.ndarray, y: np.ndarray, seed: int = SEED, test_size: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Train / test indices: a seeded split stratified by (benchmark, label)."""
    from sklearn.model_selection import train_test_split

    strata = np.array([f"{b}:{v}" for b, v in zip(benchmarks, y, strict=True)])
    return train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=strata)


def evaluate_probes(features: dict[str, np.ndarray], y: np.ndarray, benchmarks: np.ndarray, layers: Sequence[int],
                    seed: int = SEED, c: float = C, resamples: int = RESAMPLES,
                    lobo: bool = True) -> dict[str, Any]:
    """Probe AUROCs per layer for each ``SETTINGS`` pair. ``features[tag]``: ``[N, len(layers), D]``
    for the same N examples; ``y``: 1 unanswerable, 0 answerable."""
    from hcnr_jax.eval.metrics import percentile_interval

    y = np.asarray(y).astype(int)
    benchmarks = np.asarray(benchmarks)
    train, test = split(benchmarks, y, seed)
    names = list(dict.fromkeys(benchmarks.tolist()))
    out: dict[str, Any] = dict(split=dict(n_train=len(train), n_test=len(test)), layers={})
    for j, layer in enumerate(layers):
        res: dict[str, Any] = {}
        for src in dict.fromkeys(s for s, _ in SETTINGS):
            dsts = [d for s, d in SETTINGS if s == src]
            scores = probe_scores(features[src][train, j], y[train], [features[d][test, j] for d in dsts], c, seed)
            for d, sc in zip(dsts, scores, strict=True):
                res[f"{src}->{d}"] = dict(split=auroc(y[test], sc, resamples, [seed, layer]))
        if lobo and len(names) > 1:
            for src in dict.fromkeys(s for s, _ in SETTINGS):
                dsts = [d for s, d in SETTINGS if s == src]
                per: dict[str, dict[str, Any]] = {d: {} for d in dsts}
                reps: dict[str, list[np.ndarray]] = {d: [] for d in dsts}
                for k, held in enumerate(names):
                    tr, te = benchmarks != held, benchmarks == held
                    if len(set(y[tr].tolist())) < 2:
                        continue
                    scores = probe_scores(features[src][tr, j], y[tr], [features[d][te, j] for d in dsts], c, seed)
                    for d, sc in zip(dsts, scores, strict=True):
                        per[d][held] = auroc(y[te], sc, 0)
                        if resamples:
                            reps[d].append(bootstrap_auroc(y[te], sc, resamples, [seed, layer, k]))
                for d in dsts:
                    vals = [m["auroc"] for m in per[d].values() if np.isfinite(m["auroc"])]
                    entry: dict[str, Any] = dict(per_benchmark=per[d], mean=float(np.mean(vals)) if vals else float("nan"))
                    if resamples and reps[d]:
                        entry["ci"] = percentile_interval(np.nanmean(reps[d], axis=0))
                    res[f"{src}->{d}"]["lobo"] = entry
        out["layers"][str(layer)] = res
    return out


def text_baseline(questions: Sequence[str], y: np.ndarray, benchmarks: np.ndarray, seed: int = SEED,
                  c: float = C, resamples: int = RESAMPLES) -> dict[str, Any]:
    """A TF-IDF (word 1-2 grams) logistic regression on the question text, on the same split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    y = np.asarray(y).astype(int)
    train, test = split(np.asarray(benchmarks), y, seed)
    q = np.asarray(questions, dtype=object)
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True),
                        LogisticRegression(C=c, max_iter=10000, random_state=seed)).fit(q[train], y[train])
    return auroc(y[test], clf.decision_function(q[test]), resamples, [seed, 2**31 - 1])  # a stream of its own


# ---------------------------------------------------------------------------------------------
# Report


def _cell(m: dict | None, key: str = "auroc") -> str:
    if not m or key not in m or not np.isfinite(m[key]):
        return "—"
    ci = m.get("ci")
    if ci is None or not all(np.isfinite(ci)):
        return f"{m[key]:.3f}"
    return f"{m[key]:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"


def markdown(doc: dict[str, Any]) -> str:
    res = doc["results"]
    lobo = any("lobo" in v for r in res["layers"].values() for v in r.values())
    head = ["layer", *(f"{s}->{d} split" for s, d in SETTINGS)] + ([f"{s}->{d} LOBO" for s, d in SETTINGS] if lobo else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer, r in res["layers"].items():
        cells = [_cell(r[f"{s}->{d}"]["split"]) for s, d in SETTINGS]
        if lobo:
            cells += [_cell(r[f"{s}->{d}"].get("lobo"), "mean") for s, d in SETTINGS]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if doc.get("text_baseline"):
        lines.append("| text (TF-IDF) | " + _cell(doc["text_baseline"]) + " |" + " |" * (len(head) - 2))
    counts = ", ".join(f"{b} {n}" for b, n in doc["n_per_benchmark"].items())
    models = "; ".join(f"{t} = `{m}`" for t, m in doc["models"].items())
    return (f"# Answerability probes on hidden states (HCNR Observation 2)\n\n"
            f"`{doc['command']}`\n\n{models}\n\n"
            f"N = {doc['n']} examples ({counts}; {doc['n_unanswerable']} unanswerable), layers {doc['layers']} of "
            f"{doc['num_layers']}, seed {doc['seed']}, probe: standardised features + LogisticRegression(C={doc['C']}).\n\n"
            + "\n".join(lines) + "\n\n"
            "Test AUROC of a linear probe for 'unanswerable' on the residual stream at the last prompt token "
            "(layer l: after l decoder blocks), with 95% bootstrap intervals (percentile, "
            f"{doc['resamples']} resamples of the test examples within the answerable / unanswerable halves). "
            "A->B: probe trained on model A's features, tested on model B's. split: a seeded 50/50 split by "
            f"example, stratified by benchmark and label ({res['split']['n_train']} train / {res['split']['n_test']} test). "
            "LOBO: leave one benchmark out, trained on the others, the mean AUROC over held-out benchmarks "
            "(interval: of the mean of their independent bootstraps). text (TF-IDF): a probe on the question's "
            "words alone, same split.\n")


def main(argv: list[str] | None = None) -> int:
    from hcnr_jax.commands.eval import _benchmarks, resolve_benchmarks
    from hcnr_jax.data.benchmarks import BENCHMARKS, locate
    from hcnr_jax.io import atomic_write_text, finite_json, portable_path
    from hcnr_jax.pretrained import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="M0 then M1 (give it twice): HF dir, .gguf, BASE+ADAPTER[+ADAPTER]; default: the shipped pair")
    ap.add_argument("--benchmarks", type=_benchmarks, default=None,
                    help="comma-separated refusal benchmarks (default: the available ones of falseqa,nec,refunq,kuq,selfaware)")
    ap.add_argument("--data-dir", default=None, help="benchmark data folder, as for `hcnr eval --data-dir`")
    ap.add_argument("--limit", type=int, default=LIMIT, help="examples per benchmark (balanced)")
    ap.add_argument("--layers", default=None,
                    help="comma-separated layers (0: embeddings, L: after the last block); default: 4 evenly spaced + the last")
    ap.add_argument("--batch-size", type=int, default=BATCH)
    ap.add_argument("--seed", type=int, default=SEED, help="data selection, probe split and bootstrap seed")
    ap.add_argument("--C", type=float, default=C, dest="c", help="inverse L2 strength of the logistic regression")
    ap.add_argument("--bootstrap", type=int, default=RESAMPLES, help="bootstrap resamples (0: no intervals)")
    ap.add_argument("--no-lobo", action="store_true", help="skip the leave-one-benchmark-out probes")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    specs = args.model or default_models()
    if len(specs) != 2:
        ap.error(f"give --model exactly twice (M0, M1), got {len(specs)}")
    if args.limit < 2 or args.batch_size < 1:
        ap.error("--limit must be >= 2 and --batch-size >= 1")
    benchmarks = resolve_benchmarks(args.benchmarks, args.data_dir)
    bad = [b for b in benchmarks if BENCHMARKS[b].kind != "refusal"]
    if bad:
        ap.error(f"not answerable/unanswerable benchmarks: {bad}")
    rows = load_rows(benchmarks, args.data_dir, args.limit, args.seed)
    y = np.array([r["unanswerable"] for r in rows], int)
    bench = np.array([r["benchmark"] for r in rows])
    log.info("%d examples (%d unanswerable) from %s", len(rows), int(y.sum()), ", ".join(benchmarks))

    features, layers, num_layers, seconds, n_tokens = {}, None, None, {}, {}
    for tag, spec in zip(TAGS, specs, strict=True):
        t0 = time.perf_counter()
        model = load_pretrained(spec, dtype="float32")
        if model.tokenizer is None:
            ap.error(f"{spec}: no tokenizer")
        if layers is None:
            num_layers = model.config.num_layers
            layers = (tuple(int(x) for x in args.layers.split(",")) if args.layers else default_layers(num_layers))
        elif model.config.num_layers != num_layers:
            ap.error(f"{spec}: {model.config.num_layers} layers, M0 has {num_layers}")
        ids = prompt_ids(model, rows)
        n_tokens[tag] = int(sum(map(len, ids)))
        features[tag] = last_token_states(model, ids, layers, args.batch_size)
        seconds[tag] = round(time.perf_counter() - t0, 1)
        log.info("%s: features %s in %.0f s (%d prompt tokens)", tag, features[tag].shape, seconds[tag], n_tokens[tag])
        del model

    results = evaluate_probes(features, y, bench, layers, args.seed, args.c, args.bootstrap, not args.no_lobo)

    def shown(text: str) -> str:
        # Results are committed: the data folder is one machine's path, recorded as DIR (as in the other scripts).
        return text.replace(args.data_dir, "DIR") if args.data_dir and args.data_dir != "hub" else text

    cmd = [shown(a) for a in (sys.argv[1:] if argv is None else argv)]
    doc = dict(
        command=shlex.join(["python", "experiments/probes.py", *cmd]),
        models={t: "+".join(portable_path(p) for p in s.split("+")) for t, s in zip(TAGS, specs, strict=True)},
        benchmarks=list(benchmarks), data_dir=None if args.data_dir is None else shown(args.data_dir),
        data={b: shown(locate(b, args.data_dir).describe()) for b in benchmarks}, limit=args.limit, n=len(rows), n_unanswerable=int(y.sum()),
        n_per_benchmark={b: int((bench == b).sum()) for b in benchmarks}, layers=list(layers), num_layers=num_layers,
        seed=args.seed, seeds=dict(data=args.seed, split=args.seed, probe=args.seed, bootstrap=args.seed),
        C=args.c, resamples=args.bootstrap, batch_size=args.batch_size, prompt_tokens=n_tokens,
        feature_seconds=seconds, features="residual stream after `layer` blocks at the last prompt token, float32",
        results=results, text_baseline=text_baseline([r["question"] for r in rows], y, bench, args.seed, args.c,
                                                     args.bootstrap),
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(doc)
    atomic_write_text(out / "probes.json", finite_json(doc, indent=1) + "\n")  # temp file, then rename
    atomic_write_text(out / "probes.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
