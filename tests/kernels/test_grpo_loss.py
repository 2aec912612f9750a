"""Fused GRPO loss (torch backend and Triton under the interpreter) against the fp64 spec."""

import zlib

import pytest
import torch

import rerule.kernels.triton_grpo as triton_grpo
from rerule import grpo_loss
from rerule.kernels.grpo_loss import backend_module
from rerule.kernels.options import LossOptions
from tests.kernels._grpo_cases import (
    assert_close,
    assert_like_eager,
    check_near_reference_kl,
    huge_logit_case,
    make_inputs,
    near_reference_kl_case,
    reference,
)

# (name, options, which log-prob inputs exist)
CASES = [
    ("grpo-token-plain", dict(), dict(old=False, behavior=False, ref=False)),
    ("grpo-token-all", dict(beta=0.04), {}),
    ("grpo-token-onpolicy-behavior", dict(is_cap=1.5), dict(old=False, ref=False)),
    ("grpo-token-asym-cap1", dict(epsilon_low=0.1, epsilon_high=0.28, is_cap=1.0, beta=0.02), {}),
    ("bnpo-token-delta", dict(loss_type="bnpo", delta=1.1, beta=0.1), {}),
    ("dr_grpo-token-dual", dict(loss_type="dr_grpo", dual_clip=1.5, max_completion_length=12), {}),
    ("dapo-token-items-temp", dict(loss_type="dapo", num_items_in_batch=37, temperature=0.7), {}),
    ("dapo-token-beta-noold", dict(loss_type="dapo", beta=0.3), dict(old=False)),
    ("grpo-seq", dict(importance_sampling_level="sequence", beta=0.05), {}),
    ("bnpo-seq-cap", dict(loss_type="bnpo", importance_sampling_level="sequence", is_cap=1.2), dict(ref=False)),
    ("dr_grpo-seq-delta-dual", dict(loss_type="dr_grpo", importance_sampling_level="sequence", delta=1.05,
                                    dual_clip=1.2, beta=0.01), {}),
    ("dapo-seq-temp", dict(loss_type="dapo", importance_sampling_level="sequence", temperature=1.3), {}),
    ("grpo-seq-plain", dict(importance_sampling_level="sequence"), dict(old=False, behavior=False, ref=False)),
    ("bnpo-token-klis", dict(loss_type="bnpo", beta=0.2, bias_correction_kl=True, delta=1.2), {}),
    ("grpo-token-klis-noold", dict(beta=0.3, bias_correction_kl=True), dict(old=False)),
    ("dapo-seq-klis", dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.2,
                           bias_correction_kl=True), {}),
    ("grpo-token-wkl", dict(beta=0.3, is_weight_kl=True, is_cap=1.5), {}),
    ("bnpo-token-wkl-klis-noold", dict(loss_type="bnpo", beta=0.3, is_weight_kl=True, bias_correction_kl=True),
     dict(old=False)),
    ("grpo-seq-wkl", dict(importance_sampling_level="sequence", beta=0.2, is_weight_kl=True), {}),
    ("dapo-token-wkl-nobeh", dict(loss_type="dapo", beta=0.2, is_weight_kl=True), dict(behavior=False)),
]
TOL = 2e-5


def _run(inputs, impl, inplace=False, return_entropy=True, **opts):
    x = inputs["logits"].clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(x, **kw, **opts, impl=impl, inplace=inplace, return_entropy=return_entropy)
    out.loss.backward()
    return out, x


def _check(out, grad, ref, eager=None, tol=TOL):
    """Element-wise against the fp64 spec; with ``eager`` (the spec in fp32 on the same input) also
    the kernel rule: no output's error above 2x eager fp32's + 1e-6."""
    loss_r, logp_r, ent_r, met_r, grad_r = ref
    assert torch.isfinite(grad).all()
    n = grad.shape[0] * grad.shape[1]  # gradients are O(1 / tokens): compare them times the token count
    assert_close(out.loss.detach(), loss_r, tol, tol, "loss")
    assert_close(out.logps, logp_r, tol, tol, "logps")
    assert_close(out.entropy, ent_r, tol, tol, "entropy")
    assert_close(grad * n, grad_r * n, tol, tol, "grad")
    for k, v in met_r.items():
        assert abs(out.metrics[k].item() - v.item()) <= tol * max(1.0, abs(v.item())), k
    if eager is not None:
        for what, o_, e_, r_, sc in (("loss", out.loss.detach(), eager[0], loss_r, 1.0),
                                     ("logps", out.logps, eager[1], logp_r, 1.0),
                                     ("entropy", out.entropy, eager[2], ent_r, 1.0),
                                     ("grad", grad, eager[4], grad_r, float(n))):
            assert_like_eager(o_, e_, r_, what, scale=sc)


@pytest.fixture
def poisoned(monkeypatch):
    """Triton outputs start as NaN: a row or element the kernel forgets to write fails the test."""
    monkeypatch.setattr(
        triton_grpo, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )
    monkeypatch.setenv("RERULE_BLOCK_V", "256")  # V=1007: three full vocab tiles and a partial one


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("name,opts,which", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(impl, name, opts, which, poisoned):
    inputs = make_inputs(3, 7, 1007, seed=zlib.crc32(name.encode()) % 1000, **which)
    ref = reference(inputs, **opts)
    out, x = _run(inputs, impl, **opts)
    _check(out, x.grad, ref, reference(inputs, torch.float32, **opts))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_inplace_writes_grad_into_logits(impl, level, poisoned):
    inputs = make_inputs(2, 5, 1007, seed=3)
    opts = dict(beta=0.1, importance_sampling_level=level)
    ref = reference(inputs, **opts)
    x = inputs["logits"].clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(x, **kw, **opts, impl=impl, inplace=True, return_entropy=True)
    out.loss.backward()
    _check(out, x.grad, ref)
    # the opt-in mode really reuses the caller's buffer: it now holds the gradient (autograd copies it
    # into .grad only because x is a leaf; a non-leaf's buffer flows on to the producer's backward)
    assert torch.equal(x.detach(), x.grad)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_default_never_touches_logits(impl):
    inputs = make_inputs(2, 4, 300, seed=4)
    before = inputs["logits"].clone()
    _run(inputs, impl, beta=0.1)
    assert torch.equal(inputs["logits"], before)


SHAPES = [(1, 1, 5), (1, 63, 1007), (2, 3, 2), (4, 2, 1000 + 7)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in SHAPES])
def test_awkward_shapes(impl, shape, poisoned):
    inputs = make_inputs(*shape, seed=sum(shape))
    opts = dict(beta=0.05, dual_clip=2.0)
    ref = reference(inputs, **opts)
    out, x = _run(inputs, impl, **opts)
    _check(out, x.grad, ref, reference(inputs, torch.float32, **opts))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_rows_and_fully_masked_batch(impl, level, poisoned):
    inputs = make_inputs(3, 6, 257, seed=5)
    inputs["completion_mask"][1] = 0
    # padding may hold anything: garbage there must not leak into the loss or the gradient
    inputs["logits"][1] = float("nan")
    inputs["old_logps"][1] = float("inf")
    opts = dict(beta=0.1, importance_sampling_level=level)
    clean = dict(inputs, logits=inputs["logits"].nan_to_num(0.0))
    ref = reference(clean, **opts)
    out, x = _run(inputs, impl, **opts)
    _check(out, x.grad, ref)
    assert (x.grad[1] == 0).all() and (out.logps[1] == 0).all()

    inputs["completion_mask"].zero_()
    out, x = _run(inputs, impl, **opts)
    assert out.loss.item() == 0.0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_extreme_logits(impl, poisoned):
    def edit(x, ids):
        x[0, 0, :500] = 1e4
        x[0, 1, :] = -1e4
        x[1, :, 700:] = float("-inf")
        ids[1] %= 700  # chosen tokens stay finite

    inputs = make_inputs(2, 5, 1007, seed=6, edit=edit)
    ref = reference(inputs, beta=0.1)
    out, xg = _run(inputs, impl, beta=0.1)
    # logps near -2e4 carry fp32's own rounding (ulp 2e-3): the element-wise bound is eager's
    eager = reference(inputs, torch.float32, beta=0.1)
    n = 2 * 5
    for what, o_, e_, r_, sc in (("loss", out.loss.detach(), eager[0], ref[0], 1.0),
                                 ("logps", out.logps, eager[1], ref[1], 1.0),
                                 ("entropy", out.entropy, eager[2], ref[2], 1.0),
                                 ("grad", xg.grad, eager[4], ref[4], float(n))):
        assert_like_eager(o_, e_, r_, what, scale=sc)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_selected_token_at_minus_inf_is_an_error(impl):
    inputs = make_inputs(2, 3, 64, seed=7)
    inputs["logits"][0, 1, inputs["completion_ids"][0, 1]] = float("-inf")
    with pytest.raises(ValueError, match="logits"):
        _run(inputs, impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_an_error(impl, bad):
    inputs = make_inputs(2, 3, 64, seed=8)
    inputs["logits"][1, 2, 5] = bad
    inputs["completion_mask"][1, 2] = 1
    with pytest.raises(ValueError, match="non-finite"):
        _run(inputs, impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bf16_logits_tolerance_rule(impl):
    """|ours_bf16 - ref_fp64| <= 2 |eager_bf16 - ref_fp64| + floor (docs/kernels.md, "How the tests judge accuracy")."""
    inputs = make_inputs(2, 6, 1007, seed=9, dtype=torch.bfloat16)
    opts = dict(beta=0.05)
    loss_r, logp_r, _, _, grad_r = reference(inputs, **opts)
    out, x = _run(inputs, impl, **opts)
    # eager bf16: autograd log_softmax in bf16
    xe = inputs["logits"].clone().requires_grad_()
    lp = torch.log_softmax(xe, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    eager_err_lp = (lp.double() * inputs["completion_mask"] - logp_r).abs().max().item()
    assert (out.logps.double() - logp_r).abs().max().item() <= 2 * eager_err_lp + 1e-6
    assert_close(out.loss.detach(), loss_r, 1e-5, 1e-4, "loss")
    assert x.grad.dtype == torch.bfloat16
    # the gradient is rounded once to bf16, element by element: at most 2^-8 relative when rounded to
    # nearest (torch, compiled Triton), 2^-7 when truncated (the Triton interpreter truncates)
    n = 2 * 6
    assert_close(x.grad.double() * n, grad_r * n, 1e-6, 2.0**-8 if impl == "torch" else 2.0**-7, "grad")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_strided_logits_view_and_upstream_scale(impl):
    """TRL slices logits[:, :-1]: a view with a contiguous vocab dim runs without a copy."""
    inputs = make_inputs(2, 5, 301, seed=10)
    full = torch.cat([inputs["logits"], torch.randn(2, 1, 301)], dim=1)
    ref = reference(inputs, beta=0.1)
    xf = full.clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(xf[:, :-1], **kw, beta=0.1, impl=impl)
    (3.0 * out.loss).backward()
    assert_close(xf.grad[:, :-1] * 10, 3.0 * ref[4] * 10, TOL, TOL, "grad")
    assert (xf.grad[:, -1] == 0).all()
    with pytest.raises(RuntimeError):
        out.loss.backward()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_no_grad_forward(impl):
    inputs = make_inputs(2, 4, 100, seed=11)
    ref = reference(inputs, beta=0.1)
    out = grpo_loss(**inputs, beta=0.1, impl=impl)
    assert not out.loss.requires_grad
    assert_close(out.loss, ref[0], TOL, TOL, "loss")


def test_rewards_path_equals_advantages_path():
    from rerule import group_advantages

    inputs = make_inputs(4, 3, 50, seed=12)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    kw = {k: v for k, v in inputs.items() if k != "advantages"}
    a = grpo_loss(**kw, rewards=rewards, group_size=2, scale_rewards="batch")
    b = grpo_loss(**kw, advantages=group_advantages(rewards, 2, "batch"))
    assert torch.equal(a.loss, b.loss)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(1, 2, 10, seed=13)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grpo_loss(**inputs, impl="triton")


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_is_weight_kl_bounds_the_kl_gradient_of_replayed_tokens(impl):
    """A replayed token the policy has moved away from (logp << ref = mu): k3's gradient
    beta * (1 - exp(ref - logp)) explodes; weighted by w = min(pi/mu, cap) it stays O(beta)."""
    V = 64
    logits = torch.zeros(1, 1, V)
    logits[0, 0, 1:] = 30.0  # token 0 has logp ~ -34
    ids = torch.zeros(1, 1, dtype=torch.long)
    mu = torch.full((1, 1), -2.0)
    kw = dict(advantages=torch.zeros(1), behavior_logps=mu, ref_logps=mu, beta=0.01, impl=impl)
    grads = {}
    for flag in (False, True):
        x = logits.clone().requires_grad_()
        grpo_loss(x, ids, torch.ones(1, 1), is_weight_kl=flag, **kw).loss.backward()
        grads[flag] = x.grad.abs().max().item()
    assert grads[False] > 1e10 and grads[True] < 0.05


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_backward_scales_in_fp32(impl):
    """(loss / 3).backward() on bf16 logits: the stored bf16 gradient times fp32(1/3), rounded once; a
    bf16-rounded scalar (0.33398) would give other bits."""
    inputs = make_inputs(2, 3, 257, seed=21, dtype=torch.bfloat16)
    grads = []
    for scale in (None, 3.0):
        x = inputs["logits"].clone().requires_grad_()
        kw = {k: v for k, v in inputs.items() if k != "logits"}
        out = grpo_loss(x, **kw, beta=0.1, impl=impl)
        (out.loss if scale is None else out.loss / scale).backward()
        grads.append(x.grad)
    expected = (grads[0].float() * (torch.tensor(1.0) / 3.0)).to(torch.bfloat16)
    assert torch.equal(grads[1], expected)
    assert not torch.equal(grads[1], grads[0] * torch.tensor(1 / 3.0).to(torch.bfloat16))


def test_backward_with_unit_upstream_skips_the_scale_pass(monkeypatch):
    """loss.backward() (upstream 1) leaves the stored gradient as it is: no pass over [B, T, V]."""
    from rerule.kernels import grpo_loss as gl

    t = torch.randn(4, 5, dtype=torch.bfloat16)
    before = t.clone()
    calls = []
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, *a, **k: calls.append(1))
    assert gl.scale_grad_(t, torch.tensor(1.0)) is t and torch.equal(t, before) and not calls
    monkeypatch.undo()
    gl.scale_grad_(t, torch.tensor(0.5))
    assert torch.equal(t, (before.float() * 0.5).to(torch.bfloat16))
    f = torch.randn(3, 7)[:, :5]  # non-contiguous fp32 and bf16 views scale too
    g = f.clone()
    gl.scale_grad_(f, torch.tensor(2.0))
    assert torch.equal(f, g * 2)
    h = torch.randn(2, 4, 6, dtype=torch.bfloat16)[:, :3]
    hh = h.clone()
    gl.scale_grad_(h, torch.tensor(1 / 3.0))
    assert torch.equal(h, (hh.float() * torch.tensor(1 / 3.0)).to(torch.bfloat16))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_single_confident_token_keeps_one_minus_p(impl, level):
    """p_label = 1 - 3.7e-13: 1 - p cancels to 0 in fp32 (eager's gradient at the label is 0); from the
    sum of the other terms it keeps its digits, in the fused sweep and in the separate gradient kernel."""
    logits = torch.zeros(1, 2, 5)
    logits[0, :, 0] = 30.0
    ids = torch.zeros(1, 2, dtype=torch.long)
    inputs = dict(logits=logits, completion_ids=ids, completion_mask=torch.ones(1, 2),
                  advantages=torch.ones(1), old_logps=torch.full((1, 2), -0.05))
    opts = dict(importance_sampling_level=level, epsilon_high=10.0)
    ref = reference(inputs, **opts)
    out, x = _run(inputs, impl, return_entropy=False, **opts)
    # the fp64 spec itself loses 1 - p to ~3e-4 relative here (1 - exp(-3.7e-13) in fp64); a softmax
    # gradient row sums to zero, so the label's exact value is minus the sum of the other entries
    label_grad, label_ref = x.grad[0, :, 0].double(), -ref[4][0, :, 1:].sum(-1)
    assert (label_ref.abs() > 1e-14).all()
    assert ((label_grad - label_ref).abs() <= 1e-5 * label_ref.abs()).all(), (label_grad, label_ref)
    assert_close(out.logps, ref[1], 1e-12, 1e-5, "logps")  # -3.7e-13, not 0 or -6e-8


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_logp_pair_carries_the_digits_fp32_rounds_off(impl):
    """logp + logp_lo is the log-prob of the fp32 logits to ~1e-6, where the correctly rounded fp32
    logp alone is up to half an ulp of 2e4 (~1e-3) off."""
    x, ids, truth, _ = huge_logit_case()
    backend = backend_module(impl)
    mask = torch.ones(ids.shape, dtype=torch.int32)
    logp, stats, _, _, _ = backend.grpo_fwd(x, ids, mask, None, None, None, None, None, LossOptions(), False,
                                            False, False, False)
    pair = logp.double() + backend.logp_lo(stats).double()
    assert (logp.double() - truth).abs().max() > 1e-4  # the input is one where the low part matters
    assert (pair - truth).abs().max() <= 2e-6, (pair - truth).abs().max()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_huge_logit_loss_is_exact_where_eager_fp32_is_not(impl, level):
    """At +-1e4 logits the loss depends on logp - old (O(1)); from the fp32 logps alone it would carry
    their ~5e-4 rounding (eager fp32 does, and so did the kernels before the logp pair)."""
    x, ids, truth, old = huge_logit_case(seed=12)
    inputs = dict(logits=x, completion_ids=ids, completion_mask=torch.ones(ids.shape),
                  advantages=torch.tensor([1.0, -0.7]), old_logps=old, ref_logps=(truth + 0.1).float())
    opts = dict(importance_sampling_level=level, beta=0.3, epsilon_low=0.9, epsilon_high=10.0)
    ref = reference(inputs, **opts)
    eager = reference(inputs, torch.float32, **opts)
    out, xg = _run(inputs, impl, return_entropy=False, **opts)
    err = abs(out.loss.item() - ref[0].item())
    assert abs(eager[0].item() - ref[0].item()) > 1e-5  # eager's error: what the test would miss
    assert err <= 1e-6 * (1 + abs(ref[0].item())), (err, abs(eager[0].item() - ref[0].item()))
    assert_like_eager(xg.grad, eager[4], ref[4], "grad", scale=float(ids.numel()))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_near_the_reference_keeps_its_digits(impl, level):
    """ref = logp + d with small d: exp(d) - d - 1 ~ d^2 / 2 and its gradient 1 - exp(d) ~ -d cancel in fp32
    (eager's rounding of exp(d) is up to 2.5e-4 of 1 - exp(d) at d = 2.4e-4); from the series of
    exp(d) - 1 - d they keep their digits (``near_reference_kl_case``: every input exact)."""
    inputs, opts = near_reference_kl_case(level)
    truth, eager = reference(inputs, **opts), reference(inputs, torch.float32, **opts)
    out, x = _run(inputs, impl, return_entropy=False, **opts)
    check_near_reference_kl(out.loss, x.grad, truth, eager)
