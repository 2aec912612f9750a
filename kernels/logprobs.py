"""Per-token log-probs (+ entropy) of [B, T, V] logits, differentiable, on any backend.

Forward is the GRPO forward sweep without the loss (online log-sum-exp, label gather,
entropy); backward is the gradient sweep dlogits = g * (onehot - softmax) / tau with
g = d out / d logp. Only the logits and the backend's per-row softmax statistics (the row max and
the sums, not a rounded log-sum-exp) are saved.
"""

from __future__ import annotations

import torch

from .grpo_loss import backend_module
from .options import LossOptions


class TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, return_entropy, impl, tile):
        backend = backend_module(impl)
        o = LossOptions(temperature=temperature)
        logp, stats, ent, _, _ = backend.grpo_fwd(
            logits, ids, mask, None, None, None, None, None, o, False, False, return_entropy, False, tile
        )
        ctx.save_for_backward(logits, ids, mask, stats)
        ctx.meta = (temperature, impl, tile)
        ent = ent if ent is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):
        logits, ids, mask, stats = ctx.saved_tensors
        temperature, impl, tile = ctx.meta
        g = grad_logp * mask.to(grad_logp.dtype)
        dx = backend_module(impl).grpo_grad(logits, ids, mask, stats, g, temperature, False, tile)
        return dx, None, None, None, None, None, None


def fused_token_logps(logits, ids, mask, temperature=1.0, return_entropy=False, impl="torch", tile=None):
    """Kernel-level entry on canonical inputs (see grpo_loss.fused_grpo_loss). Returns (logp, entropy)."""
    logp, ent = TokenLogps.apply(logits, ids, mask, temperature, return_entropy, impl, tile)
    return logp, (ent if return_entropy else None)
