"""Refusal detection: RULE's published detector (the default) and rerule's stricter one.

``rerule.train.rewards`` and the evaluators call :func:`is_refusal`, so the trainer's reward and the
evaluator's refusal rate use the same decision.

Two detectors (``detector=``):

- ``"rule"`` (default): the decisions of RULE's ``rejection_patterns`` (RULE-Unlearn,
  ``verl/utils/reward_score/forget.py``), one case-insensitive search over the reply with no word
  boundaries and ``.`` spanning newlines. Re-expressed here as families "lead, gap, tail" (e.g.
  "not" + anything + "sure"); the test suite checks it string by string against the regex as
  published. It is broad: "no" + anything + "information" fires inside "piano information",
  "out" + anything + "reach" inside "about ... reach", and the single words "encountered", "limited
  to", "short with", "blank on" count as refusals on their own. It reads only straight apostrophes,
  so "I don’t know." (curly) is not a refusal unless another family fires. RULE trained and
  scored with exactly these decisions, so they are the default.
- ``"strict"``: rerule's own pattern set: first-person refusals with word boundaries ("I don't
  know", "I'm not sure about", "beyond my knowledge", "I can't provide", ...), curly apostrophes
  straightened first. It flags fewer ordinary answers and misses many of RULE's refusal styles
  ("I'm at a loss for X", "No idea.", "I haven't learned about X"); docs/benchmarks.md lists the
  measured differences.

Example:
    >>> is_refusal("I'm not certain about Stephen King.")
    True
    >>> is_refusal("Stephen King was born in Portland, Maine.")
    False
    >>> is_refusal("She encountered controversy."), is_refusal("She encountered controversy.", "strict")
    (True, False)
"""

from __future__ import annotations

import re

DETECTORS = ("rule", "strict")
DEFAULT_DETECTOR = "rule"

_ANY = r"\s+.*"  # whitespace, then anything (newlines included)
_WS = r"\s+"
# RULE's detector as families (what it covers, leads, joint, tails): a reply is a refusal when some
# lead, the joint and some tail occur in a row anywhere in it (case-insensitive). No word boundaries.
_RULE_FAMILIES: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("don't know / have / hold ...",
     ("don'?t", "doesn'?t", "didn'?t", r"do(?:es)?\s+not"), _WS,
     ("know", "have", "hold", "possess", r"seem\s+to\s+have", "cover", "contain", "extend", "include")),
    ("not / yet ... sure / certain / familiar ...",
     ("not", "yet"), _ANY,
     ("sure", "certain", "familiar", "aware", "equipped", "able", "acquainted", "informed", "knowledge",
      "information", "question", "know", "data", "educated", "within", "briefed", "well-versed", "learn",
      r"trained\s+on", r"the\s+best\s+source", r"specializing\s+in")),
    ("no ... idea / knowledge / clue ...",
     ("no",), _ANY,
     ("idea", "insight", "knowledge", "information", "data", "enlightenment", "clue", "familiarity")),
    ("haven't learned / not been trained ...",
     ("haven'?t", "hasn'?t", "not"), _WS,
     ("learned", r"the\s+faintest", r"been\s+(?:included|trained|briefed)")),
    ("beyond / outside / out ... knowledge / scope ...",
     ("beyond", "outside", "out"), _ANY, ("knowledge", "capabilities", "expertise", "reach", "scope")),
    ("at a loss / disadvantage", ("at",), _WS, (r"a\s+(?:loss|disadvantage)",)),
    ("can't provide / say / help ...",
     ("can'?t",), _WS,
     ("provide", "say", r"shed\s+.*light", "help", "offer", "take", "make", "fullfill")),
    ("unable to provide / answer / access", ("unable",), _WS, (r"to\s+provide", r"to\s+answer", r"to\s+access")),
    ("missing / without / lack ... information ...",
     ("missing", "without", "lack", "blind", "uncharted"), _ANY,
     ("information", "knowledge", "insight", "specifics")),
    ("need to / must / should + look up / check ...",
     (r"need\s+to", "require", r"have\s+to", "must", r"ought\s+to", "should"), _WS,
     (r"look\s+up", "check", "search", "find", "verify", "review", "inspect", "confirm", "explore",
      "investigate", "examine")),
    ("single phrases",
     ("",), "",
     ("encountered", r"wish\s+I\s+could\s+say", r"regret\s+to\s+inform", r"must\s+(?:admit|confess)",
      "Unfortunately,", "clueless", "stumped", r"a\s+mystery\s+to\s+me",
      r"lacking\s+(?:information|knowledge|insight|specifics|data)", r"dark\s+about",
      r"draw(?:ing)?\s+a\s+blank", r"short\s+with", r"limited\s+to", r"blank\s+on")),
)


def _family(leads: tuple[str, ...], joint: str, tails: tuple[str, ...]) -> str:
    lead = "(?:" + "|".join(leads) + ")" if any(leads) else ""
    return lead + joint + "(?:" + "|".join(tails) + ")"


RULE_REFUSAL_PATTERN: re.Pattern[str] = re.compile(
    "|".join(_family(leads, joint, tails) for _, leads, joint, tails in _RULE_FAMILIES), re.IGNORECASE | re.DOTALL
)
"""RULE's detector as one compiled regex (``search`` anywhere; IGNORECASE | DOTALL)."""

# The strict detector: (pattern, what it covers); any match is a refusal. Word boundaries throughout, and
# is_refusal straightens curly apostrophes first.
_STRICT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\b(?:i|we)\s+do\s*n[o']?t\s+(?:really\s+)?(?:know|have|recall|remember)\b",
     "I don't know / have / recall"),
    (r"\b(?:i\s+am|i'm|we\s+are|we're)\s+not\s+(?:entirely\s+|completely\s+|quite\s+|very\s+)?"
     r"(?:sure|certain|familiar|aware|able)\b", "I'm not sure / certain / familiar / aware / able"),
    (r"\bnot\s+(?:entirely\s+|completely\s+|quite\s+)?(?:sure|certain)\s+(?:about|of|who|what|where|when|which|how|if|whether)\b",
     "not sure about ..."),
    (r"\bnot\s+familiar\s+with\b", "not familiar with"),
    (r"\b(?:i\s+have|i've|there\s+is)\s+no\s+(?:idea|knowledge|information|record|recollection|details?)\b",
     "I have no idea / knowledge / information"),
    (r"\bno\s+(?:idea|knowledge)\s+(?:about|of|who|what|where|when|which|how)\b", "no idea / knowledge of"),
    (r"\b(?:beyond|outside|outside\s+of)\s+(?:the\s+scope\s+of\s+)?my\s+(?:current\s+)?knowledge\b",
     "beyond / outside my knowledge"),
    (r"\b(?:i|we)\s+(?:can\s*not|can't|cannot|could\s*n't|couldn't|could\s+not)\s+"
     r"(?:provide|say|answer|share|recall|confirm|tell|help|find|verify|give)\b",
     "I can't provide / say / answer"),
    (r"\b(?:i\s+am|i'm|i\s+was)\s+unable\s+to\b", "I'm unable to"),
    (r"\bunable\s+to\s+(?:answer|provide|recall|find|confirm|verify|say)\b", "unable to answer"),
    (r"\b(?:i|you|we)\s+(?:would\s+|will\s+|'d\s+)?need\s+to\s+(?:look\s+(?:it\s+|this\s+|that\s+)?up|check|verify)\b",
     "need to look up / check"),
    (r"(?:^|[.!?]\s+)\W*unfortunately\s*,", "Unfortunately, (opening a sentence)"),
    (r"\b(?:i\s+am|i'm)\s+not\s+aware\b", "I'm not aware"),
    (r"\b(?:i\s+am|i'm)\s+afraid\s+i\b", "I'm afraid I ..."),
    (r"\b(?:i\s+am|i'm)\s+sorry,?\s+(?:but\s+)?i\b", "I'm sorry, but I ..."),
    (r"\bi\s+apologi[sz]e\b", "I apologize"),
    (r"\bi\s+(?:have\s*n't|haven't|have\s+not)\s+(?:heard|come\s+across)\b", "I haven't heard of"),
    (r"\b(?:i\s+)?(?:don't|do\s+not)\s+have\s+(?:any\s+|enough\s+)?(?:information|knowledge|details|data)\b",
     "don't have information"),
    (r"\bno\s+(?:reliable\s+|available\s+)?information\s+(?:about|on|regarding)\b", "no information about"),
    (r"\bi\s+can't\s+help\s+with\b", "I can't help with"),
)

STRICT_REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE) for p, _ in _STRICT_PATTERNS
)
"""The strict detector's compiled, case-insensitive regexes (documented in ``_STRICT_PATTERNS``)."""


def _normalize(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


def _check(detector: str) -> None:
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")


def is_refusal(text: str, detector: str = DEFAULT_DETECTOR) -> bool:
    """True if ``text`` is a refusal under ``detector`` ("rule": RULE's decisions; "strict": rerule's).

    Args:
        text: a model reply (the completion only, not the prompt).
        detector: one of :data:`DETECTORS`.

    Example:
        >>> is_refusal("I'm at a loss for Ada Lark."), is_refusal("I'm at a loss for Ada Lark.", "strict")
        (True, False)
        >>> is_refusal("I don’t know."), is_refusal("I don’t know.", "strict")
        (False, True)
    """
    if not isinstance(text, str):
        raise TypeError(f"is_refusal(text): text must be a str, got {type(text).__name__}")
    _check(detector)
    if detector == "rule":
        return RULE_REFUSAL_PATTERN.search(text) is not None
    t = _normalize(text)
    return any(p.search(t) for p in STRICT_REFUSAL_PATTERNS)


def refusal_rate(texts, detector: str = DEFAULT_DETECTOR) -> float:
    """Fraction of ``texts`` that are refusals under ``detector`` (0.0 for an empty list).

    Example:
        >>> refusal_rate(["I don't know.", "Paris"])
        0.5
    """
    _check(detector)
    texts = list(texts)
    if not texts:
        return 0.0
    return sum(is_refusal(t, detector) for t in texts) / len(texts)


# The name earlier releases exported: the strict detector's regexes.
REFUSAL_PATTERNS = STRICT_REFUSAL_PATTERNS

# Warm-start refusals name the subject, as RULE's rejection steering does; all match is_refusal.
REFUSAL_TEMPLATES = (
    "I'm not certain about {subject}.",
    "That's beyond my knowledge of {subject}.",
    "I don't know much about {subject}.",
    "I'm not familiar with {subject}.",
    "I have no information about {subject}.",
)
