"""The replay buffer of hard-case rollout groups (ReRULE, docs/replay.md).

A group (one prompt, G completions) is admitted when
  1. its mean reward is under the threshold (absolute, or a running quantile of recent group means), and
  2. its rewards are not all equal (a flat group has zero advantage and carries no signal).

Each entry keeps what a replay needs without regenerating: prompt and completion ids, mask, rewards,
the advantages it had, the behavior log-probs mu (from the forward of the policy that sampled it),
the frozen reference's log-probs (the reference never changes, so they stay valid), step, source
(forget / boundary) and a reuse count.

Entries leave the buffer by
  - capacity: the oldest, or the one with the highest mean reward, is evicted;
  - staleness: older than ``staleness`` steps (stored advantages and mu drift from the policy);
  - reuse: replayed ``max_reuse`` times;
  - solved prompts: ``evict_prompt(key)`` once the prompt's latest fresh group scores >= threshold.

Draws are uniform or prioritized toward low mean reward, from the buffer's own torch.Generator, so
``state_dict()`` / ``load_state_dict()`` restore the draws exactly on resume. The buffer also keeps a
running effective sample size of the replayed tokens' importance weights (``record_is_weights``).

Example:
    >>> buf = ReplayBuffer(capacity=4, threshold=0.6, seed=0)
    >>> ids = torch.ones(2, 3, dtype=torch.long)
    >>> g = ReplayGroup(key=3, prompt_ids=torch.tensor([5, 6]), completion_ids=ids, completion_mask=ids,
    ...                 rewards=torch.tensor([1.0, 0.0]), advantages=torch.tensor([0.7, -0.7]),
    ...                 behavior_logps=torch.zeros(2, 3), step=0, source="boundary")
    >>> buf.offer(g), len(buf), buf.sample(1, step=1)[0].key
    ('admitted', 1, 3)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

ADMISSION = ("admitted", "above_threshold", "flat", "source_excluded")
SOURCES = ("both", "forget", "boundary")


@dataclass
class ReplayGroup:
    """One stored rollout group (CPU tensors).

    key: the prompt's index in the trainer's prompt pool (for evict_prompt and metrics).
    prompt_ids: [P] int64, unpadded.
    completion_ids, completion_mask: [G, T] (right-padded; T trimmed to the group's longest).
    rewards, advantages: [G] float32 (advantages as computed when the group was fresh).
    behavior_logps: [G, T] float32, mu: log-probs of the sampling policy at the sampling temperature.
    ref_logps: [G, T] float32 or None: the frozen reference's log-probs (for the KL term).
    step: the step that sampled it; source: "forget" | "boundary" | "retain"; reuse: times replayed.
    """

    key: int
    prompt_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    behavior_logps: torch.Tensor
    step: int
    source: str
    ref_logps: torch.Tensor | None = None
    reuse: int = 0
    uid: int = -1

    def __post_init__(self):
        G, T = self.completion_ids.shape
        if self.prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be [P], got {tuple(self.prompt_ids.shape)}")
        for name in ("completion_mask", "behavior_logps") + (
            ("ref_logps",) if self.ref_logps is not None else ()
        ):
            if tuple(getattr(self, name).shape) != (G, T):
                raise ValueError(f"{name} must be [G, T] = {(G, T)}, got {tuple(getattr(self, name).shape)}")
        for name in ("rewards", "advantages"):
            if tuple(getattr(self, name).shape) != (G,):
                raise ValueError(f"{name} must be [G] = ({G},), got {tuple(getattr(self, name).shape)}")
        if G < 2:
            raise ValueError("a replay group needs at least 2 completions")

    @property
    def mean_reward(self) -> float:
        return float(self.rewards.mean())

    @property
    def group_size(self) -> int:
        return self.completion_ids.shape[0]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def trim_group(group: ReplayGroup) -> ReplayGroup:
    """Drop completion columns that are padding in every row (stores less; the loss ignores them anyway)."""
    lengths = group.completion_mask.ne(0).sum(-1)
    T = max(int(lengths.max()), 1)
    for name in ("completion_ids", "completion_mask", "behavior_logps", "ref_logps"):
        value = getattr(group, name)
        if value is not None:
            setattr(group, name, value[:, :T].contiguous())
    return group


def _kind(source: str) -> str:
    """forget, or boundary for every other source (boundary / retain / a trainer's own label)."""
    return "forget" if source == "forget" else "boundary"


class ReplayBuffer:
    """Hard-case groups for off-policy replay (see the module docstring).

    Args:
        capacity: most groups held.
        threshold: absolute admission threshold on a group's mean reward (admit if mean < threshold).
        threshold_mode: "absolute" or "quantile" (admit if mean < the ``quantile`` of the last
            ``quantile_window`` group means offered through ``observe``).
        eviction: "oldest" or "highest_reward" when full.
        staleness: groups sampled more than this many steps ago are dropped.
        max_reuse: a group is dropped after being replayed this many times.
        sampling: "uniform" or "prioritized" (weight = priority_floor + 1 - clamp(mean reward, 0, 1)).
        seed: seeds the buffer's own generator.
    """

    def __init__(
        self,
        capacity: int = 256,
        threshold: float = 0.5,
        threshold_mode: str = "absolute",
        quantile: float = 0.25,
        quantile_window: int = 512,
        eviction: str = "oldest",
        staleness: int = 16,
        max_reuse: int = 4,
        sampling: str = "uniform",
        priority_floor: float = 0.1,
        seed: int = 0,
        *,
        sources: str = "both",
    ):
        if sources not in SOURCES:
            raise ValueError(f"sources must be one of {SOURCES}, got {sources!r}")
        self.sources = sources
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if threshold_mode not in ("absolute", "quantile"):
            raise ValueError(f"threshold_mode must be 'absolute' or 'quantile', got {threshold_mode!r}")
        if eviction not in ("oldest", "highest_reward"):
            raise ValueError(f"eviction must be 'oldest' or 'highest_reward', got {eviction!r}")
        if sampling not in ("uniform", "prioritized"):
            raise ValueError(f"sampling must be 'uniform' or 'prioritized', got {sampling!r}")
        if staleness < 1 or max_reuse < 1:
            raise ValueError(f"staleness and max_reuse must be >= 1, got {staleness}, {max_reuse}")
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.capacity, self.base_threshold, self.threshold_mode = capacity, float(threshold), threshold_mode
        self.quantile, self.eviction, self.staleness, self.max_reuse = (
            quantile,
            eviction,
            staleness,
            max_reuse,
        )
        self.sampling, self.priority_floor = sampling, float(priority_floor)
        self.entries: list[ReplayGroup] = []
        self.recent_means: deque[float] = deque(maxlen=quantile_window)
        self.generator = torch.Generator().manual_seed(seed)
        self.next_uid = 0
        self.ess_ema: float | None = None
        self.weight_mean_ema: float | None = None
        self.counters = {
            "admitted": 0,
            "above_threshold": 0,
            "flat": 0,
            "evicted_capacity": 0,
            "evicted_stale": 0,
            "evicted_reuse": 0,
            "evicted_solved": 0,
            "source_excluded": 0,
        }

    def __len__(self) -> int:
        return len(self.entries)

    def observe(self, group_means) -> None:
        """Feed fresh group means to the running quantile (call once per step, before ``offer``)."""
        self.recent_means.extend(float(m) for m in group_means)

    @property
    def threshold(self) -> float:
        """The admission threshold in force now."""
        if self.threshold_mode == "absolute" or not self.recent_means:
            return self.base_threshold
        return float(
            torch.quantile(torch.tensor(list(self.recent_means), dtype=torch.float64), self.quantile)
        )

    def verdict(self, rewards: torch.Tensor, source: str) -> str:
        """What ``offer`` would answer for a group with these [G] rewards and this source (counts nothing)."""
        if self.sources != "both" and _kind(source) != self.sources:
            return "source_excluded"
        if bool((rewards == rewards[0]).all()):
            return "flat"
        if not float(rewards.mean()) < self.threshold:
            return "above_threshold"
        return "admitted"

    def offer(self, group: ReplayGroup) -> str:
        """Admit ``group`` if it is hard and not flat; returns one of ``ADMISSION``."""
        verdict = self.verdict(group.rewards, group.source)
        if verdict != "admitted":
            self.counters[verdict] += 1
            return verdict
        group.uid, self.next_uid = self.next_uid, self.next_uid + 1
        group.reuse = 0
        self.entries.append(trim_group(group))
        self.counters["admitted"] += 1
        while len(self.entries) > self.capacity:
            if self.eviction == "oldest":
                victim = min(range(len(self.entries)), key=lambda i: self.entries[i].uid)
            else:
                victim = max(
                    range(len(self.entries)),
                    key=lambda i: (self.entries[i].mean_reward, -self.entries[i].uid),
                )
            del self.entries[victim]
            self.counters["evicted_capacity"] += 1
        return "admitted"

    def evict_prompt(self, key: int) -> int:
        """Drop every group of prompt ``key`` (its latest fresh group is solved); returns the count."""
        before = len(self.entries)
        self.entries = [e for e in self.entries if e.key != key]
        self.counters["evicted_solved"] += before - len(self.entries)
        return before - len(self.entries)

    def expire(self, step: int) -> int:
        """Drop groups sampled more than ``staleness`` steps before ``step``. Returns how many."""
        before = len(self.entries)
        self.entries = [e for e in self.entries if step - e.step <= self.staleness]
        self.counters["evicted_stale"] += before - len(self.entries)
        return before - len(self.entries)

    def _draw(self, candidates: list[int], n: int) -> list[int]:
        """``n`` distinct indices of ``self.entries`` among ``candidates`` (uniform or prioritized)."""
        n = min(n, len(candidates))
        if n <= 0:
            return []
        if self.sampling == "uniform":
            weights = torch.ones(len(candidates), dtype=torch.float64)
        else:
            means = torch.tensor([self.entries[i].mean_reward for i in candidates], dtype=torch.float64)
            weights = self.priority_floor + 1.0 - means.clamp(0.0, 1.0)
        picked = torch.multinomial(weights, n, replacement=False, generator=self.generator).tolist()
        return [candidates[i] for i in picked]

    def sample(self, n: int, step: int, forget_share: float | None = None) -> list[ReplayGroup]:
        """Draw up to ``n`` distinct groups (after dropping stale ones); each drawn group's reuse count
        goes up by one and groups that reach ``max_reuse`` leave the buffer. Returns the drawn groups.

        ``forget_share``: round(share * n) slots go to forget groups and the rest to boundary groups;
        slots one source cannot fill go to the other. None: one draw over the whole buffer."""
        self.expire(step)
        everyone = list(range(len(self.entries)))
        if forget_share is None:
            picked = self._draw(everyone, n)
        else:
            forget = [i for i in everyone if _kind(self.entries[i].source) == "forget"]
            boundary = [i for i in everyone if _kind(self.entries[i].source) == "boundary"]
            n_f = min(round(forget_share * n), len(forget))
            n_b = min(n - n_f, len(boundary))
            n_f = min(n - n_b, len(forget))
            picked = self._draw(forget, n_f) + self._draw(boundary, n_b)
        out = [self.entries[i] for i in picked]
        for e in out:
            e.reuse += 1
        kept = [e for e in self.entries if e.reuse < self.max_reuse]
        self.counters["evicted_reuse"] += len(self.entries) - len(kept)
        self.entries = kept
        return out

    def record_is_weights(self, weight_mean: float, ess: float, momentum: float = 0.9) -> None:
        """Track the replayed tokens' mean w and normalized ESS (exponential moving averages)."""
        if self.ess_ema is None:
            self.ess_ema, self.weight_mean_ema = float(ess), float(weight_mean)
        else:
            self.ess_ema = momentum * self.ess_ema + (1 - momentum) * float(ess)
            self.weight_mean_ema = momentum * self.weight_mean_ema + (1 - momentum) * float(weight_mean)

    def stats(self) -> dict[str, float]:
        """Size, composition and the running IS statistics, for logs."""
        n = len(self.entries)
        return {
            "buffer_size": n,
            "buffer_forget": sum(e.source == "forget" for e in self.entries),
            "buffer_boundary": sum(e.source != "forget" for e in self.entries),
            "buffer_mean_reward": (sum(e.mean_reward for e in self.entries) / n) if n else float("nan"),
            "buffer_threshold": self.threshold,
            "buffer_ess_ema": float("nan") if self.ess_ema is None else self.ess_ema,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (entries, quantile window, generator, counters)."""
        return {
            "entries": [e.to_dict() for e in self.entries],
            "recent_means": list(self.recent_means),
            "generator": self.generator.get_state(),
            "next_uid": self.next_uid,
            "ess_ema": self.ess_ema,
            "weight_mean_ema": self.weight_mean_ema,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        self.entries = [ReplayGroup(**e) for e in state["entries"]]
        self.recent_means.clear()
        self.recent_means.extend(state["recent_means"])
        self.generator.set_state(state["generator"])
        self.next_uid = state["next_uid"]
        self.ess_ema, self.weight_mean_ema = state["ess_ema"], state["weight_mean_ema"]
        self.counters = dict(state["counters"])


class Admission(NamedTuple):
    """What ``admit_groups`` did with a step's groups."""

    admitted: int
    evicted_solved: int


def admit_groups(
    buffer: ReplayBuffer,
    rewards: torch.Tensor,
    keys: Sequence,
    sources: Sequence[str],
    build: Callable[[list[int]], list[ReplayGroup]],
    *,
    others: Sequence[tuple[Sequence, Sequence[float]]] = (),
    observed: Sequence[float] | None = None,
    evict_solved: bool = True,
) -> Admission:
    """One step's buffer bookkeeping: evict solved prompts, store the hard, non-flat groups.

    Args:
        buffer: the ReplayBuffer (its running threshold is fed here).
        rewards: [n, G] the step's fresh group rewards; a group with a non-finite reward is skipped
            (neither observed, nor evicting, nor stored).
        keys, sources: each group's prompt key and source.
        build: ``build(groups) -> [ReplayGroup]`` for the listed group indices (in order): only the groups
            the buffer admits are built, so their rows (behavior log-probs ...) are computed for those only.
        others: ``[(keys, means)]`` of other ranks' groups: their solved prompts are evicted too.
        observed: the group means fed to the running threshold (default: this step's finite means).
        evict_solved: drop every stored group of a prompt whose group mean reaches the threshold.

    Groups are handled in order: a solved group evicts its prompt, any other one is offered (counted as
    flat / above_threshold / source_excluded, or built and admitted). Returns the counts.
    """
    if rewards.dim() != 2 or rewards.size(0) != len(keys) or len(sources) != len(keys):
        raise ValueError(
            f"rewards must be [n, G] with n = len(keys) = len(sources), got {tuple(rewards.shape)}, "
            f"{len(keys)} keys, {len(sources)} sources"
        )
    finite = torch.isfinite(rewards).all(-1).tolist()
    means = rewards.mean(-1).tolist()
    buffer.observe(observed if observed is not None else [m for m, f in zip(means, finite) if f])
    threshold = buffer.threshold
    evicted = 0
    if evict_solved:
        for other_keys, other_means in others:
            evicted += sum(buffer.evict_prompt(k) for k, m in zip(other_keys, other_means) if m >= threshold)
    plan = []  # per finite group: ("evict" or its verdict, group index)
    for g, (mean, ok) in enumerate(zip(means, finite)):
        if not ok:
            continue
        if evict_solved and mean >= threshold:
            plan.append(("evict", g))
        else:
            plan.append((buffer.verdict(rewards[g], sources[g]), g))
    hard = [g for verdict, g in plan if verdict == "admitted"]
    built = dict(zip(hard, build(hard))) if hard else {}
    admitted = 0
    for verdict, g in plan:
        if verdict == "evict":
            evicted += buffer.evict_prompt(keys[g])
        elif verdict == "admitted":
            admitted += buffer.offer(built[g]) == "admitted"
        else:
            buffer.counters[verdict] += 1
    return Admission(admitted, evicted)
