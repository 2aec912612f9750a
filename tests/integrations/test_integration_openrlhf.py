"""rerule.integrations.openrlhf.PolicyLoss against an independent transcription of OpenRLHF's published
PolicyLoss (ppo / gspo, dual clip, vLLM IS correction tis / icepop / seq-mask-tis), on random inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rerule.integrations.openrlhf import PolicyLoss


def mmean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim) if dim is not None else (x * mask).sum() / mask.sum()


def openrlhf_policy_loss(lp, old, adv, mask, rollout, *, low=0.2, high=0.2, dual_clip=None, token_level=True,
                         ptype="ppo", vllm_is=False, thr=None, is_type="tis"):
    """OpenRLHF's formula written out with plain autograd (fp64 here)."""
    m = mask.to(lp.dtype)
    if ptype == "gspo":
        token_level = False
        log_ratio = lp - (rollout if vllm_is else old)
        ratio = ((log_ratio * m).sum(-1) / m.sum(-1)).exp().unsqueeze(-1) * m
    else:
        log_ratio = lp - old
        ratio = log_ratio.exp()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - low, 1 + high) * adv
    if dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        loss = -torch.where(adv < 0, torch.max(clip1, dual_clip * adv), clip1)
    vllm_kl = None
    if vllm_is and ptype == "ppo":
        lo, hi = thr
        log_is = old - rollout
        if is_type == "icepop":
            w = torch.exp(log_is).detach()
            loss = w * ((w >= lo) & (w <= hi)) * loss
        elif is_type == "seq-mask-tis":
            seq_is = torch.exp(mmean(log_is, m, dim=-1))
            keep = (seq_is >= lo) & (seq_is <= hi)
            loss = keep.unsqueeze(-1) * torch.exp(log_is).detach() * loss
        else:
            loss = torch.exp(log_is).clamp(min=lo, max=hi).detach() * loss
        vllm_kl = mmean(rollout - old, m)
    loss = mmean(loss, m) if token_level else mmean(loss, m, dim=-1).mean()
    clip_ratio = mmean(torch.lt(surr2, surr1).to(lp.dtype), m)
    ppo_kl = mmean(-log_ratio.detach(), m)
    return loss, clip_ratio, ppo_kl, vllm_kl


def make(B=6, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lp = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    adv[1] = -2.0
    lp[1, :3] = old[1, :3] + 1.5  # A < 0 with ratio > 3: the dual clip binds
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1  # OpenRLHF divides by per-row counts: keep every row non-empty
    mask[1, :3] = 1
    return lp, old, adv, mask, rollout


CASES = [
    dict(),
    dict(low=0.2, high=0.28, dual_clip=3.0),
    dict(token_level=False, dual_clip=2.0),
    dict(ptype="gspo", low=3e-4, high=4e-4),
    dict(ptype="gspo", vllm_is=True, thr=[0.5, 2.0]),
    dict(vllm_is=True, thr=[0.5, 1.5], is_type="tis", dual_clip=3.0),
    dict(vllm_is=True, thr=[0.7, 1.3], is_type="icepop"),
    dict(vllm_is=True, thr=[0.9, 1.1], is_type="seq-mask-tis", token_level=False),
]


def _module(case):
    return PolicyLoss(
        clip_eps_low=case.get("low", 0.2), clip_eps_high=case.get("high", 0.2),
        dual_clip=case.get("dual_clip"),
        token_level_loss=case.get("token_level", True), policy_loss_type=case.get("ptype", "ppo"),
        enable_vllm_is_correction=case.get("vllm_is", False), vllm_is_truncated_threshold=case.get("thr"),
        vllm_is_correction_type=case.get("is_type", "tis"),
    )


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "default"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_openrlhf(case, seed):
    lp, old, adv, mask, rollout = make(seed=seed)
    x_ref = lp.clone().requires_grad_()
    ref = openrlhf_policy_loss(x_ref, old, adv, mask, rollout, **case)
    ref[0].backward()
    x = lp.float().clone().requires_grad_()
    mod = _module(case)
    assert isinstance(mod, nn.Module)
    out = mod(x, old.float(), adv.float(), mask, rollout.float())
    out[0].backward()
    torch.testing.assert_close(out[0].double(), ref[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1].double(), ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[2].double(), ref[2], rtol=1e-5, atol=1e-6)
    if ref[3] is None:
        assert out[3] is None
    else:
        torch.testing.assert_close(out[3].double(), ref[3], rtol=1e-5, atol=1e-6)


def test_dual_clip_changes_the_gradient():
    lp, old, adv, mask, rollout = make()
    grads = []
    for dual in (None, 3.0):
        x = lp.float().clone().requires_grad_()
        PolicyLoss(dual_clip=dual)(x, old.float(), adv.float(), mask)[0].backward()
        grads.append(x.grad)
    # Row 1 has A < 0 and ratio > 3 on its first tokens: dual clip zeroes their gradient.
    assert (grads[0][1, :3] != 0).all() and (grads[1][1, :3] == 0).all()


def test_no_mask_and_empty_rows():
    lp, old, adv, mask, _ = make()
    full = PolicyLoss()(lp, old, adv)
    ones = PolicyLoss()(lp, old, adv, torch.ones_like(mask))
    torch.testing.assert_close(full[0], ones[0])
    mask[2] = 0
    out = PolicyLoss(token_level_loss=False)(lp, old, adv, mask)
    assert torch.isfinite(out[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="vllm_is_correction_type"):
        PolicyLoss(vllm_is_correction_type="mis")
    with pytest.raises(ValueError, match="vllm_is_truncated_threshold"):
        PolicyLoss(enable_vllm_is_correction=True)
    lp, old, adv, mask, _ = make()
    with pytest.raises(ValueError, match="rollout_log_probs is required"):
        PolicyLoss(enable_vllm_is_correction=True, vllm_is_truncated_threshold=[0.5, 2])(lp, old, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        PolicyLoss()(lp, old, adv[:, :-1], mask)
    with pytest.raises(TypeError, match="old_log_probs"):
        PolicyLoss()(lp, old.tolist(), adv, mask)
