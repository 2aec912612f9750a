"""Benchmark metrics on plain numbers and strings (no model here).

Each definition follows a benchmark's published code; docs/benchmarks.md names the repository and
file for each and lists where rerule departs.

- ROUGE-L, two implementations, because the benchmarks disagree:
  :func:`rouge_l` is ``rouge-score`` (lowercases, drops non-alphanumerics; TOFU and open-unlearning
  with the Porter stemmer, MUSE without), :func:`rouge_pkg_l` is the PyPI ``rouge`` package
  (case-sensitive, punctuation stays on its word, "." splits sentences, no stemming; RWKU and RULE).
  "Paris, France" against "Paris" has recall 1.0 under the first and 0.0 under the second.
- Truth ratio (TOFU): ``P(perturbed) / P(paraphrased)``, each a
  length-normalized probability ``exp(-mean token loss)``; several perturbed
  answers are combined by averaging their mean token losses, as TOFU does.
  Aggregated as ``mean(min(tr, 1/tr))`` on forget and ``mean(max(0, 1 - tr))``
  on retain-like sets. (TOFU's Forget Quality code uses the inverse ratio; the
  KS test is invariant to that monotone map, so the p-value is the same.)
- Forget Quality: the ``scipy.stats.ks_2samp`` p-value between two models'
  per-sample forget truth ratios.
- Model Utility: the harmonic mean of TOFU's 9 numbers (0 if any is 0).
- Min-K% Prob: the mean of the lowest ``k`` fraction of token log-probs;
  Min-K%++ (RWKU) standardizes each token log-prob by the mean and standard
  deviation of the log-prob under the model's own next-token distribution first.
- zlib score (RWKU): mean token log-prob / zlib-compressed byte length of the text.
- Extraction Strength (open-unlearning): ``1 - k / n`` for the smallest ``k``
  from which every teacher-forced greedy prediction of the answer matches.
- PrivLeak (MUSE, open-unlearning's TOFU PrivLeak): ``(AUC - AUC_ref) / AUC_ref * 100``
  where AUC is the chance that a holdout text scores a higher Min-K% than a
  forget text. A model that memorized the forget set gives AUC < AUC_ref, so < 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from scipy import stats

from rerule.eval.rouge_pkg import RougeL, rouge_pkg_l, rouge_pkg_l_recall
from rerule.refusal import refusal_rate

# MUSE's published PrivLeak reference: the retrained model's AUC, used when no retrained model is given.
MUSE_REFERENCE_AUC = {"books": 0.5393, "news": 0.4772}
TOFU_UTILITY_KEYS = tuple(
    f"{s}_{m}"
    for s in ("retain", "real_authors", "world_facts")
    for m in ("prob", "rouge_l_recall", "truth_ratio")
)


@lru_cache(maxsize=2)
def _scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(
    predictions: str | Sequence[str], references: str | Sequence[str], *, use_stemmer: bool = True
) -> RougeL:
    """ROUGE-L of predictions against references (rouge-score).

    Args:
        predictions: a string, or [N] strings.
        references: the same shape as ``predictions``.
        use_stemmer: Porter-stem tokens first (TOFU's and open-unlearning's setting).

    Example:
        >>> rouge_l("born in Velmora", "Velmora").recall
        1.0
        >>> rouge_l(["a b", "c"], ["a b", "d"]).f1.tolist()
        [1.0, 0.0]
    """
    if isinstance(predictions, str) != isinstance(references, str):
        raise TypeError("rouge_l: predictions and references must both be str or both be sequences")
    if isinstance(predictions, str):
        s = _scorer(use_stemmer).score(references, predictions)["rougeL"]
        return RougeL(float(s.recall), float(s.fmeasure))
    if len(predictions) != len(references):
        raise ValueError(f"rouge_l: {len(predictions)} predictions but {len(references)} references")
    scores = [_scorer(use_stemmer).score(r, p)["rougeL"] for p, r in zip(predictions, references)]
    return RougeL(np.array([s.recall for s in scores], float), np.array([s.fmeasure for s in scores], float))


def mean_per_group(values, groups) -> float:
    """Mean over groups of each group's mean (RWKU and RULE average per target, not over all probes).

    Example:
        >>> mean_per_group([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "a", "a", "b"])
        0.5
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    groups = list(groups)
    if v.size != len(groups):
        raise ValueError(f"mean_per_group: {v.size} values but {len(groups)} groups")
    if v.size == 0:
        raise ValueError("mean_per_group: no values")
    means = {}
    for g in dict.fromkeys(groups):
        means[g] = float(np.mean([x for x, h in zip(v, groups) if h == g]))
    return float(np.mean(list(means.values())))


def truth_ratio(perturbed_prob, paraphrased_prob) -> np.ndarray:
    """Per-sample TOFU truth ratio ``P(perturbed) / P(paraphrased)``.

    Args:
        perturbed_prob: [N] or [N, K] length-normalized probabilities of the
            perturbed answers; K options combine by their geometric mean (the
            mean of their mean token losses).
        paraphrased_prob: [N] length-normalized probabilities of the paraphrase.

    Returns:
        [N] float64 ratios.

    Example:
        >>> truth_ratio([[0.1, 0.4]], [0.4]).round(6).tolist()
        [0.5]
    """
    pert = np.asarray(perturbed_prob, dtype=np.float64)
    para = np.asarray(paraphrased_prob, dtype=np.float64)
    if pert.ndim == 2:
        pert = np.exp(np.log(pert).mean(axis=1))
    if pert.ndim != 1 or para.shape != pert.shape:
        raise ValueError(f"truth_ratio: perturbed_prob [N] or [N, K] and paraphrased_prob [N], got "
                         f"{np.shape(perturbed_prob)} and {np.shape(paraphrased_prob)}")
    if np.any(pert <= 0) or np.any(para <= 0):
        raise ValueError("truth_ratio: probabilities must be > 0")
    return pert / para


def truth_ratio_stat(ratios, role: str) -> float:
    """Aggregate truth ratios: ``mean(min(tr, 1/tr))`` for role "forget",
    ``mean(max(0, 1 - tr))`` for role "retain".

    Example:
        >>> truth_ratio_stat([0.5, 2.0], "forget"), truth_ratio_stat([0.5, 2.0], "retain")
        (0.5, 0.25)
    """
    tr = np.asarray(ratios, dtype=np.float64)
    if role == "forget":
        return float(np.mean(np.minimum(tr, 1.0 / tr)))
    if role == "retain":
        return float(np.mean(np.maximum(0.0, 1.0 - tr)))
    raise ValueError(f"truth_ratio_stat: role must be 'forget' or 'retain', got {role!r}")


def forget_quality(unlearned_truth_ratios, retain_truth_ratios) -> float:
    """TOFU Forget Quality: the two-sample KS-test p-value.

    Args:
        unlearned_truth_ratios: [N] per-sample forget truth ratios of the model judged.
        retain_truth_ratios: [M] the same for a model never trained on the forget set.

    Example:
        >>> forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
        1.0
    """
    a, b = np.asarray(unlearned_truth_ratios, float), np.asarray(retain_truth_ratios, float)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality: both truth-ratio arrays must be non-empty")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Mapping[str, float] | Sequence[float]) -> float:
    """TOFU Model Utility: the harmonic mean of its 9 numbers.

    Args:
        values: a mapping with the keys of :data:`TOFU_UTILITY_KEYS`, or 9 numbers.

    Example:
        >>> round(model_utility([0.5] * 8 + [1.0]), 6)
        0.529412
    """
    if isinstance(values, Mapping):
        missing = [k for k in TOFU_UTILITY_KEYS if k not in values]
        if missing:
            raise ValueError(f"model_utility: missing {missing}")
        values = [values[k] for k in TOFU_UTILITY_KEYS]
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (9,):
        raise ValueError(f"model_utility: expected 9 values, got shape {v.shape}")
    if np.any(v < 0):
        raise ValueError("model_utility: values must be >= 0")
    # The harmonic mean is 0 as soon as one number is 0; hmean would warn and divide by zero.
    if np.any(v == 0):
        return 0.0
    return float(stats.hmean(v))


def min_k_prob(token_logprobs, k: float = 0.4) -> float:
    """Min-K% Prob: the mean of the ``max(1, int(n * k))`` lowest token log-probs.

    Args:
        token_logprobs: [n] log-probabilities of a text's tokens (n >= 1).
        k: fraction of tokens kept, in (0, 1].

    Example:
        >>> min_k_prob([-1.0, -5.0, -0.5, -3.0, -2.0], k=0.4)
        -4.0
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_prob: k must be in (0, 1], got {k}")
    lp = np.sort(np.asarray(token_logprobs, dtype=np.float64).reshape(-1))
    if lp.size == 0:
        raise ValueError("min_k_prob: token_logprobs is empty")
    return float(lp[: max(1, int(lp.size * k))].mean())


def min_k_plus_plus(token_logprobs, mu, sigma2, k: float = 0.2) -> float:
    """Min-K%++ (RWKU's MIA score): the mean of the lowest ``max(1, int(n * k))`` standardized log-probs.

    Each token's log-prob is standardized as ``(logp - mu) / sqrt(sigma2)`` where ``mu`` and
    ``sigma2`` are the mean and variance of the log-prob under the model's next-token distribution
    at that position.

    Example:
        >>> min_k_plus_plus([-1.0, -3.0, -2.0, -2.0, -2.0], [-1.0] * 5, [4.0] * 5, k=0.4)
        -0.75
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min_k_plus_plus: k must be in (0, 1], got {k}")
    lp, m, s2 = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (token_logprobs, mu, sigma2))
    if lp.size == 0 or lp.shape != m.shape or lp.shape != s2.shape:
        raise ValueError(f"min_k_plus_plus: need equal non-empty [n] arrays, got {lp.shape}, {m.shape}, {s2.shape}")
    z = np.sort((lp - m) / np.sqrt(s2))
    return float(z[: max(1, int(lp.size * k))].mean())


def zlib_score(mean_logprob: float, text: str) -> float:
    """RWKU's zlib MIA score: mean token log-prob / length in bytes of the zlib-compressed UTF-8 text.

    Example:
        >>> import zlib
        >>> zlib_score(-2.0, "abc") == -2.0 / len(zlib.compress(b"abc"))
        True
    """
    import zlib

    if not isinstance(text, str):
        raise TypeError("zlib_score: text must be a str")
    return float(mean_logprob) / len(zlib.compress(text.encode("utf-8")))


def extraction_strength(predicted_ids, label_ids) -> float:
    """Extraction Strength (open-unlearning): ``1 - k / n`` for the smallest ``k`` such that the
    teacher-forced greedy predictions match the labels from position ``k`` to the end.

    ``n`` is the number of answer tokens (with TOFU's end-of-sequence token). As in open-unlearning,
    the search stops at ``k = n - 1``, so a reply with no matching suffix scores ``1 / n``.

    Example:
        >>> extraction_strength([5, 9, 7, 8], [1, 2, 7, 8])
        0.5
        >>> extraction_strength([1, 2], [1, 2]), extraction_strength([0, 0], [1, 2])
        (1.0, 0.5)
    """
    p, y = np.asarray(predicted_ids).reshape(-1), np.asarray(label_ids).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"extraction_strength: predictions {p.shape} and labels {y.shape} differ")
    n = y.size
    if n == 0:
        raise ValueError("extraction_strength: no answer tokens")
    k = 0
    for k in range(n):
        if np.array_equal(p[k:], y[k:]):
            break
    return 1.0 - k / n


def mia_auc(forget_scores, holdout_scores) -> float:
    """AUC of "holdout scores higher than forget" (ties count half).

    With Min-K% log-prob scores, a model that memorized the forget texts
    scores them higher, so its AUC falls below 0.5.

    Example:
        >>> mia_auc([-1.0, -2.0], [-3.0, -4.0])
        0.0
    """
    f, h = np.asarray(forget_scores, float), np.asarray(holdout_scores, float)
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc: both score arrays must be non-empty")
    u = stats.mannwhitneyu(h, f, alternative="two-sided").statistic
    return float(u / (f.size * h.size))


def privleak(auc: float, auc_retrain: float, eps: float = 0.0) -> float:
    """PrivLeak in percent: ``(auc - auc_retrain) / (auc_retrain + eps) * 100``.

    MUSE divides by the reference itself (``eps=0``, the reference must be > 0); open-unlearning's
    TOFU PrivLeak adds ``eps=1e-10`` so that a reference AUC of 0 is allowed.

    Example:
        >>> privleak(0.25, 0.5)
        -50.0
    """
    if eps < 0 or auc_retrain + eps <= 0:
        raise ValueError(f"privleak: auc_retrain + eps must be > 0, got {auc_retrain} + {eps}")
    return float((auc - auc_retrain) / (auc_retrain + eps) * 100.0)


__all__ = [
    "MUSE_REFERENCE_AUC",
    "RougeL",
    "TOFU_UTILITY_KEYS",
    "extraction_strength",
    "forget_quality",
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
