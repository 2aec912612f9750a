"""Scores on the synthetic world (rerule.data.synthetic).

- ``forget_refusal_rate``: share of forget prompts refused (higher is better);
- ``forget_leak``: mean ROUGE-L recall of the true answer in forget replies (lower);
- ``boundary_quality``: mean ROUGE-L recall of boundary replies (higher);
- ``boundary_over_refusal``: share of boundary prompts refused (lower);
- ``retain_quality``: mean ROUGE-L recall of retain replies (higher);
- ``retain_refusal_rate``: share of retain prompts refused (lower).
"""

from __future__ import annotations

import numpy as np

from rerule.data.schema import UnlearningTask
from rerule.eval.common import score_probes
from rerule.eval.metrics import refusal_rate, rouge_l

KEYS = {
    "forget": ("forget_leak", "forget_refusal_rate"),
    "boundary": ("boundary_quality", "boundary_over_refusal"),
    "retain": ("retain_quality", "retain_refusal_rate"),
}


def score_recall_refusal(name, probe, recs, replies) -> tuple[dict, dict]:
    """Probe set ``name``'s ROUGE-L recall and refusal rate under its :data:`KEYS`, and its replies."""
    quality_key, refusal_key = KEYS[name]
    metrics = {
        quality_key: float(np.mean(rouge_l(replies, [r.answer for r in recs]).recall)),
        refusal_key: refusal_rate(replies),
    }
    return metrics, {f"{name}_replies": replies}


def evaluate_synthetic(
    model, tokenizer, task: UnlearningTask, *, batch_size: int = 8, max_examples: int | None = None,
    max_new_tokens: int | None = None, progress: bool = False, return_samples: bool = False,
):
    """Score ``model`` on a synthetic task (keys in the module doc).

    Returns:
        ``dict[str, float]``, or ``(metrics, samples)`` with ``return_samples``
        where samples maps ``"{probe}_replies"`` to the replies.
    """
    metrics, samples = score_probes(
        model, tokenizer, {name: task.probes[name] for name in KEYS}, score_recall_refusal, batch_size=batch_size,
        max_examples=max_examples, max_new_tokens=max_new_tokens, progress=progress,
    )
    return (metrics, samples) if return_samples else metrics
