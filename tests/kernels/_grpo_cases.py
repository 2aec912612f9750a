"""Shared builders for the GRPO loss tests: random inputs at awkward shapes, and the comparison."""

from __future__ import annotations

import torch

from rerule.kernels.options import LossOptions
from rerule.kernels.reference import grpo_loss_reference

OPTION_KEYS = ("temperature", "epsilon_low", "epsilon_high", "delta", "dual_clip", "beta", "loss_type",
               "importance_sampling_level", "is_cap", "bias_correction_kl", "is_weight_kl")


def make_inputs(B, T, V, *, seed=0, scale=2.0, mask_p=0.25, off_policy=0.3, dtype=torch.float32,
                old=True, behavior=True, ref=True, edit=None):
    """Random logits/ids/mask/advantages and log-prob inputs near the current policy (so that
    some ratios clip and some do not)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    if edit is not None:
        # edit(logits, ids) in place before the log-prob inputs are derived from the logits
        edit(logits, ids)
    mask = (torch.rand(B, T, generator=g) > mask_p).to(torch.int64)
    adv = torch.randn(B, generator=g, dtype=torch.float64).float()
    cur = torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()
    out = dict(logits=logits, completion_ids=ids, completion_mask=mask, advantages=adv)
    if old:
        out["old_logps"] = cur + off_policy * torch.randn(B, T, generator=g)
    if behavior:
        base = out.get("old_logps", cur)
        out["behavior_logps"] = base + 0.7 * torch.randn(B, T, generator=g)
    if ref:
        out["ref_logps"] = (cur + 0.5 * torch.randn(B, T, generator=g)).clamp(max=0.0)  # log-probs are <= 0
    return out


def reference(inputs, dtype=torch.float64, **opts):
    """The spec's loss, logps, entropy, metrics and d loss / d logits, computed in ``dtype``: fp64 is
    the truth; fp32 is what eager torch makes of the same input (the yardstick for a kernel's error)."""
    o = LossOptions(**{k: v for k, v in opts.items() if k in OPTION_KEYS})
    x = inputs["logits"].detach().to(dtype).requires_grad_()
    d = lambda k: None if inputs.get(k) is None else inputs[k].to(dtype)
    loss, logp, ent, metrics = grpo_loss_reference(
        x, inputs["completion_ids"], inputs["completion_mask"], inputs["advantages"].to(dtype),
        d("old_logps"), d("behavior_logps"), d("ref_logps"), o,
        opts.get("max_completion_length"), opts.get("num_items_in_batch"),
    )
    loss.backward()
    return loss.detach(), logp, ent, metrics, x.grad


def assert_close(a, b, atol, rtol, what=""):
    """Element-wise |a - b| <= atol + rtol * |b| (never normalized by a whole tensor's max)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    bad = (a - b).abs() > atol + rtol * b.abs()
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {b.numel()} elements off, first at {i}: {a[tuple(i)].item()!r} vs "
            f"{b[tuple(i)].item()!r} (atol={atol}, rtol={rtol})"
        )


def scaled_err(a, r, scale=1.0, size=None):
    """max_i |a_i - r_i| / (1 + size_i) of a against the truth r after multiplying both by ``scale``;
    size = |r| by default (element-wise: a 3e-4 error at logp -6.9 counts as 4e-5, not as 3e-8)."""
    a, r = torch.as_tensor(a).double() * scale, torch.as_tensor(r).double() * scale
    if r.numel() == 0:
        return 0.0
    size = r.abs() if size is None else size.double() * scale
    return ((a - r).abs() / (1.0 + size)).max().item()


def assert_like_eager(ours, eager, truth, what="", scale=1.0, floor=1e-6, factor=2.0):
    """The kernel rule: error(ours) <= factor * error(eager torch, same input, same dtype) + floor,
    both measured by ``scaled_err`` against the fp64 truth."""
    e_ours, e_eager = scaled_err(ours, truth, scale), scaled_err(eager, truth, scale)
    assert e_ours <= factor * e_eager + floor, f"{what}: error {e_ours:.3g} vs eager {e_eager:.3g}"


def assert_grad_close(a, b, tol, what="grad", tokens=None):
    """Gradients element-wise at atol = rtol = ``tol`` after multiplying by the token count (a GRPO
    gradient element is O(1 / tokens); times the count it is O(1), so a fixed atol means the same
    everywhere)."""
    n = tokens if tokens is not None else (a.shape[0] * a.shape[1] if a.dim() >= 2 else 1)
    assert_close(a.double() * n, b.double() * n, tol, tol, what)


def huge_logit_case(seed=11, B=2, T=8, V=257):
    """+-1e4 logits, several at the row max, and old log-probs within 0.05 of the exact ones."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1e4).float()
    x[..., :3] = 1e4
    ids = torch.randint(3, V, (B, T), generator=g)
    truth = torch.log_softmax(x.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = (truth + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    return x, ids, truth, old


def near_reference_kl_case(level: str):
    """(inputs, options) where ref = logp + d with small dyadic d and logp = -100 exactly (max 0, the label
    100 below, the rest further, so the row sum is 1 in fp32): every input is exact, the advantages are 0,
    and the loss and gradient are the k3 KL's alone."""
    B, T, V = 2, 16, 9
    logits = torch.full((B, T, V), -300.0)
    logits[..., 0] = 0.0
    logits[..., 5] = -100.0
    ids = torch.full((B, T), 5)
    k = torch.tensor([1.0, -1, 2, -2, 3, -3, 5, -5, 8, -8, 13, -13, 21, -21, 34, -34])
    ref = (-100.0 + k * 2.0**-12).expand(B, T).contiguous()
    inputs = dict(logits=logits, completion_ids=ids, completion_mask=torch.ones(B, T),
                  advantages=torch.zeros(B), ref_logps=ref)
    return inputs, dict(beta=1.0, importance_sampling_level=level)


def check_near_reference_kl(loss, grad, truth, eager, tol=2e-6):
    """The label's gradient (= the per-token KL gradient) and the loss within ``tol`` relative of the fp64
    spec, where eager fp32's textbook exp(d) - d - 1 / 1 - exp(d) is off by more than 1e-5."""
    rel = lambda a, r: ((a.double() - r).abs() / r.abs().clamp(min=1e-300)).max().item()
    assert rel(eager[4][..., 5], truth[4][..., 5]) > 1e-5  # what the textbook form loses
    assert rel(grad[..., 5], truth[4][..., 5]) <= tol, rel(grad[..., 5], truth[4][..., 5])
    assert rel(loss.detach(), truth[0]) <= tol, (rel(loss.detach(), truth[0]), rel(eager[0], truth[0]))
