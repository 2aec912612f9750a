"""Which prompts a step trains on: uniform, or prioritized toward prompts whose last group scored low.

Prioritized sampling is an on-policy curriculum (docs/replay.md: it captured most of replay's gain in the
toy study, so any claim for ReRULE must beat it). It is independent of replay: the demo's four arms
are {uniform, prioritized} x {RULE, ReRULE}.

Weights: ``(floor + 1 - s_i) ** alpha`` where ``s_i`` is the mean reward of prompt i's latest group,
clamped to [0, 1] (RULE's rewards live there); a prompt never sampled has s_i = 0, so every prompt
is tried early. Each step draws distinct prompts (without replacement) from a private
``torch.Generator``; ``state_dict()`` restores it exactly.

Example:
    >>> s = PromptSampler(4, mode="prioritized", seed=0)
    >>> s.update([0, 1, 2], [1.0, 1.0, 1.0])
    >>> [round(w, 3) for w in s.weights().tolist()]  # prompt 3 is unseen: the likeliest draw
    [0.1, 0.1, 0.1, 1.1]
"""

from __future__ import annotations

import torch

MODES = ("uniform", "prioritized")


class PromptSampler:
    """Draws ``k`` distinct prompt indices out of ``n`` per step.

    Args:
        n: pool size.
        mode: "uniform" or "prioritized".
        floor, alpha: the prioritized weight ``(floor + 1 - s) ** alpha``.
        seed: seeds the private generator.
    """

    def __init__(self, n: int, mode: str = "uniform", floor: float = 0.1, alpha: float = 1.0, seed: int = 0):
        if n < 1:
            raise ValueError(f"n (the prompt pool) must be >= 1, got {n}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not floor > 0 or not alpha > 0:
            raise ValueError(f"floor and alpha must be > 0, got {floor}, {alpha}")
        self.n, self.mode, self.floor, self.alpha = n, mode, float(floor), float(alpha)
        self.scores = torch.zeros(n, dtype=torch.float64)
        self.seen = torch.zeros(n, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(seed)

    def weights(self) -> torch.Tensor:
        """[n] unnormalized draw weights."""
        if self.mode == "uniform":
            return torch.ones(self.n, dtype=torch.float64)
        return (self.floor + 1.0 - self.scores.clamp(0.0, 1.0)) ** self.alpha

    def sample(self, k: int) -> list[int]:
        """``k`` distinct indices (k <= n)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k must be in [1, {self.n}] (prompts_per_step <= the prompt pool), got {k}")
        return torch.multinomial(self.weights(), k, replacement=False, generator=self.generator).tolist()

    def update(self, indices, group_means) -> None:
        """Record the mean reward of each sampled prompt's fresh group."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        self.scores[idx] = torch.as_tensor(list(group_means), dtype=torch.float64)
        self.seen[idx] = True

    def state_dict(self) -> dict:
        return {
            "scores": self.scores.clone(),
            "seen": self.seen.clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["scores"].shape != (self.n,):
            raise ValueError(
                f"sampler state is for {state['scores'].shape[0]} prompts, this pool has {self.n}"
            )
        self.scores.copy_(state["scores"])
        self.seen.copy_(state["seen"])
        self.generator.set_state(state["generator"])
