"""CUDA C++ backend of the fused GRPO loss over logits (``impl="cuda"``).

Same contract as ``triton_grpo.grpo_fwd`` / ``grpo_grad``; the work is done by
``librerule_cuda.so`` (kernels/csrc), a plain C library called through ctypes with raw device
pointers, element strides, a dtype code and torch's current stream. It needs no CUDA build of
torch, and the library is loaded on the first call, never at import.

Build it (from the repository root)::

    cmake -S . -B build -DRERULE_BUILD_CUDA=ON && cmake --build build    # -> kernels/lib/
    RERULE_BUILD_CUDA=1 pip install -e .                                 # the same, through setup.py

``RERULE_CUDA_LIB`` points at a library elsewhere. Tuning knobs (defaults are automatic):
``tile`` / ``RERULE_CUDA_THREADS`` = threads per block (multiple of 32, at most 1024), and
``RERULE_CUDA_CACHE_BYTES`` = bytes of each row kept in shared memory for the gradient sweep
(-1 auto = as much as fits, 0 = off).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from .options import LossOptions

ABI_VERSION = 4  # RERULE_CUDA_ABI_VERSION in kernels/csrc/rerule_grpo.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
LIB_NAME = "librerule_cuda.so"
BUILD_HINT = (
    "build it from the repository root with "
    "`cmake -S . -B build -DRERULE_BUILD_CUDA=ON && cmake --build build` "
    "(writes kernels/lib/librerule_cuda.so) or `RERULE_BUILD_CUDA=1 pip install -e .`, "
    "or set RERULE_CUDA_LIB to a built librerule_cuda.so; impl='triton' and impl='torch' need no build"
)

_p = ctypes.c_void_p
_i64, _i32, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class GrpoArgs(ctypes.Structure):
    """RerGrpoArgs of rerule_grpo.h, field for field."""

    _fields_ = [
        ("logits", _p), ("dlogits", _p), ("ids", _p), ("mask", _p), ("adv", _p), ("rw", _p),
        ("old_logp", _p), ("beh_logp", _p), ("ref_logp", _p),
        ("logp", _p), ("logp_lo", _p), ("lse", _p), ("row_max", _p), ("row_s", _p), ("row_q", _p), ("entropy", _p),
        ("loss_tok", _p),
        ("B", _i64), ("T", _i64), ("V", _i64),
        ("stride_b", _i64), ("stride_t", _i64), ("stride_db", _i64), ("stride_dt", _i64),
        ("cache_bytes", _i64),
        ("tau", _f32), ("clip_lo", _f32), ("clip_hi", _f32), ("delta", _f32), ("dual_clip", _f32),
        ("beta", _f32), ("is_cap", _f32),
        ("dtype", _i32), ("has_delta", _i32), ("has_dual", _i32), ("bias_correction_kl", _i32),
        ("is_weight_kl", _i32), ("fused_loss", _i32), ("compute_grad", _i32), ("return_entropy", _i32),
        ("threads", _i32), ("device", _i32),
    ]


class GrpoGradArgs(ctypes.Structure):
    """RerGrpoGradArgs of rerule_grpo.h, field for field."""

    _fields_ = [
        ("logits", _p), ("dlogits", _p), ("ids", _p), ("mask", _p), ("row_max", _p), ("row_s", _p), ("row_q", _p),
        ("g", _p),
        ("B", _i64), ("T", _i64), ("V", _i64),
        ("stride_b", _i64), ("stride_t", _i64), ("stride_db", _i64), ("stride_dt", _i64),
        ("tau", _f32), ("dtype", _i32), ("threads", _i32), ("device", _i32),
    ]


class Library:
    """A loaded librerule_cuda.so (or, in tests, its host emulator: ``prefix="rerule_emu_"``,
    ``device_type="cpu"``), with its ABI checked against the ctypes structs above."""

    def __init__(self, path: str | os.PathLike, prefix: str = "rerule_", device_type: str = "cuda"):
        self.path = str(path)
        self.device_type = device_type
        lib = ctypes.CDLL(self.path)
        fn = lambda name: getattr(lib, prefix + name)
        self.fwd, self.grad = fn("grpo_fwd"), fn("grpo_grad")
        self.fwd.argtypes, self.fwd.restype = [ctypes.POINTER(GrpoArgs), _p], ctypes.c_int
        self.grad.argtypes, self.grad.restype = [ctypes.POINTER(GrpoGradArgs), _p], ctypes.c_int
        self.error_string, self.last_message = fn("cuda_error_string"), fn("cuda_last_message")
        self.error_string.argtypes, self.error_string.restype = [ctypes.c_int], ctypes.c_char_p
        self.last_message.argtypes, self.last_message.restype = [], ctypes.c_char_p
        abi, size, gsize = fn("cuda_abi_version"), fn("grpo_args_size"), fn("grpo_grad_args_size")
        abi.restype, size.restype, gsize.restype = ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t
        expected = (ABI_VERSION, ctypes.sizeof(GrpoArgs), ctypes.sizeof(GrpoGradArgs))
        if (abi(), size(), gsize()) != expected:
            raise RuntimeError(
                f"{self.path} was built from another version of kernels/csrc (ABI {abi()}, struct sizes "
                f"{size()}/{gsize()}; this rerule expects ABI {ABI_VERSION}, {ctypes.sizeof(GrpoArgs)}/"
                f"{ctypes.sizeof(GrpoGradArgs)}): rebuild it; {BUILD_HINT}"
            )

    def check(self, code: int, what: str) -> None:
        if code != 0:
            # code 1 (cudaErrorInvalidValue) from our own argument checks comes with the reason
            detail = self.last_message().decode() if code == 1 else _HINTS.get(code, "")
            msg = f"{what} failed with CUDA error {code} ({self.error_string(code).decode()})"
            raise RuntimeError(msg + (f": {detail}" if detail else ""))


# The two build mismatches a user can fix (cudaErrorInsufficientDriver, cudaErrorNoKernelImageForDevice).
_HINTS = {
    35: f"{LIB_NAME} links the CUDA runtime of the toolkit that built it, which is newer than this driver "
        f"supports: rebuild it with an older CUDA toolkit, or update the driver; {BUILD_HINT}",
    209: f"{LIB_NAME} has no code for this GPU: rebuild it with -DCMAKE_CUDA_ARCHITECTURES=<this card's sm, "
         f"e.g. 90>; {BUILD_HINT}",
}


_LIB: Library | None = None
_LOCK = threading.Lock()


# columns of the per-row statistics grpo_fwd returns, as torch's and Triton's: (max, sum, sum without the
# label, logp_lo); grpo_grad reads the first three
STATS_WIDTH = 4


def logp_lo(stats: torch.Tensor) -> torch.Tensor:
    """The low part of each log-prob from ``grpo_fwd``'s ``stats`` [B, T, 4]: logp + logp_lo is the log-prob
    to ~1e-7 absolute at |logits| ~ 1e4 (see label_logp in kernels/csrc/grpo_row.cuh)."""
    return stats[..., 3]


def library_path() -> Path:
    """Where the library is looked for: $RERULE_CUDA_LIB, else kernels/lib/librerule_cuda.so."""
    env = os.environ.get("RERULE_CUDA_LIB")
    return Path(env) if env else Path(__file__).resolve().parent / "lib" / LIB_NAME


def get_library() -> Library:
    """The process-wide Library, loaded on first use; a clear RuntimeError if it is missing."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            path = library_path()
            if not path.is_file():
                raise RuntimeError(f"impl='cuda' needs the CUDA library, not found at {path}: {BUILD_HINT}")
            try:
                _LIB = Library(path)
            except OSError as e:
                raise RuntimeError(f"impl='cuda' could not load {path} ({e}): {BUILD_HINT}") from e
        return _LIB


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _empty(shape, dtype, device) -> torch.Tensor:
    # Every output element is written by a kernel; tests swap this for a NaN-poisoned allocator.
    return torch.empty(shape, dtype=dtype, device=device)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def _wrong_device(logits: torch.Tensor) -> ValueError:
    return ValueError(
        f"impl='cuda' needs CUDA tensors, but logits are on {logits.device}: move them with .cuda(), "
        "or use impl='torch' (CPU) / impl='auto'"
    )


def _library_for(logits: torch.Tensor) -> Library:
    # CPU tensors fail on the device first: building the library would not help them
    if _LIB is None and logits.device.type != "cuda":
        raise _wrong_device(logits)
    return get_library()


def _check_logits(lib: Library, logits: torch.Tensor, others: dict) -> int:
    """Validate what the C side cannot see (device, dtype, layout); returns the dtype code."""
    if logits.device.type != lib.device_type:
        raise _wrong_device(logits)
    if logits.dtype not in DTYPE_CODES:
        raise TypeError(f"impl='cuda' supports float32, float16 and bfloat16 logits, got {logits.dtype}")
    if logits.dim() != 3 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [B, T, V] with a contiguous vocab dim, got {logits.stride()}")
    for name, t in others.items():
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    return DTYPE_CODES[logits.dtype]


def _rows(name: str, t: torch.Tensor | None, dtype: torch.dtype, n: int) -> torch.Tensor | None:
    """A contiguous [n] view of a per-row input in the dtype the C struct declares."""
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} elements (one per logits row or sequence), got {t.numel()}")
    return t.reshape(-1).to(dtype).contiguous()


def _grad_buffer(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    return logits if inplace else _empty(logits.shape, logits.dtype, logits.device)


def _launch(lib: Library, fn, args, device: torch.device, what: str) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
    else:
        stream = None
    lib.check(fn(ctypes.byref(args), stream), what)


def fwd_args(
    lib: Library, logits, ids, mask, adv, rw, old, behavior, ref, o: LossOptions,
    fused_loss: bool, compute_grad: bool, return_entropy: bool, inplace: bool, threads: int | None = None,
):
    """Allocate the outputs and fill a GrpoArgs. Returns (args, outputs, keep_alive)."""
    dtype = _check_logits(lib, logits, dict(completion_ids=ids, mask=mask, advantages=adv, rw=rw,
                                            old_logps=old, behavior_logps=behavior, ref_logps=ref))
    B, T, V = logits.shape
    N = B * T
    dev = logits.device
    ids_, mask_ = _rows("completion_ids", ids, torch.int64, N), _rows("mask", mask, torch.int32, N)
    has_ref = ref is not None and o.beta != 0.0
    adv_ = _rows("advantages", adv, torch.float32, B) if fused_loss else None
    rw_ = _rows("rw", rw, torch.float32, N) if fused_loss else None
    old_ = _rows("old_logps", old, torch.float32, N) if fused_loss else None
    beh_ = _rows("behavior_logps", behavior, torch.float32, N) if fused_loss else None
    ref_ = _rows("ref_logps", ref, torch.float32, N) if (fused_loss and has_ref) else None
    logp, lse = _empty((N,), torch.float32, dev), _empty((N,), torch.float32, dev)
    stats = _empty((STATS_WIDTH, N), torch.float32, dev)  # one contiguous [N] array per C pointer
    ent = _empty((N,), torch.float32, dev) if return_entropy else None
    loss_tok = _empty((N,), torch.float32, dev) if fused_loss else None
    grad = fused_loss and compute_grad
    dx = _grad_buffer(logits, inplace) if grad else None
    args = GrpoArgs(
        logits=logits.data_ptr(), dlogits=_ptr(dx), ids=_ptr(ids_), mask=_ptr(mask_),
        adv=_ptr(adv_), rw=_ptr(rw_), old_logp=_ptr(old_), beh_logp=_ptr(beh_), ref_logp=_ptr(ref_),
        logp=logp.data_ptr(), logp_lo=stats[3].data_ptr(), lse=lse.data_ptr(), row_max=stats[0].data_ptr(),
        row_s=stats[1].data_ptr(), row_q=stats[2].data_ptr(), entropy=_ptr(ent), loss_tok=_ptr(loss_tok),
        B=B, T=T, V=V, stride_b=logits.stride(0), stride_t=logits.stride(1),
        stride_db=dx.stride(0) if grad else 0, stride_dt=dx.stride(1) if grad else 0,
        cache_bytes=_env_int("RERULE_CUDA_CACHE_BYTES", -1),
        tau=float(o.temperature), clip_lo=1.0 - o.epsilon_low, clip_hi=1.0 + o.epsilon_high,
        delta=float(o.delta or 0.0), dual_clip=float(o.dual_clip or 0.0), beta=float(o.beta),
        is_cap=float(o.is_cap),
        dtype=dtype, has_delta=int(o.delta is not None), has_dual=int(o.dual_clip is not None),
        bias_correction_kl=int(o.bias_correction_kl), is_weight_kl=int(o.is_weight_kl),
        fused_loss=int(fused_loss), compute_grad=int(grad), return_entropy=int(return_entropy),
        threads=threads or _env_int("RERULE_CUDA_THREADS", 0), device=dev.index or 0,
    )
    shape = (B, T)
    outputs = (
        logp.view(shape), stats.view(STATS_WIDTH, B, T).permute(1, 2, 0), None if ent is None else ent.view(shape),
        None if loss_tok is None else loss_tok.view(shape), dx,
    )
    return args, outputs, (ids_, mask_, adv_, rw_, old_, beh_, ref_, lse)  # lse: written, not returned


def grad_args(
    lib: Library, logits, ids, mask, stats, g, temperature: float, inplace: bool, threads: int | None = None
):
    """Allocate dlogits and fill a GrpoGradArgs. ``stats`` [B, T, 4] = (row max, sum, sum without the label,
    logp_lo) from grpo_fwd.
    Returns (args, dlogits, keep_alive)."""
    dtype = _check_logits(lib, logits, dict(completion_ids=ids, mask=mask, stats=stats, g=g))
    B, T, V = logits.shape
    N = B * T
    ids_, mask_ = _rows("completion_ids", ids, torch.int64, N), _rows("mask", mask, torch.int32, N)
    if stats.shape[-1] != STATS_WIDTH:
        raise ValueError(f"stats must be the [B, T, {STATS_WIDTH}] row statistics of cuda grpo_fwd, got "
                         f"{tuple(stats.shape)}")
    mx_, s_, q_ = (_rows(name, stats[..., i], torch.float32, N) for i, name in enumerate(("row_max", "row_s", "row_q")))
    g_ = _rows("g", g, torch.float32, N)
    dx = _grad_buffer(logits, inplace)
    args = GrpoGradArgs(
        logits=logits.data_ptr(), dlogits=dx.data_ptr(), ids=_ptr(ids_), mask=_ptr(mask_),
        row_max=_ptr(mx_), row_s=_ptr(s_), row_q=_ptr(q_), g=_ptr(g_),
        B=B, T=T, V=V, stride_b=logits.stride(0), stride_t=logits.stride(1),
        stride_db=dx.stride(0), stride_dt=dx.stride(1), tau=float(temperature), dtype=dtype,
        threads=threads or _env_int("RERULE_CUDA_THREADS", 0), device=logits.device.index or 0,
    )
    return args, dx, (ids_, mask_, mx_, s_, q_, g_)


def grpo_fwd(
    logits, ids, mask, adv, rw, old, behavior, ref, o: LossOptions,
    fused_loss: bool, compute_grad: bool, return_entropy: bool, inplace: bool, tile: int | None = None,
):
    """Forward (and, for token-level losses, the gradient) over [B, T, V] logits (stride 1 on V).

    ids/mask/rw/old/behavior/ref are [B, T]; adv is [B] fp32; ``tile`` = threads per block (None: auto).
    Returns (logp, stats, entropy or None, loss_tok or None, dlogits or None): fp32 [B, T] except stats
    ([B, T, 4]: row max, sum and sum without the label of exp(logits / tau - max), for ``grpo_grad``, and
    ``logp_lo``) and dlogits ([B, T, V] in the
    logits dtype; the logits buffer itself when ``inplace``).
    """
    lib = _library_for(logits)
    args, outputs, _keep = fwd_args(
        lib, logits, ids, mask, adv, rw, old, behavior, ref, o,
        fused_loss, compute_grad, return_entropy, inplace, tile,
    )
    _launch(lib, lib.fwd, args, logits.device, "rerule_grpo_fwd")
    return outputs


def grpo_grad(logits, ids, mask, stats, g, temperature: float, inplace: bool, tile: int | None = None):
    """dlogits = g * (onehot - softmax(logits / tau)) / tau, zero rows where mask is 0."""
    lib = _library_for(logits)
    args, dx, _keep = grad_args(lib, logits, ids, mask, stats, g, temperature, inplace, tile)
    _launch(lib, lib.grad, args, logits.device, "rerule_grpo_grad")
    return dx

