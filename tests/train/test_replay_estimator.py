"""The replay estimator (rerule.train.update.replay_weights, docs/replay.md): consistent weighted advantages
sum to zero per group, pi = mu is the on-policy GRPO update exactly, one SGD step moves replayed
completions the way their advantages say, and the weights behave at the extremes."""

from __future__ import annotations

import math

import pytest
import torch

from rerule.loss import group_advantages, grpo_loss, token_logps
from rerule.train.update import replay_weights, row_weight_behavior

G = 8


def _group_inputs(n_groups=5, T=7, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = n_groups * G
    rewards = torch.randint(0, 3, (B,), generator=g).double() / 2
    mask = torch.ones(B, T)
    mask[torch.arange(B), torch.randint(1, T, (B,), generator=g)] = 0
    mask = mask.cumprod(-1)
    mu = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    cur = mu + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    return rewards, cur, mu, mask


@pytest.mark.parametrize("scale", ["group", "none"])
@pytest.mark.parametrize("spread", [0.05, 1.0, 5.0], ids=["near", "moved", "far"])
def test_consistent_weighted_advantages_sum_to_zero(spread, scale):
    rewards, cur, mu, mask = _group_inputs(spread=spread, seed=int(spread * 10))
    rw = replay_weights(rewards, cur, mu, mask, G, cap=2.0, scale=scale)
    sums = rw.weighted_sums(G)
    assert sums.abs().max() < 1e-12, sums
    if spread > 0.5:
        assert rw.truncated.any(), "the test must exercise truncation"
    torch.testing.assert_close(rw.row_weights.view(-1, G).sum(-1), torch.full((len(sums),), float(G)).double())
    assert ((rw.ess >= 1 - 1e-12) & (rw.ess <= G + 1e-12)).all()
    # the ablation keeps the first version's bias: its row-weight-1 advantages do not sum to zero
    biased = replay_weights(rewards, cur, mu, mask, G, cap=2.0, mode="recomputed", scale=scale)
    if spread > 0.5:
        assert biased.weighted_sums(G).abs().max() > 0.1


def test_on_policy_point_is_grpo():
    """pi = mu: p_i = 1/G, row weight exactly 1, GRPO's advantages (unbiased std, eps 1e-4)."""
    rewards, _, mu, mask = _group_inputs(seed=3)
    rw = replay_weights(rewards, mu, mu, mask, G, cap=2.0)
    assert torch.equal(rw.row_weights, torch.ones_like(rw.row_weights))
    r = rewards.view(-1, G)
    grpo = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(rw.advantages, grpo, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rw.advantages.float(), group_advantages(rewards.float(), G))
    torch.testing.assert_close(rw.ess, torch.full_like(rw.ess, float(G)))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_row_weight_one_is_the_on_policy_gradient(level):
    """At pi = mu the replay loss (behavior channel carrying G p_i = 1) has the on-policy GRPO loss and
    gradient, fp64 logits, the same advantages (bit for bit: the estimator's row weights are exactly 1).
    The kernel takes old - behavior against its logp pair (logp + logp_lo, docs/kernels.md), while the
    encoding behavior = cur - log(w) holds the fp32 logp: w arrives as exp(logp_lo) = 1 + O(1e-7), so
    loss and gradient agree to that, element by element, not to the bit."""
    B, T, V = 2 * G, 6, 37
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 4
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[3, 2:] = 0
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    cur = token_logps(logits, ids, mask, impl="torch")[0]
    rw = replay_weights(rewards, cur, cur, mask, G, cap=2.0)
    adv = rw.advantages.float()
    kw = dict(beta=0.02, ref_logps=ref, importance_sampling_level=level, impl="torch", is_weight_kl=True)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    on = grpo_loss(x1, ids, mask, adv, **kw)
    replay = grpo_loss(x2, ids, mask, adv, behavior_logps=row_weight_behavior(cur, rw.row_weights),
                       is_cap=float(G), **kw)
    on.loss.backward()
    replay.loss.backward()
    torch.testing.assert_close(replay.loss, on.loss, rtol=2e-6, atol=0)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=2e-6, atol=1e-12)
    assert not torch.equal(x1.grad, torch.zeros_like(x1.grad))


def test_one_sgd_step_moves_logps_with_the_advantage_sign():
    """Tabular policy (free logits per row): one SGD step on the consistent replay loss raises every
    positive-advantage completion's log-prob and lowers every negative one, truncation active."""
    B, T, V = 3 * G, 5, 11
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.5] * 3).double()
    cur = token_logps(logits, ids, mask, impl="torch")[0].double()
    mu = cur + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8
    rw = replay_weights(rewards, cur, mu, mask, G, cap=2.0)
    assert rw.truncated.any() and (rw.ess < G - 0.5).all()
    x = logits.clone().requires_grad_()
    out = grpo_loss(x, ids, mask, rw.advantages.float(), behavior_logps=row_weight_behavior(cur, rw.row_weights),
                    is_cap=float(G), impl="torch")
    out.loss.backward()
    with torch.no_grad():
        after = token_logps(x - 5.0 * x.grad, ids, mask, impl="torch")[0].double()
    moved = (after - cur).sum(-1)
    adv = rw.advantages
    assert (moved[adv > 1e-6] > 0).all() and (moved[adv < -1e-6] < 0).all(), (moved, adv)


def test_extremes():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0]).double()
    mask = torch.ones(G, 4)
    mu = torch.full((G, 4), -2.0, dtype=torch.float64)
    # one dominant weight (ESS ~ 1): finite, sums to zero, |G p_i A_i| <= sqrt(G (G - 1))
    cur = mu.clone()
    cur[1] += 50.0
    cur[0] -= 50.0
    cur[2:] -= 50.0
    rw = replay_weights(rewards, cur, mu, mask, G, cap=1e30)
    assert rw.ess.item() == pytest.approx(1.0, abs=1e-6)
    eff = rw.row_weights * rw.advantages
    assert torch.isfinite(eff).all() and eff.abs().max() <= math.sqrt(G * (G - 1)) + 1e-9
    assert rw.weighted_sums(G).abs().max() < 1e-12
    # the same with truncation: the dominant ratio is capped at 2, the others are ~0, ESS still ~1
    assert replay_weights(rewards, cur, mu, mask, G, cap=2.0).ess.item() == pytest.approx(1.0, abs=1e-6)
    # all weights tiny (e^-4000 each): self-normalization is scale free, no underflow
    rw = replay_weights(rewards, mu - 1000.0, mu, mask, G, cap=2.0)
    torch.testing.assert_close(rw.row_weights, torch.ones(G, dtype=torch.float64))
    # all weights huge: every ratio truncated to cap, equal weights again
    rw = replay_weights(rewards, mu + 1000.0, mu, mask, G, cap=2.0)
    assert rw.truncated.all()
    torch.testing.assert_close(rw.row_weights, torch.ones(G, dtype=torch.float64))
    torch.testing.assert_close(rw.advantages, group_advantages(rewards, G).double())
    # the Cauchy-Schwarz bound holds for random groups too
    r, c, m_, k = _group_inputs(n_groups=40, spread=3.0, seed=11)
    rw = replay_weights(r, c, m_, k, G, cap=2.0)
    assert (rw.row_weights * rw.advantages).abs().max() <= math.sqrt(G * (G - 1)) + 1e-9


def test_bad_arguments():
    rewards, cur, mu, mask = _group_inputs(n_groups=1)
    with pytest.raises(ValueError, match="mode"):
        replay_weights(rewards, cur, mu, mask, G, cap=2.0, mode="recompute")
    with pytest.raises(ValueError, match="cap"):
        replay_weights(rewards, cur, mu, mask, G, cap=0.0)
    with pytest.raises(ValueError, match="stored"):
        replay_weights(rewards, cur, mu, mask, G, cap=2.0, mode="stored")


def test_weight_statistics_are_the_token_sums():
    """importance_stats / weight_stats: n, sum w, sum w^2, truncated count and max over the unmasked tokens,
    written out token by token here."""
    from rerule.train.update import importance_stats, weight_stats

    g = torch.Generator().manual_seed(3)
    cur, mu = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[3] = 0
    cap = 1.5
    toks = [(i, t) for i in range(4) for t in range(5) if mask[i, t]]
    raw = [math.exp(float(cur[i, t]) - float(mu[i, t])) for i, t in toks]
    w = [min(r, cap) for r in raw]
    s = importance_stats(cur, mu, mask, cap)
    assert s["n"] == len(toks) and s["truncated"] == sum(r > cap for r in raw) > 0
    assert s["w"] == pytest.approx(sum(w), rel=1e-12) and s["w2"] == pytest.approx(sum(x * x for x in w), rel=1e-12)
    assert s["w_max"] == pytest.approx(max(w), rel=1e-12)

    rows, trunc = torch.tensor([0.5, 2.0, 1.0, 0.5]), torch.tensor([False, True, False, False])
    s = weight_stats(rows, mask, trunc)
    per_tok = [float(rows[i]) for i, _ in toks]
    assert s["n"] == len(toks) and s["truncated"] == sum(bool(trunc[i]) for i, _ in toks) == 3
    assert s["w"] == pytest.approx(sum(per_tok)) and s["w2"] == pytest.approx(sum(x * x for x in per_tok))
    assert s["w_max"] == 2.0
    empty = importance_stats(cur, mu, torch.zeros(4, 5), cap)
    assert empty == {"n": 0.0, "w": 0.0, "w2": 0.0, "truncated": 0.0, "w_max": 0.0}
