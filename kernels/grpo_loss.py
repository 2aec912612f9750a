"""The fused GRPO loss over logits as an autograd Function, on any backend.

Forward does all the work: the backend's forward pass returns the per-token log-probs and,
for token-level losses, the per-token loss terms and d loss / d logits in the same launch.
Sequence-level IS (GSPO) needs every log-prob of a sequence before any gradient, so it takes
the small torch step ``sequence_terms`` in between and a second launch (``grpo_grad``).
Backward only scales the stored gradient by the upstream scalar: not at all when it is 1 (the usual
``loss.backward()``: no extra read and write of the [B, T, V] buffer), and in fp32 otherwise (never
through a bf16 rounding of the scalar), see ``scale_grad_``.

Memory: the gradient is one [B, T, V] buffer in the logits' dtype, or the logits buffer itself
with ``inplace=True`` (opt-in: the caller's logits are overwritten).
"""

from __future__ import annotations

import importlib

import torch

from .grpo_math import sequence_terms
from .options import LossOptions

BACKENDS = ("torch", "triton", "cuda")


def backend_module(impl: str):
    """The module implementing grpo_fwd / grpo_grad for ``impl`` (imported on first use)."""
    if impl not in BACKENDS:
        raise ValueError(f"impl must be one of {BACKENDS + ('auto',)}, got {impl!r}")
    return importlib.import_module(f".{impl}_grpo", __package__)


# elements per fp32 block when scaling a half-precision gradient (64 MB of fp32 scratch)
_SCALE_BLOCK = 1 << 24


def scale_grad_(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """t *= grad in place, for a stored gradient t and the upstream 0-dim gradient ``grad``.

    grad == 1 (``loss.backward()``): nothing is done, so the backward costs no pass over t (one
    host sync decides this). Otherwise the product is taken in fp32 (fp64 for fp64 t) and rounded to
    t's dtype once: a bf16 t is upcast block by block, never multiplied by a bf16-rounded scalar
    (which would scale by 0.33393 for 1/3).
    """
    if bool(grad == 1):
        return t
    acc = torch.promote_types(t.dtype, torch.float32)
    g = grad.detach().to(acc)
    if t.dtype == acc:
        return t.mul_(g)
    blocks = [t] if t.is_contiguous() else t.unbind(0)
    for blk in blocks:
        if not blk.is_contiguous():
            blk.copy_(blk.to(acc).mul_(g))
            continue
        flat = blk.view(-1)
        for i in range(0, flat.numel(), _SCALE_BLOCK):
            part = flat[i : i + _SCALE_BLOCK]
            part.copy_(part.to(acc).mul_(g))
    return t


class FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, mask, adv, rw, old, behavior, ref, o: LossOptions, impl, return_entropy, inplace,
                tile):
        backend = backend_module(impl)
        need_grad = ctx.needs_input_grad[0]
        token_level = not o.sequence_level
        logp, stats, ent, loss_tok, dx = backend.grpo_fwd(
            logits, ids, mask, adv, rw, old, behavior, ref, o,
            token_level, need_grad and token_level, return_entropy, inplace and need_grad, tile,
        )
        if token_level:
            loss = (rw * loss_tok).sum()
        else:
            loss_tok, g = sequence_terms(
                logp, mask, adv, rw, o, old=old, behavior=behavior, ref=ref if o.beta != 0.0 else None,
                logp_lo=backend.logp_lo(stats),
            )
            loss = (rw * loss_tok).sum()
            if need_grad:
                dx = backend.grpo_grad(logits, ids, mask, stats, g, o.temperature, inplace, tile)
        if need_grad:
            ctx.save_for_backward(dx)
        ctx.consumed = False
        outs = (loss, logp, ent if ent is not None else logp.new_empty(0))
        ctx.mark_non_differentiable(outs[1], outs[2])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        if ctx.consumed:
            raise RuntimeError("the fused GRPO loss keeps one gradient buffer: backward can run once per forward")
        ctx.consumed = True
        (dx,) = ctx.saved_tensors
        # Scale the buffer in place: it is ours (or, with inplace=True, the caller's logits);
        # a second [B, T, V] allocation here would double the peak memory of the loss.
        return (scale_grad_(dx, grad_loss),) + (None,) * 12


def fused_grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    old: torch.Tensor | None,
    behavior: torch.Tensor | None,
    ref: torch.Tensor | None,
    o: LossOptions,
    impl: str,
    rw: torch.Tensor,
    return_entropy: bool = False,
    inplace: bool = False,
    tile: int | None = None,
):
    """Kernel-level entry on validated, canonical inputs.

    logits [B, T, V] (stride 1 on V); ids int64 [B, T]; mask int32 [B, T]; adv fp32 [B];
    old/behavior/ref fp32 [B, T] or None, with masked positions already zeroed. rw: [B, T] fp32
    reduction weights, loss = sum(rw * loss_tok) (``grpo_math.reduction_weights`` of the loss type,
    times any gradient-accumulation factor): the kernels read nothing else of the loss type. ``tile``
    is the backend's block (Triton BLOCK_V, torch chunk rows), for tests. Returns (loss, logp, entropy).
    """
    loss, logp, ent = FusedGRPOLoss.apply(
        logits, ids, mask, adv, rw, old, behavior, ref, o, impl, return_entropy, inplace, tile
    )
    return loss, logp, (ent if return_entropy else None)
