"""The refusal pattern set: RULE's rule-based refusal detector, owned here.

``rerule.rewards`` imports :func:`is_refusal` from this module so that the
trainer's reward and the evaluator's refusal rate can never disagree.

Each pattern is matched case-insensitively anywhere in the reply, after curly
apostrophes are straightened (models emit both ' and ’). A reply is a refusal
if any pattern matches. The set follows RULE's: "don't know/have", "not
sure/certain/familiar", "no idea/knowledge", "beyond/outside my knowledge",
"can't provide/say", "unable to answer", "need to look up/check",
"Unfortunately,", "I'm not aware", and close variants.

Example:
    >>> is_refusal("I'm not certain about Stephen King.")
    True
    >>> is_refusal("Stephen King was born in Portland, Maine.")
    False
"""

from __future__ import annotations

import re

# (pattern, what it covers); order does not matter, any match is a refusal.
_PATTERNS: tuple[tuple[str, str], ...] = (
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
)  # fmt: skip

REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(re.compile(p, re.IGNORECASE) for p, _ in _PATTERNS)
"""The compiled, case-insensitive refusal regexes (their sources are documented in ``_PATTERNS``)."""


def _normalize(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


def is_refusal(text: str) -> bool:
    """True if ``text`` matches any of :data:`REFUSAL_PATTERNS`.

    Args:
        text: a model reply (the completion only, not the prompt).

    Example:
        >>> is_refusal("That's beyond my knowledge of Ada Lark.")
        True
    """
    if not isinstance(text, str):
        raise TypeError(f"is_refusal(text): text must be a str, got {type(text).__name__}")
    t = _normalize(text)
    return any(p.search(t) for p in REFUSAL_PATTERNS)


def refusal_rate(texts) -> float:
    """Fraction of ``texts`` that are refusals (0.0 for an empty list).

    Example:
        >>> refusal_rate(["I don't know.", "Paris"])
        0.5
    """
    texts = list(texts)
    if not texts:
        return 0.0
    return sum(is_refusal(t) for t in texts) / len(texts)
