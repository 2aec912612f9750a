"""The GRPO loss from hidden states and the lm_head weight; the [N, V] logits never exist whole.

Design: chunked GEMM + the fused GRPO kernel, on any backend (torch, Triton, CUDA)::

    rows   = nonzero(mask)                       # compact first: padding rows are never multiplied
    for each chunk r of rows (chunk_rows rows):
        x_c   = h[r] @ W.T (+ b)                 # [n, V], fp32 (fp32 accumulate for bf16/fp16 inputs)
        logp, stats, ent, loss_tok, dx_c = backend.grpo_fwd(x_c as [n, 1, V], ..., inplace=True)
        grad_h[r]  = dx_c @ W                    # each row written once
        grad_W    += dx_c.T @ h[r]               # fp32 accumulator, cast to W's dtype at the end
        grad_b    += dx_c.sum(0)

Why this shape:

* Compaction. A batch that is half padding costs half: the row count of every GEMM and kernel
  launch is the number of tokens with mask 1, not B * T.
* One launch per chunk for token-level losses. The backend's ``grpo_fwd`` (the same kernel as
  ``grpo_loss``) returns logp, the per-token loss and d loss / d logits for the chunk in one sweep,
  written in place over the chunk's logits (the buffer is ours). The chunk is viewed as [n, 1, V]
  (T = 1), so each row carries its own advantage, reduction weight and old/behavior/ref log-prob.
* Gradients in forward. The autograd Function computes grad_h, grad_W and grad_b while each
  chunk's logits are live and backward only scales them by the upstream scalar, so a token-level
  loss costs 6 N H V FLOPs (one GEMM forward, two backward, no recompute) against Liger's
  8 N H V convention. Only one [n, V] block exists at a time: peak memory is the gradients
  (grad_W fp32 [V, H], grad_h [N, H]) plus one chunk and the backend's scratch.
* fp32 accumulation. grad_W is summed over chunks in fp32 even for bf16/fp16 weights (Liger
  accumulates across chunks in bf16, which loses low-order bits once there are many chunks),
  and is cast to the weight's dtype once at the end.
* Sequence-level IS (GSPO) needs every log-prob of a sequence before any gradient: pass 1 over the
  chunks computes logp and the softmax statistics (and entropy) only and discards the logits; the O(N) torch step
  ``sequence_terms`` gives the per-token g = d loss / d logp; pass 2 recomputes each chunk's
  logits and calls the backend's ``grpo_grad`` for dx_c. Cost: 8 N H V FLOPs (one extra GEMM),
  the same peak memory.

GEMM precision: logits are never rounded to the input dtype (rounding logits to bf16 before the
softmax is a bug peers shipped). fp32 inputs: fp32 GEMMs. bf16/fp16 on CUDA: ``torch.mm(...,
out_dtype=torch.float32)`` (tensor cores, fp32 accumulate and output); dx_c is rounded to the
input dtype for the two gradient GEMMs, as an eager bf16 backward does. Where that mixed GEMM does
not exist (CPU), W is upcast to fp32 once per call (bf16 values are exact in fp32, so this is the
product a bf16-in / fp32-accumulate GEMM computes) and all three GEMMs run in fp32.
fp64 inputs: fp64 GEMMs, the backend's math in fp32.

The alternative: a Cut-Cross-Entropy style single Triton kernel that never materializes even a
chunk (GEMM tiles of h @ W.T feed an online max / log-sum-exp per row in registers; the backward
recomputes the tiles and fuses dx into the grad_h / grad_W GEMMs). It holds O(N) extra memory
instead of one [n, V] chunk, but recomputes the logits in backward (8 N H V FLOPs or more, plus a
split-V reduction for grad_h), and its hand-written GEMM has to match cuBLAS/CUTLASS to win. The
chunked pipeline keeps cuBLAS for 100% of the FLOPs and adds one read + one write of each chunk
for the fused kernel (with V = 151936, n = 2048: ~2.5 GB per chunk, ~1 ms at 3 TB/s next to
~10 ms of GEMM per chunk at H = 4096). How to decide on a GPU: run bench/ at N = 8192, H = 4096,
V = 151936 bf16 and compare (a) this pipeline's time against 3x the bare lm_head GEMM time (its
floor), (b) a CCE kernel's time against 4x; the pipeline wins unless its fused-kernel sweeps and
the bf16 cast of dx_c cost more than the extra GEMM. No GPU was available when this was written:
the default GPU chunk size below is an untuned starting point.
"""

from __future__ import annotations

import os

import torch

from .grpo_loss import backend_module, scale_grad_
from .grpo_math import sequence_terms
from .options import LossOptions

# fp32 bytes of one chunk's logits. CPU: 32 MB; at N=4096, V=32000, H=512 a 64 MB chunk measured
# 155-185 MB peak RSS above the inputs (as much as Liger), 32 MB measured 115-131 MB (timings on the
# shared 2-core machine were too noisy to rank the two).
# GPU: 1 GiB (a GEMM of >= 1k rows runs near peak; untuned, see the module docstring).
_CPU_CHUNK_BYTES = int(os.environ.get("RERULE_FUSED_LINEAR_CPU_CHUNK_BYTES", 32 << 20))
_GPU_CHUNK_BYTES = int(os.environ.get("RERULE_FUSED_LINEAR_GPU_CHUNK_BYTES", 1 << 30))
_TORCH_SUBCHUNK_ELEMS = int(os.environ.get("RERULE_FUSED_LINEAR_SUBCHUNK_ELEMS", 1 << 19))
_GPU_GRADW_BLOCK = 8192
_HALF = (torch.float16, torch.bfloat16)


def default_chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's fp32 logits take about the byte budget of ``device``."""
    if device.type == "cpu":
        return max(1, _CPU_CHUNK_BYTES // (4 * max(V, 1)))
    # a multiple of 128 rows keeps the GEMM's M dimension on whole tiles
    return max(128, (_GPU_CHUNK_BYTES // (4 * max(V, 1))) // 128 * 128)


_MIXED_MM: dict[str, tuple[bool, bool]] = {}


def _mixed_mm_support(device: torch.device) -> tuple[bool, bool]:
    """(mm with out_dtype=fp32 for half inputs, addmm accumulating into an fp32 ``out``), probed once."""
    key = str(device)
    if key not in _MIXED_MM:
        mm_ok = acc_ok = False
        if device.type == "cuda":
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            try:
                mm_ok = bool((torch.mm(a, a, out_dtype=torch.float32) == 16).all())
            except (RuntimeError, TypeError, NotImplementedError):
                mm_ok = False
            if mm_ok:
                c = torch.ones(16, 16, dtype=torch.float32, device=device)
                try:
                    torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
                    acc_ok = bool((c == 17).all())
                except (RuntimeError, TypeError, NotImplementedError):
                    acc_ok = False
        _MIXED_MM[key] = (mm_ok, acc_ok)
    return _MIXED_MM[key]


class _LmHead:
    """The three lm_head GEMMs of one call and the fp32 gradient accumulators of W and b."""

    def __init__(self, weight, bias, need_w: bool, need_b: bool):
        self.dtype = weight.dtype
        self.acc = torch.promote_types(weight.dtype, torch.float32)
        mm_ok, self.acc_ok = _mixed_mm_support(weight.device) if weight.dtype in _HALF else (False, False)
        self.mixed = mm_ok
        self.w = weight if (self.mixed or weight.dtype == self.acc) else weight.to(self.acc)
        self.b = None if bias is None else bias.to(self.acc)
        V, H = weight.shape
        self.grad_w = torch.zeros(V, H, dtype=self.acc, device=weight.device) if need_w else None
        self.grad_b = torch.zeros(V, dtype=self.acc, device=weight.device) if need_b else None

    def logits(self, h_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, H] rows of hidden -> [n, V] logits in the accumulation dtype (fp32, or fp64), into ``out``
        (a reused [n, V] buffer) when given."""
        if self.mixed:
            x = torch.mm(h_c, self.w.T, out_dtype=torch.float32)
        else:
            x = torch.mm(h_c.to(self.acc), self.w.T, out=out)
        if self.b is not None:
            x += self.b
        return x

    def backward(self, dx_c: torch.Tensor, h_c: torch.Tensor, grad_h: torch.Tensor | None, r: torch.Tensor):
        """Add one chunk's d loss / d logits [n, V] into grad_h[r], grad_W and grad_b."""
        if self.grad_b is not None:
            self.grad_b += dx_c.sum(0)
        if self.mixed:
            d = dx_c.to(self.dtype)
            if grad_h is not None:
                grad_h.index_copy_(0, r, torch.mm(d, self.w))
            if self.grad_w is not None:
                if self.acc_ok:
                    torch.addmm(self.grad_w, d.T, h_c, out_dtype=torch.float32, out=self.grad_w)
                else:
                    # No fp32-accumulating addmm for half inputs in this torch: add fp32 products in vocab
                    # blocks, so the temporary is [block, H], never a second [V, H].
                    for v0 in range(0, d.shape[1], _GPU_GRADW_BLOCK):
                        v1 = v0 + _GPU_GRADW_BLOCK
                        self.grad_w[v0:v1] += torch.mm(d[:, v0:v1].T, h_c, out_dtype=torch.float32)
            return
        if grad_h is not None:
            grad_h.index_copy_(0, r, torch.mm(dx_c, self.w).to(grad_h.dtype))
        if self.grad_w is not None:
            # in place (beta = 1): no [V, H] temporary per chunk
            self.grad_w.addmm_(dx_c.T, h_c.to(self.acc))


def _chunk_slices(n_valid: int, step: int):
    for s in range(0, n_valid, step):
        yield s, min(s + step, n_valid)


def _sequence_grad_pass(backend, head, h2, rows, step, buf, grad_h, *, ids_v, stats_v, g_v, ones, temperature, tile):
    """Pass 2 of a sequence-level loss: recompute each chunk's logits and back-propagate the per-token
    d loss / d logp ``g_v`` through the saved softmax statistics into the lm_head and ``grad_h``."""
    col = lambda t, s, e: t[s:e].view(-1, 1)
    for s, e in _chunk_slices(rows.numel(), step):
        r = rows[s:e]
        h_c = h2.index_select(0, r)
        n = e - s
        x = chunk_logits(head, h_c, None if buf is None else buf[:n])
        V = x.shape[-1]
        dx = backend.grpo_grad(
            x.view(n, 1, V), col(ids_v, s, e), ones[:n], _stats_rows(stats_v, s, e), col(g_v, s, e),
            temperature, True, tile,
        )
        head.backward(dx.view(n, V), h_c, grad_h, r)
        del x, dx


def _token_pass(backend, head, h2, rows, step, buf, grad_h, *, cols, adv_v, ones, o, any_grad, return_entropy, tile):
    """Pass 1 over the valid rows in chunks: chunk logits, the backend's forward (log-probs, softmax
    statistics, entropy; for a token-level loss also the per-token loss and its gradient, back-propagated
    into the lm_head and ``grad_h`` at once). Returns per valid row (logp, stats, entropy or None, loss)."""
    ids_v, rw_v, old_v, behavior_v, ref_v = cols
    col = lambda t, s, e: None if t is None else t[s:e].view(-1, 1)
    token_level = not o.sequence_level
    n_valid = rows.numel()
    f32 = dict(dtype=torch.float32, device=h2.device)
    logp_v = torch.zeros(n_valid, **f32)
    stats_v = None  # the backend's per-row softmax statistics ([n_valid, k]), kept for pass 2
    ent_v = torch.zeros(n_valid, **f32) if return_entropy else None
    loss_v = torch.zeros(n_valid, **f32)
    for s, e in _chunk_slices(n_valid, step):
        r = rows[s:e]
        h_c = h2.index_select(0, r)
        n = e - s
        x = chunk_logits(head, h_c, None if buf is None else buf[:n])
        V = x.shape[-1]
        lp, ls, en, lt, dx = backend.grpo_fwd(
            x.view(n, 1, V), col(ids_v, s, e), ones[:n], adv_v[s:e], col(rw_v, s, e), col(old_v, s, e),
            col(behavior_v, s, e), col(ref_v, s, e), o, token_level, token_level and any_grad, return_entropy,
            True, tile,
        )
        logp_v[s:e] = lp.view(-1)
        st = ls.reshape(n, -1)
        if stats_v is None:
            stats_v = torch.zeros(n_valid, st.shape[1], **f32)
        stats_v[s:e] = st
        if return_entropy:
            ent_v[s:e] = en.view(-1)
        if token_level:
            loss_v[s:e] = lt.view(-1)
            if any_grad:
                head.backward(dx.view(n, V), h_c, grad_h, r)
        del x, dx
    return logp_v, stats_v, ent_v, loss_v


def fused_linear_grpo_forward(
    hidden, weight, bias, ids, mask, adv, rw, old, behavior, ref, o: LossOptions, impl: str,
    need_h: bool, need_w: bool, need_b: bool, return_entropy: bool, chunk_rows: int | None = None,
    tile: int | None = None,
):
    """The whole computation on canonical inputs; gradients (if asked) are for a unit upstream scalar.

    hidden [B, T, H]; weight [V, H]; bias [V] or None (same dtype); ids int64 [B, T]; mask int32
    [B, T]; adv fp32 [B]; rw fp32 [B, T] (reduction weights); old/behavior/ref fp32 [B, T] or None.
    Returns (loss 0-dim fp32, logp [B, T], entropy [B, T] or None, grad_h [B, T, H] or None,
    grad_W [V, H] or None, grad_b [V] or None); gradients in the inputs' dtypes.
    """
    backend = backend_module(impl)
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    device = hidden.device
    h2 = hidden.reshape(N, H)
    valid = mask.reshape(-1) != 0
    rows = valid.nonzero().squeeze(1)
    n_valid = rows.numel()
    step = chunk_rows or default_chunk_rows(V, device)
    if impl == "torch" and tile is None:
        # The torch backend copies the rows it works on (~4 [rows, V] fp32 temporaries): sub-chunks of
        # ~2 MB keep that scratch small next to the chunk.
        tile = max(1, min(step, _TORCH_SUBCHUNK_ELEMS // max(V, 1)))

    # Per valid row, contiguous: a chunk's inputs are slices, viewed as [n, 1] (T = 1 for the backend).
    pick = lambda t: None if t is None else t.reshape(-1).index_select(0, rows).contiguous()
    ids_v, rw_v, old_v, behavior_v = pick(ids), pick(rw), pick(old), pick(behavior)
    ref_v = pick(ref) if o.beta != 0.0 else None
    adv_v = adv.index_select(0, rows // T).contiguous()
    ones = torch.ones(min(step, max(n_valid, 1)), 1, dtype=torch.int32, device=device)
    f32 = dict(dtype=torch.float32, device=device)

    head = _LmHead(weight, bias, need_w, need_b and bias is not None)
    grad_h = torch.zeros(N, H, dtype=hidden.dtype, device=device) if need_h else None
    any_grad = need_h or need_w or (need_b and bias is not None)
    token_level = not o.sequence_level

    # One chunk buffer for the whole call: allocating a fresh [n, V] block per chunk lets glibc raise
    # its mmap threshold and keep freed blocks resident, which showed up as ~+50% peak RSS on CPU.
    buf = None if (head.mixed or n_valid == 0) else torch.empty(min(step, n_valid), V, dtype=head.acc, device=device)
    logp_v, stats_v, ent_v, loss_v = _token_pass(
        backend, head, h2, rows, step, buf, grad_h, cols=(ids_v, rw_v, old_v, behavior_v, ref_v), adv_v=adv_v,
        ones=ones, o=o, any_grad=any_grad, return_entropy=return_entropy, tile=tile,
    )

    logp = torch.zeros(N, **f32).index_copy_(0, rows, logp_v).view(B, T)
    ent = None if ent_v is None else torch.zeros(N, **f32).index_copy_(0, rows, ent_v).view(B, T)
    if token_level:
        loss_tok = torch.zeros(N, **f32).index_copy_(0, rows, loss_v).view(B, T)
    else:
        ref_or_none = ref if o.beta != 0.0 else None
        lo_v = backend.logp_lo(stats_v) if n_valid else None
        logp_lo = None if lo_v is None else torch.zeros(N, **f32).index_copy_(0, rows, lo_v).view(B, T)
        loss_tok, g = sequence_terms(
            logp, mask, adv, rw, o, old=old, behavior=behavior, ref=ref_or_none, logp_lo=logp_lo
        )
        if any_grad:
            _sequence_grad_pass(
                backend, head, h2, rows, step, buf, grad_h, ids_v=ids_v, stats_v=stats_v,
                g_v=pick(g.to(torch.float32)), ones=ones, temperature=o.temperature, tile=tile,
            )
    loss = (rw * loss_tok).sum()

    grad_w = None if head.grad_w is None else head.grad_w.to(weight.dtype)
    grad_b = None if head.grad_b is None else head.grad_b.to(bias.dtype)
    grad_h = None if grad_h is None else grad_h.view(B, T, H)
    return loss, logp, ent, grad_h, grad_w, grad_b


def _stats_rows(stats_v: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Rows s:e of the kept statistics, shaped as the backend returned them for an [n, 1, V] chunk."""
    st = stats_v[s:e]
    return st.view(e - s, 1) if st.shape[1] == 1 else st.view(e - s, 1, st.shape[1])


def chunk_logits(head: _LmHead, h_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk's logits (module level so tests can count the rows that are multiplied)."""
    return head.logits(h_c, out)


class FusedLinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, mask, adv, rw, old, behavior, ref, o: LossOptions, impl, grad_enabled,
                return_entropy, chunk_rows, tile):
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        # An ambient autocast (trainers run the model under one) would turn the fp32 GEMMs into bf16
        # ones and round the logits; the precision here is chosen explicitly, so autocast is off.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, logp, ent, gh, gw, gb = fused_linear_grpo_forward(
                hidden, weight, bias, ids, mask, adv, rw, old, behavior, ref, o, impl, need_h, need_w, need_b,
                return_entropy, chunk_rows, tile,
            )
        ctx.save_for_backward(gh, gw, gb)
        ctx.consumed = False
        outs = (loss, logp, ent if ent is not None else logp.new_empty(0))
        ctx.mark_non_differentiable(outs[1], outs[2])
        return outs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        if ctx.consumed:
            raise RuntimeError(
                "the fused-linear GRPO loss keeps one set of gradients: backward can run once per forward"
            )
        ctx.consumed = True
        # The stored gradients are ours: scale them in place rather than allocate a second grad_W.
        # (skipped when the upstream gradient is 1; in fp32 otherwise, see scale_grad_)
        grads = tuple(None if t is None else scale_grad_(t, grad_loss) for t in ctx.saved_tensors)
        return grads + (None,) * 13


def fused_linear_grpo(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
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
    chunk_rows: int | None = None,
    tile: int | None = None,
):
    """Kernel-level entry on validated, canonical inputs (see ``fused_linear_grpo_forward``).

    rw: [B, T] fp32 reduction weights, as in ``grpo_loss.fused_grpo_loss``. ``chunk_rows`` is the
    number of valid rows per GEMM chunk (default ``default_chunk_rows``); ``tile`` is passed to the
    backend (Triton BLOCK_V, torch sub-chunk rows), for tests.
    Returns (loss, logp, entropy or None); loss is differentiable w.r.t. hidden, weight and bias.
    """
    loss, logp, ent = FusedLinearGRPOLoss.apply(
        hidden, weight, bias, ids, mask, adv, rw, old, behavior, ref, o, impl, torch.is_grad_enabled(),
        return_entropy, chunk_rows, tile,
    )
    return loss, logp, (ent if return_entropy else None)
