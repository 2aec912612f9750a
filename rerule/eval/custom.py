"""Scores on a custom task (``rerule.data.custom``): whichever of forget / boundary / retain it has.

- ``forget_refusal_rate``: share of forget questions refused (higher is better);
- ``forget_leak``: mean ROUGE-L recall of the true answer in forget replies (lower);
- ``boundary_quality``: mean ROUGE-L recall of the reference answer in boundary replies (higher);
- ``boundary_over_refusal``: share of boundary questions refused (lower);
- ``retain_quality`` / ``retain_refusal_rate``: the same on retain questions.

The keys and their definitions are the synthetic world's (``rerule.eval.synthetic``), so a custom run and
the demo read alike.
"""

from __future__ import annotations

from rerule.data.schema import UnlearningTask
from rerule.eval.common import score_probes
from rerule.eval.synthetic import KEYS, score_recall_refusal


def evaluate_custom(
    model, tokenizer, task: UnlearningTask, *, batch_size: int = 8, max_examples: int | None = None,
    max_new_tokens: int | None = None, progress: bool = False, return_samples: bool = False,
):
    """Score ``model`` on a custom task (keys in the module doc; a set the task lacks is left out)."""
    metrics, samples = score_probes(
        model, tokenizer, {n: task.probes[n] for n in KEYS if n in task.probes}, score_recall_refusal,
        batch_size=batch_size, max_examples=max_examples, max_new_tokens=max_new_tokens, progress=progress,
    )
    return (metrics, samples) if return_samples else metrics
