"""Per-token log-probs op, and hypothesis property tests of the fused loss over shapes and options."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerule import grpo_loss, token_logps
from rerule.kernels.reference import token_logps_reference
from tests.kernels._grpo_cases import assert_close, assert_grad_close, make_inputs, reference


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 1007), (3, 63, 130)], ids=str)
def test_token_logps_values_and_grad(impl, shape, monkeypatch):
    monkeypatch.setenv("RERULE_BLOCK_V", "256")
    B, T, V = shape
    x64 = torch.randn(B, T, V, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).long()
    up = torch.randn(B, T, dtype=torch.float64)

    xr = x64.clone().requires_grad_()
    lp_r, ent_r = token_logps_reference(xr, ids, temperature=0.9)
    lp_r, ent_r = lp_r * mask, ent_r * mask
    (lp_r * up).sum().backward()

    x = x64.float().requires_grad_()
    lp, ent = token_logps(x, ids, mask, temperature=0.9, return_entropy=True, impl=impl)
    (lp * up.float()).sum().backward()
    assert_close(lp, lp_r, 2e-6, 2e-6, "logps")
    assert_close(ent, ent_r.detach(), 2e-5, 2e-5, "entropy")
    assert_close(x.grad, xr.grad, 2e-6, 2e-5, "grad")
    assert (x.grad[mask == 0] == 0).all()


OPTS = st.fixed_dictionaries(
    {
        "loss_type": st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]),
        "importance_sampling_level": st.sampled_from(["token", "sequence"]),
        "beta": st.sampled_from([0.0, 0.04, 0.5]),
        "temperature": st.sampled_from([0.6, 1.0, 1.7]),
        "epsilon_low": st.sampled_from([0.1, 0.2]),
        "epsilon_high": st.sampled_from([0.2, 0.28]),
        "delta": st.sampled_from([None, 1.2, 3.0]),
        "dual_clip": st.sampled_from([None, 1.5, 3.0]),
        "is_cap": st.sampled_from([0.5, 1.0, 2.0]),
        "bias_correction_kl": st.booleans(),
        "is_weight_kl": st.booleans(),
    }
)


def _property(impl, B, T, V, opts, flags, seed):
    old, beh, ref = flags
    inputs = make_inputs(B, T, V, seed=seed, old=old, behavior=beh, ref=ref or opts["beta"] > 0)
    expected = reference(inputs, **opts)
    x = inputs["logits"].clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(x, **kw, **opts, impl=impl, return_entropy=True)
    out.loss.backward()
    assert torch.isfinite(x.grad).all()
    assert abs(out.loss.item() - expected[0].item()) <= 2e-5 * max(1.0, abs(expected[0].item()))
    assert_grad_close(x.grad, expected[4], 2e-5)
    assert_close(out.logps, expected[1], 2e-5, 2e-5, "logps")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), T=st.integers(1, 9), V=st.integers(2, 300), opts=OPTS,
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 10_000))
def test_property_torch(B, T, V, opts, flags, seed):
    _property("torch", B, T, V, opts, flags, seed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(2, 600), opts=OPTS,
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()), seed=st.integers(0, 10_000))
def test_property_triton(B, T, V, opts, flags, seed):
    _property("triton", B, T, V, opts, flags, seed)
