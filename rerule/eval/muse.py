"""MUSE scores: VerbMem, KnowMem (ROUGE-L F1) and PrivLeak (Min-K%, k = 0.4), as swj0419/muse_bench.

Keys: ``knowmem_forget_rouge_l_f1``, ``knowmem_retain_rouge_l_f1``,
``verbmem_forget_rouge_l_f1`` (rouge-score's ROUGE-L without a stemmer, as MUSE
scores it; KnowMem replies are cut at MUSE's markers "\\n\\n", "\\nQuestion",
"Question:"; VerbMem feeds the raw excerpt and scores against the reference's
first ``max_new_tokens`` tokens, as MUSE does), ``privleak_auc`` (chance that a holdout text has a higher Min-K%
than a forget text), ``privleak_reference_auc`` and ``privleak`` =
(AUC - reference) / reference * 100. The reference is the retrained model's AUC
(its report's ``privleak_auc``); without one it is MUSE's published retrained
AUC for the corpus (:data:`rerule.eval.metrics.MUSE_REFERENCE_AUC`: Books
0.5393, News 0.4772), or 0.5 for a corpus MUSE did not publish.
"""

from __future__ import annotations

import numpy as np

from rerule.data.schema import UnlearningTask
from rerule.eval.common import limit, probe_min_k, score_probes
from rerule.eval.metrics import MUSE_REFERENCE_AUC, mia_auc, privleak, rouge_l

REFERENCE_AUC = 0.5  # for a corpus without a published reference
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")  # MUSE's knowmem.py cuts a reply before these


def cut_knowmem_reply(text: str) -> str:
    r"""A KnowMem reply up to MUSE's stop markers (applied in order, as MUSE does).

    Example:
        >>> cut_knowmem_reply("Morwen Tate\nof Gull Rock\n\nQuestion: Who?")
        'Morwen Tate\nof Gull Rock'
    """
    for stop in KNOWMEM_STOPS:
        text = text.split(stop)[0]
    return text


def truncate_reference(tokenizer, text: str, max_tokens: int) -> str:
    """MUSE's VerbMem reference: its first ``max_tokens`` tokens (special tokens included, as MUSE
    encodes with ``add_special_tokens=True``), decoded without them."""
    ids = tokenizer(text, add_special_tokens=True).input_ids[:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def default_reference_auc(task_name: str) -> float:
    """MUSE's published retrained-model AUC for ``task_name`` ("muse/books", "muse/news"), else 0.5.

    Example:
        >>> default_reference_auc("muse/books"), default_reference_auc("muse/news")
        (0.5393, 0.4772)
    """
    corpus = task_name.split("/")[-1].lower()
    return MUSE_REFERENCE_AUC.get(corpus, REFERENCE_AUC)


def evaluate_muse(
    model, tokenizer, task: UnlearningTask, *, batch_size: int = 8, max_examples: int | None = None,
    max_new_tokens: int | None = None, reference_auc: float | None = None, k: float = 0.4,
    max_length: int | None = 2048, progress: bool = False, return_samples: bool = False,
):
    """Score ``model`` on a MUSE task (keys in the module doc).

    Returns:
        ``dict[str, float]``, or ``(metrics, samples)`` with ``return_samples``
        (replies per generated probe, Min-K% scores per privleak split).
    """
    def score(name, probe, recs, replies):
        refs = [r.answer for r in recs]
        if name.startswith("knowmem"):
            replies = [cut_knowmem_reply(t) for t in replies]
        else:
            n = max_new_tokens or probe.max_new_tokens
            refs = [truncate_reference(tokenizer, a, n) for a in refs]
        f1 = rouge_l(replies, refs, use_stemmer=False).f1
        return {f"{name}_rouge_l_f1": float(np.mean(f1))}, {f"{name}_replies": replies}

    metrics, samples = score_probes(
        model, tokenizer, {n: task.probes[n] for n in ("knowmem_forget", "knowmem_retain", "verbmem_forget")}, score,
        batch_size=batch_size, max_examples=max_examples, max_new_tokens=max_new_tokens, progress=progress,
        skip_empty=False, strip=False,  # MUSE cuts the raw reply (a leading "\n\n" empties it)
    )
    scores = {}
    for split in ("forget", "holdout"):
        probe = task.probes[f"privleak_{split}"]
        scores[split] = probe_min_k(
            model, tokenizer, probe, limit(probe.records, max_examples), batch_size=batch_size, k=k,
            max_length=max_length, progress=progress,
        )
        samples[f"privleak_{split}_min_k"] = scores[split].tolist()
    ref = default_reference_auc(task.name) if reference_auc is None else float(reference_auc)
    metrics["privleak_auc"] = mia_auc(scores["forget"], scores["holdout"])
    metrics["privleak_reference_auc"] = ref
    metrics["privleak"] = privleak(metrics["privleak_auc"], ref)
    return (metrics, samples) if return_samples else metrics
