"""RULE's rule-based rewards: refusal detection, subject mention, ROUGE-L recall. No judge model.

Variants (REFERENCE.md, RULE):

====================  =================================  ==========================================
variant               forget prompt                      boundary (and retain) prompt
====================  =================================  ==========================================
``forget``            1 if refusal                       1 if ROUGE-L recall > 0.5
``forget_abs``        1 if refusal                       1 if not refusal
``two_stage``         1 if refusal                       0.5 if not refusal + 0.5 if ROUGE-L rec > 0.3
``two_stage_target``  0.5 if refusal + 0.5 if subject    same as ``two_stage``
====================  =================================  ==========================================

A reward function is any callable ``fn(completions: list[str], records: list) -> list[float]``; a
record needs ``.source`` ("forget" or "boundary"; "retain" is scored like a boundary prompt),
``.answer`` and ``.subject``. The trainer takes ``reward_fn=`` to plug in another one.

The refusal detector is the project's single pattern set, ``rerule.eval.refusal.is_refusal``, so
the trainer's reward and the evaluator's refusal rate cannot disagree.

Example:
    >>> from types import SimpleNamespace as R
    >>> fn = make_reward_fn("two_stage_target")
    >>> fn(["I'm not sure about Ada Lark.", "Ada was born in Velmora."],
    ...    [R(source="forget", answer="Velmora", subject="Ada Lark")] * 2)
    [1.0, 0.0]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from rouge_score import rouge_scorer

from rerule.eval.refusal import is_refusal

RewardFn = Callable[[Sequence[str], Sequence[object]], list[float]]
VARIANTS = ("two_stage", "two_stage_target", "forget", "forget_abs")
# The boundary ROUGE-L recall threshold each variant was published with.
DEFAULT_ROUGE_THRESHOLD = {"forget": 0.5, "forget_abs": 0.5, "two_stage": 0.3, "two_stage_target": 0.3}

__all__ = [
    "DEFAULT_ROUGE_THRESHOLD",
    "VARIANTS",
    "RewardFn",
    "RuleReward",
    "is_refusal",
    "make_reward_fn",
    "mentions_subject",
    "rouge_l_recall",
]


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    # No stemmer: RWKU and RULE score raw ROUGE-L; rouge-score lowercases and strips punctuation itself.
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (rouge-score's tokenizer), in [0, 1].

    An empty reference gives 0.0 (nothing to recall).

    Example:
        >>> rouge_l_recall("She was born in Velmora in 1950", "Velmora")
        1.0
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("rouge_l_recall(prediction, reference) needs two str")
    # rouge-score's signature is score(target, prediction); recall is relative to the target.
    return float(_scorer().score(reference, prediction)["rougeL"].recall)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2019", "'")).strip().lower()


def mentions_subject(text: str, subject: str) -> bool:
    """True if the full subject name appears in ``text`` (case- and whitespace-insensitive, whole words).

    An empty subject never counts as mentioned.

    Example:
        >>> mentions_subject("I'm not sure about  stephen KING.", "Stephen King")
        True
        >>> mentions_subject("Kingston is a city.", "King")
        False
    """
    subject = _normalize(subject or "")
    if not subject:
        return False
    return re.search(rf"(?<!\w){re.escape(subject)}(?!\w)", _normalize(text)) is not None


class RuleReward:
    """RULE's reward for one variant (see the module table); call it on (completions, records).

    Args:
        variant: one of :data:`VARIANTS`.
        rouge_threshold: boundary ROUGE-L recall threshold (None: the variant's published one).
    """

    def __init__(self, variant: str = "two_stage", rouge_threshold: float | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.rouge_threshold = (
            DEFAULT_ROUGE_THRESHOLD[variant] if rouge_threshold is None else float(rouge_threshold)
        )

    def forget(self, text: str, record) -> float:
        refused = is_refusal(text)
        if self.variant == "two_stage_target":
            return 0.5 * refused + 0.5 * mentions_subject(text, record.subject)
        return float(refused)

    def boundary(self, text: str, record) -> float:
        refused = is_refusal(text)
        if self.variant == "forget_abs":
            return float(not refused)
        above = rouge_l_recall(text, record.answer) > self.rouge_threshold
        if self.variant == "forget":
            return float(above)
        return 0.5 * (not refused) + 0.5 * above

    def __call__(self, completions: Sequence[str], records: Sequence[object]) -> list[float]:
        if len(completions) != len(records):
            raise ValueError(
                f"completions ({len(completions)}) and records ({len(records)}) differ in length"
            )
        out = []
        for text, rec in zip(completions, records):
            source = getattr(rec, "source", None)
            if source == "forget":
                out.append(self.forget(text, rec))
            elif source in ("boundary", "retain"):
                out.append(self.boundary(text, rec))
            else:
                raise ValueError(f"record.source must be 'forget', 'boundary' or 'retain', got {source!r}")
        return out

    def __repr__(self) -> str:
        return f"RuleReward(variant={self.variant!r}, rouge_threshold={self.rouge_threshold})"


def make_reward_fn(variant: str = "two_stage", rouge_threshold: float | None = None) -> RewardFn:
    """The reward callable for a config's ``reward`` section."""
    return RuleReward(variant, rouge_threshold)
