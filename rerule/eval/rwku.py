"""RWKU scores: ROUGE-L recall per probe level, and Min-K% membership scores.

Keys: ``{forget_level1,2,3, neighbor_level1,2}_rouge_l_recall`` (in [0, 1];
RWKU's tables show x100; lower is better on forget, higher on neighbours),
``mia_forget_min_k`` and ``mia_retain_min_k`` (mean Min-K% log-prob, k = 0.4),
and ``mia_auc`` (chance that a retain text scores higher than a forget text;
below 0.5 means the forget texts are still recognized).
"""

from __future__ import annotations

import numpy as np

from rerule.data.rwku import PROBE_CONFIGS
from rerule.data.schema import UnlearningTask
from rerule.eval.common import limit, probe_min_k, probe_replies
from rerule.eval.metrics import mia_auc, rouge_l


def evaluate_rwku(
    model, tokenizer, task: UnlearningTask, *, batch_size: int = 8, max_examples: int | None = None,
    max_new_tokens: int | None = None, k: float = 0.4, max_length: int | None = 2048,
    progress: bool = False, return_samples: bool = False,
):  # fmt: skip
    """Score ``model`` on an RWKU task (keys in the module doc).

    Returns:
        ``dict[str, float]``, or ``(metrics, samples)`` with ``return_samples``.
    """
    metrics, samples = {}, {}
    for name in PROBE_CONFIGS:
        probe = task.probes[name]
        recs = limit(probe.records, max_examples)
        if not recs:
            continue
        replies = probe_replies(
            model,
            tokenizer,
            probe,
            recs,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        metrics[f"{name}_rouge_l_recall"] = float(np.mean(rouge_l(replies, [r.answer for r in recs]).recall))
        samples[f"{name}_replies"] = replies
    scores = {}
    for name in ("mia_forget", "mia_retain"):
        probe = task.probes[name]
        recs = limit(probe.records, max_examples)
        scores[name] = probe_min_k(
            model,
            tokenizer,
            probe,
            recs,
            batch_size=batch_size,
            k=k,
            max_length=max_length,
            progress=progress,
        )
        metrics[f"{name}_min_k"] = float(np.nanmean(scores[name])) if recs else float("nan")
        samples[f"{name}_min_k"] = scores[name].tolist()
    if len(scores["mia_forget"]) and len(scores["mia_retain"]):
        metrics["mia_auc"] = mia_auc(scores["mia_forget"], scores["mia_retain"])
    return (metrics, samples) if return_samples else metrics
