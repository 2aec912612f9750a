"""fused_linear_grpo_loss against the fp64 reference on hidden @ weight.T + bias and against grpo_loss on
explicit logits: loss, logps, entropy, metrics and the gradients of hidden, weight and bias."""

from __future__ import annotations

import math

import pytest
import torch

import rerule.kernels.fused_linear as fl
from rerule import fused_linear_grpo_loss, grpo_loss
from rerule.kernels.options import LossOptions
from rerule.kernels.reference import grpo_loss_reference

OPTION_KEYS = ("temperature", "epsilon_low", "epsilon_high", "delta", "dual_clip", "beta", "loss_type",
               "importance_sampling_level", "is_cap", "bias_correction_kl", "is_weight_kl")


def make_case(B=4, T=9, H=33, V=1007, *, seed=0, dtype=torch.float32, bias=True, mask_p=0.3, masked_row=True,
              old=True, behavior=True, ref=True):
    """Random hidden/weight/bias (logits of std ~2), ids, a mask with an all-masked row, advantages, and
    log-prob inputs near the current policy, so that some ratios clip and some do not."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(H))
    b = 0.5 * torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > mask_p).to(torch.int64)
    if masked_row and B > 1:
        mask[1] = 0
    c = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if b is None else b.to(dtype),
             completion_ids=ids, completion_mask=mask,
             advantages=torch.randn(B, generator=g, dtype=torch.float64).float())
    logits = c["hidden"].double() @ c["weight"].double().T + (0 if b is None else c["bias"].double())
    cur = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    if old:
        c["old_logps"] = cur + 0.3 * torch.randn(B, T, generator=g)
    if behavior:
        c["behavior_logps"] = c.get("old_logps", cur) + 0.7 * torch.randn(B, T, generator=g)
    if ref:
        c["ref_logps"] = cur + 0.5 * torch.randn(B, T, generator=g)
    return c


def _params(case, dtype=None):
    names = ("hidden", "weight") + (("bias",) if case["bias"] is not None else ())
    return [case[n].detach().to(dtype or case[n].dtype).requires_grad_() for n in names]


def _rest(case):
    return {k: v for k, v in case.items() if k not in ("hidden", "weight", "bias")}


def reference(case, upstream, dtype=torch.float64, **opts):
    """Autograd reference on (hidden @ weight.T + bias) in ``dtype``: loss, logps, entropy, metrics, grads."""
    params = _params(case, dtype)
    logits = params[0] @ params[1].T + (params[2] if len(params) > 2 else 0)
    o = LossOptions(**{k: v for k, v in opts.items() if k in OPTION_KEYS})
    d = lambda k: None if case.get(k) is None else case[k].to(torch.float64)
    loss, logp, ent, metrics = grpo_loss_reference(
        logits, case["completion_ids"], case["completion_mask"], case["advantages"].double(),
        d("old_logps"), d("behavior_logps"), d("ref_logps"), o,
        opts.get("max_completion_length"), opts.get("num_items_in_batch"),
    )
    grads = torch.autograd.grad(loss * upstream, params)
    return loss.detach(), logp, ent, metrics, grads


def explicit(case, upstream, **opts):
    """grpo_loss (torch backend) on explicit fp32 logits, differentiated back to hidden/weight/bias."""
    params = _params(case)
    logits = params[0] @ params[1].T + (params[2] if len(params) > 2 else 0)
    out = grpo_loss(logits, **_rest(case), impl="torch", return_entropy=True, **opts)
    return out, torch.autograd.grad(out.loss * upstream, params)


def ours(case, upstream, impl="torch", chunk_size=None, **opts):
    params = _params(case)
    out = fused_linear_grpo_loss(*params[:2], **_rest(case), bias=params[2] if len(params) > 2 else None,
                                 chunk_size=chunk_size, impl=impl, return_entropy=True, **opts)
    return out, torch.autograd.grad(out.loss * upstream, params)


def err(a, b):
    """max |a - b| / max |b| (absolute when b is all zero)."""
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30 if b.abs().max() > 0 else 1.0)).item()


def assert_matches(out, grads, ref, tol, what):
    loss, logp, ent, metrics, ref_grads = ref
    assert abs(out.loss.item() - loss.item()) <= tol * max(abs(loss.item()), 1e-3), (what, "loss", out.loss, loss)
    assert (out.logps.double() - logp).abs().max() <= tol * 10, (what, "logps")
    assert (out.entropy.double() - ent).abs().max() <= tol * 10, (what, "entropy")
    for k, v in metrics.items():
        assert abs(out.metrics[k].item() - v.item()) <= 1e-4, (what, k, out.metrics[k], v)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert err(g, r) <= tol, (what, f"grad_{name}", err(g, r))


# Every loss type at both IS levels, with and without old/behavior/ref, delta, dual clip, temperature.
CASES = [
    dict(),
    dict(loss_type="bnpo", epsilon_high=0.28, _inputs=dict(ref=False)),
    dict(loss_type="dr_grpo", beta=0.04, temperature=0.7, max_completion_length=12),
    dict(loss_type="dapo", num_items_in_batch=37, delta=1.5, dual_clip=3.0, beta=0.1, is_cap=1.5),
    dict(importance_sampling_level="sequence", beta=0.1),
    dict(importance_sampling_level="sequence", loss_type="bnpo", temperature=1.3, _inputs=dict(old=False)),
    dict(importance_sampling_level="sequence", loss_type="dr_grpo", delta=1.2, dual_clip=2.0,
         _inputs=dict(behavior=False, ref=False)),
    dict(importance_sampling_level="sequence", loss_type="dapo", beta=0.05,
         _inputs=dict(old=False, behavior=True)),
    dict(beta=0.0, _inputs=dict(old=False, behavior=False, ref=False)),
    dict(beta=0.1, bias_correction_kl=True, loss_type="bnpo"),
    dict(beta=0.1, bias_correction_kl=True, importance_sampling_level="sequence"),
    dict(beta=0.2, is_weight_kl=True, is_cap=1.5),
]
CASE_IDS = ["grpo-all", "bnpo-noref", "drgrpo-kl-tau", "dapo-delta-dual", "seq-grpo-kl", "seq-bnpo-noold",
            "seq-drgrpo-delta-dual", "seq-dapo-behonly", "grpo-bare", "bnpo-kl-biascorr", "seq-grpo-kl-biascorr",
            "grpo-kl-isweight"]


@pytest.mark.parametrize("opts", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("chunk_size", [None, 5, 1], ids=["chunk-default", "chunk5", "chunk1"])
def test_matches_reference_and_explicit_logits(opts, chunk_size):
    opts = dict(opts)
    case = make_case(**opts.pop("_inputs", {}))
    upstream = torch.tensor(0.37)
    ref = reference(case, upstream, **opts)
    out, grads = ours(case, upstream, chunk_size=chunk_size, **opts)
    assert_matches(out, grads, ref, 2e-5, "vs fp64 reference")
    ex_out, ex_grads = explicit(case, upstream, **opts)
    assert abs(out.loss.item() - ex_out.loss.item()) <= 1e-5 * max(abs(ex_out.loss.item()), 1e-3)
    assert torch.allclose(out.logps, ex_out.logps, atol=2e-5, rtol=0)
    assert torch.allclose(out.entropy, ex_out.entropy, atol=2e-5, rtol=0)
    for k in ex_out.metrics:
        assert torch.allclose(out.metrics[k], ex_out.metrics[k], atol=1e-5), k
    for g, e in zip(grads, ex_grads):
        assert err(g, e) <= 2e-5


@pytest.mark.parametrize("shape", [(1, 1, 7, 5), (2, 63, 16, 300), (3, 4, 64, 2048 + 1)],
                         ids=["B1-T1", "T63", "V2049"])
def test_awkward_shapes(shape):
    B, T, H, V = shape
    case = make_case(B, T, H, V, seed=3, masked_row=B > 2, mask_p=0.2 if B * T > 1 else 0.0)
    opts = dict(beta=0.02, loss_type="bnpo")
    ref = reference(case, torch.tensor(1.0), **opts)
    out, grads = ours(case, torch.tensor(1.0), chunk_size=7, **opts)
    assert_matches(out, grads, ref, 2e-5, shape)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fully_masked_batch(level):
    case = make_case(B=3, T=4, H=8, V=50)
    case["completion_mask"] = torch.zeros(3, 4, dtype=torch.int64)
    out, grads = ours(case, torch.tensor(1.0), chunk_size=2, importance_sampling_level=level)
    ref = reference(case, torch.tensor(1.0), importance_sampling_level=level)
    assert out.loss.item() == 0.0 and ref[0].item() == 0.0
    assert (out.logps == 0).all() and (out.entropy == 0).all()
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_padding_rows_are_never_multiplied(level, monkeypatch):
    """Only rows with mask 1 reach the GEMM; sequence level multiplies them twice (two passes)."""
    seen = []
    orig = fl.chunk_logits

    def spy(head, h_c, out=None):
        seen.append(h_c.shape[0])
        return orig(head, h_c, out)

    monkeypatch.setattr(fl, "chunk_logits", spy)
    case = make_case(B=4, T=10, H=16, V=64, mask_p=0.5)
    n_valid = int((case["completion_mask"] != 0).sum())
    # row 1 is all padding, the others about half
    assert 0 < n_valid <= 30
    ours(case, torch.tensor(1.0), chunk_size=3, importance_sampling_level=level)
    passes = 2 if level == "sequence" else 1
    assert sum(seen) == passes * n_valid
    assert len(seen) == passes * math.ceil(n_valid / 3) and max(seen) <= 3
    seen.clear()
    params = _params(case)
    with torch.no_grad():
        fused_linear_grpo_loss(*params[:2], **_rest(case), bias=params[2], chunk_size=3,
                               importance_sampling_level=level)
    assert sum(seen) == n_valid


def test_frozen_weight_no_bias_and_shifted_hidden():
    """TRL-style hidden[:, :-1] (non-contiguous), a frozen lm_head (PEFT), and no bias."""
    case = make_case(B=3, T=6, H=20, V=97, bias=False)
    full = torch.cat([case["hidden"], torch.randn(3, 1, 20)], dim=1).requires_grad_()
    weight = case["weight"].clone()
    out = fused_linear_grpo_loss(full[:, :-1], weight, **_rest(case), chunk_size=4, beta=0.1)
    out.loss.backward()
    ref = reference(case, torch.tensor(1.0), beta=0.1)
    assert weight.grad is None
    assert err(full.grad[:, :-1], ref[4][0]) <= 2e-5
    assert (full.grad[:, -1] == 0).all()
    assert abs(out.loss.item() - ref[0].item()) <= 2e-5 * abs(ref[0].item())


def test_ambient_autocast_does_not_round_the_logits():
    case = make_case(B=2, T=6, H=24, V=301, seed=2)
    up = torch.tensor(1.0)
    plain, plain_grads = ours(case, up, chunk_size=4, beta=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_grads = ours(case, up, chunk_size=4, beta=0.1)
    assert torch.equal(plain.loss, auto.loss) and torch.equal(plain.logps, auto.logps)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, auto_grads))


def test_rewards_and_group_size_and_backward_once():
    case = make_case(B=4, T=5, H=12, V=40)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    params = _params(case)
    rest = {k: v for k, v in _rest(case).items() if k != "advantages"}
    out = fused_linear_grpo_loss(*params[:2], **rest, bias=params[2], rewards=rewards, group_size=2)
    ex = grpo_loss(params[0] @ params[1].T + params[2], **rest, rewards=rewards, group_size=2)
    assert torch.allclose(out.loss, ex.loss, atol=1e-6)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bf16_inputs_torch_path(level):
    """|ours_bf16 - ref_hi| <= 2 |eager_bf16 - ref_hi| + floor, for loss, logps and all three gradients.

    eager_bf16 is what a bf16 model does: bf16 logits from a bf16 GEMM, autograd through them."""
    case = make_case(B=4, T=16, H=64, V=1000 + 7, dtype=torch.bfloat16, seed=5)
    opts = dict(beta=0.05, importance_sampling_level=level, dual_clip=3.0)
    up = torch.tensor(1.0)
    loss_hi, logp_hi, _, _, grads_hi = reference(case, up, **opts)
    lo_loss, lo_logp, _, _, lo_grads = reference(case, up, dtype=torch.bfloat16, **opts)
    out, grads = ours(case, up, chunk_size=11, **opts)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    e_ours, e_lo = abs(out.loss.item() - loss_hi.item()), abs(lo_loss.item() - loss_hi.item())
    assert e_ours <= 2 * e_lo + 1e-4 * abs(loss_hi.item())
    valid = case["completion_mask"].bool()
    assert (out.logps - logp_hi)[valid].abs().max() <= 2 * (lo_logp - logp_hi)[valid].abs().max() + 1e-4
    for name, g, g_lo, g_hi in zip(("hidden", "weight", "bias"), grads, lo_grads, grads_hi):
        floor = g_hi.abs().max().item() * 2.0**-8
        e_ours, e_lo = (g.double() - g_hi).abs().max().item(), (g_lo.double() - g_hi).abs().max().item()
        assert e_ours <= 2 * e_lo + floor, (name, e_ours, e_lo, floor)


def test_grad_weight_accumulates_in_fp32_over_many_chunks():
    """300 one-row chunks in bf16: grad_W stays within one bf16 rounding of the fp64 value, while summing
    the same per-chunk contributions in bf16 (Liger's accumulation) is visibly worse."""
    case = make_case(B=6, T=50, H=16, V=64, dtype=torch.bfloat16, seed=7, mask_p=0.0, masked_row=False)
    up = torch.tensor(1.0)
    _, _, _, _, grads_hi = reference(case, up)
    out, grads = ours(case, up, chunk_size=1)
    g_hi = grads_hi[1]
    # One bf16 rounding of the exact value: |err| <= 2^-9 |g| (plus fp32 noise).
    assert ((grads[1].double() - g_hi).abs() <= g_hi.abs() * 2.0**-8 + 1e-6).all()
    # The same sum accumulated in bf16, chunk by chunk, from the exact per-row gradients.
    h = case["hidden"].double().reshape(-1, 16)
    logits = (h @ case["weight"].double().T + case["bias"].double()).requires_grad_()
    loss = grpo_loss_reference(logits.view(6, 50, 64), case["completion_ids"], case["completion_mask"],
                               case["advantages"].double(), case["old_logps"].double(),
                               case["behavior_logps"].double(), case["ref_logps"].double())[0]
    (dlogits,) = torch.autograd.grad(loss, logits)
    acc = torch.zeros(64, 16, dtype=torch.bfloat16)
    for i in range(h.shape[0]):
        acc = (acc.double() + torch.outer(dlogits[i], h[i])).to(torch.bfloat16)
    e_bf16 = (acc.double() - g_hi).abs().max().item()
    e_ours = (grads[1].double() - g_hi).abs().max().item()
    assert e_bf16 > 4 * e_ours, (e_bf16, e_ours)


@pytest.mark.parametrize("addmm_acc", [True, False], ids=["addmm-fp32-out", "blocked-add"])
def test_mixed_precision_gemm_branch_emulated(addmm_acc, monkeypatch):
    """The CUDA bf16 branch (mm with out_dtype=fp32, dx rounded to bf16 for the gradient GEMMs) has no
    CPU kernel; emulate those two torch ops exactly (bf16 operands, fp32 products) to run its plumbing."""
    orig_mm = torch.mm

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return orig_mm(a, b) if out is None else orig_mm(a, b, out=out)
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        return orig_mm(a.float(), b.float())

    def addmm(c, a, b, *, out_dtype, out):
        assert out is c and c.dtype == torch.float32 and a.dtype == torch.bfloat16
        return out.add_(orig_mm(a.float(), b.float()))

    case = make_case(B=3, T=8, H=32, V=1000 + 7, dtype=torch.bfloat16, seed=13)
    up = torch.tensor(1.0)
    loss_hi, logp_hi, _, _, grads_hi = reference(case, up, beta=0.05)
    plain, plain_grads = ours(case, up, chunk_size=5, beta=0.05)
    monkeypatch.setattr(fl, "_mixed_mm_support", lambda device: (True, addmm_acc))
    monkeypatch.setattr(fl, "_GPU_GRADW_BLOCK", 100)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    out, grads = ours(case, up, chunk_size=5, beta=0.05)
    monkeypatch.undo()
    # fp32 logits in both branches: the same loss and logps as the all-fp32 CPU branch
    assert abs(out.loss.item() - plain.loss.item()) <= 1e-6 * abs(loss_hi.item())
    assert torch.allclose(out.logps, plain.logps, atol=1e-6, rtol=0)
    # gradients: only the bf16 rounding of dlogits before the two gradient GEMMs is added
    for g, g_plain, g_hi in zip(grads, plain_grads, grads_hi):
        e_ours, e_plain = (g.double() - g_hi).abs().max().item(), (g_plain.double() - g_hi).abs().max().item()
        assert g.dtype == torch.bfloat16 and e_ours <= 2 * e_plain + g_hi.abs().max().item() * 2.0**-7


TRITON_CASES = [
    dict(beta=0.1, delta=1.4, dual_clip=3.0, temperature=0.8, bias_correction_kl=True),
    dict(importance_sampling_level="sequence", beta=0.1, loss_type="bnpo"),
]


@pytest.mark.parametrize("opts", TRITON_CASES, ids=["token", "sequence"])
def test_triton_interpreter(opts):
    case = make_case(B=2, T=5, H=33, V=1000 + 7, seed=11, masked_row=False)
    case["completion_mask"][1, 2:] = 0
    up = torch.tensor(0.5)
    ref = reference(case, up, **opts)
    out, grads = ours(case, up, impl="triton", chunk_size=3, **opts)
    assert_matches(out, grads, ref, 2e-5, "triton")


def _bad(**kw):
    case = make_case(B=2, T=3, H=8, V=20, old=False, behavior=False, ref=False)
    args = dict(hidden=case["hidden"], weight=case["weight"], completion_ids=case["completion_ids"],
                completion_mask=case["completion_mask"], advantages=case["advantages"], bias=case["bias"])
    args.update(kw)
    return fused_linear_grpo_loss(**args)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(weight=torch.randn(20, 9)), ValueError, "weight must be \\[V, H\\] with H = hidden.shape\\[-1\\] = 8"),
    (dict(bias=torch.randn(21)), ValueError, "bias must have shape"),
    (dict(hidden=torch.randn(2, 3, 8, dtype=torch.bfloat16)), TypeError,
     "weight dtype torch.float32 differs from hidden"),
    (dict(bias=torch.randn(20, dtype=torch.float64)), TypeError, "bias dtype"),
    (dict(hidden=torch.randn(6, 8)), ValueError, "hidden must have 3 dims"),
    (dict(weight=torch.ones(20, 8, dtype=torch.int64)), TypeError, "weight must be a floating-point"),
    (dict(completion_ids=torch.full((2, 3), 20)), ValueError, "completion_ids must lie in \\[0, 20\\)"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an int"),
    (dict(impl="bogus"), ValueError, "impl must be one of"),
    (dict(advantages=torch.randn(3)), ValueError, "advantages must have shape"),
    (dict(beta=0.1), ValueError, "ref_logps"),
    (dict(hidden=torch.full((2, 3, 8), float("nan"))), ValueError, "hidden/weight/bias"),
], ids=["H-mismatch", "bias-shape", "dtype-mix", "bias-dtype", "hidden-2d", "weight-int", "ids-range",
        "chunk-0", "chunk-float", "impl", "adv-shape", "beta-no-ref", "nan-hidden"])
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**kw)


def test_shared_keywords_match_grpo_loss():
    """Both public losses hand the same keywords to one checker (rerule.loss.check_loss_inputs): the names and
    defaults must agree, or one of them would check something the other does not."""
    import inspect

    from rerule.loss import LOSS_ARGUMENTS

    a = inspect.signature(grpo_loss).parameters
    b = inspect.signature(fused_linear_grpo_loss).parameters
    shared = {n for n in a if a[n].kind is inspect.Parameter.KEYWORD_ONLY} - {"inplace", "return_entropy"}
    assert shared == set(LOSS_ARGUMENTS)
    for name in LOSS_ARGUMENTS:
        assert b[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert a[name].default == b[name].default, name
