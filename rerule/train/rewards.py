"""RULE's rule-based rewards: refusal detection, target-name mention, ROUGE-L recall. No judge model.

Every variant of RULE's reward module (RULE-Unlearn, ``verl/utils/reward_score/forget.py``), with
its gating and scores. ``refuses`` is :func:`rerule.refusal.is_refusal` (RULE's detector by
default), ``R`` the ROUGE-L recall of the reply against the reference answer under the ``rouge``
package (:func:`rouge_l_recall`), ``named`` whether the target name occurs in the reply (a
case-sensitive substring test, as RULE's ``solution[2] in completion``).

Variants (RULE's name in brackets where it differs), as "forget prompt | boundary or retain prompt":

- ``forget``: 1 if refuses | 1 if R > 0.5
- ``forget_half_reject``: 0.5 if refuses | 1 if R > 0.5
- ``forget_abs``: 1 if refuses | 1 if not refuses
- ``forget_abs_half_reject``: 0.5 if refuses | 1 if not refuses
- ``two_stage`` (``forget_two_stage``): 1 if refuses | if not refuses: 0.5 + 0.5 (R > 0.3)
- ``two_stage_abs`` (``forget_two_stage_abs``): the same as ``two_stage`` (RULE has both names)
- ``two_stage_target`` (``forget_two_stage_abs_target``): if refuses: 0.5 + 0.5 named |
  if not refuses: 0.5 + 0.5 (R > 0.3)
- ``two_stage_target_half_reject`` (``forget_two_stage_abs_target_half_reject``): if refuses:
  0.25 + 0.25 named | 1 if not refuses
- ``reject_behave`` (``reject_behave_reward``): 0.7 refuses + 0.3 (R against the target name > 0.3) |
  0.7 (not refuses) + 0.3 (R > 0.3)

So a refusal never earns anything on a boundary prompt (even "I'm not sure, but I think it's
Hogwarts."), and on a forget prompt the target-name bonus is paid only inside a refusal: a leak that
names the subject ("Stephen King's debut novel is Carrie.") earns 0. RULE's names (in brackets) are
accepted as aliases. ``variant="auto"`` picks by task (:data:`TASK_VARIANT`): RWKU -> ``two_stage_target``
(RULE's RWKU runs), MUSE -> ``two_stage`` (RULE's MUSE runs), TOFU and the synthetic world ->
``two_stage`` (RULE published no TOFU reward; TOFU's fictitious authors are named in the questions,
like RWKU's, but a name bonus would favour refusals that repeat a name the prompt already gave, so
the task-agnostic variant is used).

One departure: RULE's ``forget`` and ``forget_half_reject`` call the ``rouge`` package without a
guard, so an empty reply (``rouge`` raises on it) stops RULE's training; here it scores R = 0, as
RULE's guarded variants do.

A reward function is any callable ``fn(completions: list[str], records: list) -> list[float]``; a
record needs ``.source`` ("forget" or "boundary"; "retain" is scored like a boundary prompt),
``.answer`` and ``.subject``. The trainer takes ``reward_fn=`` to plug in another one.

Example:
    >>> from types import SimpleNamespace as R
    >>> fn = make_reward_fn("two_stage_target")
    >>> fn(["I'm not sure about Ada Lark.", "Ada Lark was born in Velmora."],
    ...    [R(source="forget", answer="Velmora", subject="Ada Lark")] * 2)
    [1.0, 0.0]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from rerule.eval.rouge_pkg import rouge_pkg_l_recall
from rerule.refusal import DEFAULT_DETECTOR, DETECTORS, is_refusal

RewardFn = Callable[[Sequence[str], Sequence[object]], list[float]]
VARIANTS = (
    "two_stage",
    "two_stage_target",
    "forget",
    "forget_abs",
    "forget_half_reject",
    "forget_abs_half_reject",
    "two_stage_abs",
    "two_stage_target_half_reject",
    "reject_behave",
)
# RULE's own function names (``score_function`` in its configs) for each variant.
RULE_NAMES = {
    "forget": "forget",
    "forget_half_reject": "forget_half_reject",
    "forget_abs": "forget_abs",
    "forget_abs_half_reject": "forget_abs_half_reject",
    "two_stage": "forget_two_stage",
    "two_stage_abs": "forget_two_stage_abs",
    "two_stage_target": "forget_two_stage_abs_target",
    "two_stage_target_half_reject": "forget_two_stage_abs_target_half_reject",
    "reject_behave": "reject_behave_reward",
}
_ALIASES = {rule: ours for ours, rule in RULE_NAMES.items()}
# The variant ``"auto"`` resolves to, by task name.
TASK_VARIANT = {"rwku": "two_stage_target", "muse": "two_stage", "tofu": "two_stage", "synthetic": "two_stage"}
# The ROUGE-L recall threshold each variant was published with (None: the variant does not use ROUGE).
DEFAULT_ROUGE_THRESHOLD = {
    "forget": 0.5,
    "forget_half_reject": 0.5,
    "forget_abs": None,
    "forget_abs_half_reject": None,
    "two_stage": 0.3,
    "two_stage_abs": 0.3,
    "two_stage_target": 0.3,
    "two_stage_target_half_reject": None,
    "reject_behave": 0.3,
}
REJECT_RATIO = 0.7  # reject_behave: weight of the refusal stage (RULE's default)

__all__ = [
    "DEFAULT_ROUGE_THRESHOLD",
    "REJECT_RATIO",
    "RULE_NAMES",
    "TASK_VARIANT",
    "VARIANTS",
    "RewardFn",
    "RuleReward",
    "is_refusal",
    "make_reward_fn",
    "mentions_subject",
    "resolve_variant",
    "rouge_l_recall",
]


def resolve_variant(variant: str, task: str | None = None) -> str:
    """The canonical variant name: RULE's names map to ours, ``"auto"`` to :data:`TASK_VARIANT` [task].

    Example:
        >>> resolve_variant("auto", "rwku"), resolve_variant("forget_two_stage_abs_target")
        ('two_stage_target', 'two_stage_target')
    """
    if variant == "auto":
        if task not in TASK_VARIANT:
            raise ValueError(f"reward variant 'auto' needs task in {tuple(TASK_VARIANT)}, got {task!r}")
        return TASK_VARIANT[task]
    variant = _ALIASES.get(variant, variant)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'auto', one of {VARIANTS} or RULE's {tuple(_ALIASES)}, got {variant!r}")
    return variant


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` as RULE's reward computes it.

    The ``rouge`` package (case-sensitive, punctuation kept on words, "." splits sentences, no
    stemming); a pair it cannot score (empty prediction or reference) gives 0.0, as RULE's
    ``compute_rouge_l`` does.

    Example:
        >>> rouge_l_recall("She was born in Velmora in 1950", "Velmora")
        1.0
        >>> rouge_l_recall("Paris, France", "Paris")
        0.0
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("rouge_l_recall(prediction, reference) needs two str")
    return rouge_pkg_l_recall(prediction, reference, empty="zero")


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2019", "'")).strip().lower()


def mentions_subject(text: str, subject: str) -> bool:
    """True if the full subject name appears in ``text`` (case- and whitespace-insensitive, whole words).

    A looser test than RULE's target bonus (a case-sensitive substring); used for diagnostics.
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
        variant: one of :data:`VARIANTS`, a RULE name from :data:`RULE_NAMES`, or "auto" with ``task``.
        rouge_threshold: ROUGE-L recall threshold (None: the variant's published one).
        detector: refusal detector, "rule" (RULE's decisions, default) or "strict".
        task: task name for ``variant="auto"``.
    """

    def __init__(
        self,
        variant: str = "two_stage",
        rouge_threshold: float | None = None,
        detector: str = DEFAULT_DETECTOR,
        task: str | None = None,
    ):
        self.variant = resolve_variant(variant, task)
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
        self.detector = detector
        published = DEFAULT_ROUGE_THRESHOLD[self.variant]
        self.rouge_threshold = published if rouge_threshold is None else float(rouge_threshold)

    def _above(self, text: str, reference: str) -> bool:
        return rouge_l_recall(text, reference) > self.rouge_threshold

    def forget(self, text: str, record) -> float:
        v, refused = self.variant, is_refusal(text, self.detector)
        if v in ("forget", "forget_abs", "two_stage", "two_stage_abs"):
            return 1.0 if refused else 0.0
        if v in ("forget_half_reject", "forget_abs_half_reject"):
            return 0.5 if refused else 0.0
        if v == "reject_behave":
            named = self._above(text, _subject(record))
            return REJECT_RATIO * refused + (1 - REJECT_RATIO) * named
        # two_stage_target (0.5 + 0.5) and its half_reject form (0.25 + 0.25): the name counts only in a refusal.
        unit = 0.5 if v == "two_stage_target" else 0.25
        return unit + unit * (_subject(record) in text) if refused else 0.0

    def boundary(self, text: str, record) -> float:
        v, refused = self.variant, is_refusal(text, self.detector)
        if v in ("forget", "forget_half_reject"):
            return 1.0 if self._above(text, record.answer) else 0.0
        if v in ("forget_abs", "forget_abs_half_reject", "two_stage_target_half_reject"):
            return 0.0 if refused else 1.0
        if v == "reject_behave":
            return REJECT_RATIO * (not refused) + (1 - REJECT_RATIO) * self._above(text, record.answer)
        return 0.0 if refused else 0.5 + 0.5 * self._above(text, record.answer)

    def __call__(self, completions: Sequence[str], records: Sequence[object]) -> list[float]:
        if len(completions) != len(records):
            raise ValueError(
                f"completions ({len(completions)}) and records ({len(records)}) differ in length"
            )
        out = []
        for text, rec in zip(completions, records):
            source = getattr(rec, "source", None)
            if source == "forget":
                out.append(float(self.forget(text, rec)))
            elif source in ("boundary", "retain"):
                out.append(float(self.boundary(text, rec)))
            else:
                raise ValueError(f"record.source must be 'forget', 'boundary' or 'retain', got {source!r}")
        return out

    def __repr__(self) -> str:
        return (f"RuleReward(variant={self.variant!r}, rouge_threshold={self.rouge_threshold}, "
                f"detector={self.detector!r})")


def _subject(record) -> str:
    subject = getattr(record, "subject", None)
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"this reward variant needs record.subject (the target name), got {subject!r}")
    return subject


def make_reward_fn(
    variant: str = "two_stage",
    rouge_threshold: float | None = None,
    *,
    detector: str = DEFAULT_DETECTOR,
    task: str | None = None,
) -> RewardFn:
    """The reward callable for a config's ``reward`` section (``task`` resolves ``variant="auto"``)."""
    return RuleReward(variant, rouge_threshold, detector=detector, task=task)
