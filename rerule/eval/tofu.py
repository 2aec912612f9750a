"""TOFU scores: ROUGE-L recall, Prob, truth ratio, Forget Quality, Model Utility, Extraction
Strength, PrivLeak (locuslab/tofu and locuslab/open-unlearning ``src/evals/metrics/``).

Per probe set (forget, retain, real_authors, world_facts) the keys are
``{set}_rouge_l_recall``, ``{set}_prob`` and ``{set}_truth_ratio``:

- Prob: mean length-normalized probability of the answer,
  ``exp(mean token log-prob)`` over the answer tokens and the end-of-sequence
  token after them (TOFU and open-unlearning score that token too); on
  real_authors and world_facts it is normalized against the perturbed
  options, ``p / (p + sum p_perturbed)``. Every TOFU likelihood here
  (paraphrased and perturbed answers too) includes the end-of-sequence token.
- truth ratio: per sample ``P(perturbed) / P(paraphrased)`` (real_authors and
  world_facts use the answer itself, as TOFU does), aggregated with
  ``truth_ratio_stat`` ("forget" on the forget set, "retain" elsewhere).

``model_utility`` is the harmonic mean of the 9 retain / real_authors /
world_facts numbers. ``forget_quality`` is reported when the per-sample forget
truth ratios of a retain model are given (``retain_truth_ratios``), e.g. from
the ``samples["forget_truth_ratios"]`` of that model's ``rerule eval`` report.

``forget_extraction_strength``: mean over the forget set of open-unlearning's
Extraction Strength (teacher-forced greedy predictions of the answer tokens
and the end-of-sequence token). When the task has TOFU's holdout set:
``privleak_auc`` (Min-K%, k = 0.4, of the answer tokens; chance that a holdout
answer scores higher than a forget one), ``privleak_reference_auc`` (the
retain model's ``privleak_auc`` when given, else 0.5, open-unlearning's
default) and ``privleak`` = (AUC - reference) / (reference + 1e-10) * 100.
"""

from __future__ import annotations

import numpy as np

from rerule.data.schema import ProbeRecord, ProbeSet, UnlearningTask
from rerule.eval.common import limit, score_probes
from rerule.eval.metrics import (
    extraction_strength,
    forget_quality,
    mia_auc,
    min_k_prob,
    model_utility,
    privleak,
    rouge_l,
    truth_ratio,
    truth_ratio_stat,
)
from rerule.eval.model_io import answer_logprobs, mean_logprob

SETS = ("forget", "retain", "real_authors", "world_facts")
NORMALIZED_PROB = ("real_authors", "world_facts")
PRIVLEAK_K = 0.4
REFERENCE_AUC = 0.5  # open-unlearning's TOFU PrivLeak reference when no retain model is given


def _probabilities(
    model, tokenizer, probe: ProbeSet, recs: list[ProbeRecord], batch_size: int, progress: bool
):
    """(p_answer [N], p_base [N], p_perturbed [N] ragged lists), all length-normalized."""
    prompts = [probe.format(r) for r in recs]
    bases = [r.paraphrased_answer or r.answer for r in recs]
    flat_prompts, flat_answers, owner = [], [], []
    for i, r in enumerate(recs):
        for a in r.perturbed_answers:
            flat_prompts.append(prompts[i])
            flat_answers.append(a)
            owner.append(i)
    # One pass over answer, base and perturbed options keeps the batches full.
    all_lp = mean_logprob(
        model, tokenizer, prompts * 2 + flat_prompts, [r.answer for r in recs] + bases + flat_answers,
        batch_size, append_eos=True, progress=progress, desc=f"{probe.name} likelihood",
    )
    n = len(recs)
    p_answer, p_base = np.exp(all_lp[:n]), np.exp(all_lp[n : 2 * n])
    p_pert: list[list[float]] = [[] for _ in recs]
    for i, lp in zip(owner, all_lp[2 * n :]):
        p_pert[i].append(float(np.exp(lp)))
    return p_answer, p_base, p_pert


def evaluate_tofu(
    model, tokenizer, task: UnlearningTask, *, batch_size: int = 8, max_examples: int | None = None,
    max_new_tokens: int | None = None, retain_truth_ratios=None, reference_auc: float | None = None,
    progress: bool = False, return_samples: bool = False,
):
    """Score ``model`` on a TOFU task (keys in the module doc).

    Args:
        retain_truth_ratios: [M] per-sample forget truth ratios of a retain
            model; adds ``forget_quality``.
        reference_auc: the retain model's ``privleak_auc`` (None: 0.5).

    Returns:
        ``dict[str, float]``, or ``(metrics, samples)`` with ``return_samples``;
        samples hold ``{set}_truth_ratios`` and ``{set}_replies`` lists.
    """
    def score(name, probe, recs, replies):
        m = {f"{name}_rouge_l_recall": float(np.mean(rouge_l(replies, [r.answer for r in recs]).recall))}
        p_answer, p_base, p_pert = _probabilities(model, tokenizer, probe, recs, batch_size, progress)
        # TOFU combines the perturbed options by averaging their mean token losses: a geometric mean.
        p_pert_geo = np.array([np.exp(np.mean(np.log(p))) for p in p_pert])
        tr = truth_ratio(p_pert_geo, p_base)
        if name in NORMALIZED_PROB:
            prob = p_answer / (p_answer + np.array([sum(p) for p in p_pert]))
        else:
            prob = p_answer
        m[f"{name}_prob"] = float(np.mean(prob))
        m[f"{name}_truth_ratio"] = truth_ratio_stat(tr, "forget" if name == "forget" else "retain")
        return m, {f"{name}_truth_ratios": tr.tolist(), f"{name}_replies": replies}

    metrics, samples = score_probes(
        model, tokenizer, {name: task.probes[name] for name in SETS}, score, batch_size=batch_size,
        max_examples=max_examples, max_new_tokens=max_new_tokens, progress=progress, skip_empty=False,
    )
    metrics["model_utility"] = model_utility({k: v for k, v in metrics.items() if not k.startswith("forget")})
    if retain_truth_ratios is not None:
        metrics["forget_quality"] = forget_quality(samples["forget_truth_ratios"], retain_truth_ratios)

    forget = task.probes["forget"]
    f_recs = limit(forget.records, max_examples)
    f_rows = answer_logprobs(
        model, tokenizer, [forget.format(r) for r in f_recs], [r.answer for r in f_recs], batch_size,
        append_eos=True, details=True, progress=progress, desc="forget extraction",
    )
    es = [extraction_strength(row["argmax"], row["target"]) for row in f_rows if row["target"].size]
    metrics["forget_extraction_strength"] = float(np.mean(es)) if es else float("nan")
    samples["forget_extraction_strength"] = es
    if "holdout" in task.probes:
        holdout = task.probes["holdout"]
        h_recs = limit(holdout.records, max_examples)
        h_lps = answer_logprobs(
            model, tokenizer, [holdout.format(r) for r in h_recs], [r.answer for r in h_recs], batch_size,
            append_eos=True, progress=progress, desc="holdout likelihood",
        )
        f_score = [min_k_prob(row["logprob"], PRIVLEAK_K) for row in f_rows if row["logprob"].size]
        h_score = [min_k_prob(lp, PRIVLEAK_K) for lp in h_lps if lp.size]
        ref = REFERENCE_AUC if reference_auc is None else float(reference_auc)
        metrics["privleak_auc"] = mia_auc(f_score, h_score)
        metrics["privleak_reference_auc"] = ref
        metrics["privleak"] = privleak(metrics["privleak_auc"], ref, eps=1e-10)
        samples["privleak_forget_min_k"], samples["privleak_holdout_min_k"] = f_score, h_score
    return (metrics, samples) if return_samples else metrics
