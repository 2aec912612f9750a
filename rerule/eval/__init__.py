"""Unlearning metrics and per-benchmark evaluators.

Example:
    >>> from rerule.eval import rouge_l, forget_quality, model_utility
    >>> rouge_l("born in Velmora", "Velmora").recall
    1.0
    >>> forget_quality([0.2, 0.4, 0.6], [0.2, 0.4, 0.6])
    1.0
"""

from __future__ import annotations

from rerule.data.schema import UnlearningTask
from rerule.eval.metrics import (
    TOFU_UTILITY_KEYS,
    RougeL,
    forget_quality,
    mia_auc,
    min_k_prob,
    model_utility,
    privleak,
    rouge_l,
    truth_ratio,
    truth_ratio_stat,
)
from rerule.eval.model_io import answer_logprobs, generate_greedy, mean_logprob
from rerule.eval.muse import evaluate_muse
from rerule.eval.refusal import REFUSAL_PATTERNS, is_refusal, refusal_rate
from rerule.eval.rwku import evaluate_rwku
from rerule.eval.synthetic import evaluate_synthetic
from rerule.eval.tofu import evaluate_tofu

EVALUATORS = {
    "tofu": evaluate_tofu,
    "muse": evaluate_muse,
    "rwku": evaluate_rwku,
    "synthetic": evaluate_synthetic,
}


def evaluate(model, tokenizer, task: UnlearningTask, **kwargs):
    """Run the evaluator of ``task``'s benchmark (``task.meta["benchmark"]``).

    ``kwargs`` go to ``evaluate_tofu`` / ``evaluate_muse`` / ``evaluate_rwku``
    / ``evaluate_synthetic``; all take ``batch_size``, ``max_examples``,
    ``max_new_tokens``, ``progress`` and ``return_samples``.
    """
    bench = task.meta.get("benchmark")
    if bench not in EVALUATORS:
        raise ValueError(f"task.meta['benchmark'] must be one of {list(EVALUATORS)}, got {bench!r}")
    return EVALUATORS[bench](model, tokenizer, task, **kwargs)


__all__ = [
    "EVALUATORS",
    "REFUSAL_PATTERNS",
    "TOFU_UTILITY_KEYS",
    "RougeL",
    "answer_logprobs",
    "evaluate",
    "evaluate_muse",
    "evaluate_rwku",
    "evaluate_synthetic",
    "evaluate_tofu",
    "forget_quality",
    "generate_greedy",
    "is_refusal",
    "mean_logprob",
    "mia_auc",
    "min_k_prob",
    "model_utility",
    "privleak",
    "refusal_rate",
    "rouge_l",
    "truth_ratio",
    "truth_ratio_stat",
]
