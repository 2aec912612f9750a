"""The toy task the trainer tests share (also imported by the scripts that test_resume.py and
test_distributed.py launch, so plain functions rather than fixtures): eight "item" prompts, half
forget and half boundary, and a reward a character-level model learns in a few steps."""

from __future__ import annotations

from types import SimpleNamespace as NS


def toy_task(n: int = 8) -> NS:
    recs = [
        NS(prompt=f"Tell me about item {i}.", answer=f"item {i} is blue", subject=f"Item {i}",
           source="forget" if i % 2 else "boundary")
        for i in range(n)
    ]
    return NS(forget=[r for r in recs if r.source == "forget"], boundary=[r for r in recs if r.source != "forget"])


def upper_reward(texts, records) -> list[float]:
    """Learnable in a few steps: ~26 % of a random char model's first characters are uppercase."""
    return [1.0 if t[:1].isupper() else 0.0 for t in texts]
