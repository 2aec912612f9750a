"""Pieces every per-benchmark evaluator shares: run a probe set through the model."""

from __future__ import annotations

import numpy as np

from rerule.data.schema import ProbeRecord, ProbeSet
from rerule.eval.metrics import min_k_prob
from rerule.eval.model_io import answer_logprobs, generate_greedy


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
) -> list[str]:  # fmt: skip
    """Greedy replies to ``records`` in ``probe``'s format and length, stripped unless ``strip=False``."""
    replies = generate_greedy(
        model,
        tokenizer,
        [probe.format(r) for r in records],
        max_new_tokens or probe.max_new_tokens,
        batch_size,
        stop_at_newline=probe.stop_at_newline,
        progress=progress,
        desc=probe.name,
    )
    return [r.strip() for r in replies] if strip else replies


def probe_min_k(
    model, tokenizer, probe: ProbeSet, records: list[ProbeRecord], *, batch_size: int, k: float = 0.4,
    max_length: int | None = 2048, progress: bool = False,
) -> np.ndarray:  # fmt: skip
    """[N] Min-K% Prob of each record's text (its ``answer``) after its formatted prompt."""
    lps = answer_logprobs(
        model, tokenizer, [probe.format(r) for r in records], [r.answer for r in records], batch_size,
        max_length=max_length, progress=progress, desc=probe.name,
    )  # fmt: skip
    return np.array([min_k_prob(lp, k) if lp.size else np.nan for lp in lps], dtype=np.float64)
