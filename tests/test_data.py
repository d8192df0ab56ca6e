"""JSONL samples -> token arrays: a real chat-template tokenizer (built offline), pre-tokenized
lines, truncation, and errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hcnr_jax.data.samples import load_samples, samples_from_records
from hcnr_jax.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["user", "assistant", "\n", "what", "is", "the", "capital", "of", "france", "paris", "i", "do", "not",
         "know", "a", "b", "c"]


def tiny_tokenizer(chat_template: str | None = CHATML):
    """A word-level tokenizer with ChatML special tokens (ids 0-3) and a newline token, small enough
    for the tiny models' vocabulary of 97."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Split(" ", behavior="removed"),
    ])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", bos_token="<|im_start|>")
    fast.chat_template = chat_template
    return fast


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def targets(samples, tok, n: int) -> list[str]:
    return tok.convert_ids_to_tokens(samples.input_ids[n][samples.loss_mask[n]].tolist())


def test_chat_template_masks_exactly_the_assistant_turn(tmp_path):
    tok = tiny_tokenizer()
    path = write(tmp_path / "d.jsonl", [{"prompt": "what is the capital of france", "response": "paris"},
                                       {"prompt": "what is a", "response": "i do not know"}])
    s = load_samples(path, tok, vocab_size=97)
    assert targets(s, tok, 0) == ["paris", "<|im_end|>"]
    assert targets(s, tok, 1) == ["i", "do", "not", "know", "<|im_end|>"]
    # Everything before is the prompt exactly as the model sees it at inference.
    n0 = int(s.attention_mask[0].sum())
    ids = s.input_ids[0, :n0].tolist()
    head = tok.apply_chat_template([{"role": "user", "content": "what is the capital of france"}],
                                   add_generation_prompt=True, tokenize=False)
    assert ids[: ids.index(tok.convert_tokens_to_ids("paris"))] == tok(head, add_special_tokens=False)["input_ids"]
    # The template's trailing newline after <|im_end|> is dropped, and the rows are right-padded.
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    assert not s.attention_mask[1, int(s.attention_mask[1].sum()):].any()
    assert s.input_ids.dtype == np.int32 and s.loss_mask.dtype == bool and s.input_ids.shape[0] == 2


def test_without_chat_template_response_and_eos_are_targets():
    tok = tiny_tokenizer(chat_template=None)
    s = samples_from_records([{"prompt": "what is a", "response": "b c"}], tok)
    assert tok.convert_ids_to_tokens(s.input_ids[0].tolist()) == ["what", "is", "a", "b", "c", "<|im_end|>"]
    assert targets(s, tok, 0) == ["b", "c", "<|im_end|>"]


def test_pretokenized_lines_padding_and_first_token():
    s = samples_from_records([{"input_ids": [5, 6, 7, 8], "loss_mask": [1, 0, 1, 1]},
                              {"input_ids": [9, 10], "loss_mask": [0, 1]}], tokenizer=None)
    np.testing.assert_array_equal(s.input_ids, [[5, 6, 7, 8], [9, 10, 0, 0]])
    np.testing.assert_array_equal(s.attention_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    # loss_mask[0] is forced to 0: the first token has nothing to be predicted from.
    np.testing.assert_array_equal(s.loss_mask, [[0, 0, 1, 1], [0, 1, 0, 0]])
    assert s.num_tokens == 6 and len(s) == 2


def test_truncation_limit_and_hash(tmp_path):
    tok = tiny_tokenizer()
    recs = [{"prompt": "what is a", "response": " ".join(["b"] * 30)}, {"prompt": "a", "response": "c"}]
    full = samples_from_records(recs, tok, max_length=512)
    cut = samples_from_records(recs, tok, max_length=12)
    assert full.input_ids.shape[1] > 12 and cut.input_ids.shape[1] == 12
    np.testing.assert_array_equal(cut.input_ids[0], full.input_ids[0, :12])
    np.testing.assert_array_equal(cut.loss_mask[0], full.loss_mask[0, :12])
    assert cut.sha256 != full.sha256
    assert len(samples_from_records(recs, tok, limit=1)) == 1
    with pytest.raises(DataError, match=r"<records>:1: no target tokens .*max_length=8"):
        samples_from_records(recs, tok, max_length=8)  # the prompt alone fills 8 tokens


@pytest.mark.parametrize("lines, match", [
    (['{"input_ids": [1, 2], "loss_mask": [0, 1]}', '{"input_ids": [1, 2'], r"d\.jsonl:2: invalid JSON"),
    ([{"input_ids": [1, 2]}, {"prompt": "a"}], r"d\.jsonl:1: .*both be lists"),
    ([{"input_ids": [1, 2], "loss_mask": [0, 1]}, {"prompt": "a"}], r"d\.jsonl:2: expected keys prompt/response"),
    ([{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}], r"d\.jsonl:1: input_ids has 3 tokens but loss_mask has 2"),
    (["", {"input_ids": [1, 200], "loss_mask": [0, 1]}], r"d\.jsonl:2: token id 200 is outside the vocabulary of 97"),
    ([{"input_ids": [1, -2], "loss_mask": [0, 1]}], r"d\.jsonl:1: input_ids must be non-negative"),
    ([{"input_ids": [1, 2], "loss_mask": [0, 2]}], r"d\.jsonl:1: loss_mask must hold 0/1"),
    ([{"input_ids": [1, 2], "loss_mask": [1, 0]}], r"d\.jsonl:1: no target tokens"),
    ([[1, 2]], r"d\.jsonl:1: expected a JSON object"),
    ([{"prompt": "a", "response": 3}], r"d\.jsonl:1: 'prompt' and 'response' must be strings"),
    (["", "  "], r"d\.jsonl: empty data file"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, match):
    path = write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=match):
        load_samples(path, tiny_tokenizer(), vocab_size=97)


def test_missing_file_and_missing_tokenizer(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_samples(tmp_path / "nope.jsonl", None)
    path = write(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: prompt/response samples need a tokenizer"):
        load_samples(path, None)
