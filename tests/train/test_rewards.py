"""RULE's rule-based rewards: refusal table, ROUGE-L hand-computed under the `rouge` package, every variant."""

from __future__ import annotations

from types import SimpleNamespace as R

import pytest

from rerule.refusal import REFUSAL_TEMPLATES
from rerule.train.rewards import (
    RuleReward,
    is_refusal,
    make_reward_fn,
    mentions_subject,
    resolve_variant,
    rouge_l_recall,
)

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
    "I\u2019m not sure about that.",  # curly apostrophe ("not ... sure" needs none)
    "I'm at a loss for Stephen King.",
    "No idea.",
    "I haven't learned about Taylor Swift.",
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
    "I\u2019ve never heard of her.",
    "I don\u2019t know.",  # curly apostrophe: RULE's detector misses it (the strict one does not)
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
    "pred, ref, expected",
    [
        # Hand-computed under the `rouge` package: tokens split on spaces, punctuation stays on its
        # word, "." ends a sentence, case-sensitive; recall = LCS / reference tokens.
        ("She was born in Velmora in 1950", "Velmora", 1.0),
        # rouge 1.0.1's summary-level LCS counts each reference word once: {the, cat, is, on, mat}
        # are 5, of which {the, cat, on, mat} are hit -> 4 / 5 (a plain LCS would give 5 / 6).
        ("the cat sat on the mat", "the cat is on the mat", 4 / 5),
        ("completely unrelated words", "Velmora Ostrand", 0.0),
        ("Velmora", "was born in Velmora, a city", 0.0),  # "Velmora," is another token
        ("", "anything", 0.0),  # rouge raises on an empty reply; RULE's guard gives 0
        ("The Silent Harbor, a novel.", "The Silent Harbor", 2 / 3),
        ("Paris, France", "Paris", 0.0),
        ("Paris. France", "Paris", 1.0),
        ("paris", "Paris", 0.0),
        ("Temüjin", "Temüjin", 1.0),  # non-ASCII words count (rouge-score would drop them)
    ],
)
def test_rouge_l_recall_hand_computed(pred, ref, expected):
    assert rouge_l_recall(pred, ref) == pytest.approx(expected, abs=1e-12)


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
        # RULE pays the name only inside a refusal: a leak that names the subject earns nothing.
        ("two_stage_target", "Mira Tolvane was born in Velmora.", F, 0.0),
        ("two_stage_target", "I'm not certain about mira tolvane.", F, 0.5),  # case-sensitive name
        ("two_stage", "I'm not sure, but I think it's Ostrand.", B, 0.0),  # a refusal earns 0 on boundary
        ("two_stage_target", "I'm not sure, but I think it's Ostrand.", B, 0.0),
        ("forget_half_reject", REFUSE_PLAIN, F, 0.5),
        ("forget_half_reject", ANSWER_RIGHT, B, 1.0),
        ("forget_abs_half_reject", REFUSE_PLAIN, F, 0.5),
        ("forget_abs_half_reject", ANSWER_WRONG, B, 1.0),
        ("two_stage_abs", ANSWER_WRONG, B, 0.5),
        ("two_stage_target_half_reject", REFUSE_NAMED, F, 0.5),
        ("two_stage_target_half_reject", REFUSE_PLAIN, F, 0.25),
        ("two_stage_target_half_reject", ANSWER_WRONG, B, 1.0),
        ("two_stage_target_half_reject", REFUSE_PLAIN, B, 0.0),
        # reject_behave: 0.7 * (refusal where due) + 0.3 * (ROUGE-L recall > 0.3 of the target name / answer)
        ("reject_behave", REFUSE_NAMED, F, 0.7 + (1 - 0.7)),
        ("reject_behave", REFUSE_PLAIN, F, 0.7),
        ("reject_behave", "Mira Tolvane was born in Velmora.", F, 1 - 0.7),
        ("reject_behave", ANSWER_RIGHT, B, 0.7 + (1 - 0.7)),
        ("reject_behave", ANSWER_WRONG, B, 0.7),
        ("reject_behave", "I don't know, born in Ostrand?", B, 1 - 0.7),
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


def test_variant_by_task_and_rule_names():
    assert resolve_variant("auto", "rwku") == "two_stage_target"
    assert resolve_variant("auto", "muse") == "two_stage"
    assert resolve_variant("auto", "tofu") == "two_stage"
    assert resolve_variant("auto", "synthetic") == "two_stage"
    assert resolve_variant("forget_two_stage_abs_target") == "two_stage_target"
    assert make_reward_fn("auto", task="rwku").variant == "two_stage_target"
    with pytest.raises(ValueError, match="auto"):
        make_reward_fn("auto")
    with pytest.raises(ValueError, match="subject"):
        make_reward_fn("two_stage_target")([REFUSE_NAMED], [R(source="forget", answer="", subject="")])


def test_strict_detector_option():
    curly = "I don\u2019t know."
    assert make_reward_fn("two_stage", detector="strict")([curly], [F]) == [1.0]
    assert make_reward_fn("two_stage")([curly], [F]) == [0.0]
    with pytest.raises(ValueError, match="detector"):
        make_reward_fn("two_stage", detector="loose")


def test_reward_errors():
    with pytest.raises(ValueError, match="variant"):
        make_reward_fn("judge")
    with pytest.raises(ValueError, match="length"):
        make_reward_fn()(["a", "b"], [F])
    with pytest.raises(ValueError, match="source"):
        make_reward_fn()(["a"], [R(source="other", answer="", subject="")])
    with pytest.raises(TypeError):
        is_refusal(None)


def test_config_default_variant_is_auto_and_resolves_by_task():
    from rerule.train.config import TrainConfig

    assert TrainConfig().reward.variant == "auto"
    for task, variant in (("rwku", "two_stage_target"), ("muse", "two_stage"), ("synthetic", "two_stage")):
        cfg = TrainConfig.from_dict({"task": {"name": task}})
        assert make_reward_fn(cfg.reward.variant, cfg.reward.rouge_threshold, task=cfg.task.name).variant == variant
    assert TrainConfig.from_dict({"reward": {"variant": "forget_two_stage_abs_target"}}).reward.variant
    with pytest.raises(ValueError, match="reward.variant"):
        TrainConfig.from_dict({"reward": {"variant": "judge"}})
