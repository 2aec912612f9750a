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
        out["ref_logps"] = cur + 0.5 * torch.randn(B, T, generator=g)
    return out


def reference(inputs, **opts):
    """fp64 reference loss, logps, entropy, metrics and d loss / d logits."""
    o = LossOptions(**{k: v for k, v in opts.items() if k in OPTION_KEYS})
    x = inputs["logits"].detach().double().requires_grad_()
    d = lambda k: None if inputs.get(k) is None else inputs[k].double()
    loss, logp, ent, metrics = grpo_loss_reference(
        x, inputs["completion_ids"], inputs["completion_mask"], inputs["advantages"].double(),
        d("old_logps"), d("behavior_logps"), d("ref_logps"), o,
        opts.get("max_completion_length"), opts.get("num_items_in_batch"),
    )
    loss.backward()
    return loss.detach(), logp, ent, metrics, x.grad


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-8)).item() if b.numel() else 0.0
