"""The spec: the GRPO loss of docs/loss.md in plain torch autograd.

This file is the definition every backend (torch-chunked, Triton, CUDA) must match.
It holds whole [B, T, V] tensors in the compute dtype and is written for clarity,
not memory. It computes in fp32, or in fp64 when given fp64 inputs (for gradcheck).

Per token (masked tokens contribute nothing)::

    logp      = log_softmax(logits / tau)[completion_id]
    log_ratio = logp - old                     (token)   |  masked mean_t(logp - old)  (sequence)
    ratio     = exp(log_ratio); if delta: ratio = min(ratio, delta)
    clipped   = clamp(exp(log_ratio), 1 - eps_low, 1 + eps_high)
    surrogate = min(ratio * A, clipped * A);  dual clip: for A < 0, max(surrogate, c * A)
    w         = min(exp(old - behavior), is_cap)   (detached; 1 without behavior; the default is_mode)
                TRL's vLLM modes: d = (old - behavior) per token (token_*) or summed over the
                sequence (sequence_*), rho = exp(d); *_truncate: clamp(rho, is_cap_min, is_cap),
                *_mask: rho outside [is_cap_min, is_cap] -> 0; or w = is_ratio as given
    kl        = exp(ref - logp) - (ref - logp) - 1        (x exp(log_ratio) with bias_correction_kl)
    loss_tok  = -(w * surrogate) + beta * kl               (w * beta * kl with is_weight_kl)

Reductions: grpo (per-sequence mean, then batch mean), bnpo (token mean), dr_grpo
(sum / (B * max_completion_length)), dapo (sum / num_items_in_batch).
Masked positions report logp = 0 and entropy = 0. Metrics are means over unmasked tokens, except
clip_ratio_low / high at sequence level: means over the B sequences (TRL's convention).
"""

from __future__ import annotations

import torch

from .options import ADV_SCALES, LossOptions


def group_advantages_reference(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """(r - mean_G(r)) / (std(r) + eps), std unbiased over the group ("group") or batch ("batch")."""
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.to(dtype).reshape(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.to(dtype).std() + eps)
    return centered.reshape(-1)


def reduce_tokens(
    loss_tok: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce [B, T] per-token losses to a scalar with TRL's normalizers."""
    mask = mask.to(loss_tok.dtype)
    masked = loss_tok * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = loss_tok.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (loss_tok.shape[0] * length)
    if loss_type == "dapo":
        items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        return masked.sum() / items.clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def token_logps_reference(
    logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of [B, T, V] logits (differentiable, compute dtype)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(dtype) / temperature
    logprobs = torch.log_softmax(x, dim=-1)
    logp = logprobs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    probs = logprobs.exp()
    entropy = -(probs * torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)
    return logp, entropy


def importance_weight_reference(logp, old, valid, behavior_logps, is_ratio, is_mode: str, is_cap_min, is_cap: float):
    """The detached importance weight w [B, T] and where it was truncated or masked (``outside``):
    1 without behavior log-probs; ``is_ratio`` as given; else rho = exp(old - behavior) per token (or
    its product over the sequence), clamped to [is_cap_min, is_cap] or zeroed outside it (``*_mask``)."""
    dtype = logp.dtype
    lo = -float("inf") if is_cap_min is None else is_cap_min
    if is_ratio is not None:
        r = is_ratio.to(dtype).reshape(logp.size(0), -1).expand_as(logp)
        w = torch.where(valid, r, torch.ones_like(r)).detach()
        outside = torch.zeros_like(valid)
    elif behavior_logps is None:
        # no behavior policy: the tokens are on-policy and w is exactly 1, whatever is_cap is
        w = torch.ones_like(logp)
        outside = torch.zeros_like(valid)
    else:
        behavior = torch.where(valid, behavior_logps.to(dtype), old)
        d = (old - behavior).detach()
        if is_mode.startswith("sequence"):
            d = d.sum(-1, keepdim=True).expand_as(logp)
        rho = torch.exp(d)
        outside = valid & ((rho > is_cap) | (rho < lo))
        if is_mode.endswith("mask"):
            w = torch.where((rho > is_cap) | (rho < lo), torch.zeros_like(rho), rho)
        else:
            w = torch.clamp(rho, min=lo, max=is_cap)
    return w, outside


def grpo_loss_reference(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    behavior_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    options: LossOptions | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    is_mode: str = "token_truncate",
    is_cap_min: float | None = None,
    is_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss by autograd. Returns (loss, logps, entropy, metrics); logps/entropy are detached.

    is_mode / is_cap_min / is_ratio: the importance weight w (see the module docstring)."""
    o = LossOptions() if options is None else options
    logp_all, entropy = token_logps_reference(logits, completion_ids, o.temperature)
    dtype = logp_all.dtype
    mask = completion_mask.to(dtype)
    valid = completion_mask.bool()
    # Padding positions are excluded before any exp(), so a padded garbage logit cannot leak a NaN.
    logp = torch.where(valid, logp_all, torch.zeros_like(logp_all))
    adv = advantages.to(dtype).unsqueeze(1)
    old = logp.detach() if old_logps is None else torch.where(valid, old_logps.to(dtype), logp.detach())

    log_ratio = logp - old
    if o.sequence_level:
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef = torch.exp(log_ratio)
    clipped = torch.clamp(coef, 1 - o.epsilon_low, 1 + o.epsilon_high)
    ratio = coef if o.delta is None else torch.clamp(coef, max=o.delta)
    surrogate = torch.min(ratio * adv, clipped * adv)
    if o.dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.max(surrogate, o.dual_clip * adv), surrogate)

    w, outside = importance_weight_reference(logp, old, valid, behavior_logps, is_ratio, is_mode, is_cap_min, o.is_cap)

    loss_tok = -(w * surrogate)
    kl = torch.zeros_like(logp)
    if ref_logps is not None:
        ref = torch.where(valid, ref_logps.to(dtype), logp.detach())
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if o.bias_correction_kl:
            kl = kl * coef
        if o.beta != 0.0:
            loss_tok = loss_tok + o.beta * (w * kl if o.is_weight_kl else kl)
    loss = reduce_tokens(loss_tok, completion_mask, o.loss_type, max_completion_length, num_items_in_batch)

    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        low = ((coef < 1 - o.epsilon_low) & (adv < 0)).to(dtype)
        high = ((coef > 1 + o.epsilon_high) & (adv > 0)).to(dtype)
        if o.sequence_level:  # one ratio per sequence: the mean over the B sequences, as TRL logs it
            clip_low, clip_high = low.mean(), high.mean()
        else:
            clip_low, clip_high = (low * mask).sum() / n, (high * mask).sum() / n
        w_sum = (w * mask).sum()
        w_sq = (w * w * mask).sum()
        metrics = {
            "clip_ratio_low": clip_low,
            "clip_ratio_high": clip_high,
            "kl": (kl * mask).sum() / n,
            "is_weight_mean": w_sum / n,
            "is_truncated_frac": outside.to(dtype).sum() / n,
            # normalized effective sample size (sum w)^2 / (n * sum w^2) in (0, 1]; 1 with no tokens
            "is_ess": torch.where(w_sq > 0, w_sum * w_sum / (n * w_sq.clamp(min=1e-30)), torch.ones_like(w_sq)),
        }
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return loss, logp.detach(), entropy.detach(), metrics
