"""The benchmarked ops and every implementation of each (ours and the peers), on one set of options.

Ops: ``logps`` (per-token log-probs), ``loss`` (the fused GRPO loss over logits), ``linear`` (the
fused-linear GRPO loss over hidden states and the LM head), ``advantages`` (group advantages).

Impls (not every op has every one):

=================  =====================================================================
triton, torch      ours: ``rerule.*(impl="triton" | "torch")``
cuda               ours, the CUDA C++ backend (impl="cuda"): GPU only, when kernels/lib is built
reference          the spec, ``rerule.kernels.reference`` (plain autograd, fp32 math)
compile            ``torch.compile(dynamic=True)`` of the reference (loss value only, so unused
                   outputs fold), fwd+bwd
trl                TRL's ``selective_log_softmax`` as TRL dispatches it (its Triton kernel on
                   CUDA, its eager loop on CPU) + TRL's loss formula + autograd
trl_eager          TRL's eager path (per-sequence ``log_softmax`` in the logits' dtype, gather)
                   + TRL's loss formula + autograd; needs no trl install
liger              Liger ``triton_grpo_loss`` (logits [B, T+1, V]) / ``fused_selective_log_softmax``
liger_chunked      Liger ``LigerFusedLinearGRPOLoss`` (torch.compile'd chunks on CUDA)
=================  =====================================================================

The options every impl runs with, and the peers' adapters, are in bench/peers.py.
"""

from __future__ import annotations

import math
import os

import torch

import rerule
from rerule.kernels.reference import group_advantages_reference, grpo_loss_reference, token_logps_reference

from .common import SESSION, compile_enabled, profile
from .peers import (
    GROUP_SIZE,
    LOSS_OPTIONS,
    MODES,
    OPTS,
    eager_logps,
    liger_ext_grads,
    liger_ext_leaves,
    liger_linear,
    liger_logps,
    liger_loss,
    liger_on,
    trl_logps,
    trl_logps_fn,
    trl_on,
    trl_style_advantages,
    trl_style_loss,
)


def _compiled(key, fn):
    # dynamic shapes: the gate's shape and the timed shape share one compilation (minutes on a GPU
    # machine's budget otherwise); timed in fwd+bwd only, for the same reason.
    if key not in SESSION.compile_cache:
        SESSION.compile_cache[key] = torch.compile(fn, dynamic=True)
    return SESSION.compile_cache[key]


# ----------------------------------------------------------------------------- impl records


class Impl:
    """One implementation of an op.

    forward(inp, leaves) -> the op's output (scalar loss, [B, T] logps or [N] advantages).
    leaves(inp, need_grad) -> the differentiable inputs it reads (default: the op's own, no copy).
    grads(leaves) -> {"grad_<name>": tensor} in the op's canonical layout (default: leaf.grad).
    interpreted: a Triton kernel; on CPU it runs under TRITON_INTERPRET, for the gate only.
    """

    def __init__(
        self,
        name,
        label,
        forward,
        *,
        ours=False,
        modes=MODES,
        available=None,
        leaves=None,
        grads=None,
        interpreted=False,
        detail=None,
    ):
        self.name, self.label, self.forward, self.ours, self.modes = name, label, forward, ours, modes
        self._available, self._leaves, self._grads = available, leaves, grads
        self.interpreted, self.detail = interpreted, detail

    def unavailable(self, dev) -> str | None:
        """None when this impl can run on ``dev``, else why not."""
        if self.interpreted and dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on CPU needs TRITON_INTERPRET=1 before triton is imported"
        return self._available() if self._available else None

    def leaves(self, op, inp, need_grad):
        if self._leaves:
            return self._leaves(inp, need_grad)
        return {k: inp[k].detach().requires_grad_(need_grad) for k in op.leaf_names}

    def grads(self, leaves):
        if self._grads:
            return self._grads(leaves)
        return {f"grad_{k}": t.grad for k, t in leaves.items()}


def _compile_on():
    if compile_enabled(profile()):
        return None
    return (
        "torch.compile is off in this profile (~50 s per graph on a CPU); RERULE_BENCH_COMPILE=1 turns it on"
    )


def _cuda_on():
    if not torch.cuda.is_available():
        return "impl='cuda' needs a GPU"
    try:
        from rerule.kernels import cuda_grpo

        path = cuda_grpo.library_path()
    except Exception as err:
        return f"rerule.kernels.cuda_grpo unavailable ({type(err).__name__}: {err})"
    return None if path.is_file() else f"the CUDA library is not built ({path} missing)"


def _fused_linear_on():
    return None if hasattr(rerule, "fused_linear_grpo_loss") else "rerule.fused_linear_grpo_loss is missing"


# ----------------------------------------------------------------------------- inputs


def _gen(dev, seed):
    return torch.Generator(device=dev).manual_seed(seed)


def _mask(B, T, dev, padded, gen):
    if not padded:
        return torch.ones(B, T, dtype=torch.int32, device=dev)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=gen, device=dev)
    return (torch.arange(T, device=dev).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.int32)


def _true_logps(logits_rows, ids, temperature):
    """fp32 log-probs of ids, computed in row chunks (no [N, V] fp32 copy at real shapes)."""
    B, T = ids.shape
    flat_ids = ids.reshape(-1)
    out = torch.empty(B * T, dtype=torch.float32, device=ids.device)
    step = 1024
    for s in range(0, B * T, step):
        x = logits_rows(s, s + step).float() / temperature
        out[s : s + step] = x.gather(1, flat_ids[s : s + step, None]).squeeze(1) - torch.logsumexp(x, -1)
    return out.view(B, T)


def _policy_inputs(B, T, dev, gen, padded, true_logp):
    """ids-free part: mask, advantages, old and ref log-probs near the true ones (some ratios clip)."""
    mask = _mask(B, T, dev, padded, gen)
    noise = lambda: 0.3 * torch.randn(B, T, generator=gen, device=dev)
    return {
        "mask": mask,
        "adv": torch.randn(B, generator=gen, device=dev),
        "old": (true_logp + noise()).contiguous(),
        "ref": (true_logp + noise()).contiguous(),
        "g": torch.randn(B, T, generator=gen, device=dev) * mask,
    }


def logits_inputs(case, dtype, dev, seed, padded=False):
    gen = _gen(dev, seed)
    B, T, V = case.B, case.T, case.V
    logits = (2.0 * torch.randn(B, T, V, generator=gen, device=dev)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen, device=dev)
    rows = logits.view(B * T, V)
    true = _true_logps(lambda a, b: rows[a:b], ids, OPTS["temperature"])
    return {"logits": logits, "ids": ids, **_policy_inputs(B, T, dev, gen, padded, true)}


def linear_inputs(case, dtype, dev, seed, padded=False):
    gen = _gen(dev, seed)
    B, T, V, H = case.B, case.T, case.V, case.H
    hidden = torch.randn(B, T, H, generator=gen, device=dev).to(dtype)
    # logits of std ~2, like a trained LM head
    weight = (2.0 / math.sqrt(H) * torch.randn(V, H, generator=gen, device=dev)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=gen, device=dev)
    h, w32 = hidden.view(B * T, H), weight.float()
    true = _true_logps(lambda a, b: h[a:b].float() @ w32.T, ids, OPTS["temperature"])
    return {"hidden": hidden, "weight": weight, "ids": ids, **_policy_inputs(B, T, dev, gen, padded, true)}


# ----------------------------------------------------------------------------- ops


def spec_loss(logits, inp):
    """The spec's GRPO loss (rerule.kernels.reference) of these logits on the bench inputs."""
    return grpo_loss_reference(
        logits, inp["ids"], inp["mask"], inp["adv"], inp["old"], None, inp["ref"], LOSS_OPTIONS
    )[0]


def lo_logps(logits, ids):
    """The gate's low-precision baseline: log_softmax in the logits' own dtype, then gather."""
    x = logits / OPTS["temperature"]
    return torch.log_softmax(x, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class Op:
    """An op: its inputs, differentiable leaves, output, floors, spec and low-precision baseline."""

    name = title = out_name = ""
    leaf_names: tuple = ()
    modes = MODES

    def __init__(self):
        self.impls: dict[str, Impl] = {}

    def add(self, impl: Impl):
        self.impls[impl.name] = impl

    def backward(self, out, inp):
        out.backward()

    def compare_out(self, out, inp):
        return out.detach()

    def floor(self, case, mode, itemsize) -> tuple[float, float]:
        raise NotImplementedError

    def gate_case(self, case, rows):
        # the timed T (so Liger's per-sequence chunks keep their compiled shape), fewer sequences
        T = min(case.T, max(rows // 2, 1))
        return type(case)(max(rows // T, 1), T, case.V, case.H)


class LogpsOp(Op):
    name, title, out_name, leaf_names = "logps", "per-token log-probs", "logps", ("logits",)
    inputs = staticmethod(logits_inputs)

    def backward(self, out, inp):
        out.backward(inp["g"].to(out.dtype))

    def compare_out(self, out, inp):
        # positions with mask 0 are 0 for ours and arbitrary for peers that do not take a mask
        return out.detach() * inp["mask"]

    def floor(self, case, mode, itemsize):
        # fwd reads the logits once; the upstream gradient arrives only in backward, which must read
        # them again and write the gradient: 3 passes.
        return (1 if mode == "fwd" else 3) * case.N * case.V * itemsize, 0.0

    def reference(self, inp, leaves):
        return token_logps_reference(leaves["logits"], inp["ids"], OPTS["temperature"])[0]

    def lo(self, inp, leaves):
        return lo_logps(leaves["logits"], inp["ids"])


class LossOp(Op):
    name, title, out_name, leaf_names = "loss", "GRPO loss over logits", "loss", ("logits",)
    inputs = staticmethod(logits_inputs)

    def floor(self, case, mode, itemsize):
        # read the logits; fwd+bwd also writes the gradient (4 N V bytes in bf16, the floor)
        return (1 if mode == "fwd" else 2) * case.N * case.V * itemsize, 0.0

    def reference(self, inp, leaves):
        return spec_loss(leaves["logits"], inp)

    def lo(self, inp, leaves):
        logp = lo_logps(leaves["logits"], inp["ids"])
        return trl_style_loss(logp, inp["mask"], inp["adv"], inp["old"], inp["ref"])


class LinearOp(Op):
    name, title, out_name, leaf_names = "linear", "fused-linear GRPO loss", "loss", ("hidden", "weight")
    inputs = staticmethod(linear_inputs)

    def floor(self, case, mode, itemsize):
        # GEMM work in the 8 N H V convention (logits, recomputed logits, d hidden, d weight); bytes:
        # hidden and weight read, and written back as gradients.
        flops = (2 if mode == "fwd" else 8) * case.N * case.H * case.V
        nbytes = (1 if mode == "fwd" else 2) * (case.N + case.V) * case.H * itemsize
        return nbytes, flops

    def logits(self, leaves):
        return leaves["hidden"] @ leaves["weight"].T

    def reference(self, inp, leaves):
        return spec_loss(self.logits(leaves), inp)

    def lo(self, inp, leaves):
        logp = lo_logps(self.logits(leaves), inp["ids"])
        return trl_style_loss(logp, inp["mask"], inp["adv"], inp["old"], inp["ref"])


class AdvantagesOp(Op):
    name, title, out_name, leaf_names = "advantages", "group advantages", "adv", ()
    modes = ("fwd",)

    def inputs(self, case, dtype, dev, seed, padded=False):
        # rewards are fp32 whatever the model dtype; 0/1 rule rewards plus a continuous part
        gen = _gen(dev, seed)
        r = (torch.rand(case.N, generator=gen, device=dev) > 0.5).float()
        return {"rewards": r + 0.5 * torch.rand(case.N, generator=gen, device=dev)}

    def floor(self, case, mode, itemsize):
        return 2 * case.N * 4, 0.0  # read and write fp32; far below launch latency at these sizes

    def gate_case(self, case, rows):
        return case

    def reference(self, inp, leaves):
        return group_advantages_reference(inp["rewards"].double(), GROUP_SIZE)

    lo = None


def _ours_logps(impl):
    def forward(inp, lv):
        return rerule.token_logps(lv["logits"], inp["ids"], inp["mask"], OPTS["temperature"], impl=impl)[0]

    return forward


def _ours_loss(impl):
    def forward(inp, lv):
        kw = dict(old_logps=inp["old"], ref_logps=inp["ref"], impl=impl, **OPTS)
        return rerule.grpo_loss(lv["logits"], inp["ids"], inp["mask"], inp["adv"], **kw).loss

    return forward


def _ours_linear(impl):
    def forward(inp, lv):
        kw = dict(old_logps=inp["old"], ref_logps=inp["ref"], impl=impl, **OPTS)
        h, w = lv["hidden"], lv["weight"]
        return rerule.fused_linear_grpo_loss(h, w, inp["ids"], inp["mask"], inp["adv"], **kw).loss

    return forward


def _trl_loss(logps_fn, logits_of):
    """TRL's loss over log-probs from ``logps_fn`` (TRL's or the eager one) of ``logits_of(leaves)``."""

    def forward(inp, lv):
        logp = logps_fn(logits_of(lv), inp["ids"])
        return trl_style_loss(logp, inp["mask"], inp["adv"], inp["old"], inp["ref"])

    return forward


def _common_impls(op, ours, *, interpreted_ours=True, ours_available=None):
    """Ours (triton, torch), the spec and torch.compile of it: every op with a gradient has these."""
    op.add(Impl("triton", "rerule (Triton)", ours("triton"), ours=True, interpreted=interpreted_ours,
                available=ours_available))
    op.add(Impl("torch", "rerule (torch)", ours("torch"), ours=True, available=ours_available))
    op.add(Impl("reference", "torch reference (spec)", op.reference))
    compiled = lambda inp, lv: _compiled(op.name, op.reference)(inp, lv)
    op.add(Impl("compile", "torch.compile(reference)", compiled, available=_compile_on, modes=("fwd+bwd",)))


def build_ops() -> dict:
    logps, loss, linear, adv = LogpsOp(), LossOp(), LinearOp(), AdvantagesOp()
    trl_detail = lambda: trl_logps_fn()[1]
    liger_layout = dict(leaves=liger_ext_leaves, grads=liger_ext_grads, interpreted=True)
    logits_of = lambda lv: lv["logits"]

    _common_impls(logps, _ours_logps)
    logps.add(Impl("cuda", "rerule (CUDA)", _ours_logps("cuda"), ours=True, available=_cuda_on))
    logps.add(Impl("trl", "TRL selective_log_softmax", lambda inp, lv: trl_logps(lv["logits"], inp["ids"]),
                   available=trl_on, detail=trl_detail))
    logps.add(Impl("trl_eager", "TRL-style eager", lambda inp, lv: eager_logps(lv["logits"], inp["ids"])))
    logps.add(Impl("liger", "Liger fused_selective_log_softmax", liger_logps, modes=("fwd",),
                   available=liger_on("logps"), **liger_layout))

    _common_impls(loss, _ours_loss)
    loss.add(Impl("cuda", "rerule (CUDA)", _ours_loss("cuda"), ours=True, available=_cuda_on))
    loss.add(Impl("trl", "TRL selective_log_softmax + TRL loss", _trl_loss(trl_logps, logits_of),
                  available=trl_on, detail=trl_detail))
    loss.add(Impl("trl_eager", "TRL-style eager", _trl_loss(eager_logps, logits_of)))
    loss.add(Impl("liger", "Liger triton_grpo_loss", liger_loss, available=liger_on("loss"), **liger_layout))

    _common_impls(linear, _ours_linear, ours_available=_fused_linear_on)
    linear.add(Impl("trl", "TRL selective_log_softmax + TRL loss", _trl_loss(trl_logps, linear.logits),
                    available=trl_on, detail=trl_detail))
    linear.add(Impl("trl_eager", "TRL-style eager", _trl_loss(eager_logps, linear.logits)))
    linear.add(Impl("liger_chunked", "Liger LigerFusedLinearGRPOLoss", liger_linear,
                    available=liger_on("linear")))

    fwd = dict(modes=("fwd",))
    adv.add(Impl("torch", "rerule.group_advantages",
                 lambda inp, lv: rerule.group_advantages(inp["rewards"], GROUP_SIZE), ours=True, **fwd))
    adv.add(Impl("reference", "torch reference (spec)",
                 lambda inp, lv: group_advantages_reference(inp["rewards"], GROUP_SIZE), **fwd))
    adv_ref = group_advantages_reference
    adv_compiled = lambda inp, lv: _compiled("advantages", adv_ref)(inp["rewards"], GROUP_SIZE)
    adv.add(Impl("compile", "torch.compile(reference)", adv_compiled, available=_compile_on, **fwd))
    adv.add(Impl("trl_eager", "TRL-style eager", lambda inp, lv: trl_style_advantages(inp["rewards"]), **fwd))
    return {op.name: op for op in (logps, loss, linear, adv)}


OPS = build_ops()
