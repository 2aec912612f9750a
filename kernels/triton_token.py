"""Per-token scalar math of the Triton GRPO kernels (triton_grpo.py): the log-prob as an fp32 pair,
the k3 KL without cancellation and the per-token GRPO terms with their gradient d loss_tok / d logp,
line for line ``grpo_math.token_terms`` (torch's min / max / clamp tie conventions; the derivation is
in grpo_math's docstring), evaluated in registers once per row."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _two_sum_err(a, b, s):
    """The rounding error of s = fl(a + b): a + b = s + err exactly (TwoSum, any magnitudes)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


@triton.jit
def _label_logp(y_label, y_err, s, q):
    """(logp, logp_lo): log p_label = y_label + (y_err - log(s)) (one rounding of x_label - max - log s)
    and the rounding error of that addition, so that logp + logp_lo carries ~1e-7 absolute accuracy
    at |x| ~ 1e4, where a correctly rounded fp32 logp is ~5e-4 off; or -log1p(q / e_label) by its
    series (and lo = 0) where the label holds nearly all the mass (there log(s) would round
    s = 1 + tiny to 1 and lose every digit)."""
    z = q / tl.exp(y_label)
    small = z < 1e-3
    zs = tl.where(small, z, 0.0)
    series = -(zs - zs * zs * (0.5 - zs * (1.0 / 3.0)))
    t = y_err - tl.log(s)
    hi = y_label + t
    lo = _two_sum_err(y_label, t, hi)
    lo = tl.where(small | (lo != lo), 0.0, lo)
    return tl.where(small, series, hi), lo


@triton.jit
def _k3(d):
    """(kl, expm1(d)) of the k3 KL at d = ref - logp without cancellation: below |d| = 0.5 from the series
    of exp(d) - 1 - d (1/k!, k = 2..10; grpo_math.k3_terms is the same in torch), else exp(d) - 1."""
    small = tl.abs(d) < 0.5
    ds = tl.where(small, d, 0.0)
    c = 2.755731922398589e-07
    c = c * ds + 2.7557319223985893e-06
    c = c * ds + 2.48015873015873e-05
    c = c * ds + 0.0001984126984126984
    c = c * ds + 0.001388888888888889
    c = c * ds + 0.008333333333333333
    c = c * ds + 0.041666666666666664
    c = c * ds + 0.16666666666666666
    c = c * ds + 0.5
    kl_small = ds * ds * c
    em1 = tl.where(small, ds + kl_small, tl.exp(d) - 1.0)
    return tl.where(small, kl_small, em1 - d), em1


@triton.jit
def _token_terms(
    logp, logp_lo, adv, i_n, OLD, BEH, REF, lo, hi, delta, dual_c, beta, is_cap,
    HAS_OLD: tl.constexpr, HAS_BEH: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_DUAL: tl.constexpr, KL_IS: tl.constexpr, W_KL: tl.constexpr,
):
    """(loss_tok, d loss_tok / d logp) of row ``i_n``, from its log-prob pair (logp, logp_lo), its
    advantage and the row's old / behavior / ref log-probs (read here; absent ones are constexpr-off).
    lo / hi are the clip bounds 1 - eps_low / 1 + eps_high."""
    # differences with the pair logp + logp_lo (exact when close: Sterbenz); no old = the same pair
    if HAS_OLD:
        old = tl.load(OLD + i_n).to(tl.float32)
        d_old = (logp - old) + logp_lo
    else:
        old = logp
        d_old = tl.zeros([], tl.float32)
    r = tl.exp(d_old)
    cl = tl.minimum(tl.maximum(r, lo), hi)
    g_ratio = adv * r
    rd = r
    if HAS_DELTA:
        rd = tl.minimum(r, delta)
        g_ratio = tl.where(r <= delta, g_ratio, 0.0)
    g_clip = tl.where((r >= lo) & (r <= hi), adv * r, 0.0)
    a = rd * adv
    b = cl * adv
    sur = tl.minimum(a, b)
    ds = tl.where(a < b, g_ratio, tl.where(a > b, g_clip, 0.5 * (g_ratio + g_clip)))
    if HAS_DUAL:
        floor = dual_c * adv
        neg = adv < 0
        ds = tl.where(neg & (sur < floor), 0.0, tl.where(neg & (sur == floor), 0.5 * ds, ds))
        sur = tl.where(neg, tl.maximum(sur, floor), sur)
    w = 1.0
    if HAS_BEH:
        d_beh = old - tl.load(BEH + i_n).to(tl.float32)
        if not HAS_OLD:
            d_beh += logp_lo
        w = tl.minimum(tl.exp(d_beh), is_cap)
    loss = -w * sur
    dl = -w * ds
    if HAS_REF:
        d_ref = (tl.load(REF + i_n).to(tl.float32) - logp) - logp_lo
        kl, em1 = _k3(d_ref)
        bw = beta
        if W_KL:
            bw = beta * w
        if KL_IS:
            loss += bw * r * kl
            dl -= bw * r * d_ref
        else:
            loss += bw * kl
            dl -= bw * em1
    return loss, dl
