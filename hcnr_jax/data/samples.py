"""Samples for the statistics: JSONL files -> right-padded token arrays with a loss mask.

Two line formats (docs/method.md, "What goes in"):

- ``{"prompt": ..., "response": ...}``: rendered with the tokenizer's chat template. The prompt is
  the user turn plus the generation prompt (exactly what the model sees at inference), the
  targets are the assistant turn's tokens up to and including its end-of-turn token. Without a
  chat template: ``prompt`` tokens (with the tokenizer's special tokens), then ``response``
  tokens and the EOS token as targets.
- ``{"input_ids": [...], "loss_mask": [...]}``: pre-tokenized; ``loss_mask[t] = 1`` marks
  ``input_ids[t]`` as a target predicted from the tokens before it.

``loss_mask[:, 0]`` is always 0: the first token has nothing to be predicted from.

Preference pairs (DPO / ORPO) are ``{"prompt", "chosen", "rejected"}`` lines, each answer tokenized
like a ``{"prompt", "response"}`` line (``load_pairs`` -> ``PairSamples``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hcnr_jax.data.jsonl import read_jsonl
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

    def padded_to(self, length: int) -> Samples:
        """The same samples right-padded to ``length`` >= T tokens (padding is neither attended nor
        a target, so every statistic is unchanged); the same hash, since the content is."""
        extra = length - self.input_ids.shape[1]
        if extra < 0:
            raise ValueError(f"padded_to({length}): the samples are already {self.input_ids.shape[1]} tokens long")
        if extra == 0:
            return self
        pad = ((0, 0), (0, extra))
        return Samples(np.pad(self.input_ids, pad), np.pad(self.attention_mask, pad), np.pad(self.loss_mask, pad),
                       self.sha256)

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


def _pretokenized(rec: Mapping[str, Any], where: str) -> tuple[list[int], list[int]]:
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


def check_record(rec: Any, where: str, vocab_size: int | None = None, pairs: bool = False) -> None:
    """One data line checked without a tokenizer (before any model is loaded): an object in one of
    the line formats (``pairs``: a preference pair) whose values have the right types; pre-tokenized
    lines also need a target token and ids inside ``vocab_size``. Errors name ``where``."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if pairs:
        _pair_fields(rec, where)
    elif "input_ids" in rec or "loss_mask" in rec:
        ids, mask = _pretokenized(rec, where)
        if not any(mask[1:]):  # the first token is never a target
            raise DataError(f"{where}: no target tokens (empty loss mask)")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise DataError(f"{where}: token id {max(ids)} is outside the vocabulary of {vocab_size}")
    elif "prompt" in rec and "response" in rec:
        if not isinstance(rec["prompt"], str) or not isinstance(rec["response"], str):
            raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    else:
        raise DataError(f"{where}: expected keys prompt/response or input_ids/loss_mask, got {sorted(rec)}")


def _record_tokens(rec: Any, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    check_record(rec, where)
    if "input_ids" in rec or "loss_mask" in rec:
        return _pretokenized(rec, where)
    if tokenizer is None:
        raise DataError(f"{where}: prompt/response samples need a tokenizer (the model has none)")
    return _tokenize_chat(rec["prompt"], rec["response"], tokenizer, where)


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
    arrays = _padded(rows, max(len(ids) for ids, _ in rows))
    return Samples(*arrays, _tokens_hash(arrays))


def _padded(rows: list[tuple[list[int], list[int]]], t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids [N, t] int32, attention_mask, loss_mask [N, t] bool) of right-padded rows."""
    input_ids = np.zeros((len(rows), t), np.int32)
    attention = np.zeros((len(rows), t), bool)
    loss = np.zeros((len(rows), t), bool)
    for n, (ids, mask) in enumerate(rows):
        input_ids[n, : len(ids)] = ids
        attention[n, : len(ids)] = True
        loss[n, : len(ids)] = np.asarray(mask, bool)
    return input_ids, attention, loss


def _tokens_hash(arrays: Iterable[np.ndarray], salt: bytes = b"") -> str:
    # The hash covers the tokens themselves, so the same file under another tokenizer differs.
    h = hashlib.sha256(salt)
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


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


# --- Preference pairs (DPO / ORPO) ------------------------------------------------------------

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PairSamples:
    """N preference pairs ``{"prompt", "chosen", "rejected"}``: the prompt followed by each answer,
    tokenized like a ``{"prompt", "response"}`` sample (chat template, targets = the assistant
    turn). Chosen and rejected rows are right-padded to one common length T."""

    chosen_input_ids: np.ndarray  # [N, T] int32, right-padded
    chosen_attention_mask: np.ndarray  # [N, T] bool
    chosen_loss_mask: np.ndarray  # [N, T] bool
    rejected_input_ids: np.ndarray  # [N, T] int32, right-padded
    rejected_attention_mask: np.ndarray  # [N, T] bool
    rejected_loss_mask: np.ndarray  # [N, T] bool
    sha256: str  # hash of the tokens (a cache key)

    def __len__(self) -> int:
        return int(self.chosen_input_ids.shape[0])

    def select(self, index: Any) -> PairSamples:
        """A subset (``index`` a slice or integer array); its hash names the subset."""
        idx = np.arange(len(self))[index]
        h = hashlib.sha256(f"{self.sha256}:{idx.tobytes().hex()}".encode()).hexdigest()
        return PairSamples(*(getattr(self, f"{side}_{k}")[idx] for side in ("chosen", "rejected")
                             for k in ("input_ids", "attention_mask", "loss_mask")), h)


def _pair_fields(rec: Mapping[str, Any], where: str) -> None:
    for key in PAIR_FIELDS:
        if key not in rec:
            raise DataError(f"{where}: missing field '{key}' (preference pairs need {list(PAIR_FIELDS)})")
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")


def _pair_tokens(rec: Any, tokenizer: Any, where: str, max_length: int,
                 vocab_size: int | None) -> tuple[tuple[list[int], list[int]], ...]:
    check_record(rec, where, pairs=True)
    if tokenizer is None:
        raise DataError(f"{where}: prompt/chosen/rejected pairs need a tokenizer (the model has none)")
    out = []
    for key in ("chosen", "rejected"):
        ids, mask = _tokenize_chat(rec["prompt"], rec[key], tokenizer, f"{where}: field '{key}'")
        ids, mask = ids[:max_length], mask[:max_length]
        if mask:
            mask[0] = 0
        if not any(mask):
            raise DataError(f"{where}: field '{key}': no target tokens (empty answer, or cut off by "
                            f"max_length={max_length})")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise DataError(f"{where}: field '{key}': token id {max(ids)} is outside the vocabulary of {vocab_size}")
        out.append((ids, mask))
    return tuple(out)


def _pairs(items: Iterable[tuple[str, Any]], tokenizer: Any, max_length: int, limit: int | None,
           source: str, vocab_size: int | None) -> PairSamples:
    if max_length < 2:
        raise DataError(f"{source}: max_length must be at least 2, got {max_length}")
    rows = []
    for where, rec in items:
        if limit is not None and len(rows) >= limit:
            break
        rows.append(_pair_tokens(rec, tokenizer, where, max_length, vocab_size))
    if not rows:
        raise DataError(f"{source}: no samples")
    t = max(len(ids) for pair in rows for ids, _ in pair)
    arrays = [a for side in range(2) for a in _padded([pair[side] for pair in rows], t)]
    return PairSamples(*arrays, _tokens_hash(arrays, b"preference-pairs"))


def pairs_from_records(
    records: Iterable[Any],
    tokenizer: Any,
    max_length: int = 512,
    limit: int | None = None,
    source: str = "<records>",
    vocab_size: int | None = None,
) -> PairSamples:
    """Tokenize ``{"prompt", "chosen", "rejected"}`` records into ``PairSamples``.

    Each answer is tokenized as ``_tokenize_chat(prompt, answer)`` and cut on the right at
    ``max_length``. A missing or non-string field, or an answer left without target tokens, is a
    ``DataError`` naming ``source``, the record number (1-based) and the field."""
    return _pairs(((f"{source}:{i}", r) for i, r in enumerate(records, 1)), tokenizer, max_length, limit,
                  source, vocab_size)


def load_pairs(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 512,
    limit: int | None = None,
    vocab_size: int | None = None,
) -> PairSamples:
    """Read a JSONL file of ``{"prompt", "chosen", "rejected"}`` lines into ``PairSamples``;
    errors name the file, the line and the field."""
    items = ((f"{path}:{i}", rec) for i, rec in read_jsonl(path))
    return _pairs(items, tokenizer, max_length, limit, str(path), vocab_size)
