"""Triton backend of the fused GRPO loss over logits.

Two kernels, one program per (b, t) row of the logits:

* ``_grpo_fwd_kernel``: one sweep over the vocab keeps the online max, the sum of
  exp and (on request) the sum of p * x for the entropy, and gathers the label logit.
  For token-level losses (FUSED_LOSS) it then evaluates the per-token GRPO terms
  (ratio, clip, dual clip, behaviour weight, k3 KL, reduction weight) in registers
  and, when a gradient is needed, sweeps the row again to write
  ``dlogits = g * (onehot - softmax) / tau`` while the row is still hot in L2.
  So forward and gradient are one launch.
* ``_grpo_grad_kernel``: the second sweep alone, for per-token scalars g computed
  outside (sequence-level IS, and the backward of plain per-token log-probs).

Out-of-range vocab columns load as -inf (never 0) so they add nothing to the
log-sum-exp; addressing is int64; all math is fp32 whatever the input dtype.
Rows with mask 0 skip the vocab sweep: they report zeros and, if a gradient is
written, a zero row.

Host launchers ``grpo_fwd`` / ``grpo_grad`` allocate and pick the grid; the
autograd Functions live in grpo_loss.py and logprobs.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .options import LossOptions


@triton.jit
def _row_lse(p_x, label, V, inv_tau, RETURN_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online log-sum-exp of one row of x = logits * inv_tau; also the label's x and the entropy.

    The entropy accumulates t = sum e_j (x_j - m) relative to the running max m, so it stays
    exact when the logits are huge (lse - sum p x would cancel catastrophically at |x| ~ 1e4).
    """
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(p_x + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_tau
        m_new = tl.maximum(m, tl.max(b_x, axis=0))
        # An all -inf prefix keeps m = -inf; shift by 0 then so exp() never sees -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_safe)
        # NaN stays NaN here (and poisons s): a where() on b_x > -inf would silently drop it
        b_y = b_x - m_safe
        b_e = tl.exp(b_y)
        if RETURN_ENT:
            dm = tl.where(m == float("-inf"), 0.0, m - m_safe)
            t = scale * (t + s * dm) + tl.sum(b_e * tl.where(b_x > float("-inf"), b_y, 0.0), axis=0)
        s = s * scale + tl.sum(b_e, axis=0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(s)
    x_label = tl.load(p_x + label).to(tl.float32) * inv_tau
    ent = tl.log(s) - t / s
    return lse, x_label, ent


@triton.jit
def _row_grad(p_x, p_dx, label, lse, g, V, inv_tau, BLOCK_V: tl.constexpr):
    """dx = g * (onehot(label) - exp(x - lse)) * inv_tau over one row, stored in p_dx's dtype."""
    coef = g * inv_tau
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_x = tl.load(p_x + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_tau
        b_p = tl.exp(b_x - lse)
        b_d = tl.where(o_v == label, coef - b_p * coef, -b_p * coef)
        tl.store(p_dx + o_v, b_d.to(p_dx.dtype.element_ty), mask=m_v)


@triton.jit
def _row_zero(p_dx, V, BLOCK_V: tl.constexpr):
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        tl.store(p_dx + o_v, tl.zeros([BLOCK_V], tl.float32).to(p_dx.dtype.element_ty), mask=o_v < V)


@triton.jit
def _grpo_fwd_kernel(
    X, stride_xb, stride_xt,
    IDS, MASK, ADV, RW, OLD, BEH, REF,
    LOGP, LSE, ENT, LOSS,
    DX, stride_dxb, stride_dxt,
    T, V,
    inv_tau, lo, hi, delta, dual_c, beta, is_cap,
    HAS_OLD: tl.constexpr, HAS_BEH: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, KL_IS: tl.constexpr, W_KL: tl.constexpr,
    FUSED_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, RETURN_ENT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    p_x = X + i_b * stride_xb + i_t * stride_xt
    p_dx = DX + i_b * stride_dxb + i_t * stride_dxt
    if tl.load(MASK + i_n) != 0:
        label = tl.load(IDS + i_n).to(tl.int64)
        lse, x_label, ent = _row_lse(p_x, label, V, inv_tau, RETURN_ENT, BLOCK_V)
        logp = x_label - lse
        tl.store(LOGP + i_n, logp)
        tl.store(LSE + i_n, lse)
        if RETURN_ENT:
            tl.store(ENT + i_n, ent)
        if FUSED_LOSS:
            adv = tl.load(ADV + i_b).to(tl.float32)
            if HAS_OLD:
                old = tl.load(OLD + i_n).to(tl.float32)
            else:
                old = logp
            r = tl.exp(logp - old)
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
                w = tl.minimum(tl.exp(old - tl.load(BEH + i_n).to(tl.float32)), is_cap)
            loss = -w * sur
            dl = -w * ds
            if HAS_REF:
                ref = tl.load(REF + i_n).to(tl.float32)
                e = tl.exp(ref - logp)
                bw = beta
                if W_KL:
                    bw = beta * w
                if KL_IS:
                    loss += bw * r * (e - (ref - logp) - 1.0)
                    dl += bw * r * (logp - ref)
                else:
                    loss += bw * (e - (ref - logp) - 1.0)
                    dl += bw * (1.0 - e)
            tl.store(LOSS + i_n, loss)
            if COMPUTE_GRAD:
                _row_grad(p_x, p_dx, label, lse, tl.load(RW + i_n) * dl, V, inv_tau, BLOCK_V)
    else:
        tl.store(LOGP + i_n, 0.0)
        tl.store(LSE + i_n, 0.0)
        if RETURN_ENT:
            tl.store(ENT + i_n, 0.0)
        if FUSED_LOSS:
            tl.store(LOSS + i_n, 0.0)
            if COMPUTE_GRAD:
                _row_zero(p_dx, V, BLOCK_V)


@triton.jit
def _grpo_grad_kernel(
    X, stride_xb, stride_xt,
    IDS, MASK, LSE, G,
    DX, stride_dxb, stride_dxt,
    T, V, inv_tau,
    BLOCK_V: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    p_x = X + i_b * stride_xb + i_t * stride_xt
    p_dx = DX + i_b * stride_dxb + i_t * stride_dxt
    if tl.load(MASK + i_n) != 0:
        label = tl.load(IDS + i_n).to(tl.int64)
        _row_grad(p_x, p_dx, label, tl.load(LSE + i_n), tl.load(G + i_n), V, inv_tau, BLOCK_V)
    else:
        _row_zero(p_dx, V, BLOCK_V)


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    env = os.environ.get("RERULE_BLOCK_V")
    if env:
        return int(env)
    # The interpreter pays per op, not per element: one big tile is fastest there.
    cap = 16384 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return min(triton.next_power_of_2(V), cap)


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output element is written by a kernel; tests swap this for a NaN-poisoned allocator.
    return torch.empty(shape, dtype=dtype, device=device)


def _grad_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    return logits if inplace else _empty(logits.shape, logits.dtype, logits.device)


def check_interpreter(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (or use impl='torch'/'auto')."
        )


def grpo_fwd(
    logits, ids, mask, adv, rw, old, beh, ref, o: LossOptions,
    fused_loss: bool, compute_grad: bool, return_entropy: bool, inplace: bool, block_v: int | None = None,
):
    """Launch the forward kernel over [B, T, V] logits (row stride 1 on V).

    ids/mask/rw/old/beh/ref are [B, T] contiguous; adv is [B] fp32. Returns
    (logp, lse, entropy or None, loss_tok or None, dlogits or None), fp32 except dlogits.
    """
    check_interpreter(logits)
    B, T, V = logits.shape
    N = B * T
    f32 = (torch.float32, logits.device)
    logp, lse = _empty((N,), *f32), _empty((N,), *f32)
    ent = _empty((N,), *f32) if return_entropy else logp
    loss_tok = _empty((N,), *f32) if fused_loss else logp
    dx = _grad_buffer(logits, inplace) if (fused_loss and compute_grad) else logits
    BLOCK_V = _block_v(V, block_v)
    has_ref = ref is not None and o.beta != 0.0
    dummy = logp
    if N > 0:
        _grpo_fwd_kernel[(N,)](
            logits, logits.stride(0), logits.stride(1),
            ids, mask, adv if fused_loss else dummy, rw if fused_loss else dummy,
            old if old is not None else dummy, beh if beh is not None else dummy, ref if has_ref else dummy,
            logp, lse, ent, loss_tok,
            dx, dx.stride(0), dx.stride(1),
            T, V,
            1.0 / o.temperature, 1.0 - o.epsilon_low, 1.0 + o.epsilon_high,
            float(o.delta or 0.0), float(o.dual_clip or 0.0), float(o.beta), float(o.is_cap),
            HAS_OLD=old is not None, HAS_BEH=beh is not None, HAS_REF=has_ref,
            HAS_DELTA=o.delta is not None, HAS_DUAL=o.dual_clip is not None, KL_IS=o.bias_correction_kl,
            W_KL=o.is_weight_kl and beh is not None,
            FUSED_LOSS=fused_loss, COMPUTE_GRAD=compute_grad, RETURN_ENT=return_entropy,
            BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_V),
        )
    shape = (B, T)
    return (
        logp.view(shape),
        lse.view(shape),
        ent.view(shape) if return_entropy else None,
        loss_tok.view(shape) if fused_loss else None,
        dx if (fused_loss and compute_grad) else None,
    )


def grpo_grad(logits, ids, mask, lse, g, temperature: float, inplace: bool, block_v: int | None = None):
    """Launch the gradient sweep: dlogits = g * (onehot - softmax) / tau, zero rows where mask is 0."""
    check_interpreter(logits)
    B, T, V = logits.shape
    dx = _grad_buffer(logits, inplace)
    BLOCK_V = _block_v(V, block_v)
    if B * T > 0:
        _grpo_grad_kernel[(B * T,)](
            logits, logits.stride(0), logits.stride(1),
            ids, mask, lse.contiguous(), g.to(torch.float32).contiguous(),
            dx, dx.stride(0), dx.stride(1),
            T, V, 1.0 / temperature,
            BLOCK_V=BLOCK_V, num_warps=_num_warps(BLOCK_V),
        )
    return dx
