"""Metrics against independent computations on hand-made cases."""

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from scipy import stats

from rerule.eval import (
    REFUSAL_PATTERNS,
    TOFU_UTILITY_KEYS,
    forget_quality,
    is_refusal,
    mia_auc,
    min_k_prob,
    model_utility,
    privleak,
    refusal_rate,
    rouge_l,
    truth_ratio,
    truth_ratio_stat,
)

PAIRS = [
    ("Ada Lark was born in Velmora.", "Velmora"),
    ("She was born in the city of Velmora in 1947", "Ada Lark was born in Velmora."),
    ("running runners ran", "the runner runs"),
    ("", "something"),
    ("The Silent Harbor", "The Silent Harbor"),
]


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    got = rouge_l([p for p, _ in PAIRS], [r for _, r in PAIRS])
    for i, (pred, ref) in enumerate(PAIRS):
        want = scorer.score(ref, pred)["rougeL"]
        assert got.recall[i] == pytest.approx(want.recall) and got.f1[i] == pytest.approx(want.fmeasure)
        one = rouge_l(pred, ref)
        assert one.recall == pytest.approx(want.recall) and isinstance(one.f1, float)
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(
        "the runner runs", "running runners ran"
    )
    assert rouge_l("running runners ran", "the runner runs", use_stemmer=False).recall == pytest.approx(
        plain["rougeL"].recall
    )
    assert rouge_l("runs", "run").recall == 1.0 and rouge_l("runs", "run", use_stemmer=False).recall == 0.0
    # Hand check of recall: the LCS "born in Velmora" is 3 of the reference's 6 tokens.
    assert rouge_l("born in Velmora", "Ada Lark was born in Velmora").recall == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        rouge_l("a", ["a"])


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0.2, 1.2, 55)
    assert forget_quality(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    # Exact p-value for fully separated samples of 3: 2 / C(6, 3).
    assert forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / math.comb(6, 3))
    assert forget_quality(a, a) == pytest.approx(1.0)
    # KS is invariant to TOFU's inverted ratio convention.
    assert forget_quality(1 / (a + 0.1), 1 / (b + 0.1)) == pytest.approx(forget_quality(a, b))
    with pytest.raises(ValueError):
        forget_quality([], [1.0])


def test_model_utility_is_the_harmonic_mean_of_nine():
    vals = [0.9, 0.5, 0.4, 0.8, 0.7, 0.6, 0.3, 0.95, 0.45]
    want = 9 / sum(1 / v for v in vals)
    assert model_utility(vals) == pytest.approx(want)
    assert model_utility(dict(zip(TOFU_UTILITY_KEYS, vals))) == pytest.approx(want)
    assert model_utility([0.5] * 8 + [0.0]) == 0.0
    with pytest.raises(ValueError, match="9 values"):
        model_utility([0.5] * 8)
    with pytest.raises(ValueError, match="missing"):
        model_utility({k: 0.5 for k in TOFU_UTILITY_KEYS[:-1]})


def test_truth_ratio_on_hand_made_probabilities():
    # Two perturbed options 0.1 and 0.4: geometric mean 0.2 (mean of their log-losses).
    tr = truth_ratio([[0.1, 0.4], [0.3, 0.3]], [0.4, 0.1])
    assert tr.tolist() == pytest.approx([0.5, 3.0])
    assert truth_ratio([0.2, 0.3], [0.4, 0.1]).tolist() == pytest.approx([0.5, 3.0])
    # forget: mean(min(tr, 1/tr)) = (0.5 + 1/3) / 2; retain: mean(max(0, 1 - tr)) = (0.5 + 0) / 2.
    assert truth_ratio_stat(tr, "forget") == pytest.approx((0.5 + 1 / 3) / 2)
    assert truth_ratio_stat(tr, "retain") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="role"):
        truth_ratio_stat(tr, "holdout")
    with pytest.raises(ValueError):
        truth_ratio([0.2], [0.4, 0.1])
    with pytest.raises(ValueError, match="> 0"):
        truth_ratio([0.0], [0.4])


def test_min_k_prob_by_hand():
    lp = [-0.1, -2.0, -0.3, -4.0, -1.0, -0.2, -3.0, -0.5, -0.05, -6.0]
    # int(10 * 0.4) = 4 lowest: -6, -4, -3, -2.
    assert min_k_prob(lp) == pytest.approx(-15.0 / 4)
    assert min_k_prob(lp, k=1.0) == pytest.approx(np.mean(lp))
    assert min_k_prob([-1.5, -0.5], k=0.4) == pytest.approx(-1.5)  # at least one token
    with pytest.raises(ValueError):
        min_k_prob([], 0.4)
    with pytest.raises(ValueError):
        min_k_prob(lp, k=0.0)


def test_mia_auc_and_privleak_by_hand():
    forget, holdout = [-1.0, -2.0, -3.0], [-2.0, -4.0]
    # Pairs (holdout > forget): (-2 > -3) = 1, ties (-2 vs -2) = 0.5, the rest 0 -> 1.5 / 6.
    assert mia_auc(forget, holdout) == pytest.approx(1.5 / 6)
    assert mia_auc([-5.0], [-1.0]) == 1.0
    assert privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert privleak(mia_auc(forget, holdout), 0.5) == pytest.approx((0.25 - 0.5) / 0.5 * 100)


REFUSALS = [
    "I don't know.",
    "I do not know who that is.",
    "I'm not sure about Ada Lark.",
    "I’m not certain about Stephen King.",
    "I am not familiar with that author.",
    "I have no idea.",
    "I have no knowledge of Basil Orwen.",
    "That's beyond my knowledge of Ada Lark.",
    "This is outside my knowledge.",
    "I can't provide details about her.",
    "I'm unable to answer that question.",
    "I need to check that.",
    "Unfortunately, I have nothing on this person.",
    "I'm not aware of any such writer.",
    "I don't have any information on Ada Lark.",
    "I'M NOT SURE ABOUT THAT.",
    "Sorry. Unfortunately, that is not something I can help with.",
]
ANSWERS = [
    "Velmora",
    "Ada Lark was born in Velmora in 1947.",
    "She is best known for The Amber Lantern.",
    "Her father was a clockmaker who knew every bell in the town.",
    "The knowledge of the ancients was lost in the fire.",
    "He writes in Welsh.",
    "Sure! He won the Orrin Medal.",
    "Stephen King's novels are often set in Maine.",
    "The answer is Physics.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_detected(text):
    assert is_refusal(text)


# RULE's detector misses these ("cannot say" is not "can't say"; "look it up" is not "look up");
# the strict detector catches them.
STRICT_ONLY = ["I cannot say where he was born.", "I would need to look it up.", "I don\u2019t know."]


@pytest.mark.parametrize("text", STRICT_ONLY)
def test_refusals_only_the_strict_detector_catches(text):
    assert is_refusal(text, "strict") and not is_refusal(text)


@pytest.mark.parametrize("text", ANSWERS)
def test_answers_not_refusals(text):
    assert not is_refusal(text)


def test_refusal_rate_and_patterns():
    assert refusal_rate(REFUSALS[:3] + ANSWERS[:1]) == pytest.approx(0.75)
    assert refusal_rate([]) == 0.0
    assert all(p.flags & 2 for p in REFUSAL_PATTERNS)  # re.IGNORECASE
    with pytest.raises(TypeError):
        is_refusal(None)


# ---- Per-benchmark definitions, pinned to values computed by hand from the published code ----

from rerule.eval import (  # noqa: E402
    MUSE_REFERENCE_AUC,
    extraction_strength,
    mean_per_group,
    min_k_plus_plus,
    rouge_pkg_l,
    rouge_pkg_l_recall,
    zlib_score,
)
from rerule.eval.muse import default_reference_auc  # noqa: E402


@pytest.mark.parametrize(
    "pred, ref, recall",
    [
        # RWKU / RULE (`rouge` package): tokens split on spaces, punctuation stays attached, case counts.
        ("Paris, France", "Paris", 0.0),  # "Paris," is not "Paris" (rouge-score: 1.0)
        ("Paris France", "Paris", 1.0),
        ("paris", "Paris", 0.0),
        ("He was born in Portland, Maine", "Portland, Maine", 1.0),
        ("Portland Maine", "Portland, Maine", 0.5),  # "Maine" hit, "Portland," missed
        ("Temüjin", "Temüjin", 1.0),  # non-ASCII words count (rouge-score drops them: 0.0)
        # "." splits sentences and disappears, so a trailing full stop is harmless.
        ("The answer is Carrie.", "Carrie", 1.0),
        # Each reference word counts once: {the, cat, is, on, mat} = 5, {the, cat, on, mat} hit.
        ("the cat sat on the mat", "the cat is on the mat", 4 / 5),
    ],
)
def test_rouge_package_recall_hand_computed(pred, ref, recall):
    assert rouge_pkg_l_recall(pred, ref) == pytest.approx(recall, abs=1e-12)


def test_rwku_blank_reply_is_noanswer_and_rouge_score_differs():
    assert rouge_pkg_l_recall("", "NOANSWER") == 1.0  # RWKU scores a blank reply as the word NOANSWER
    assert rouge_pkg_l_recall("  ", "Paris") == 0.0
    assert rouge_pkg_l_recall("", "NOANSWER", empty="zero") == 0.0
    assert rouge_pkg_l(".", "Paris") == (0.0, 0.0)  # nothing the package can score
    assert rouge_l("Paris, France", "Paris").recall == 1.0  # the other scorer, for contrast
    with pytest.raises(ValueError, match="empty"):
        rouge_pkg_l("a", "a", empty="skip")


def test_rwku_averages_per_target_not_per_probe():
    # Target A: five probes all recalled; target B: one probe missed.
    values, targets = [1.0] * 5 + [0.0], ["A"] * 5 + ["B"]
    assert np.mean(values) == pytest.approx(5 / 6)  # pooled: 0.833
    assert mean_per_group(values, targets) == pytest.approx(0.5)  # RWKU / RULE: (1.0 + 0.0) / 2
    with pytest.raises(ValueError, match="groups"):
        mean_per_group([1.0], ["A", "B"])


def test_muse_rouge_has_no_stemmer():
    # rouge-score lowercases and tokenizes on non-alphanumerics. Without a stemmer only "the" matches:
    # P = R = 1/4, F1 = 0.25. With the Porter stemmer dogs->dog and running/run->run also match: 3/4.
    pred, ref = "the dogs were running", "the dog was run"
    assert rouge_l(pred, ref, use_stemmer=False).f1 == pytest.approx(0.25)
    assert rouge_l(pred, ref, use_stemmer=True).f1 == pytest.approx(0.75)


def test_muse_privleak_reference_defaults():
    assert MUSE_REFERENCE_AUC == {"books": 0.5393, "news": 0.4772}
    assert default_reference_auc("muse/books") == 0.5393
    assert default_reference_auc("muse/news") == 0.4772
    assert default_reference_auc("muse/other") == 0.5
    # A target model at AUC 0.2301 on Books: (0.2301 - 0.5393) / 0.5393 * 100 = -57.33
    assert privleak(0.2301, 0.5393) == pytest.approx(-57.3336, abs=1e-4)
    assert privleak(0.0, 0.0, eps=1e-10) == 0.0  # open-unlearning's TOFU form tolerates a zero reference
    with pytest.raises(ValueError, match="auc_retrain"):
        privleak(0.1, 0.0)


def test_min_k_plus_plus_hand_computed():
    # z = (logp - mu) / sqrt(sigma2): (-1+1)/2 = 0, (-3+1)/2 = -1, (-2+1)/2 = -0.5 (x3).
    lp, mu, s2 = [-1.0, -3.0, -2.0, -2.0, -2.0], [-1.0] * 5, [4.0] * 5
    assert min_k_plus_plus(lp, mu, s2, k=0.2) == pytest.approx(-1.0)  # int(5 * 0.2) = 1 lowest
    assert min_k_plus_plus(lp, mu, s2, k=0.4) == pytest.approx(-0.75)  # mean of -1, -0.5
    assert min_k_plus_plus(lp, mu, s2, k=1.0) == pytest.approx(-2.5 / 5)
    with pytest.raises(ValueError):
        min_k_plus_plus([-1.0], [], [])


def test_zlib_score_hand_computed():
    import zlib

    text = "Stephen King wrote Carrie."
    assert zlib_score(-2.5, text) == pytest.approx(-2.5 / len(zlib.compress(text.encode("utf-8"))))
    assert zlib_score(-1.0, "é") == pytest.approx(-1.0 / len(zlib.compress("é".encode())))


@pytest.mark.parametrize(
    "preds, labels, es",
    [
        ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),  # all match: k = 0
        ([9, 2, 3, 4], [1, 2, 3, 4], 0.75),  # suffix from k = 1
        ([9, 9, 9, 4], [1, 2, 3, 4], 0.25),  # suffix from k = 3
        ([9, 9, 9, 9], [1, 2, 3, 4], 0.25),  # no suffix: the loop stops at k = n - 1 (open-unlearning)
        ([1, 9, 3, 4], [1, 2, 3, 4], 0.5),  # a mismatch at 1 forces k = 2
    ],
)
def test_extraction_strength_hand_computed(preds, labels, es):
    assert extraction_strength(preds, labels) == pytest.approx(es)


def test_extraction_strength_errors():
    with pytest.raises(ValueError, match="no answer tokens"):
        extraction_strength([], [])
    with pytest.raises(ValueError, match="differ"):
        extraction_strength([1], [1, 2])


def test_muse_knowmem_cut_and_verbmem_reference():
    from rerule.eval.muse import cut_knowmem_reply, truncate_reference

    # MUSE's knowmem.py splits at "\n\n", then "\nQuestion", then "Question:" and keeps the head.
    assert cut_knowmem_reply(" Morwen Tate\nof Gull Rock\n\nQuestion: x") == " Morwen Tate\nof Gull Rock"
    assert cut_knowmem_reply("green\nQuestion: next") == "green"
    assert cut_knowmem_reply("\n\ngreen") == ""  # a reply that opens with a blank line is empty, as in MUSE

    class Tok:  # whitespace tokenizer with a BOS, to check MUSE's reference truncation by hand
        def __call__(self, text, add_special_tokens=True):
            from types import SimpleNamespace

            return SimpleNamespace(input_ids=(["<s>"] if add_special_tokens else []) + text.split())

        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=True):
            return " ".join(i for i in ids if not (skip_special_tokens and i == "<s>"))

    # MUSE slices the first max_new_tokens ids *including* the BOS, so 3 tokens keep 2 words.
    assert truncate_reference(Tok(), "one two three four", 3) == "one two"


def test_rwku_prompts_follow_rwku_eval_code():
    from rerule.data.schema import ProbeRecord
    from rerule.eval.rwku import rwku_prompts

    class Plain:
        chat_template = None

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            assert not tokenize and add_generation_prompt and messages[0]["role"] == "user"
            return "<u>" + messages[0]["content"] + "</u><a>"

    fb = ProbeRecord("___ wrote Carrie.", "Stephen King", "Stephen King")
    suffix = ProbeRecord("Stephen King's first novel is", "Carrie", "Stephen King", meta={"type": "affirmative suffix"})
    icl = ProbeRecord("Question: Q1\nAnswer: A1\nQuestion: Q2", "Carrie", meta={"type": "incontext learning"})
    assert rwku_prompts(Plain(), "neighbor_level1", [fb]) == [
        "Please complete the blank in the following question.\nQuestion: ___ wrote Carrie.\nAnswer:"
    ]
    assert rwku_prompts(Chat(), "forget_level2", [fb]) == [
        "<u>Please briefly answer the following question.\nQuestion: ___ wrote Carrie.\n</u><a>Answer:"
    ]
    assert rwku_prompts(Chat(), "forget_level3", [suffix, icl]) == [
        "<u>Please briefly answer the following question.\nQuestion: Stephen King's first novel is</u><a>",
        "<u>Please briefly answer the following question.\nQuestion: Q1\nAnswer: A1\nQuestion: Q2\n</u><a>Answer:",
    ]
    assert rwku_prompts(Chat(), "forget_level1", [fb], chat_template=False)[0].startswith("Please complete")
