"""O(B*T) pieces of the fused GRPO loss, in torch: reduction weights, per-token terms with their
analytic gradient d loss / d logp, the sequence-level (GSPO) step, and the metrics.

The backends do the O(B*T*V) part (log-sum-exp, gather, dlogits = g * (onehot - softmax) / tau)
and call into this for everything that only needs per-token scalars. The Triton token-level kernel
repeats ``token_terms`` inside the kernel (triton_token.py); tests hold the two to the reference in reference.py.

Gradient of the surrogate (torch's min/max/clamp conventions are reproduced, ties included, so
the analytic gradient equals autograd's at r == 1, the on-policy point)::

    r  = exp(log_ratio), cl = clamp(r, 1 - eps_low, 1 + eps_high), rd = min(r, delta)
    s  = min(rd * A, cl * A)
    ds/dlog_ratio = A * r * [r <= delta]                 if rd * A < cl * A
                  = A * r * [1 - eps_low <= r <= 1 + eps_high]   if rd * A > cl * A
                  = mean of the two                     on a tie
    dual clip (A < 0): s' = max(s, c * A); ds'/dlr = ds if s > cA, 0 if s < cA, ds / 2 on a tie
    d loss_tok / d logp = -w * ds/dlr + beta * (1 - exp(ref - logp))      (token level)
    bias-corrected KL (r * kl, r = exp(log_ratio) unclipped): d(r * kl)/dlogp = r * (logp - ref)
"""

from __future__ import annotations

import math

import torch

from .options import LossOptions


def reduction_weights(
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T] fp32 weights rw with loss = sum(rw * loss_tok), equal to TRL's normalizers."""
    m = mask.to(torch.float32)
    B, T = m.shape
    if loss_type == "grpo":
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = T if max_completion_length is None else max_completion_length
        return m / float(B * length)
    if loss_type == "dapo":
        items = m.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=m.device)
        return m / items.to(torch.float32).clamp(min=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def surrogate_and_grad(log_ratio: torch.Tensor, adv: torch.Tensor, o: LossOptions):
    """s(log_ratio, A) and ds/dlog_ratio, elementwise (broadcasting)."""
    r = torch.exp(log_ratio)
    lo, hi = 1.0 - o.epsilon_low, 1.0 + o.epsilon_high
    cl = r.clamp(lo, hi)
    g_ratio = adv * r
    if o.delta is not None:
        rd = r.clamp(max=o.delta)
        g_ratio = torch.where(r <= o.delta, g_ratio, torch.zeros_like(g_ratio))
    else:
        rd = r
    g_clip = torch.where((r >= lo) & (r <= hi), adv * r, torch.zeros_like(r))
    a, b = rd * adv, cl * adv
    s = torch.minimum(a, b)
    ds = torch.where(a < b, g_ratio, torch.where(a > b, g_clip, 0.5 * (g_ratio + g_clip)))
    if o.dual_clip is not None:
        floor = o.dual_clip * adv
        neg = adv < 0
        ds = torch.where(neg & (s < floor), torch.zeros_like(ds), torch.where(neg & (s == floor), 0.5 * ds, ds))
        s = torch.where(neg, torch.maximum(s, floor), s)
    return s, ds


def behavior_weight(old: torch.Tensor, behavior: torch.Tensor | None, cap: float):
    """(w, w_raw): w = min(exp(old - behavior), cap); ones without behavior."""
    if behavior is None:
        ones = torch.ones_like(old)
        return ones, ones
    w_raw = torch.exp(old - behavior)
    return w_raw.clamp(max=cap), w_raw


# A weight of 0 (a masked ratio) as a log-weight: exp(-1e4) underflows to exactly 0 in fp32.
_LOG_ZERO = -1.0e4
_NO_CAP = float(torch.finfo(torch.float32).max)


def importance_weights(
    mask: torch.Tensor,
    old: torch.Tensor | None = None,
    behavior: torch.Tensor | None = None,
    mode: str = "token_truncate",
    cap: float | None = 2.0,
    cap_min: float | None = None,
    ratio: torch.Tensor | None = None,
):
    """The detached per-token importance weight w [B, T] fp32 and the bool [B, T] of tokens whose raw
    ratio lay outside [cap_min, cap] (truncated or masked), from one of:

    - ``ratio`` [B, T], [B, 1] or [B]: used as given (e.g. TRL's ``importance_sampling_ratio``),
      broadcast over the tokens of a sequence; nothing is flagged.
    - ``old`` and ``behavior`` [B, T] with TRL's vLLM correction ``mode``: the log ratio is
      (old - behavior) * mask per token (``token_*``) or its sum over the sequence (``sequence_*``,
      one ratio per sequence, broadcast); ``*_truncate`` clamps the ratio to [cap_min, cap],
      ``*_mask`` sets ratios outside [cap_min, cap] to 0. ``None`` bounds are open.

    O(B*T); the kernels receive the result as behavior log-probs (``kernel_behavior``).
    """
    m = mask.to(torch.float32)
    if ratio is not None:
        r = ratio.detach().to(torch.float32)
        r = r.unsqueeze(-1) if r.dim() == 1 else r
        w = torch.where(m > 0, r.expand_as(m), torch.ones_like(m))
        return w.contiguous(), torch.zeros_like(m, dtype=torch.bool)
    diff = (old.detach() - behavior.detach()) * m
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    w_raw = torch.exp(diff).expand_as(m)
    outside = torch.zeros_like(m, dtype=torch.bool)
    if cap is not None:
        outside = outside | (w_raw > cap)
    if cap_min is not None:
        outside = outside | (w_raw < cap_min)
    if mode.endswith("truncate"):
        w = w_raw.clamp(min=cap_min, max=cap) if (cap is not None or cap_min is not None) else w_raw
    else:
        w = torch.where(outside, torch.zeros_like(w_raw), w_raw)
    outside = outside & (m > 0)
    return w.contiguous(), outside.contiguous()


def kernel_behavior(old: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Behavior log-probs that make the kernels' min(exp(old - behavior), cap) equal ``w`` when they
    run with cap = ``_NO_CAP``: behavior = old - log(w) (w = 0 becomes exp(-1e4) = 0 exactly). The
    round trip through log / exp costs fp32 rounding only (relative error ~|log w| * 2^-24)."""
    return (old - torch.log(w).clamp(min=_LOG_ZERO)).contiguous()


def _log_diffs(logp, old, behavior, ref, logp_lo):
    """(logp - old, old - behavior or None, ref - logp or None) with logp = logp + logp_lo, a pair.

    At |logits| ~ 1e4 an fp32 logp is off by up to half an ulp of 1e4 (~5e-4) however well it was
    rounded, and these differences are O(1): logp - old is exact in fp32 (Sterbenz) when the two are
    close, and adding logp_lo then gives the difference to ~1e-7 instead of ~1e-3. old = None is the
    detached current logp (the same pair): the log ratio is exactly 0.
    """
    lo = torch.zeros_like(logp) if logp_lo is None else logp_lo
    if old is None:
        d_old = torch.zeros_like(logp)
        d_beh = None if behavior is None else (logp - behavior) + lo
    else:
        d_old = (logp - old) + lo
        d_beh = None if behavior is None else old - behavior
    d_ref = None if ref is None else (ref - logp) - lo
    return d_old, d_beh, d_ref


# 1/k! for k = 10 .. 2: (exp(d) - 1 - d) / d^2 = sum_k d^(k-2) / k!, truncated after d^8 / 10!
K3_SERIES = tuple(1.0 / math.factorial(k) for k in range(10, 1, -1))
# |d| below which the series is used: there its truncation is < 1e-10 relative, and outside it
# exp(d) - 1 and expm1(d) - d cancel by a factor of 5 at most
K3_SMALL = 0.5


def k3_terms(d_ref):
    """(kl, expm1(d)) at d = ref - logp: the k3 estimator kl = exp(d) - d - 1 and minus its derivative in
    logp, without the cancellation of the textbook forms. Near the reference (d -> 0, the usual case)
    exp(d) - d - 1 ~ d^2 / 2 and 1 - exp(d) ~ -d lose every digit to the rounding of exp(d) (a 1-ulp
    exp error is 3e-5 of 1 - exp(d) at d = 0.004); here both come from the series of exp(d) - 1 - d."""
    small = d_ref.abs() < K3_SMALL
    ds = torch.where(small, d_ref, torch.zeros_like(d_ref))
    c = torch.full_like(ds, K3_SERIES[0])
    for coef in K3_SERIES[1:]:
        c = c * ds + coef
    kl_small = ds * ds * c
    em1 = torch.where(small, ds + kl_small, torch.expm1(d_ref))
    return torch.where(small, kl_small, em1 - d_ref), em1


def _weight(d_beh, like, cap: float):
    """w = min(exp(old - behavior), cap), or ones without behavior."""
    return torch.ones_like(like) if d_beh is None else torch.exp(d_beh).clamp(max=cap)


def token_terms(logp, adv, rw, o: LossOptions, old=None, behavior=None, ref=None, logp_lo=None):
    """Token-level loss terms, elementwise over any shape.

    Returns (loss_tok, g) with g = rw * d loss_tok / d logp. ``adv`` is per token (broadcast).
    ``logp_lo``: the low part of each logp (the backend's, see ``_log_diffs``), or None.
    """
    kl_on = ref is not None and o.beta != 0.0
    d_old, d_beh, d_ref = _log_diffs(logp, old, behavior, ref if kl_on else None, logp_lo)
    s, ds = surrogate_and_grad(d_old, adv, o)
    w = _weight(d_beh, logp, o.is_cap)
    loss_tok = -w * s
    dl = -w * ds
    if kl_on:
        kl, em1 = k3_terms(d_ref)
        bw = o.beta * w if o.is_weight_kl else o.beta
        if o.bias_correction_kl:
            r = torch.exp(d_old)
            loss_tok = loss_tok + bw * r * kl
            dl = dl - bw * r * d_ref
        else:
            loss_tok = loss_tok + bw * kl
            dl = dl - bw * em1
    return loss_tok, rw * dl


def sequence_terms(logp, mask, adv, rw, o: LossOptions, old=None, behavior=None, ref=None, logp_lo=None):
    """Sequence-level (GSPO) terms on [B, T]: the log ratio is the masked mean over the sequence.

    Returns (loss_tok, g) like ``token_terms``; g couples every token of a sequence. ``logp_lo`` as
    there: the mean of T differences adds T rounding errors of ~5e-4 at |logits| ~ 1e4 without it.
    """
    m = mask.to(logp.dtype)
    kl_on = ref is not None and o.beta != 0.0
    d_old, d_beh, d_ref = _log_diffs(logp, old, behavior, ref if kl_on else None, logp_lo)
    length = m.sum(-1, keepdim=True).clamp(min=1.0)
    lr = (d_old * m).sum(-1, keepdim=True) / length
    s, ds = surrogate_and_grad(lr, adv.unsqueeze(-1), o)
    w = _weight(d_beh, logp, o.is_cap)
    loss_tok = -w * s
    g = -(rw * w).sum(-1, keepdim=True) * ds * m / length
    if kl_on:
        kl, em1 = k3_terms(d_ref)
        bw = o.beta * w if o.is_weight_kl else torch.full_like(logp, o.beta)
        if o.bias_correction_kl:
            # r_b * kl_t: r_b couples the sequence, d r_b / d logp_t = r_b * m_t / length
            r = torch.exp(lr)
            loss_tok = loss_tok + bw * r * kl
            g = g - rw * bw * r * em1 + r * m / length * (rw * bw * kl * m).sum(-1, keepdim=True)
        else:
            loss_tok = loss_tok + bw * kl
            g = g - rw * bw * em1
    return loss_tok * m, g * m


def loss_metrics(logp, mask, adv, o: LossOptions, old=None, behavior=None, ref=None, weights=None) -> dict:
    """The metrics dict of docs/loss.md from per-token scalars ([B, T]); O(B*T), no pass over logits.

    ``weights`` = (w, outside) from ``importance_weights`` replaces the weight from ``behavior``.
    clip_ratio_low / high are means over unmasked tokens at token level and, as TRL logs them, means
    over the B sequences (one ratio each) at sequence level.
    """
    m = mask.to(torch.float32)
    n = m.sum().clamp(min=1.0)
    old_ = logp if old is None else old
    lr = logp - old_
    a = adv.to(torch.float32).unsqueeze(-1)
    if o.sequence_level:
        lr = (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    coef = torch.exp(lr)
    low = ((coef < 1 - o.epsilon_low) & (a < 0)).float()
    high = ((coef > 1 + o.epsilon_high) & (a > 0)).float()
    if o.sequence_level:
        clip_low, clip_high = low.mean(), high.mean()
    else:
        clip_low, clip_high = (low * m).sum() / n, (high * m).sum() / n
    if weights is None:
        w, w_raw = behavior_weight(old_, behavior, o.is_cap)
        outside = w_raw > o.is_cap
    else:
        w, outside = weights
    if ref is not None:
        kl = k3_terms(ref - logp)[0]
        if o.bias_correction_kl:
            kl = kl * coef
        kl_mean = (kl * m).sum() / n
    else:
        kl_mean = torch.zeros((), device=logp.device)
    w_sum, w_sq = (w * m).sum(), (w * w * m).sum()
    return {
        "clip_ratio_low": clip_low,
        "clip_ratio_high": clip_high,
        "kl": kl_mean,
        "is_weight_mean": w_sum / n,
        "is_truncated_frac": (outside.float() * m).sum() / n,
        "is_ess": torch.where(w_sq > 0, w_sum * w_sum / (n * w_sq.clamp(min=1e-30)), torch.ones_like(w_sq)),
    }
