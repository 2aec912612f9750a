"""Torch backend of the fused GRPO loss over logits: the Triton kernels' algorithm, in chunks of rows.

Same contract as triton_grpo.grpo_fwd / grpo_grad, so one autograd Function drives both.
Only rows with mask 1 are computed (gathered into chunks), and at most one fp32
[chunk, V] block is live at a time, so peak memory is the gradient buffer plus one chunk,
not the several [N, V] fp32 copies autograd keeps for log_softmax.
"""

from __future__ import annotations

import os

import torch

from .grpo_math import token_terms
from .options import LossOptions

# fp32 elements per chunk (16M = 64 MB): large enough to amortize, small next to the logits.
_CHUNK_ELEMS = int(os.environ.get("RERULE_CHUNK_ELEMS", 1 << 24))


def _chunks(rows: torch.Tensor, V: int, chunk_rows: int | None):
    step = chunk_rows or max(1, _CHUNK_ELEMS // max(V, 1))
    for start in range(0, rows.numel(), step):
        yield rows[start : start + step]


def _row_stats(x: torch.Tensor, labels: torch.Tensor, return_entropy: bool):
    """x: fp32 [n, V] already divided by tau. Returns (lse, label x, entropy or None)."""
    lse = torch.logsumexp(x, dim=-1)
    x_label = x.gather(1, labels.unsqueeze(1)).squeeze(1)
    ent = None
    if return_entropy:
        # -sum p log p on max-shifted values: lse - sum p x cancels catastrophically at |x| ~ 1e4
        y = x - x.amax(dim=-1, keepdim=True).nan_to_num(0.0, 0.0, 0.0)
        logq = y - torch.logsumexp(y, dim=-1, keepdim=True)
        p = torch.exp(logq)
        ent = -torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)
    return lse, x_label, ent


def _write_grad(dst_rows: torch.Tensor, dx_flat, x, lse, labels, g, inv_tau):
    d = torch.exp(x - lse.unsqueeze(1))
    coef = (g * inv_tau).unsqueeze(1)
    d.mul_(-coef)
    d.scatter_add_(1, labels.unsqueeze(1), coef)
    dx_flat.index_copy_(0, dst_rows, d.to(dx_flat.dtype))


def _grad_buffer(logits, inplace, valid):
    if inplace:
        flat = logits.view(-1, logits.shape[-1])
        flat[~valid] = 0
        return logits, flat
    dx = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
    return dx, dx.view(-1, logits.shape[-1])


def grpo_fwd(
    logits, ids, mask, adv, rw, old, beh, ref, o: LossOptions,
    fused_loss: bool, compute_grad: bool, return_entropy: bool, inplace: bool, chunk_rows: int | None = None,
):
    B, T, V = logits.shape
    # reshape, not view: a [B, T, V] slice of a longer sequence (TRL's logits[:, :-1]) is fine
    flat = logits.reshape(B * T, V)
    if inplace and flat.data_ptr() != logits.data_ptr():
        raise ValueError("inplace=True needs logits whose rows are contiguous in one buffer")
    ids_f, valid = ids.reshape(-1), mask.reshape(-1) != 0
    rows = valid.nonzero().squeeze(1)
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp, lse = torch.zeros(B * T, **f32), torch.zeros(B * T, **f32)
    ent = torch.zeros(B * T, **f32) if return_entropy else None
    loss_tok = torch.zeros(B * T, **f32) if fused_loss else None
    dx = dx_flat = None
    if fused_loss and compute_grad:
        dx, dx_flat = _grad_buffer(logits, inplace, valid)
    inv_tau = 1.0 / o.temperature
    for r in _chunks(rows, V, chunk_rows):
        x = flat.index_select(0, r).to(torch.float32) * inv_tau
        labels = ids_f.index_select(0, r)
        c_lse, x_label, c_ent = _row_stats(x, labels, return_entropy)
        c_logp = x_label - c_lse
        logp[r], lse[r] = c_logp, c_lse
        if return_entropy:
            ent[r] = c_ent
        if fused_loss:
            take = lambda t: None if t is None else t.reshape(-1).index_select(0, r).to(torch.float32)
            c_loss, c_g = token_terms(
                c_logp, adv.index_select(0, r // T), take(rw), o, old=take(old), behavior=take(beh),
                ref=take(ref) if o.beta != 0.0 else None,
            )
            loss_tok[r] = c_loss
            if compute_grad:
                _write_grad(r, dx_flat, x, c_lse, labels, c_g, inv_tau)
    shape = (B, T)
    return (
        logp.view(shape),
        lse.view(shape),
        None if ent is None else ent.view(shape),
        None if loss_tok is None else loss_tok.view(shape),
        dx,
    )


def grpo_grad(logits, ids, mask, lse, g, temperature: float, inplace: bool, chunk_rows: int | None = None):
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    valid = mask.reshape(-1) != 0
    rows = valid.nonzero().squeeze(1)
    dx, dx_flat = _grad_buffer(logits, inplace, valid)
    inv_tau = 1.0 / temperature
    ids_f, lse_f, g_f = ids.reshape(-1), lse.reshape(-1), g.reshape(-1).to(torch.float32)
    for r in _chunks(rows, V, chunk_rows):
        x = flat.index_select(0, r).to(torch.float32) * inv_tau
        _write_grad(r, dx_flat, x, lse_f.index_select(0, r), ids_f.index_select(0, r), g_f.index_select(0, r), inv_tau)
    return dx
