"""Samples for the statistics: JSONL files -> right-padded token arrays with a loss mask.

Two line formats (METHOD.md, "Inputs"):

- ``{"prompt": ..., "response": ...}``: rendered with the tokenizer's chat template. The prompt is
  the user turn plus the generation prompt (exactly what the model sees at inference), the
  targets are the assistant turn's tokens up to and including its end-of-turn token. Without a
  chat template: ``prompt`` tokens (with the tokenizer's special tokens), then ``response``
  tokens and the EOS token as targets.
- ``{"input_ids": [...], "loss_mask": [...]}``: pre-tokenized; ``loss_mask[t] = 1`` marks
  ``input_ids[t]`` as a target predicted from the tokens before it.

``loss_mask[:, 0]`` is always 0: the first token has nothing to be predicted from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.errors import DataError

# Token strings that end an assistant turn in the chat templates of the supported families.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class Samples:
    """Token arrays of N samples, right-padded to the longest one (T)."""

    input_ids: np.ndarray  # [N, T] int32, right-padded
    attention_mask: np.ndarray  # [N, T] bool
    loss_mask: np.ndarray  # [N, T] bool; 1: input_ids[n, t] is a target predicted from tokens < t
    sha256: str  # hash of the source content and tokenization settings (a cache key)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def select(self, index: Any) -> Samples:
        """A subset (``index`` a slice or integer array); its hash names the subset."""
        idx = np.arange(len(self))[index]
        h = hashlib.sha256(f"{self.sha256}:{idx.tobytes().hex()}".encode()).hexdigest()
        return Samples(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx], h)


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _tokenize_chat(prompt: str, response: str, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of one prompt/response pair."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        prefix = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if not full.startswith(prefix):
            raise DataError(f"{where}: the chat template renders the assistant turn in a way that does not "
                            "extend the generation prompt; pass pre-tokenized input_ids/loss_mask instead")
        head, rest = _encode(tokenizer, prefix), _encode(tokenizer, full[len(prefix):])
        ends = _end_of_turn_ids(tokenizer)
        last = max((i for i, t in enumerate(rest) if t in ends), default=len(rest) - 1)
        rest = rest[: last + 1]  # tokens after the end-of-turn (a trailing newline) are no target
    else:
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise DataError(f"{where}: the tokenizer has neither a chat template nor an EOS token")
        head = _encode(tokenizer, prompt, special=True)
        rest = [*_encode(tokenizer, response), int(tokenizer.eos_token_id)]
    return head + rest, [0] * len(head) + [1] * len(rest)


def _record_tokens(rec: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "input_ids" in rec or "loss_mask" in rec:
        ids, mask = rec.get("input_ids"), rec.get("loss_mask")
        if not isinstance(ids, list) or not isinstance(mask, list):
            raise DataError(f"{where}: 'input_ids' and 'loss_mask' must both be lists")
        if len(ids) != len(mask):
            raise DataError(f"{where}: input_ids has {len(ids)} tokens but loss_mask has {len(mask)}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise DataError(f"{where}: input_ids must be non-negative integers")
        if not all(m in (0, 1) for m in mask):
            raise DataError(f"{where}: loss_mask must hold 0/1 values")
        return list(ids), [int(m) for m in mask]
    if "prompt" in rec and "response" in rec:
        if not isinstance(rec["prompt"], str) or not isinstance(rec["response"], str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
        if tokenizer is None:
            raise DataError(f"{where}: prompt/response samples need a tokenizer (the model has none)")
        return _tokenize_chat(rec["prompt"], rec["response"], tokenizer, where)
    raise DataError(f"{where}: expected keys prompt/response or input_ids/loss_mask, got {sorted(rec)}")


def samples_from_records(
    records: Iterable[Any],
    tokenizer: Any,
    max_length: int = 512,
    limit: int | None = None,
    source: str = "<records>",
    vocab_size: int | None = None,
) -> Samples:
    """Tokenize records (dicts in either line format) into ``Samples``.

    Sequences longer than ``max_length`` are cut on the right. A sample left without any target
    token is a ``DataError`` naming ``source`` and the record number (1-based).
    """
    return _samples(((f"{source}:{i}", r) for i, r in enumerate(records, 1)), tokenizer, max_length, limit,
                    source, vocab_size)


def _samples(items: Iterable[tuple[str, Any]], tokenizer: Any, max_length: int, limit: int | None,
             source: str, vocab_size: int | None) -> Samples:
    if max_length < 2:
        raise DataError(f"{source}: max_length must be at least 2, got {max_length}")
    rows: list[tuple[list[int], list[int]]] = []
    for where, rec in items:
        if limit is not None and len(rows) >= limit:
            break
        ids, mask = _record_tokens(rec, tokenizer, where)
        ids, mask = ids[:max_length], mask[:max_length]
        if mask:
            mask[0] = 0
        if not any(mask):
            raise DataError(f"{where}: no target tokens (empty loss mask, or cut off by max_length={max_length})")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise DataError(f"{where}: token id {max(ids)} is outside the vocabulary of {vocab_size}")
        rows.append((ids, mask))
    if not rows:
        raise DataError(f"{source}: no samples")
    t = max(len(ids) for ids, _ in rows)
    input_ids = np.zeros((len(rows), t), np.int32)
    attention = np.zeros((len(rows), t), bool)
    loss = np.zeros((len(rows), t), bool)
    for n, (ids, mask) in enumerate(rows):
        input_ids[n, : len(ids)] = ids
        attention[n, : len(ids)] = True
        loss[n, : len(ids)] = np.asarray(mask, bool)
    # The hash covers the tokens themselves, so the same file under another tokenizer differs.
    h = hashlib.sha256()
    for a in (input_ids, attention, loss):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return Samples(input_ids, attention, loss, h.hexdigest())


def read_jsonl(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of each non-blank line; ``DataError`` names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    if not records:
        raise DataError(f"{path}: empty data file")
    return records


def load_samples(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 512,
    limit: int | None = None,
    vocab_size: int | None = None,
) -> Samples:
    """Read a JSONL file of samples (either line format) and tokenize it; see the module docstring."""
    items = ((f"{path}:{i}", rec) for i, rec in read_jsonl(path))
    return _samples(items, tokenizer, max_length, limit, str(path), vocab_size)
