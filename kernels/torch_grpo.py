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


# columns of the per-row statistics grpo_fwd returns: (max, sum, sum without the label, logp_lo);
# grpo_grad reads the first three
STATS_WIDTH = 4


def _chunk_rows(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, _CHUNK_ELEMS // max(V, 1))


def _chunks(rows: torch.Tensor, step: int):
    for start in range(0, rows.numel(), step):
        yield rows[start : start + step]


def _row_pass(x: torch.Tensor, labels: torch.Tensor, return_entropy: bool):
    """One sweep over fp32 scaled rows x [n, V], which it overwrites with e = exp(x - max).

    Returns (logp, stats, entropy or None, e) with stats [n, 4] = (m, s, q, logp_lo): the row max,
    s = sum(e), q = the sum of e without the label's term, and the low part of the log-prob (see
    ``label_logp``). The softmax is e / s, so the gradient needs no second exp(), and 1 - p_label =
    q / s keeps its digits when the label holds nearly all the mass. logp and the entropy are taken
    relative to the row max, which keeps them exact for huge logits (|x| ~ 1e4) where lse - x would
    cancel.
    """
    lab = labels.unsqueeze(1)
    m = x.amax(dim=-1, keepdim=True)
    # an all -inf (or +inf / NaN) row: shift by 0 and let the NaN surface in logp
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    x_label = x.gather(1, lab).squeeze(1)
    y = x.sub_(m)
    y_label = y.gather(1, lab).squeeze(1)
    # the rounding error of y_label = x_label - m, so that logp is rounded once, not twice
    y_err = torch.nan_to_num(two_sum_err(x_label, -m.squeeze(1), y_label), nan=0.0)
    t = None
    if return_entropy:
        ey = torch.exp(y)
        t = torch.where(ey > 0, ey * y, torch.zeros_like(y)).sum(-1)
        del ey
    e = y.exp_()
    e_label = e.gather(1, lab).squeeze(1)
    q = e.scatter(1, lab, 0.0).sum(-1)
    s = q + e_label
    log_s = torch.log(s)
    logp, logp_lo = label_logp(y_label, y_err, e_label, s, q, log_s)
    ent = log_s - t / s if return_entropy else None
    return logp, torch.stack([m.squeeze(1), s, q, logp_lo], dim=1), ent, e


def label_logp(y_label, y_err, e_label, s, q, log_s):
    """(logp, logp_lo): log p_label as an fp32 pair whose sum carries ~1e-7 absolute accuracy.

    logp = y_label + (y_err - log(s)), one rounding of x_label - max - log s (y_err is the rounding
    error of y_label), and logp_lo = the rounding error of that last addition (TwoSum). At |x| ~ 1e4 a
    correctly rounded fp32 logp is still ~5e-4 off (half an ulp of 1e4); the loss's O(B*T) terms take
    differences such as logp - old, where that error is all that is left, so they use logp + logp_lo
    (``grpo_math.token_terms``). Where the label holds nearly all the mass, logp = -log1p(q / e_label)
    (there log(s) rounds s = 1 + tiny and loses the digits; log1p keeps them) and logp_lo = 0.
    """
    z = q / e_label
    t = y_err - log_s
    hi = y_label + t
    lo = two_sum_err(y_label, t, hi)
    confident = z < 1e-3
    hi = torch.where(confident, -torch.log1p(z), hi)
    lo = torch.where(confident | ~torch.isfinite(lo), torch.zeros_like(lo), lo)
    return hi, lo


def two_sum_err(a, b, s):
    """The rounding error of s = fl(a + b): a + b = s + err exactly (Knuth's TwoSum, any magnitudes)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


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

    def load(self, r, tau):
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
        # a true division, as eager torch does it (x * fp32(1 / tau) would round twice)
        return (w.div_(tau) if tau != 1.0 else w), direct

    def store(self, r, w, direct, labels, label_value):
        """w holds -coef * softmax; set the label's entry to coef * (1 - p) and land it in the buffer."""
        w.scatter_(1, labels.unsqueeze(1), label_value.unsqueeze(1))
        if not direct:
            self.dx_flat.index_copy_(0, r, w.to(self.dx_flat.dtype))


def grpo_fwd(
    logits, ids, mask, adv, rw, old, behavior, ref, o: LossOptions,
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
    logp, stats = torch.zeros(B * T, **f32), torch.zeros(B * T, STATS_WIDTH, **f32)
    ent = torch.zeros(B * T, **f32) if return_entropy else None
    loss_tok = torch.zeros(B * T, **f32) if fused_loss else None
    dx = dx_flat = None
    grad = fused_loss and compute_grad
    if grad:
        dx, dx_flat = _grad_buffer(logits, inplace, valid)
    step = _chunk_rows(V, chunk_rows)
    ws = _Workspace(flat, dx_flat, rows, step)
    tau = float(o.temperature)
    for r in _chunks(rows, step):
        w, direct = ws.load(r, tau)
        labels = ids_f.index_select(0, r)
        c_logp, c_stats, c_ent, e = _row_pass(w, labels, return_entropy)
        logp[r], stats[r] = c_logp, c_stats
        if return_entropy:
            ent[r] = c_ent
        if fused_loss:
            take = lambda t, r=r: None if t is None else t.reshape(-1).index_select(0, r).to(torch.float32)
            c_loss, c_g = token_terms(
                c_logp, adv.index_select(0, r // T), take(rw), o, old=take(old), behavior=take(behavior),
                ref=take(ref) if o.beta != 0.0 else None, logp_lo=c_stats[:, 3],
            )
            loss_tok[r] = c_loss
            if grad:
                c = (c_g / tau) / c_stats[:, 1]
                ws.store(r, e.mul_(-c.unsqueeze(1)), direct, labels, c * c_stats[:, 2])
    shape = (B, T)
    return (
        logp.view(shape),
        stats.view(B, T, STATS_WIDTH),
        None if ent is None else ent.view(shape),
        None if loss_tok is None else loss_tok.view(shape),
        dx,
    )


def logp_lo(stats: torch.Tensor) -> torch.Tensor:
    """The low part of each log-prob from ``grpo_fwd``'s ``stats`` [B, T, 4] (see ``label_logp``)."""
    return stats[..., 3]


def grpo_grad(logits, ids, mask, stats, g, temperature: float, inplace: bool, chunk_rows: int | None = None):
    """dlogits = g / tau * (onehot - softmax), from ``stats`` [B, T, 4] = (max, sum, sum without the label, -)
    that ``grpo_fwd`` returned for the same logits: p = exp(x - max) / sum, relative to the kept max
    (exp(x - lse) from an fp32 lse would lose the digits that lse's rounding takes at |x| ~ 1e4)."""
    B, T, V = logits.shape
    flat = logits.reshape(B * T, V)
    valid = mask.reshape(-1) != 0
    rows = valid.nonzero().squeeze(1)
    dx, dx_flat = _grad_buffer(logits, inplace, valid)
    step = _chunk_rows(V, chunk_rows)
    ws = _Workspace(flat, dx_flat, rows, step)
    tau = float(temperature)
    ids_f, st_f, g_f = ids.reshape(-1), stats.reshape(-1, STATS_WIDTH), g.reshape(-1).to(torch.float32)
    for r in _chunks(rows, step):
        w, direct = ws.load(r, tau)
        st = st_f.index_select(0, r)
        c = (g_f.index_select(0, r) / tau) / st[:, 1]
        p = w.sub_(st[:, 0:1]).exp_()
        ws.store(r, p.mul_(-c.unsqueeze(1)), direct, ids_f.index_select(0, r), c * st[:, 2])
    return dx
