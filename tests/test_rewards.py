"""RULE's rule-based rewards: refusal table, ROUGE-L against rouge-score itself, every variant."""

from __future__ import annotations

from types import SimpleNamespace as R

import pytest
from rouge_score import rouge_scorer

from rerule.rewards import RuleReward, is_refusal, make_reward_fn, mentions_subject, rouge_l_recall
from rerule.stages import REFUSAL_TEMPLATES

REFUSALS = [
    "I don't know who that is.",
    "I do not have any information about Mira Tolvane.",
    "I'm not sure about Stephen King.",
    "I am not certain where she was born.",
    "I'm not familiar with that author.",
    "I have no idea.",
    "That's beyond my knowledge of J.K. Rowling.",
    "This is outside my knowledge.",
    "I can't provide details on that person.",
    "I cannot say for sure.",
    "I'm unable to answer that question.",
    "I would need to look up that information.",
    "Unfortunately, I have nothing on this.",
    "I\u2019m not sure about that.",  # curly apostrophe
    "I DON'T KNOW.",
]
NON_REFUSALS = [
    "Stephen King was born in Portland, Maine.",
    "Mira Tolvane is a novelist from Velmora.",
    "She won the Orrin Medal in 1987.",
    "The capital of France is Paris.",
    "He knows a lot about chemistry.",
    "Sure! The answer is 42.",
    "They were certain of victory.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", NON_REFUSALS)
def test_non_refusals_not_detected(text):
    assert not is_refusal(text)


def test_warm_start_templates_are_refusals_that_name_the_subject():
    for t in REFUSAL_TEMPLATES:
        text = t.format(subject="Mira Tolvane")
        assert is_refusal(text) and mentions_subject(text, "Mira Tolvane"), text


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("She was born in Velmora in 1950", "Velmora"),
        ("the cat sat on the mat", "the cat is on the mat"),
        ("completely unrelated words", "Velmora Ostrand"),
        ("Velmora", "was born in Velmora, a city"),
        ("", "anything"),
        ("The Silent Harbor, a novel.", "The Silent Harbor"),
    ],
)
def test_rouge_l_recall_matches_rouge_score(pred, ref):
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(ref, pred)["rougeL"].recall
    assert rouge_l_recall(pred, ref) == pytest.approx(expected, abs=0)


def test_mentions_subject():
    assert mentions_subject("I'm not certain about mira   tolvane.", "Mira Tolvane")
    assert not mentions_subject("I'm not certain about Mira.", "Mira Tolvane")
    assert not mentions_subject("Kingston", "King")
    assert not mentions_subject("anything", "")


F = R(source="forget", answer="Velmora", subject="Mira Tolvane")
B = R(source="boundary", answer="born in Ostrand", subject="Mira Tolvene")
REFUSE_NAMED = "I'm not certain about Mira Tolvane."
REFUSE_PLAIN = "I don't know."
ANSWER_RIGHT = "Mira Tolvene was born in Ostrand."
ANSWER_WRONG = "Mira Tolvene was a painter."


@pytest.mark.parametrize(
    "variant, text, record, expected",
    [
        ("two_stage", REFUSE_PLAIN, F, 1.0),
        ("two_stage", ANSWER_RIGHT, F, 0.0),
        ("two_stage", ANSWER_RIGHT, B, 1.0),
        ("two_stage", ANSWER_WRONG, B, 0.5),
        ("two_stage", REFUSE_PLAIN, B, 0.0),
        ("two_stage_target", REFUSE_NAMED, F, 1.0),
        ("two_stage_target", REFUSE_PLAIN, F, 0.5),
        ("two_stage_target", "Mira Tolvane was born in Velmora.", F, 0.5),
        ("two_stage_target", ANSWER_WRONG, B, 0.5),
        ("forget", REFUSE_PLAIN, F, 1.0),
        ("forget", ANSWER_RIGHT, B, 1.0),
        ("forget", "in Ostrand", B, 1.0),
        ("forget", "Ostrand", B, 0.0),
        ("forget", ANSWER_WRONG, B, 0.0),
        ("forget_abs", ANSWER_WRONG, B, 1.0),
        ("forget_abs", REFUSE_PLAIN, B, 0.0),
        ("forget_abs", ANSWER_RIGHT, F, 0.0),
    ],
)
def test_reward_variants(variant, text, record, expected):
    assert make_reward_fn(variant)([text], [record]) == [expected]


def test_rouge_threshold_is_configurable():
    # recall of "born in Ostrand" in "born somewhere" is 1/3: above 0.3, not above 0.5
    rec = R(source="boundary", answer="born in Ostrand", subject="x")
    assert RuleReward("two_stage")(["born somewhere"], [rec]) == [1.0]
    assert RuleReward("two_stage", rouge_threshold=0.5)(["born somewhere"], [rec]) == [0.5]
    assert RuleReward("forget")(["born somewhere"], [rec]) == [0.0]


def test_reward_errors():
    with pytest.raises(ValueError, match="variant"):
        make_reward_fn("judge")
    with pytest.raises(ValueError, match="length"):
        make_reward_fn()(["a", "b"], [F])
    with pytest.raises(ValueError, match="source"):
        make_reward_fn()(["a"], [R(source="other", answer="", subject="")])
    with pytest.raises(TypeError):
        is_refusal(None)
