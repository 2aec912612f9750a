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


def _chunk_rows(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, _CHUNK_ELEMS // max(V, 1))


def _chunks(rows: torch.Tensor, step: int):
    for start in range(0, rows.numel(), step):
        yield rows[start : start + step]


def _row_pass(x: torch.Tensor, labels: torch.Tensor, return_entropy: bool):
    """One sweep over fp32 scaled rows x [n, V], which it overwrites with e = exp(x - max).

    Returns (logp, lse, entropy or None, e, s) with s = sum(e): the softmax is e / s, so the
    gradient needs no second exp(). logp and the entropy are taken relative to the row max, which
    keeps them exact for huge logits (|x| ~ 1e4) where lse - x would cancel.
    """
    x_label = x.gather(1, labels.unsqueeze(1)).squeeze(1)
    m = x.amax(dim=-1, keepdim=True)
    # an all -inf (or +inf / NaN) row: shift by 0 and let the NaN surface in logp
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    y = x.sub_(m)
    t = None
    if return_entropy:
        ey = torch.exp(y)
        t = torch.where(ey > 0, ey * y, torch.zeros_like(y)).sum(-1)
        del ey
    e = y.exp_()
    s = e.sum(-1)
    log_s = torch.log(s)
    m = m.squeeze(1)
    logp = (x_label - m) - log_s
    ent = log_s - t / s if return_entropy else None
    return logp, m + log_s, ent, e, s


def _grad_buffer(logits, inplace, valid):
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if inplace:
        dx, flat = logits, flat_logits
    else:
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        flat = dx.view(-1, logits.shape[-1])
    # valid rows are all overwritten below; only padding rows need zeros
    pad = (~valid).nonzero().squeeze(1)
    if pad.numel():
        flat.index_fill_(0, pad, 0)
    return dx, flat


class _Workspace:
    """Where a chunk's fp32 work happens.

    When the gradient buffer is fp32 and the chunk's rows are contiguous (no padding inside), the
    rows are processed in the gradient buffer itself: copy the logits in, turn them into the
    gradient in place, and nothing is copied out. Otherwise one chunk-sized scratch block is reused
    for every chunk (a fresh [chunk, V] block per chunk costs page faults on CPU every time).
    """

    def __init__(self, flat, dx_flat, rows, step):
        self.flat, self.dx_flat = flat, dx_flat
        self.direct_ok = dx_flat is not None and dx_flat.dtype == torch.float32
        self.scratch = None
        self.step = min(step, max(rows.numel(), 1))

    def load(self, r, inv_tau):
        n = r.numel()
        r0 = int(r[0])
        if self.direct_ok and int(r[-1]) - r0 + 1 == n:
            w = self.dx_flat[r0 : r0 + n]
            if w.data_ptr() != self.flat[r0].data_ptr():
                w.copy_(self.flat[r0 : r0 + n])
            direct = True
        else:
            if self.scratch is None:
                self.scratch = torch.empty(self.step, self.flat.shape[1], dtype=torch.float32, device=self.flat.device)
            w = self.scratch[:n]
            w.copy_(self.flat.index_select(0, r) if self.flat.dtype != torch.float32 else self.flat[r])
            direct = False
        return (w.mul_(inv_tau) if inv_tau != 1.0 else w), direct

    def store(self, r, w, direct, labels, coef):
        """w holds -coef * softmax; add coef at the label and land it in the gradient buffer."""
        w.scatter_add_(1, labels.unsqueeze(1), coef.unsqueeze(1))
        if not direct:
            self.dx_flat.index_copy_(0, r, w.to(self.dx_flat.dtype))


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
    grad = fused_loss and compute_grad
    if grad:
        dx, dx_flat = _grad_buffer(logits, inplace, valid)
    step = _chunk_rows(V, chunk_rows)
    ws = _Workspace(flat, dx_flat, rows, step)
    inv_tau = 1.0 / o.temperature
    for r in _chunks(rows, step):
        w, direct = ws.load(r, inv_tau)
        labels = ids_f.index_select(0, r)
        c_logp, c_lse, c_ent, e, c_s = _row_pass(w, labels, return_entropy)
        logp[r], lse[r] = c_logp, c_lse
        if return_entropy:
            ent[r] = c_ent
        if fused_loss:
            take = lambda t, r=r: None if t is None else t.reshape(-1).index_select(0, r).to(torch.float32)
            c_loss, c_g = token_terms(
                c_logp, adv.index_select(0, r // T), take(rw), o, old=take(old), behavior=take(beh),
                ref=take(ref) if o.beta != 0.0 else None,
            )
            loss_tok[r] = c_loss
            if grad:
                coef = c_g * inv_tau
                ws.store(r, e.mul_((-coef / c_s).unsqueeze(1)), direct, labels, coef)
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
    step = _chunk_rows(V, chunk_rows)
    ws = _Workspace(flat, dx_flat, rows, step)
    inv_tau = 1.0 / temperature
    ids_f, lse_f, g_f = ids.reshape(-1), lse.reshape(-1), g.reshape(-1).to(torch.float32)
    for r in _chunks(rows, step):
        w, direct = ws.load(r, inv_tau)
        coef = g_f.index_select(0, r) * inv_tau
        p = w.sub_(lse_f.index_select(0, r).unsqueeze(1)).exp_()
        ws.store(r, p.mul_(-coef.unsqueeze(1)), direct, ids_f.index_select(0, r), coef)
    return dx
