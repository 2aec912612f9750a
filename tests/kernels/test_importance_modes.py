"""Importance-sampling modes of the loss API (TRL's vLLM correction: token / sequence x truncate / mask,
lower and upper bound), the ready-made ratio input (is_ratio [B, T], [B, 1], [B]), TRL's
gradient-accumulation normalizers, and sequence-level clip metrics: every backend (torch, Triton
interpreter, fused-linear) against the fp64 spec, element-wise, loss, gradient and metrics.
Parity with TRL itself is in tests/integrations/test_integration_trl.py."""

from __future__ import annotations

import pytest
import torch

from rerule import fused_linear_grpo_loss, grpo_loss
from rerule.kernels.grpo_math import importance_weights
from rerule.kernels.options import IS_MODES, LossOptions
from rerule.kernels.reference import grpo_loss_reference

B, T, V, H = 6, 7, 37, 12
CAP, CAP_MIN = 1.5, 0.7


def inputs(seed=0, spread=0.45):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    mask[0] = 1
    mask[1, 2:] = 0  # a short sequence
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    cur = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    old = cur + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # behavior = old + noise, with a per-sequence offset so that sequence ratios fall on both sides
    beh = old + spread * torch.randn(B, T, generator=g, dtype=torch.float64) + torch.tensor(
        [0.6, -0.5, 0.05, -0.05, 0.4, -0.3], dtype=torch.float64)[:, None] / 2
    ref = cur + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return logits, ids, mask, adv, old, beh, ref


def spec(logits, ids, mask, adv, old, beh, ref, o, **kw):
    x = logits.detach().clone().requires_grad_()
    loss, logp, _, metrics = grpo_loss_reference(x, ids, mask, adv, old, beh, ref, o, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def close(a, b, atol, rtol, what):
    a, b = a.double(), b.double()
    bad = (a - b).abs() > atol + rtol * b.abs()
    assert not bad.any(), f"{what}: max |diff| {(a - b).abs().max().item():.3g} at {bad.nonzero()[0].tolist()}"


def check(out, grad, ref_loss, ref_grad, ref_metrics):
    close(out.loss.detach(), ref_loss, 1e-6, 1e-5, "loss")
    close(grad, ref_grad, 1e-7, 1e-4, "grad")
    for k, v in ref_metrics.items():
        close(out.metrics[k], v, 1e-6, 1e-5, k)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", IS_MODES)
def test_modes_match_spec_every_backend(mode, level):
    logits, ids, mask, adv, old, beh, ref = inputs()
    o = LossOptions(importance_sampling_level=level, is_cap=CAP, beta=0.05, bias_correction_kl=True,
                    is_weight_kl=(mode == "token_mask"))
    want = spec(logits, ids, mask, adv, old, beh, ref, o, is_mode=mode, is_cap_min=CAP_MIN)
    # the inputs reach every branch: ratios above the cap, below the floor and in between
    w, outside = importance_weights(mask, old, beh, mode, CAP, CAP_MIN)
    m = mask.bool()
    assert (w[m] == (0 if mode.endswith("mask") else CAP)).any() and ((w[m] > CAP_MIN) & (w[m] < CAP)).any()
    assert outside.any() and want[2]["is_truncated_frac"] > 0
    f = lambda t: t.float()
    kw = dict(old_logps=f(old), behavior_logps=f(beh), ref_logps=f(ref), beta=0.05, bias_correction_kl=True,
              is_weight_kl=(mode == "token_mask"), importance_sampling_level=level, is_cap=CAP, is_mode=mode,
              is_cap_min=CAP_MIN)
    for impl in ("torch", "triton"):
        x = f(logits).requires_grad_()
        out = grpo_loss(x, ids, mask, f(adv), impl=impl, **kw)
        out.loss.backward()
        check(out, x.grad, *want)
    # fused-linear: logits = hidden @ weight.T, spec on those logits
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    want = spec(hidden @ weight.T, ids, mask, adv, old, beh, ref, o, is_mode=mode, is_cap_min=CAP_MIN)
    h = f(hidden).requires_grad_()
    wt = f(weight)
    out = fused_linear_grpo_loss(h, wt, ids, mask, f(adv), chunk_size=9, **kw)
    out.loss.backward()
    close(out.loss.detach(), want[0], 1e-6, 1e-5, "fused-linear loss")
    close(h.grad, (want[1] @ weight), 1e-6, 1e-4, "fused-linear d hidden")
    for k, v in want[2].items():
        close(out.metrics[k], v, 1e-6, 1e-5, k)


def test_sequence_ratio_is_exp_of_the_summed_differences():
    _, _, mask, _, old, beh, _ = inputs()
    d = ((old - beh) * mask).sum(-1, keepdim=True)
    w, _ = importance_weights(mask, old, beh, "sequence_truncate", None, None)
    torch.testing.assert_close(w, torch.exp(d).expand(B, T), rtol=1e-12, atol=0)
    w, outside = importance_weights(mask, old, beh, "sequence_mask", 1.0, None)
    assert torch.equal(w == 0, (torch.exp(d) > 1.0).expand(B, T))
    assert torch.equal(outside, (torch.exp(d) > 1.0).expand(B, T) & mask.bool())


@pytest.mark.parametrize("shape", ["BT", "B1", "B"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ready_ratio_matches_spec(shape, level):
    logits, ids, mask, adv, old, _, ref = inputs(seed=1)
    g = torch.Generator().manual_seed(2)
    r = torch.exp(0.5 * torch.randn(B, T if shape == "BT" else 1, generator=g, dtype=torch.float64))
    r[2] = 0.0  # a masked sequence / tokens
    ratio = r if shape != "B" else r[:, 0]
    o = LossOptions(importance_sampling_level=level, beta=0.05)
    want = spec(logits, ids, mask, adv, old, None, ref, o, is_ratio=ratio)
    for impl in ("torch", "triton"):
        x = logits.float().requires_grad_()
        out = grpo_loss(x, ids, mask, adv.float(), old_logps=old.float(), ref_logps=ref.float(), beta=0.05,
                        importance_sampling_level=level, is_ratio=ratio.float(), impl=impl)
        out.loss.backward()
        check(out, x.grad, *want)
    # the ratio changes the loss (a test that ignored it would pass on ratio = 1 only)
    plain = spec(logits, ids, mask, adv, old, None, ref, o)
    assert abs(plain[0] - want[0]) > 1e-3


def test_default_mode_is_todays_truncation_without_old_logps():
    """behavior_logps + is_cap keep working as before, also without old_logps (old = current)."""
    logits, ids, mask, adv, _, beh, _ = inputs(seed=3)
    want = spec(logits, ids, mask, adv, None, beh, None, LossOptions(is_cap=CAP))
    x = logits.float().requires_grad_()
    out = grpo_loss(x, ids, mask, adv.float(), behavior_logps=beh.float(), is_cap=CAP, impl="torch")
    out.loss.backward()
    check(out, x.grad, *want)
    assert want[2]["is_truncated_frac"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_normalizer(loss_type):
    """TRL: grpo / bnpo / dr_grpo divide by the accumulation steps; dapo's normalizer is
    num_items / num_processes * accumulation steps / steps_per_generation."""
    logits, ids, mask, adv, old, _, _ = inputs(seed=4)
    items = float(mask.sum()) * 3
    kw = dict(old_logps=old.float(), loss_type=loss_type, impl="torch",
              num_items_in_batch=items if loss_type == "dapo" else None)
    x0 = logits.float().requires_grad_()
    base = grpo_loss(x0, ids, mask, adv.float(), **kw)
    base.loss.backward()
    x1 = logits.float().requires_grad_()
    out = grpo_loss(x1, ids, mask, adv.float(), gradient_accumulation_steps=4, steps_per_generation=2,
                    num_processes=3, **kw)
    out.loss.backward()
    factor = (2 * 3 / 4) if loss_type == "dapo" else 1 / 4
    close(out.loss.detach(), base.loss.detach() * factor, 1e-8, 1e-6, "loss")
    close(x1.grad, x0.grad * factor, 1e-9, 1e-6, "grad")


def test_sequence_clip_metrics_are_means_over_sequences():
    logits, ids, mask, adv, old, _, _ = inputs(seed=6)
    old = old + torch.tensor([0.5, -0.5, 0.3, -0.3, 0.0, 0.6], dtype=torch.float64)[:, None]
    out = grpo_loss(logits.float(), ids, mask, adv.float(), old_logps=old.float(),
                    importance_sampling_level="sequence", impl="torch")
    cur = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    m = mask.double()
    coef = torch.exp(((cur - old) * m).sum(-1) / m.sum(-1))
    low = ((coef < 0.8) & (adv < 0)).double().mean()
    high = ((coef > 1.2) & (adv > 0)).double().mean()
    assert low + high > 0
    close(out.metrics["clip_ratio_low"], low, 1e-7, 0, "clip_ratio_low")
    close(out.metrics["clip_ratio_high"], high, 1e-7, 0, "clip_ratio_high")


def test_bad_importance_inputs_raise():
    logits, ids, mask, adv, old, beh, _ = inputs()
    x, a, o, b = logits.float(), adv.float(), old.float(), beh.float()
    with pytest.raises(ValueError, match="is_mode"):
        grpo_loss(x, ids, mask, a, old_logps=o, behavior_logps=b, is_mode="token_clip")
    with pytest.raises(ValueError, match="need old_logps"):
        grpo_loss(x, ids, mask, a, behavior_logps=b, is_mode="sequence_mask")
    with pytest.raises(ValueError, match="at most one"):
        grpo_loss(x, ids, mask, a, old_logps=o, behavior_logps=b, is_ratio=torch.ones(B))
    with pytest.raises(ValueError, match="is_ratio must have shape"):
        grpo_loss(x, ids, mask, a, old_logps=o, is_ratio=torch.ones(B, 2))
    with pytest.raises(ValueError, match="is_ratio must be finite"):
        grpo_loss(x, ids, mask, a, old_logps=o, is_ratio=-torch.ones(B))
    with pytest.raises(TypeError, match="is_ratio"):
        grpo_loss(x, ids, mask, a, old_logps=o, is_ratio=torch.ones(B, dtype=torch.long))
    with pytest.raises(ValueError, match="is_cap_min"):
        grpo_loss(x, ids, mask, a, old_logps=o, behavior_logps=b, is_cap=1.5, is_cap_min=2.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        grpo_loss(x, ids, mask, a, gradient_accumulation_steps=0)
    with pytest.raises(TypeError, match="num_processes"):
        grpo_loss(x, ids, mask, a, num_processes=1.5)
