"""The clipped surrogate on precomputed log-probs, shared by the verl and OpenRLHF adapters.

verl and OpenRLHF hand their policy loss per-token log-probs [B, T] that already carry the graph
back to the model, so the loss itself is O(B*T) work. We run it through
``rerule.kernels.grpo_math.surrogate_and_grad`` (the piece every rerule backend uses): one pass gives
the surrogate and its analytic derivative, and backward is a single multiply. Autograd through
exp/clamp/min/where would keep ~6 [B, T] intermediates alive until backward; this keeps one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rerule.kernels.grpo_math import surrogate_and_grad
from rerule.kernels.options import LossOptions


class ClippedSurrogate(torch.autograd.Function):
    """loss_tok = -weights * s(log_ratio, A), with s the clipped (and optionally dual-clipped) surrogate.

    log_ratio broadcasts against advantages (a [B, 1] sequence-level log ratio against [B, T]
    advantages is fine); weights ([B, T] or None) are treated as constants. Gradient flows to
    log_ratio only, summed back to its shape.
    """

    @staticmethod
    def forward(ctx, log_ratio, advantages, weights, options: LossOptions):
        s, ds = surrogate_and_grad(log_ratio, advantages, options)
        loss, g = -s, -ds
        if weights is not None:
            loss, g = loss * weights, g * weights
        ctx.save_for_backward(g)
        ctx.shape = log_ratio.shape
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return (grad * g).sum_to_size(ctx.shape), None, None, None


def clipped_surrogate(log_ratio, advantages, options: LossOptions, weights=None):
    """[B, T] fp32 per-token loss -(w * min(r A, clip(r) A)) (dual clip per ``options``)."""
    lr = log_ratio.float()
    adv = advantages.detach().float()
    w = None if weights is None else weights.detach().float()
    return ClippedSurrogate.apply(lr, adv, w, options)


def masked_mean(x, mask, dim=None):
    """sum(x * mask) / max(sum(mask), 1): an empty mask gives 0, not NaN."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def check_same_shape(ref_name, ref, **tensors):
    """TypeError / ValueError naming the argument for anything not a tensor of ref's shape."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(
                f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
            )


def config_get(config, name, default=None):
    """Read ``name`` from a dict, an omegaconf DictConfig or any object with attributes."""
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)
