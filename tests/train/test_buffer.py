"""Replay buffer: admission, flat groups, eviction (capacity both rules, solved prompts), staleness,
reuse limit, sampling, exact serialization; and the prompt sampler."""

from __future__ import annotations

import io

import pytest
import torch

from rerule.train.buffer import Admission, ReplayBuffer, ReplayGroup, admit_groups
from rerule.train.sampling import PromptSampler


def group(key=0, rewards=(1.0, 0.0, 0.0, 0.0), step=0, source="boundary", T=5, length=None):
    G = len(rewards)
    g = torch.Generator().manual_seed(key * 100 + step)
    mask = torch.ones(G, T, dtype=torch.long)
    if length is not None:
        mask[:, length:] = 0
    r = torch.tensor(rewards)
    return ReplayGroup(
        key=key,
        prompt_ids=torch.arange(3) + key,
        completion_ids=torch.randint(0, 50, (G, T), generator=g),
        completion_mask=mask,
        rewards=r,
        advantages=(r - r.mean()) / (r.std() + 1e-4),
        behavior_logps=-torch.rand(G, T, generator=g),
        step=step,
        source=source,
        ref_logps=-torch.rand(G, T, generator=g),
    )


def test_admission_threshold_and_flat_groups():
    buf = ReplayBuffer(capacity=10, threshold=0.5)
    assert buf.offer(group(0, (1.0, 0.0, 0.0, 0.0))) == "admitted"  # mean 0.25
    assert buf.offer(group(1, (1.0, 1.0, 0.0, 0.0))) == "above_threshold"  # mean 0.5 is not < 0.5
    assert buf.offer(group(2, (0.0, 0.0, 0.0, 0.0))) == "flat"  # zero advantage, no signal
    assert buf.offer(group(3, (0.25, 0.25, 0.25, 0.25))) == "flat"
    assert len(buf) == 1 and buf.entries[0].key == 0
    assert buf.counters["flat"] == 2 and buf.counters["above_threshold"] == 1


def test_running_quantile_threshold():
    buf = ReplayBuffer(capacity=10, threshold_mode="quantile", quantile=0.5, quantile_window=4)
    buf.observe([0.1, 0.2, 0.3, 0.9])
    assert buf.threshold == pytest.approx(0.25)
    assert buf.offer(group(0, (0.5, 0.0, 0.0, 0.0))) == "admitted"  # 0.125 < 0.25
    assert buf.offer(group(1, (1.0, 0.0, 0.0, 0.0))) == "above_threshold"  # 0.25
    buf.observe([0.0, 0.0, 0.0, 0.0])  # window of 4: the old means fall out
    assert buf.threshold == 0.0


def test_capacity_evicts_oldest():
    buf = ReplayBuffer(capacity=2, eviction="oldest")
    for k in range(3):
        buf.offer(group(k, step=k))
    assert [e.key for e in buf.entries] == [1, 2] and buf.counters["evicted_capacity"] == 1


def test_capacity_evicts_highest_reward():
    buf = ReplayBuffer(capacity=2, eviction="highest_reward", threshold=0.9)
    buf.offer(group(0, (1.0, 1.0, 1.0, 0.0)))  # 0.75
    buf.offer(group(1, (1.0, 0.0, 0.0, 0.0)))  # 0.25
    buf.offer(group(2, (1.0, 1.0, 0.0, 0.0)))  # 0.5
    assert sorted(e.key for e in buf.entries) == [1, 2]
    buf.offer(group(3, (1.0, 1.0, 1.0, 0.0)))  # 0.75: the newcomer is itself the highest
    assert sorted(e.key for e in buf.entries) == [1, 2]


def test_evict_solved_prompt():
    buf = ReplayBuffer(capacity=10)
    for step in range(3):
        buf.offer(group(7, step=step))
    buf.offer(group(8))
    assert buf.evict_prompt(7) == 3
    assert [e.key for e in buf.entries] == [8] and buf.counters["evicted_solved"] == 3


def test_staleness():
    buf = ReplayBuffer(capacity=10, staleness=3)
    buf.offer(group(0, step=0))
    buf.offer(group(1, step=2))
    assert buf.expire(3) == 0  # age 3 is still allowed
    assert buf.expire(4) == 1 and [e.key for e in buf.entries] == [1]
    # sample() drops stale groups before drawing
    assert buf.sample(5, step=10) == [] and len(buf) == 0


def test_reuse_limit():
    buf = ReplayBuffer(capacity=10, max_reuse=2, staleness=100)
    buf.offer(group(0))
    assert [g.key for g in buf.sample(1, step=1)] == [0] and buf.entries[0].reuse == 1
    drawn = buf.sample(1, step=2)
    assert drawn[0].reuse == 2 and len(buf) == 0 and buf.counters["evicted_reuse"] == 1


def test_sample_distinct_and_uniform():
    buf = ReplayBuffer(capacity=10, max_reuse=10**6, staleness=10**6, seed=1)
    for k in range(4):
        buf.offer(group(10 + k, (1.0,) + (0.0,) * 3))
    counts = torch.zeros(4)
    for _ in range(800):
        picks = [g.key - 10 for g in buf.sample(2, step=0)]
        assert len(set(picks)) == 2
        counts[picks] += 1
    assert (counts / counts.sum() - 0.25).abs().max() < 0.05


def test_sample_prioritized_prefers_low_reward():
    buf = ReplayBuffer(
        capacity=10,
        threshold=1.0,
        sampling="prioritized",
        priority_floor=0.1,
        max_reuse=10**6,
        staleness=10**6,
        seed=0,
    )
    buf.offer(group(0, (0.9, 0.8, 0.9, 0.8)))  # mean 0.85 -> weight 0.25
    buf.offer(group(1, (0.1, 0.0, 0.1, 0.0)))  # mean 0.05 -> weight 1.05
    hits = sum(buf.sample(1, step=0)[0].key == 1 for _ in range(1000))
    assert abs(hits / 1000 - 1.05 / 1.30) < 0.05


def test_trim_and_validation():
    buf = ReplayBuffer(capacity=4)
    buf.offer(group(0, T=9, length=4))
    e = buf.entries[0]
    assert (
        e.completion_ids.shape == (4, 4) and e.behavior_logps.shape == (4, 4) and e.ref_logps.shape == (4, 4)
    )
    with pytest.raises(ValueError, match="behavior_logps"):
        ReplayGroup(
            0,
            torch.arange(2),
            torch.zeros(2, 3, dtype=torch.long),
            torch.ones(2, 3),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2, 4),
            0,
            "forget",
        )
    with pytest.raises(ValueError, match="eviction"):
        ReplayBuffer(eviction="random")


def test_serialization_round_trip_exact():
    buf = ReplayBuffer(capacity=5, threshold_mode="quantile", quantile=0.5, max_reuse=3, seed=3)
    buf.observe([0.1, 0.9, 0.4])
    for k in range(5):
        buf.offer(group(k, (1.0, 0.0, 0.0, 0.0), step=k))
    buf.sample(2, step=5)
    buf.record_is_weights(1.1, 0.8)
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    other = ReplayBuffer(capacity=5, threshold_mode="quantile", quantile=0.5, max_reuse=3, seed=99)
    other.load_state_dict(torch.load(f, weights_only=True))
    assert other.threshold == buf.threshold and other.counters == buf.counters
    assert (other.ess_ema, other.next_uid) == (buf.ess_ema, buf.next_uid)
    for a, b in zip(buf.entries, other.entries):
        for name, value in a.to_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, name)) and value.dtype == getattr(b, name).dtype, name
            else:
                assert value == getattr(b, name), name
    # The same future: draws and reuse counts continue identically.
    for step in range(6, 9):
        assert [g.uid for g in buf.sample(2, step)] == [g.uid for g in other.sample(2, step)]


def test_prompt_sampler_uniform_and_prioritized():
    s = PromptSampler(6, seed=0)
    idx = s.sample(6)
    assert sorted(idx) == list(range(6))
    with pytest.raises(ValueError, match="k must be"):
        s.sample(7)
    p = PromptSampler(3, mode="prioritized", floor=0.1, seed=0)
    p.update([0, 1, 2], [1.0, 1.0, 0.0])
    hits = sum(p.sample(1)[0] == 2 for _ in range(1000))
    assert abs(hits / 1000 - 1.1 / 1.3) < 0.05
    state = p.state_dict()
    q = PromptSampler(3, mode="prioritized", floor=0.1, seed=5)
    q.load_state_dict(state)
    assert [p.sample(2) for _ in range(5)] == [q.sample(2) for _ in range(5)]


def test_sample_forget_share_splits_slots_and_fills_from_the_other_source():
    buf = ReplayBuffer(capacity=32, threshold=0.9, seed=0)
    for k in range(6):
        buf.offer(group(key=k, source="forget" if k < 4 else "boundary"))
    got = buf.sample(4, step=0, forget_share=0.5)
    assert sorted(g.source for g in got) == ["boundary", "boundary", "forget", "forget"]
    # 3 of 4 slots wanted for boundary, but only 2 boundary groups exist: the rest go to forget
    buf = ReplayBuffer(capacity=32, threshold=0.9, seed=1)
    for k in range(6):
        buf.offer(group(key=k, source="forget" if k < 4 else "boundary"))
    got = buf.sample(4, step=0, forget_share=0.25)
    assert sorted(g.source for g in got) == ["boundary", "boundary", "forget", "forget"]


def test_sources_restrict_admission():
    buf = ReplayBuffer(capacity=8, threshold=0.9, sources="boundary")
    assert buf.offer(group(key=0, source="forget")) == "source_excluded"
    assert buf.offer(group(key=1, source="boundary")) == "admitted"
    assert buf.counters["source_excluded"] == 1 and len(buf) == 1
    with pytest.raises(ValueError, match="sources"):
        ReplayBuffer(sources="retain")


def _admit(buf, rewards, keys, sources=None, **kw):
    rewards = torch.tensor(rewards)
    sources = sources or ["boundary"] * len(keys)
    built = []

    def build(hard):
        built.append(list(hard))
        return [group(keys[g], tuple(rewards[g].tolist()), source=sources[g]) for g in hard]

    return admit_groups(buf, rewards, keys, sources, build, **kw), built


def test_admit_groups_evicts_solved_and_builds_only_admitted_groups():
    buf = ReplayBuffer(capacity=10, threshold=0.5)
    buf.offer(group(1))  # key 1 is stored, then solved this step
    buf.offer(group(5))  # key 5 is solved on another rank
    rows = [(1.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 0.0, 0.0)]
    counts, built = _admit(buf, rows, [0, 1, 2, 3], others=[([5, 6], [0.75, 0.0])])
    # group 0 admitted; 1 (0.75) and 3 (0.5 is not < 0.5) solved; 2 flat, not built
    assert counts == Admission(admitted=1, evicted_solved=2) and built == [[0]]
    assert [e.key for e in buf.entries] == [0]
    assert buf.counters["flat"] == 1 and buf.counters["above_threshold"] == 0
    assert list(buf.recent_means) == [0.25, 0.75, 0.0, 0.5]


def test_admit_groups_without_eviction_counts_above_threshold():
    buf = ReplayBuffer(capacity=10, threshold=0.5, sources="forget")
    buf.offer(group(1, source="forget"))
    rows = [(1.0, 1.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0)]
    counts, built = _admit(buf, rows, [1, 2, 3], ["forget", "boundary", "forget"], evict_solved=False,
                           observed=[9.0])
    assert counts == Admission(1, 0) and built == [[2]]
    assert [e.key for e in buf.entries] == [1, 3] and list(buf.recent_means) == [9.0]
    assert buf.counters["above_threshold"] == 1 and buf.counters["source_excluded"] == 1


def test_admit_groups_skips_non_finite_groups_and_matches_offer_order():
    buf = ReplayBuffer(capacity=1, threshold=0.5)
    buf.offer(group(9))
    rows = [(1.0, float("nan"), 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0), (0.5, 0.0, 0.0, 0.0)]
    counts, built = _admit(buf, rows, [9, 4, 9, 7])
    # the NaN group neither evicts key 9 nor feeds the threshold; groups are handled in order, so 4 pushes
    # out 9 by capacity before the solved group 2 evicts nothing, and 7 then pushes out 4
    assert counts == Admission(2, 0) and built == [[1, 3]]
    assert [e.key for e in buf.entries] == [7] and buf.counters["evicted_capacity"] == 2
    assert list(buf.recent_means) == [0.25, 1.0, 0.125]


def test_admit_groups_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rewards must be"):
        admit_groups(ReplayBuffer(), torch.zeros(3, 2), [0, 1], ["forget"] * 2, lambda hard: [])
