"""Ahead-of-time compile of the Triton kernels for real GPU targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for sm_90 / sm_80 with the ptxas that Triton ships, so a
kernel that the interpreter accepts but a real compile rejects, or one that spills registers,
shows up on a CPU-only machine. For each specialization this reports the registers, the spill
bytes (from ptxas -v) and the global memory instructions of the PTX: every ``ld.global`` /
``st.global`` with its vector width, from which ``traffic`` derives the load and store
instructions issued per 128 logits of a row sweep (1 per 128 / vector width).

Run ``python -m rerule.kernels.aot`` (prints JSON; TRITON_INTERPRET must be unset: the
interpreter replaces the compiler). tests/test_compile_targets.py runs it in a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys

TARGETS = ((90, "sm_90"), (80, "sm_80"))
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}


def _ptx_stats(ptx: str) -> dict:
    """Count global loads/stores in PTX by vector width and element size."""
    loads, stores = {}, {}
    for m in re.finditer(r"\b(ld|st)\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.(b|u|s|f)(\d+)\b", ptx):
        op, vec, bits = m.group(1), int(m.group(2) or 1), int(m.group(4))
        key = f"{vec}x{bits}"
        d = loads if op == "ld" else stores
        d[key] = d.get(key, 0) + 1
    return {"ld_global": loads, "st_global": stores}


def compile_one(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, divisible=()) -> dict:
    """Compile one specialization; returns registers, spills, ptx global load/store counts (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps})
    log = io.StringIO()
    old = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    finally:
        triton.knobs.nvidia.dump_ptxas_log = old
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    out = {
        "ok": True,
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill_st.group(1)) if spill_st else 0,
        "spill_loads": int(spill_ld.group(1)) if spill_ld else 0,
        "ptxas_log_seen": bool(regs),
    }
    out.update(_ptx_stats(k.asm["ptx"]))
    return out
