"""rerule.integrations.verl against an independent transcription of verl's published vanilla policy
loss (compute_policy_loss_vanilla + agg_loss), on random inputs: loss, d loss / d log_prob, metrics."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from rerule.integrations.verl import AGG_MODES, compute_policy_loss, register_with_verl


def verl_vanilla(old, lp, adv, mask, mode, low, high, c, is_w=None, dp_size=1, batch_num_tokens=None,
                 global_batch_size=None, loss_scale_factor=None):
    """verl's formula written out with plain autograd, in the inputs' dtype (fp64 here)."""
    neg_kl = torch.clamp(lp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    m = mask.to(lp.dtype)
    mmean = lambda x: (x * m).sum() / (m.sum() + 1e-8)
    ppo_kl = mmean(-neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clip1 = torch.maximum(pg1, pg2)
    clipfrac = mmean(torch.gt(pg2, pg1).to(lp.dtype))
    pg3 = -adv * c
    clip2 = torch.min(pg3, clip1)
    lower = mmean(torch.gt(clip1, pg3).to(lp.dtype) * (adv < 0).to(lp.dtype))
    pg = torch.where(adv < 0, clip2, clip1)
    if is_w is not None:
        pg = pg * is_w
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        loss = (pg * m).sum() / n * dp_size
    elif mode == "token-sum":
        loss = (pg * m).sum() * dp_size
    elif mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq = (pg * m).sum(-1)
        keep = (m.sum(-1) > 0).to(lp.dtype)
        n = keep.sum() if global_batch_size is None else global_batch_size
        loss = (seq * keep).sum() / n * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    else:
        cnt = m.sum(-1)
        seq = (pg * m).sum(-1) / (cnt + 1e-8)
        keep = (cnt > 0).to(lp.dtype)
        n = keep.sum() if global_batch_size is None else global_batch_size
        loss = (seq * keep).sum() / n * dp_size
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": lower.item()}


def make(B=5, T=9, seed=0, spread=0.6, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    lp = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    # Hit the +-20 clamp and the dual clip (A < 0 with a large ratio) on a few tokens.
    lp[0, 1] = old[0, 1] + 25.0
    lp[1, 2] = old[1, 2] - 25.0
    lp[2, 3] = old[2, 3] + 1.6
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    adv[2] = -1.3
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[2, 3] = 1
    if empty_row:
        mask[-1] = 0
    is_w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return old, lp, adv, mask, is_w


def run_both(mode, config, low, high, c, with_is, info=None, **make_kw):
    old, lp, adv, mask, is_w = make(**make_kw)
    w = is_w if with_is else None
    x_ref = lp.clone().requires_grad_()
    ref_loss, ref_metrics = verl_vanilla(old, x_ref, adv, mask, mode, low, high, c, w, **(info or {}))
    ref_loss.backward()
    x = lp.float().clone().requires_grad_()
    loss, metrics = compute_policy_loss(old.float(), x, adv.float(), mask, mode, config,
                                        None if w is None else w.float())
    loss.backward()
    return (loss, x.grad, metrics), (ref_loss, x_ref.grad, ref_metrics)


def assert_match(ours, ref):
    (loss, grad, metrics), (ref_loss, ref_grad, ref_metrics) = ours, ref
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(ref_metrics)
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True], ids=["no_is", "rollout_is"])
def test_matches_verl_vanilla(mode, with_is):
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0}
    assert_match(*run_both(mode, cfg, 0.2, 0.28, 3.0, with_is))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_batch_info_and_attribute_config(mode):
    # Object config (verl's ActorConfig style), clip_ratio_low/high left None -> clip_ratio.
    info = {"dp_size": 4, "batch_num_tokens": 57, "global_batch_size": 13, "loss_scale_factor": 32}
    cfg = SimpleNamespace(clip_ratio=0.15, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=2.5,
                          global_batch_info=info)
    assert_match(*run_both(mode, cfg, 0.15, 0.15, 2.5, True, info=info, seed=3))


def test_dual_clip_and_clamp_are_exercised():
    old, lp, adv, mask, _ = make()
    _, metrics = compute_policy_loss(old.float(), lp.float(), adv.float(), mask, "token-mean", {})
    assert metrics["actor/pg_clipfrac_lower"] > 0
    assert metrics["actor/pg_clipfrac"] > 0
    # The clamp at +-20 stops the gradient of the two out-of-range tokens.
    x = lp.float().clone().requires_grad_()
    compute_policy_loss(old.float(), x, adv.float(), mask, "token-sum", {})[0].backward()
    assert x.grad[0, 1] == 0 and x.grad[1, 2] == 0


def test_advantages_per_sequence_broadcast():
    old, lp, adv, mask, _ = make(seed=5)
    full, _ = compute_policy_loss(old.float(), lp.float(), adv.float(), mask, "seq-mean-token-mean", {})
    per_seq, _ = compute_policy_loss(old.float(), lp.float(), adv[:, 0].float(), mask,
                                     "seq-mean-token-mean", {})
    torch.testing.assert_close(full, per_seq)


def test_empty_mask_gives_zero_not_nan():
    old, lp, adv, mask, _ = make()
    for mode in AGG_MODES:
        empty = torch.zeros_like(mask)
        loss, metrics = compute_policy_loss(old.float(), lp.float(), adv.float(), empty, mode, {})
        assert loss.item() == 0.0 and all(v == 0.0 for v in metrics.values())


def test_bad_inputs_name_the_argument():
    old, lp, adv, mask, _ = make()
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_policy_loss(old, lp, adv, mask, "token-median", {})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss(old, lp, adv, mask, "token-mean", {"clip_ratio_c": 1.0})
    with pytest.raises(TypeError, match="clip_ratio_low"):
        compute_policy_loss(old, lp, adv, mask, "token-mean", {"clip_ratio_low": "0.2"})
    with pytest.raises(ValueError, match="response_mask"):
        compute_policy_loss(old, lp, adv, mask[:, :-1], "token-mean", {})
    with pytest.raises(ValueError, match="rollout_is_weights"):
        compute_policy_loss(old, lp, adv, mask, "token-mean", {}, rollout_is_weights=lp[:-1])
    with pytest.raises(ValueError, match="epsilon_low"):
        compute_policy_loss(old, lp, adv, mask, "token-mean", {"clip_ratio": 1.5})


def test_register_with_verl(monkeypatch):
    registry = {}

    def register_policy_loss(name):
        def deco(fn):
            registry[name] = fn
            return fn
        return deco

    core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
    core_algos.register_policy_loss = register_policy_loss
    ppo = types.ModuleType("verl.trainer.ppo")
    ppo.core_algos = core_algos
    for name, mod in (("verl", types.ModuleType("verl")), ("verl.trainer", types.ModuleType("verl.trainer")),
                      ("verl.trainer.ppo", ppo), ("verl.trainer.ppo.core_algos", core_algos)):
        monkeypatch.setitem(sys.modules, name, mod)
    assert register_with_verl() is True
    assert registry == {"rerule": compute_policy_loss}


def test_register_without_verl_is_a_no_op(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    assert register_with_verl() is False
