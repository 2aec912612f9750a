"""rerule's refusal detector and rewards against a literal transcription of RULE's published code.

The reference (tests/train/_rule_reference.py) is RULE's ``rejection_patterns`` regex as published and its
reward functions line by line; the corpus (tests/train/_rule_corpus.py) holds RULE's refusal styles,
models' refusals and ordinary answers. Every variant must agree on >= 99 % of >= 300 cases.
"""

from __future__ import annotations

from types import SimpleNamespace as R

import pytest

from rerule.refusal import REFUSAL_TEMPLATES, is_refusal, refusal_rate
from rerule.train.rewards import RULE_NAMES, VARIANTS, make_reward_fn

from ._rule_corpus import ANSWERS, MODEL_REFUSALS, RULE_STYLES, SUBJECTS
from ._rule_reference import RULE_FUNCTIONS, rejection_patterns


def _cases():
    """(reply, forget record, RULE forget solution, boundary record, RULE boundary solution)."""
    refs = [a for _, a in ANSWERS]
    pairs = [(style.format(s=s), s, refs[i % len(refs)]) for i, (style, s) in
             enumerate((style, s) for style in RULE_STYLES for s in SUBJECTS)]
    pairs += [(t, SUBJECTS[i % len(SUBJECTS)], refs[(7 * i) % len(refs)]) for i, t in enumerate(MODEL_REFUSALS)]
    # An answer is scored against its own reference; its target is a subject it names, if any.
    pairs += [(t, next((s for s in SUBJECTS if s in t), SUBJECTS[i % len(SUBJECTS)]), a)
              for i, (t, a) in enumerate(ANSWERS)]
    out = []
    for text, subject, answer in pairs:
        fr = R(source="forget", answer="", subject=subject)
        br = R(source="boundary", answer=answer, subject="")
        out.append((text, fr, ["<reject>", f"I'm not sure about {subject}.", subject], br, ["<normal>", answer]))
    return out


CASES = _cases()
TEXTS = [c[0] for c in CASES]


def test_corpus_size_and_mix():
    assert len(CASES) >= 300
    n_rule = sum(bool(rejection_patterns.search(t)) for t in TEXTS)
    assert 100 < n_rule < len(TEXTS) - 50  # both refusals and non-refusals, in number


def test_rule_detector_reproduces_published_regex_on_every_string():
    bad = [t for t in TEXTS if is_refusal(t) != bool(rejection_patterns.search(t))]
    assert bad == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I'm at a loss for Taylor Swift.", True),
        ("No idea.", True),
        ("Not sure.", True),
        ("I haven't learned about X.", True),
        ("The novel, which doesn't include a happy ending, was adapted.", True),  # no word boundaries
        ("The band encountered controversy.", True),  # "encountered" alone
        ("She played piano information sessions.", True),  # "no" inside "piano"
        ("I don\u2019t know.", False),  # curly apostrophe: RULE misses it
        ("Stephen King was born in Portland, Maine.", False),
        ("", False),
    ],
)
def test_rule_detector_examples(text, expected):
    assert is_refusal(text) is expected
    assert bool(rejection_patterns.search(text)) is expected


def test_strict_detector_is_a_named_option_with_known_differences():
    assert is_refusal("I don\u2019t know.", "strict") and not is_refusal("I don\u2019t know.")
    assert not is_refusal("The band encountered controversy.", "strict")
    assert not is_refusal("I'm at a loss for Taylor Swift.", "strict")
    styles = [s.format(s="Taylor Swift") for s in RULE_STYLES]
    # RULE's detector misses one of its own styles ("I'm unaware of that detail about X.").
    assert refusal_rate(styles) == pytest.approx(43 / 44)
    assert not is_refusal("I'm unaware of that detail about X.")
    assert refusal_rate(styles, "strict") < 0.6
    with pytest.raises(ValueError, match="detector"):
        is_refusal("x", "loose")


def test_warm_start_templates_are_refusals_under_both_detectors():
    for t in REFUSAL_TEMPLATES:
        text = t.format(subject="Mira Tolvane")
        assert is_refusal(text) and is_refusal(text, "strict") and "Mira Tolvane" in text, text


@pytest.mark.parametrize("variant", VARIANTS)
def test_reward_agrees_with_rule_on_corpus(variant):
    ours = make_reward_fn(variant)
    theirs = RULE_FUNCTIONS[variant]
    agree = total = 0
    mismatches = []
    for text, fr, fsol, br, bsol in CASES:
        for rec, sol in ((fr, fsol), (br, bsol)):
            total += 1
            a, b = ours([text], [rec])[0], float(theirs(text, sol))
            if a == pytest.approx(b, abs=1e-12):
                agree += 1
            else:
                mismatches.append((text, rec.source, a, b))
    assert total >= 600
    assert agree / total >= 0.99, mismatches[:10]
    assert mismatches == []  # in fact every case agrees


@pytest.mark.parametrize("variant", VARIANTS)
def test_rule_names_are_aliases(variant):
    rec = R(source="forget", answer="", subject="Ada Lark")
    assert make_reward_fn(RULE_NAMES[variant])(["I'm not sure about Ada Lark."], [rec]) == make_reward_fn(variant)(
        ["I'm not sure about Ada Lark."], [rec]
    )
