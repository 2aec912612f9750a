"""The benchmarks' correctness gate: an impl's outputs against the high-precision reference, before any
timing (a failing impl gets no timing row)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# The low-precision rule of docs/kernels.md ("How the tests judge accuracy"):
# |impl - ref_hi| <= 2 |torch_lo - ref_hi| + floor, here with relative norms. fp32 (and fp64) outputs
# are compared straight to the fp64/fp32 reference.
LO_FLOOR = 1e-5
FP32_RTOL = 1e-5
# A loss can sit near 0 (advantages of both signs): relative errors use at least this scale.
MIN_SCALE = 1e-3


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / max(||ref||, MIN_SCALE), in fp64; inf when got has a NaN/inf or the wrong shape."""
    if got is None or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    g, r = got.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(g).all()):
        return math.inf
    return float(torch.linalg.vector_norm(g - r) / max(float(torch.linalg.vector_norm(r)), MIN_SCALE))


@dataclass
class Gate:
    op: str
    impl: str
    shape: dict
    dtype: str
    passed: bool
    errors: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0


def judge(op: str, impl: str, shape: dict, dtype: torch.dtype, got: dict, ref: dict, lo: dict | None) -> Gate:
    """Compare an impl's outputs to the high-precision reference.

    ``got``/``ref``/``lo`` map output names (loss, logps, grad_logits, ...) to tensors; ``lo`` is the
    same computation by eager torch in the low dtype (None for fp32/fp64 runs). Every name in ``got``
    is checked; a missing or non-finite output fails.
    """
    errors, bounds, bad = {}, {}, []
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if low_precision and lo is None:
        raise ValueError("a bf16/fp16 gate needs the low-precision torch outputs (lo)")
    for name, value in got.items():
        err = rel_err(value, ref[name])
        bound = 2 * rel_err(lo[name], ref[name]) + LO_FLOOR if low_precision else FP32_RTOL
        errors[name], bounds[name] = err, bound
        if not err <= bound:
            bad.append(f"{name}: rel err {err:.3g} > {bound:.3g}")
    if not got:
        bad.append("no outputs to compare")
    return Gate(op, impl, shape, str(dtype).replace("torch.", ""), not bad, errors, bounds, "; ".join(bad))
