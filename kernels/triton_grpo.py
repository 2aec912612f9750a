"""Triton backend of the fused GRPO loss over logits.

Two kernels on a persistent grid (``_grid``: about one program per SM, few enough that the rows
in flight fit in L2); each program loops over (b, t) rows of the logits:

* ``_grpo_fwd_kernel``: one sweep over the vocab keeps the online max m, the sum q of
  exp(x - m) over the entries other than the label and (on request) the entropy terms, and
  gathers the label logit. logp = (x_label - m) - log(q + e_label) relative to the kept max, kept
  with its rounding error logp_lo for the O(B*T) terms.
  For token-level losses (FUSED_LOSS) it then evaluates the per-token GRPO terms
  (ratio, clip, dual clip, behavior weight, k3 KL, reduction weight) in registers
  and, when a gradient is needed, sweeps the row again to write
  ``dlogits = g * (onehot - softmax) / tau`` while the row is still hot in L2, with
  1 - p_label = q / s from the other terms. So forward and gradient are one launch.
* ``_grpo_grad_kernel``: the second sweep alone, for per-token scalars g computed
  outside (sequence-level IS, and the backward of plain per-token log-probs), from the
  per-row statistics (m, s, q) the forward kept.

Each sweep walks a row in three parts: a head up to the first 16-byte boundary, a body of
whole unmasked tiles (128-bit vector loads and stores whatever V is) and a masked tail.
Masked-out columns load as -inf (never 0) so they add nothing to the sums; addressing is
int64; all math is fp32 whatever the input dtype; x / tau is a true division. Rows with
mask 0 skip the vocab sweep: they report zeros and, if a gradient is written, a zero row.
Derivations and the traffic model: docs/kernels.md.

Host launchers ``grpo_fwd`` / ``grpo_grad`` allocate and pick the grid; the
autograd Functions live in grpo_loss.py and logprobs.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .options import LossOptions
from .triton_token import _label_logp, _token_terms, _two_sum_err


@triton.jit
def _scale(x, tau, TAU_ONE: tl.constexpr):
    """x / tau, a true division as eager torch does it (x * fp32(1 / tau) would round twice); nothing
    at all for the usual tau = 1 (a specialization: division costs registers and instructions)."""
    if TAU_ONE:
        return x
    else:
        return x / tau


@triton.jit
def _head(off, V, ALIGN: tl.constexpr, ROWS_ALIGNED: tl.constexpr):
    """Elements before the first 16-byte boundary of a row (0 when every row starts aligned: then the
    compiler also knows the tail's mask is constant over whole vectors, and the tail is vectorized)."""
    if ROWS_ALIGNED:
        return tl.zeros([], tl.int32)
    else:
        return tl.minimum((ALIGN - off % ALIGN) % ALIGN, V).to(tl.int32)


@triton.jit
def _lse_block(b_x, is_lab, m, q, t, s_all, RETURN_ENT: tl.constexpr):
    """Fold one block of x = logits / tau into the online state (m, q, t, s_all) of a row.

    m: running max; q: sum of exp(x - m) over the non-label entries; t: sum of exp(x - m) * (x - m)
    and s_all: sum of exp(x - m), both over all entries and only for the entropy. All relative to the
    running max, so nothing cancels when the logits are huge (|x| ~ 1e4).
    """
    m_new = tl.maximum(m, tl.max(b_x, axis=0))
    # An all -inf prefix keeps m = -inf; shift by 0 then so exp() never sees -inf - -inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_safe)
    # NaN stays NaN here (and poisons q): a where() on b_x > -inf would silently drop it
    b_y = b_x - m_safe
    b_e = tl.exp(b_y)
    if RETURN_ENT:
        # t moves with the max: t' = scale * (t + s_all * (m - m')), s_all the sum over every entry
        dm = tl.where(m == float("-inf"), 0.0, m - m_safe)
        t = scale * (t + s_all * dm) + tl.sum(b_e * tl.where(b_x > float("-inf"), b_y, 0.0), axis=0)
        s_all = s_all * scale + tl.sum(b_e, axis=0)
    q = q * scale + tl.sum(tl.where(is_lab, 0.0, b_e), axis=0)
    return m_new, q, t, s_all


@triton.jit
def _row_stats(X, off, head, label, V, tau, RETURN_ENT: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
               TAU_ONE: tl.constexpr):
    """One sweep over a row: the max m, q = sum over j != label of exp(x_j - m), and the entropy.

    x = logits / tau (a true division, as eager torch does it). The row is read in three parts:
    ``head`` (< ALIGN) elements up to the first 16-byte aligned address, a body of whole
    unmasked blocks (vector loads whatever V is), and a masked tail. ``off`` is the row's element
    offset from X; off + head is a multiple of ALIGN (16 bytes of X's dtype).
    Returns (m_safe, s, q, y_label, y_err, entropy) with s = q + exp(y_label), y_label + y_err = x_label - m_safe
    exactly (y_err: the rounding error of the fp32 subtraction).
    """
    m = tl.full([], float("-inf"), tl.float32)
    q = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    s_all = tl.zeros([], tl.float32)
    o_h = tl.arange(0, ALIGN)
    label_h = label.to(tl.int32)
    b_h = _scale(tl.load(X + off + o_h, mask=o_h < head, other=float("-inf")).to(tl.float32), tau, TAU_ONE)
    m, q, t, s_all = _lse_block(b_h, o_h == label_h, m, q, t, s_all, RETURN_ENT)
    n_body = (V - head) // BLOCK_V * BLOCK_V
    p_b = X + tl.multiple_of(off + head, ALIGN)
    lab = (label - head).to(tl.int32)  # the label's offset from the body start: int32 compares
    for v0 in range(0, n_body, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        b_x = _scale(tl.load(p_b + o_v).to(tl.float32), tau, TAU_ONE)
        m, q, t, s_all = _lse_block(b_x, o_v == lab, m, q, t, s_all, RETURN_ENT)
    o_t = n_body + tl.arange(0, BLOCK_V)
    b_t = _scale(tl.load(p_b + o_t, mask=o_t < V - head, other=float("-inf")).to(tl.float32), tau, TAU_ONE)
    m, q, t, s_all = _lse_block(b_t, o_t == lab, m, q, t, s_all, RETURN_ENT)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    x_label = _scale(tl.load(X + off + label).to(tl.float32), tau, TAU_ONE)
    y_label = x_label - m_safe
    # the rounding error of y_label, so that logp is rounded once, not twice
    y_err = _two_sum_err(x_label, -m_safe, y_label)
    y_err = tl.where(y_err == y_err, y_err, 0.0)  # inf - inf: no correction
    s = q + tl.exp(y_label)
    ent = tl.log(s) - (t / s)
    return m_safe, s, q, y_label, y_err, ent


@triton.jit
def _grad_block(b_x, is_lab, m, c, cq):
    """dx = coef * (onehot - exp(x - m) / s) for one block, with c = coef / s and cq = coef * q / s:
    at the label 1 - p = q / s is taken from the sum of the other terms, so it keeps its digits."""
    return tl.where(is_lab, cq, -c * tl.exp(b_x - m))


@triton.jit
def _row_grad(X, off, DX, off_dx, head, label, m, s, q, g, V, tau, DX_ALIGNED: tl.constexpr,
              BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, TAU_ONE: tl.constexpr):
    """dx = g / tau * (onehot(label) - softmax(x)) over one row, stored in DX's dtype.

    Same three-part walk as ``_row_stats``; off_dx + head is a multiple of ALIGN too when DX_ALIGNED
    (the host checks that the two buffers have the same alignment, row by row)."""
    coef = _scale(g, tau, TAU_ONE)
    c = coef / s
    cq = c * q
    o_h = tl.arange(0, ALIGN)
    label_h = label.to(tl.int32)
    b_h = _scale(tl.load(X + off + o_h, mask=o_h < head, other=float("-inf")).to(tl.float32), tau, TAU_ONE)
    tl.store(DX + off_dx + o_h, _grad_block(b_h, o_h == label_h, m, c, cq).to(DX.dtype.element_ty), mask=o_h < head)
    n_body = (V - head) // BLOCK_V * BLOCK_V
    p_b = X + tl.multiple_of(off + head, ALIGN)
    lab = (label - head).to(tl.int32)
    if DX_ALIGNED:
        p_db = DX + tl.multiple_of(off_dx + head, ALIGN)
    else:
        p_db = DX + off_dx + head
    for v0 in range(0, n_body, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        b_x = _scale(tl.load(p_b + o_v).to(tl.float32), tau, TAU_ONE)
        tl.store(p_db + o_v, _grad_block(b_x, o_v == lab, m, c, cq).to(DX.dtype.element_ty))
    o_t = n_body + tl.arange(0, BLOCK_V)
    m_t = o_t < V - head
    b_t = _scale(tl.load(p_b + o_t, mask=m_t, other=float("-inf")).to(tl.float32), tau, TAU_ONE)
    tl.store(p_db + o_t, _grad_block(b_t, o_t == lab, m, c, cq).to(DX.dtype.element_ty), mask=m_t)


@triton.jit
def _row_zero(p_dx, V, BLOCK_V: tl.constexpr):
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        tl.store(p_dx + o_v, tl.zeros([BLOCK_V], tl.float32).to(p_dx.dtype.element_ty), mask=o_v < V)


@triton.jit
def _grpo_fwd_kernel(
    X, stride_xb, stride_xt,
    IDS, MASK, ADV, RW, OLD, BEH, REF,
    LOGP, STATS, ENT, LOSS,
    DX, stride_dxb, stride_dxt,
    N, T, V,
    tau, lo, hi, delta, dual_c, beta, is_cap,
    HAS_OLD: tl.constexpr, HAS_BEH: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, KL_IS: tl.constexpr, W_KL: tl.constexpr,
    FUSED_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, RETURN_ENT: tl.constexpr,
    DX_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, TAU_ONE: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
):
    # Persistent grid: program p takes rows p, p + P, p + 2P, ... (P = the grid size, chosen on the
    # host so that the rows in flight fit in L2 and the gradient sweep re-reads its row from there).
    for i_n in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        _fwd_row(
            i_n, X, stride_xb, stride_xt, IDS, MASK, ADV, RW, OLD, BEH, REF, LOGP, STATS, ENT, LOSS,
            DX, stride_dxb, stride_dxt, T, V, tau, lo, hi, delta, dual_c, beta, is_cap,
            HAS_OLD, HAS_BEH, HAS_REF, HAS_DELTA, HAS_DUAL, KL_IS, W_KL, FUSED_LOSS, COMPUTE_GRAD, RETURN_ENT,
            DX_ALIGNED, BLOCK_V, ALIGN, TAU_ONE, ROWS_ALIGNED,
        )


@triton.jit
def _fwd_row(
    i_n, X, stride_xb, stride_xt, IDS, MASK, ADV, RW, OLD, BEH, REF, LOGP, STATS, ENT, LOSS,
    DX, stride_dxb, stride_dxt, T, V, tau, lo, hi, delta, dual_c, beta, is_cap,
    HAS_OLD: tl.constexpr, HAS_BEH: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, KL_IS: tl.constexpr, W_KL: tl.constexpr,
    FUSED_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, RETURN_ENT: tl.constexpr,
    DX_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, TAU_ONE: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
):
    i_b = i_n // T
    i_t = i_n % T
    off = i_b * stride_xb + i_t * stride_xt
    off_dx = i_b * stride_dxb + i_t * stride_dxt
    if tl.load(MASK + i_n) != 0:
        label = tl.load(IDS + i_n).to(tl.int64)
        head = _head(off, V, ALIGN, ROWS_ALIGNED)
        m, s, q, y_label, y_err, ent = _row_stats(X, off, head, label, V, tau, RETURN_ENT, BLOCK_V, ALIGN, TAU_ONE)
        logp, logp_lo = _label_logp(y_label, y_err, s, q)
        tl.store(LOGP + i_n, logp)
        tl.store(STATS + 4 * i_n, m)
        tl.store(STATS + 4 * i_n + 1, s)
        tl.store(STATS + 4 * i_n + 2, q)
        tl.store(STATS + 4 * i_n + 3, logp_lo)
        if RETURN_ENT:
            tl.store(ENT + i_n, ent)
        if FUSED_LOSS:
            loss, dl = _token_terms(
                logp, logp_lo, tl.load(ADV + i_b).to(tl.float32), i_n, OLD, BEH, REF, lo, hi, delta, dual_c, beta,
                is_cap, HAS_OLD, HAS_BEH, HAS_REF, HAS_DELTA, HAS_DUAL, KL_IS, W_KL,
            )
            tl.store(LOSS + i_n, loss)
            if COMPUTE_GRAD:
                _row_grad(X, off, DX, off_dx, head, label, m, s, q, tl.load(RW + i_n) * dl, V, tau, DX_ALIGNED,
                          BLOCK_V, ALIGN, TAU_ONE)
    else:
        tl.store(LOGP + i_n, 0.0)
        tl.store(STATS + 4 * i_n, 0.0)
        tl.store(STATS + 4 * i_n + 1, 1.0)
        tl.store(STATS + 4 * i_n + 2, 0.0)
        tl.store(STATS + 4 * i_n + 3, 0.0)
        if RETURN_ENT:
            tl.store(ENT + i_n, 0.0)
        if FUSED_LOSS:
            tl.store(LOSS + i_n, 0.0)
            if COMPUTE_GRAD:
                _row_zero(DX + off_dx, V, BLOCK_V)


@triton.jit
def _grpo_grad_kernel(
    X, stride_xb, stride_xt,
    IDS, MASK, STATS, G,
    DX, stride_dxb, stride_dxt,
    N, T, V, tau,
    DX_ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, TAU_ONE: tl.constexpr,
    ROWS_ALIGNED: tl.constexpr,
):
    for i_n in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):
        i_b = i_n // T
        i_t = i_n % T
        off = i_b * stride_xb + i_t * stride_xt
        off_dx = i_b * stride_dxb + i_t * stride_dxt
        if tl.load(MASK + i_n) != 0:
            label = tl.load(IDS + i_n).to(tl.int64)
            head = _head(off, V, ALIGN, ROWS_ALIGNED)
            _row_grad(X, off, DX, off_dx, head, label, tl.load(STATS + 4 * i_n), tl.load(STATS + 4 * i_n + 1),
                      tl.load(STATS + 4 * i_n + 2), tl.load(G + i_n), V, tau, DX_ALIGNED, BLOCK_V, ALIGN, TAU_ONE)
        else:
            _row_zero(DX + off_dx, V, BLOCK_V)


BLOCK_V_RANGE = (16, 16384)  # the interpreter's default tile goes up to 16384


# columns of the per-row statistics grpo_fwd returns: (max, sum, sum without the label, logp_lo);
# grpo_grad reads the first three
STATS_WIDTH = 4


def logp_lo(stats: torch.Tensor) -> torch.Tensor:
    """The low part of each log-prob from ``grpo_fwd``'s ``stats`` [B, T, 4] (see ``_label_logp``)."""
    return stats[..., 3]


def max_block_v(element_size: int) -> int:
    """Largest tile that compiles without register spills on sm_80 / sm_90 (checked by
    tests/kernels/test_compile_targets.py): 8192 for 16-bit logits, 4096 for fp32 (8192 spills on sm_90)."""
    return 8192 if element_size <= 2 else 4096


def _block_v(V: int, block_v: int | None, element_size: int = 4) -> int:
    """The vocab tile: ``block_v`` (tests), else $RERULE_BLOCK_V, else automatic.

    A tile must be a power of two (Triton's arange) in [16, ``max_block_v``]: larger tiles spill
    registers (32768 does on sm_90 for any dtype).
    """
    source = "block_v"
    if block_v is None:
        env = os.environ.get("RERULE_BLOCK_V")
        if not env:
            # The interpreter pays per op, not per element: one big tile is fastest there.
            cap = 16384 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
            return max(BLOCK_V_RANGE[0], min(triton.next_power_of_2(V), cap))
        source = "RERULE_BLOCK_V"
        try:
            block_v = int(env)
        except ValueError:
            raise ValueError(f"RERULE_BLOCK_V must be an integer, got {env!r}") from None
    lo, hi = BLOCK_V_RANGE[0], max_block_v(element_size)
    if not (lo <= block_v <= hi) or block_v & (block_v - 1):
        raise ValueError(
            f"{source} must be a power of two in [{lo}, {hi}] for {8 * element_size}-bit logits (larger tiles "
            f"spill registers), got {block_v}"
        )
    return block_v


def _grid(N: int, row_bytes: int, device: torch.device) -> int:
    """Programs of the persistent grid: enough to keep every SM busy, few enough that the rows in
    flight (one per program) fit in ~3/4 of L2, so the gradient sweep re-reads its row from L2.

    $RERULE_GRID overrides (0 = one program per row, the non-persistent launch, for A/B timing).
    """
    env = os.environ.get("RERULE_GRID")
    if env is not None and env != "":
        try:
            g = int(env)
        except ValueError:
            raise ValueError(f"RERULE_GRID must be an integer >= 0, got {env!r}") from None
        if g < 0:
            raise ValueError(f"RERULE_GRID must be an integer >= 0, got {env!r}")
        return max(1, min(N, g)) if g else max(N, 1)
    if device.type != "cuda":
        return max(N, 1)
    props = torch.cuda.get_device_properties(device)
    n_sm = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 0) or (40 << 20)
    fit = int(0.75 * l2) // max(row_bytes, 1)
    return max(1, min(N, max(n_sm, min(4 * n_sm, fit))))


def _align(t: torch.Tensor) -> int:
    """Elements per 16 bytes of ``t``'s dtype: the vector width of a 128-bit load."""
    return max(1, 16 // t.element_size())


def _rows_aligned(x: torch.Tensor, align: int) -> bool:
    """Whether every row of x starts on a 16-byte boundary (then no row has a head to peel)."""
    return x.data_ptr() % 16 == 0 and x.stride(0) % align == 0 and x.stride(1) % align == 0


def _dx_aligned(x: torch.Tensor, dx: torch.Tensor, align: int) -> bool:
    """Whether every row of dx starts at the same offset modulo ``align`` as the row of x."""
    if dx.data_ptr() == x.data_ptr() and dx.stride() == x.stride():
        return True
    return (dx.stride(0) - x.stride(0)) % align == 0 and (dx.stride(1) - x.stride(1)) % align == 0


def _num_warps(block_v: int) -> int:
    return 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output element is written by a kernel; tests swap this for a NaN-poisoned allocator.
    return torch.empty(shape, dtype=dtype, device=device)


def _grad_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The gradient buffer: the logits themselves (inplace), a contiguous one, or, when the logits are a
    view whose row offsets differ from a contiguous layout modulo 16 bytes (TRL's logits[:, :-1] with an
    odd V), a buffer with the logits' own strides, so the gradient rows start at the same alignment as
    the logit rows and the kernels' body stores stay 128-bit vector stores."""
    if inplace:
        return logits
    a = _align(logits)
    B, T, V = logits.shape
    sb, st, _ = logits.stride()
    if (sb - T * V) % a == 0 and (st - V) % a == 0:
        return _empty(logits.shape, logits.dtype, logits.device)
    size = 1 + (B - 1) * sb + (T - 1) * st + (V - 1)
    return _empty((size,), logits.dtype, logits.device).as_strided(logits.shape, logits.stride())


def check_interpreter(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported (or use impl='torch'/'auto')."
        )


def grpo_fwd(
    logits, ids, mask, adv, rw, old, behavior, ref, o: LossOptions,
    fused_loss: bool, compute_grad: bool, return_entropy: bool, inplace: bool, block_v: int | None = None,
):
    """Launch the forward kernel over [B, T, V] logits (row stride 1 on V).

    ids/mask/rw/old/behavior/ref are [B, T] contiguous; adv is [B] fp32. Returns
    (logp, lse, entropy or None, loss_tok or None, dlogits or None), fp32 except dlogits.
    """
    check_interpreter(logits)
    B, T, V = logits.shape
    N = B * T
    f32 = (torch.float32, logits.device)
    logp, stats = _empty((N,), *f32), _empty((N, STATS_WIDTH), *f32)
    ent = _empty((N,), *f32) if return_entropy else logp
    loss_tok = _empty((N,), *f32) if fused_loss else logp
    dx = _grad_buffer(logits, inplace) if (fused_loss and compute_grad) else logits
    BLOCK_V = _block_v(V, block_v, logits.element_size())
    has_ref = ref is not None and o.beta != 0.0
    dummy = logp
    align = _align(logits)
    if N > 0:
        _grpo_fwd_kernel[(_grid(N, V * logits.element_size(), logits.device),)](
            logits, logits.stride(0), logits.stride(1),
            ids, mask, adv if fused_loss else dummy, rw if fused_loss else dummy,
            old if old is not None else dummy, behavior if behavior is not None else dummy, ref if has_ref else dummy,
            logp, stats, ent, loss_tok,
            dx, dx.stride(0), dx.stride(1),
            N, T, V,
            float(o.temperature), 1.0 - o.epsilon_low, 1.0 + o.epsilon_high,
            float(o.delta or 0.0), float(o.dual_clip or 0.0), float(o.beta), float(o.is_cap),
            HAS_OLD=old is not None, HAS_BEH=behavior is not None, HAS_REF=has_ref,
            HAS_DELTA=o.delta is not None, HAS_DUAL=o.dual_clip is not None, KL_IS=o.bias_correction_kl,
            W_KL=o.is_weight_kl and behavior is not None,
            FUSED_LOSS=fused_loss, COMPUTE_GRAD=compute_grad, RETURN_ENT=return_entropy,
            DX_ALIGNED=_dx_aligned(logits, dx, align), BLOCK_V=BLOCK_V, ALIGN=align, TAU_ONE=o.temperature == 1.0,
            ROWS_ALIGNED=_rows_aligned(logits, align),
            num_warps=_num_warps(BLOCK_V),
        )
    shape = (B, T)
    return (
        logp.view(shape),
        stats.view(B, T, STATS_WIDTH),
        ent.view(shape) if return_entropy else None,
        loss_tok.view(shape) if fused_loss else None,
        dx if (fused_loss and compute_grad) else None,
    )


def grpo_grad(logits, ids, mask, stats, g, temperature: float, inplace: bool, block_v: int | None = None):
    """Launch the gradient sweep: dlogits = g * (onehot - softmax) / tau, zero rows where mask is 0.

    ``stats`` [B, T, 4] is what ``grpo_fwd`` returned for the same logits (row max, sum, and the sum
    without the label)."""
    check_interpreter(logits)
    B, T, V = logits.shape
    dx = _grad_buffer(logits, inplace)
    BLOCK_V = _block_v(V, block_v, logits.element_size())
    align = _align(logits)
    if B * T > 0:
        _grpo_grad_kernel[(_grid(B * T, V * logits.element_size(), logits.device),)](
            logits, logits.stride(0), logits.stride(1),
            ids, mask, stats.contiguous(), g.to(torch.float32).contiguous(),
            dx, dx.stride(0), dx.stride(1),
            B * T, T, V, float(temperature),
            DX_ALIGNED=_dx_aligned(logits, dx, align), BLOCK_V=BLOCK_V, ALIGN=align, TAU_ONE=temperature == 1.0,
            ROWS_ALIGNED=_rows_aligned(logits, align),
            num_warps=_num_warps(BLOCK_V),
        )
    return dx
