"""Unlearning metrics and per-benchmark evaluators.

Example:
    >>> from rerule.eval import rouge_l, forget_quality, model_utility
    >>> rouge_l("born in Velmora", "Velmora").recall
    1.0
    >>> forget_quality([0.2, 0.4, 0.6], [0.2, 0.4, 0.6])
    1.0
"""

from __future__ import annotations

import importlib

# Lazy exports (PEP 562): `import rerule.eval.rouge_pkg` (the trainer's reward path) must not pay for
# scipy, transformers and the evaluators. The refusal names are re-exported from the leaf `rerule.refusal`.
_EXPORTS = {
    "TOFU_UTILITY_KEYS": "metrics", "RougeL": "metrics", "forget_quality": "metrics", "mia_auc": "metrics",
    "min_k_prob": "metrics", "model_utility": "metrics", "privleak": "metrics", "rouge_l": "metrics",
    "truth_ratio": "metrics", "truth_ratio_stat": "metrics", "MUSE_REFERENCE_AUC": "metrics",
    "extraction_strength": "metrics", "mean_per_group": "metrics", "min_k_plus_plus": "metrics",
    "zlib_score": "metrics", "rouge_pkg_l": "rouge_pkg", "rouge_pkg_l_recall": "rouge_pkg",
    "DETECTORS": "refusal",
    "answer_logprobs": "model_io", "generate_greedy": "model_io", "mean_logprob": "model_io",
    "evaluate_custom": "custom",
    "evaluate_muse": "muse", "evaluate_rwku": "rwku", "evaluate_synthetic": "synthetic", "evaluate_tofu": "tofu",
    "REFUSAL_PATTERNS": "refusal", "is_refusal": "refusal", "refusal_rate": "refusal",
}
_EVALUATOR_NAMES = {"tofu": "evaluate_tofu", "muse": "evaluate_muse", "rwku": "evaluate_rwku",
                    "synthetic": "evaluate_synthetic", "custom": "evaluate_custom"}


def __getattr__(name):
    if name == "EVALUATORS":
        return {bench: __getattr__(fn) for bench, fn in _EVALUATOR_NAMES.items()}
    if name in _EXPORTS:
        module = _EXPORTS[name]
        path = "rerule.refusal" if module == "refusal" else f"{__name__}.{module}"
        return getattr(importlib.import_module(path), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate(model, tokenizer, task, **kwargs):
    """Run the evaluator of ``task``'s benchmark (``task.meta["benchmark"]``).

    ``kwargs`` go to ``evaluate_tofu`` / ``evaluate_muse`` / ``evaluate_rwku``
    / ``evaluate_synthetic``; all take ``batch_size``, ``max_examples``,
    ``max_new_tokens``, ``progress`` and ``return_samples``.
    """
    bench = task.meta.get("benchmark")
    if bench not in _EVALUATOR_NAMES:
        raise ValueError(f"task.meta['benchmark'] must be one of {list(_EVALUATOR_NAMES)}, got {bench!r}")
    return __getattr__(_EVALUATOR_NAMES[bench])(model, tokenizer, task, **kwargs)


__all__ = [
    "DETECTORS",
    "EVALUATORS",
    "MUSE_REFERENCE_AUC",
    "REFUSAL_PATTERNS",
    "TOFU_UTILITY_KEYS",
    "RougeL",
    "answer_logprobs",
    "evaluate",
    "evaluate_muse",
    "evaluate_rwku",
    "evaluate_synthetic",
    "evaluate_tofu",
    "extraction_strength",
    "forget_quality",
    "generate_greedy",
    "is_refusal",
    "mean_logprob",
    "mean_per_group",
    "mia_auc",
    "min_k_plus_plus",
    "min_k_prob",
    "model_utility",
    "privleak",
    "refusal_rate",
    "rouge_l",
    "rouge_pkg_l",
    "rouge_pkg_l_recall",
    "truth_ratio",
    "truth_ratio_stat",
    "zlib_score",
]
