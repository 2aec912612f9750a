"""ROUGE-L under the PyPI ``rouge`` package: the scorer of RWKU's evaluation and of RULE's rewards.

Kept apart from :mod:`rerule.eval.metrics` so that the reward path imports neither scipy nor
rouge-score. The package is case-sensitive, splits tokens on spaces with punctuation attached,
splits sentences at ".", does not stem, and computes a summary-level LCS in which each reference
word counts once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np


class RougeL(NamedTuple):
    """ROUGE-L recall and F1: floats for one pair, [N] arrays for lists."""

    recall: float | np.ndarray
    f1: float | np.ndarray


@lru_cache(maxsize=1)
def _rouge_pkg():
    from rouge import Rouge

    return Rouge(metrics=["rouge-l"])


def rouge_pkg_l(prediction: str, reference: str, *, empty: str = "noanswer") -> RougeL:
    """ROUGE-L recall and F1 of one pair under the PyPI ``rouge`` package (RWKU's and RULE's scorer).

    Case-sensitive, tokens split on spaces with punctuation attached, sentences split at ".", no
    stemming, summary-level LCS.

    Args:
        prediction: the model reply.
        reference: the reference answer.
        empty: what a blank reply becomes: "noanswer" (RWKU: it is scored as the word
            ``NOANSWER``) or "zero" (RULE's reward). A pair the package cannot score (e.g. a reply
            or reference with no words, such as "" or ".") gives 0.0 either way.

    Example:
        >>> rouge_pkg_l("Paris, France", "Paris").recall, rouge_pkg_l("Paris France", "Paris").recall
        (0.0, 1.0)
    """
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("rouge_pkg_l(prediction, reference) needs two str")
    if empty not in ("noanswer", "zero"):
        raise ValueError(f"rouge_pkg_l: empty must be 'noanswer' or 'zero', got {empty!r}")
    if empty == "noanswer" and not prediction.strip():
        prediction = "NOANSWER"
    try:
        s = _rouge_pkg().get_scores([prediction], [reference])[0]["rouge-l"]
    except ValueError:  # "Collections must contain at least 1 sentence": nothing to compare
        return RougeL(0.0, 0.0)
    return RougeL(float(s["r"]), float(s["f"]))


def rouge_pkg_l_recall(prediction: str, reference: str, *, empty: str = "noanswer") -> float:
    """The recall of :func:`rouge_pkg_l`.

    Example:
        >>> rouge_pkg_l_recall("born in Velmora", "Velmora")
        1.0
    """
    return rouge_pkg_l(prediction, reference, empty=empty).recall
