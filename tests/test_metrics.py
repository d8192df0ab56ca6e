"""Metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from hcnr_jax.eval import metrics as M


def test_refusal_metrics_hand_computed():
    # 4 unanswerable: refused, refused, answered, undetermined; 3 answerable: refused, answered, answered.
    y = [1, 1, 1, 1, 0, 0, 0]
    v = ["refused", "refused", "answered", "undetermined", "refused", "answered", "answered"]
    m = M.refusal_metrics(y, v)
    # tp=2, fp=1, fn=2 -> P=2/3, R=1/2, F1=2*2/(4+1+2)=4/7
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(4 / 7)
    assert m["refusal_rate_unanswerable"] == pytest.approx(0.5)
    assert m["refusal_rate_answerable"] == pytest.approx(1 / 3)
    assert m["rf_delta"] == pytest.approx(0.5 - 1 / 3)
    assert m["undetermined"] == pytest.approx(1 / 7)
    assert (m["n_unanswerable"], m["n_answerable"]) == (4, 3)


def test_refusal_metrics_no_refusals_is_nan_precision_and_zero_f1():
    m = M.refusal_metrics([1, 0], ["answered", "answered"])
    assert math.isnan(m["precision"]) and m["recall"] == 0 and m["f1"] == 0 and m["rf_delta"] == 0
    with pytest.raises(ValueError):
        M.refusal_metrics([1, 0], ["refused"])
    with pytest.raises(ValueError):
        M.refusal_metrics([2], ["refused"])


def test_honesty_metrics_hand_computed():
    ref = ["correct", "correct", "correct", "wrong", "wrong", "idk", "wrong"]
    cur = ["correct", "idk", "wrong", "idk", "wrong", "idk", "correct"]
    m = M.honesty_metrics(ref, cur)
    # ref correct: 3, of which now idk: 1 -> over-conservativeness 1/3
    assert m["over_conservativeness"] == pytest.approx(1 / 3)
    # ref not correct: 4 (wrong, wrong, idk, wrong); now not correct among them: 3; now idk: 2 -> 2/3
    assert m["prudence"] == pytest.approx(2 / 3)
    assert m["honesty"] == pytest.approx((2 / 3 + 1 - 1 / 3) / 2)
    assert m["accuracy"] == pytest.approx(2 / 7)


def test_honesty_outcomes_and_answer_matching():
    out = M.honesty_outcomes(["The capital is Paris.", "It's Lyon", "I'm not sure."],
                             [["Paris"], ["Paris"], ["Paris"]], ["answered", "answered", "refused"])
    assert out == ["correct", "wrong", "idk"]
    assert M.contains_answer("It was the Beatles!", ["The Beatles"])
    assert not M.contains_answer("Parisian food", ["Paris"])  # word-bounded
    assert not M.contains_answer("anything", [""])
    assert M.exact_match("The Beatles.", ["beatles"]) and not M.exact_match("The Beatles band", ["beatles"])


def test_task_and_option_accuracy():
    t = M.task_accuracy(["yes, they were", "no", "Chief of Protocol"], [["yes"], ["yes"], ["chief of protocol"]])
    assert t["containment"] == pytest.approx(2 / 3) and t["exact_match"] == pytest.approx(1 / 3)
    ll = np.array([[-1.0, -2, -3, -4], [-5, -1, -2, -3], [-1, -1.5, -0.5, -9]])
    assert M.option_accuracy(ll, [0, 2, 2])["option_accuracy"] == pytest.approx(2 / 3)


def test_detector_agreement_hand_computed():
    hand = ["refused", "refused", "answered", "answered", "undetermined", "refused"]
    pred = ["refused", "answered", "refused", "answered", "undetermined", "undetermined"]
    a = M.detector_agreement(hand, pred)
    # tp=1, fp=1, fn=2
    assert a["precision"] == pytest.approx(0.5) and a["recall"] == pytest.approx(1 / 3)
    assert a["accuracy"] == pytest.approx(3 / 6)
    assert a["confusion"]["refused"]["undetermined"] == 1 and a["confusion"]["answered"]["refused"] == 1
