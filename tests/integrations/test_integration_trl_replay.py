"""rerule.integrations.trl.ReplayGRPOTrainer: its loss is TRL's on the fresh rows plus the weighted replay loss
(consistent and recomputed estimators), and replayed groups merge into TRL's batch with the consistent weights."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from trl import GRPOTrainer

from rerule import group_advantages, grpo_loss
from rerule.integrations.trl import ReplayGRPOTrainer
from rerule.train.buffer import ReplayGroup
from tests.integrations._trl_helpers import config, dataset, make_inputs, random_reward


@pytest.mark.parametrize("mode", ["consistent", "recomputed"])
@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["beta0", "beta-bias-corrected-kl"])
def test_replay_loss_is_on_policy_plus_weighted_decoupled_replay(model_dir, tmp_path, beta, mode):
    """ReplayGRPOTrainer's loss on a batch with replayed rows equals L_on(fresh rows) from TRL's
    native loss + lambda * the spec's replay loss (w = min(exp(old - behavior), cap) on the policy term;
    consistent: behavior carries the row weight G * p_i <= G and the cap is G, so it is not truncated
    again; recomputed: the cap is replay_is_cap). beta0: old = current (ratio 1). With beta > 0 (TRL's
    default use_bias_correction_kl=True) old is off the current policy, and the replayed rows' KL is
    k3 x exp(logp - old), not weighted by w."""
    args = config(output_dir=str(tmp_path), loss_type="grpo", beta=beta, replay_weight=0.7, replay_is_cap=1.5,
                  replay_advantages=mode)
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        args=args,
        train_dataset=dataset(),
    )
    tr.current_gradient_accumulation_steps = 1
    tr.model.train()
    inputs = make_inputs(tr, seed=7)
    if beta == 0.0:
        del inputs["old_per_token_logps"], inputs["ref_per_token_logps"]
    B, C = inputs["completion_ids"].shape
    replay = torch.tensor([False, True, False, True, True, False])
    mu = make_inputs(tr, seed=7, off_policy=0.0)["old_per_token_logps"] + 0.5 * torch.randn(B, C)
    inputs.update(replay_mask=replay, behavior_per_token_logps=mu, replay_num_items=torch.tensor(7.0))

    ours = tr._compute_loss(tr.model, inputs)
    fresh = {
        k: (v[~replay] if torch.is_tensor(v) and v.dim() else v)
        for k, v in inputs.items()
        if k not in ("replay_mask", "behavior_per_token_logps", "replay_num_items")
    }
    on = GRPOTrainer._compute_loss(tr, tr.model, fresh)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)[replay]
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)[replay]
    logits = tr.model(input_ids=ids, attention_mask=attn).logits[:, -C - 1 : -1]
    spec = grpo_loss(
        logits,
        inputs["completion_ids"][replay],
        inputs["completion_mask"][replay],
        inputs["advantages"][replay],
        old_logps=inputs["old_per_token_logps"][replay] if beta else None,
        behavior_logps=mu[replay],
        ref_logps=inputs["ref_per_token_logps"][replay] if beta else None,
        beta=beta,
        bias_correction_kl=True,
        is_cap=1.5 if mode == "recomputed" else float(tr.num_generations),
        loss_type="grpo",
    )
    torch.testing.assert_close(ours, on + 0.7 * spec.loss, rtol=1e-5, atol=1e-7)
    if mode == "recomputed":
        assert spec.metrics["is_truncated_frac"] > 0  # the cap is active on these inputs
    assert tr._metrics["train"]["replay/is_truncated_frac"][-1] == pytest.approx(
        spec.metrics["is_truncated_frac"].item(), abs=1e-6
    )


def test_mix_replay_pads_and_recomputes(model_dir, tmp_path):
    """A stored group with a shorter prompt and a longer completion is merged into the fresh batch:
    padding leaves every row's log-probs unchanged, pi_old is the current policy's, and with mu = pi_old
    the recomputed advantages are the plain group advantages."""
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        args=config(output_dir=str(tmp_path)),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        train_dataset=dataset(),
    )
    tr.model.train()
    out = make_inputs(tr, seed=8)
    g = torch.Generator().manual_seed(9)
    G, P, C = 4, 3, 9
    prompt = torch.randint(4, 65, (P,), generator=g)
    comp = torch.randint(4, 65, (G, C), generator=g)
    cmask = (torch.arange(C)[None] < torch.tensor([C, 4, 6, 2])[:, None]).long()
    ones = torch.ones(G, P, dtype=torch.long)
    mu = tr._policy_logps(prompt.expand(G, P), ones, comp, cmask)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    group = ReplayGroup(
        key=1,
        prompt_ids=prompt,
        completion_ids=comp,
        completion_mask=cmask,
        rewards=rewards,
        advantages=torch.zeros(G),
        behavior_logps=mu,
        step=0,
        source="boundary",
    )
    assert tr.replay_buffer.offer(group) == "admitted"

    merged = tr._mix_replay(dict(out), step=0)
    B = out["completion_ids"].size(0)
    assert merged["completion_ids"].shape == (B + G, C) and merged["prompt_ids"].shape == (B + G, 5)
    assert merged["replay_mask"].tolist() == [False] * B + [True] * G
    assert merged["prompt_mask"][B:, :2].sum() == 0  # left padding of the shorter prompt
    cur = tr._policy_logps(
        merged["prompt_ids"], merged["prompt_mask"], merged["completion_ids"], merged["completion_mask"]
    )
    m = merged["completion_mask"].bool()
    ref_fresh = tr._policy_logps(
        out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]
    )
    torch.testing.assert_close(cur[:B, :7][m[:B, :7]], ref_fresh[m[:B, :7]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cur[B:][m[B:]], mu[cmask.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        merged["old_per_token_logps"][B:][m[B:]], mu[cmask.bool()], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(merged["advantages"][B:], group_advantages(rewards, G), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged["behavior_per_token_logps"][B:], mu)
    assert merged["replay_num_items"].item() == cmask.sum().item()

    tr.current_gradient_accumulation_steps = 1
    loss = tr._compute_loss(tr.model, merged)
    loss.backward()
    assert torch.isfinite(loss) and tr._metrics["train"]["replay/is_weight_mean"][-1] == pytest.approx(
        1.0, abs=1e-4
    )

# The README section "Using rerule inside TRL / verl / OpenRLHF" runs in tests/test_readme.py.


def test_mix_replay_consistent_weights_sum_to_zero(model_dir, tmp_path):
    """An off-policy stored group (mu shifted per row): the merged rows carry advantages A_i and
    behavior log-probs whose weight exp(old - behavior) is the row weight G * p_i (the same on every
    token of a row), with sum_i G p_i A_i = 0, and the logged replay/adv_sum is 0."""
    tr = ReplayGRPOTrainer(
        model=model_dir,
        reward_funcs=random_reward,
        args=config(output_dir=str(tmp_path), replay_is_cap=2.0),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
        train_dataset=dataset(),
    )
    tr.model.train()
    out = make_inputs(tr, seed=8)
    g = torch.Generator().manual_seed(10)
    G, P, C = 4, 3, 6
    prompt = torch.randint(4, 65, (P,), generator=g)
    comp = torch.randint(4, 65, (G, C), generator=g)
    cmask = torch.ones(G, C, dtype=torch.long)
    pi = tr._policy_logps(prompt.expand(G, P), torch.ones(G, P, dtype=torch.long), comp, cmask)
    mu = pi + torch.tensor([0.3, -0.2, 0.4, -0.5])[:, None]  # sequence ratios e^-1.8 .. e^3 (one truncated)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    group = ReplayGroup(key=2, prompt_ids=prompt, completion_ids=comp, completion_mask=cmask, rewards=rewards,
                        advantages=torch.zeros(G), behavior_logps=mu, step=0, source="forget")
    assert tr.replay_buffer.offer(group) == "admitted"
    merged = tr._mix_replay(dict(out), step=0)
    B = out["completion_ids"].size(0)
    w = torch.exp(merged["old_per_token_logps"][B:, :C] - merged["behavior_per_token_logps"][B:, :C])
    torch.testing.assert_close(w, w[:, :1].expand_as(w), rtol=1e-4, atol=1e-5)
    adv = merged["advantages"][B:]
    assert abs(float((w[:, 0] * adv).sum())) < 1e-4 and float(w[:, 0].sum()) == pytest.approx(G, rel=1e-4)
    assert not torch.allclose(w[:, 0], torch.ones(G))
    assert tr._metrics["train"]["replay/adv_sum"][-1] == pytest.approx(0.0, abs=1e-9)
