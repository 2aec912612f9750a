"""Pieces every per-benchmark evaluator shares: run a probe set through the model.

The evaluators share one loop, :func:`score_probes`: for each probe set take its first ``max_examples``
records, generate greedy replies in batches, and hand them to a per-benchmark scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from rerule.data.schema import ProbeRecord, ProbeSet
from rerule.eval.metrics import min_k_prob
from rerule.eval.model_io import answer_logprobs, generate_greedy

# scorer(name, probe, records, replies) -> (metrics, samples) for that probe set
Scorer = Callable[[str, ProbeSet, list[ProbeRecord], list[str]], tuple[dict, dict]]


def limit(records: list[ProbeRecord], max_examples: int | None) -> list[ProbeRecord]:
    """The first ``max_examples`` records (all of them for None)."""
    if max_examples is None:
        return records
    if max_examples < 1:
        raise ValueError(f"max_examples must be >= 1, got {max_examples}")
    return records[:max_examples]


def probe_replies(
    model, tokenizer, probe: ProbeSet, records: list[ProbeRecord], *, batch_size: int,
    max_new_tokens: int | None = None, progress: bool = False, strip: bool = True,
    prompts: list[str] | None = None, stop_at_newline: bool | None = None,
) -> list[str]:
    """Greedy replies to ``records``, stripped unless ``strip=False``.

    Prompts are ``probe.format(record)`` unless ``prompts`` are given; the length is ``max_new_tokens``
    (None: the probe's), cut at the first newline as the probe says unless ``stop_at_newline`` is given.
    """
    replies = generate_greedy(
        model,
        tokenizer,
        [probe.format(r) for r in records] if prompts is None else prompts,
        max_new_tokens or probe.max_new_tokens,
        batch_size,
        stop_at_newline=probe.stop_at_newline if stop_at_newline is None else stop_at_newline,
        progress=progress,
        desc=probe.name,
    )
    return [r.strip() for r in replies] if strip else replies


def score_probes(
    model, tokenizer, probes: Mapping[str, ProbeSet], score: Scorer, *, batch_size: int,
    max_examples: int | None = None, max_new_tokens: int | None = None, progress: bool = False,
    skip_empty: bool = True, strip: bool = True, prompts: Callable[[str, list], list[str]] | None = None,
    stop_at_newline: bool | None = None,
) -> tuple[dict, dict]:
    """The evaluators' probe -> generate -> score loop.

    For each ``name, probe`` of ``probes`` in order: its first ``max_examples`` records (a set left empty
    is skipped when ``skip_empty``), greedy replies from :func:`probe_replies` (``strip``, ``stop_at_newline``
    and ``max_new_tokens`` passed on; ``prompts(name, records)`` builds the prompts when given), then
    ``score(name, probe, records, replies)``, whose ``(metrics, samples)`` dicts are merged into the result.

    Returns:
        ``(metrics, samples)``, the scorers' dicts merged in probe order.
    """
    metrics, samples = {}, {}
    for name, probe in probes.items():
        recs = limit(probe.records, max_examples)
        if skip_empty and not recs:
            continue
        replies = probe_replies(
            model, tokenizer, probe, recs, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
            strip=strip, prompts=None if prompts is None else prompts(name, recs), stop_at_newline=stop_at_newline,
        )
        m, s = score(name, probe, recs, replies)
        metrics.update(m)
        samples.update(s)
    return metrics, samples


def probe_min_k(
    model, tokenizer, probe: ProbeSet, records: list[ProbeRecord], *, batch_size: int, k: float = 0.4,
    max_length: int | None = 2048, progress: bool = False,
) -> np.ndarray:
    """[N] Min-K% Prob of each record's text (its ``answer``) after its formatted prompt."""
    lps = answer_logprobs(
        model, tokenizer, [probe.format(r) for r in records], [r.answer for r in records], batch_size,
        max_length=max_length, progress=progress, desc=probe.name,
    )
    return np.array([min_k_prob(lp, k) if lp.size else np.nan for lp in lps], dtype=np.float64)
