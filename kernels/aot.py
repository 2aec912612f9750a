"""Ahead-of-time compile of the Triton kernels for real GPU targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas) for sm_90 / sm_80 with the ptxas that Triton ships, so a
kernel that the interpreter accepts but a real compile rejects, or one that spills registers,
shows up on a CPU-only machine. For each specialization this reports the registers, the spill
bytes (from ptxas -v) and the global memory instructions of the PTX: every ``ld.global`` /
``st.global`` with its vector width, from which ``traffic`` derives the load and store
instructions issued per 128 logits of a row sweep (1 per 128 / vector width).

Run ``python -m rerule.kernels.aot`` (prints JSON; TRITON_INTERPRET must be unset: the
interpreter replaces the compiler). tests/kernels/test_compile_targets.py runs it in a subprocess.
"""

from __future__ import annotations

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


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of PTX, from Triton's ptxas run by hand (``-v``): not from Triton's
    compile log, which a cache hit skips."""
    import subprocess
    import tempfile

    import triton

    ptxas = triton.knobs.nvidia.ptxas.path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    if r.returncode != 0 or not regs or not spill_st or not spill_ld:
        raise RuntimeError(f"ptxas -v gave no register report (rc {r.returncode}): {text[-2000:]}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spill_st.group(1)),
            "spill_loads": int(spill_ld.group(1))}


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
    try:
        k = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        chain, c = [], e
        while c is not None and len(chain) < 6:  # the root cause is at the end of the chain
            chain.append(f"{type(c).__name__}: {str(c)[-1500:]}")
            c = c.__cause__ or c.__context__
        return {"ok": False, "error": "\n".join(chain)}
    out = {"ok": True}
    out.update(ptxas_usage(k.asm["ptx"], arch))
    out.update(_ptx_stats(k.asm["ptx"]))
    return out


_FWD_OPTS = ("HAS_OLD", "HAS_BEH", "HAS_REF", "HAS_DELTA", "HAS_DUAL", "KL_IS", "W_KL")


def _ptr(dtype: str) -> str:
    return f"*{dtype}"


def _ints(fn, sig, constexprs, divisible, values: dict):
    """Integer arguments as the JIT would specialize them: 1 -> constexpr, multiple of 16 -> divisibility."""
    for k, v in values.items():
        if v == 1:
            constexprs[k] = 1
        else:
            sig[k] = "i64" if k.startswith("stride") else "i32"
            if v % 16 == 0:
                divisible.append(k)


def fwd_spec(dtype="bf16", V=151936, T=512, block_v=None, options="all", fused=True, grad=True, ent=False,
             dx_aligned=True, tau_one=True):
    """(name, signature, constexprs, divisible, num_warps) of one _grpo_fwd_kernel specialization."""
    from .triton_grpo import BLOCK_V_RANGE, _num_warps

    bv = block_v or max(BLOCK_V_RANGE[0], min(1 << (V - 1).bit_length(), 4096))
    sig = {"X": _ptr(dtype), "DX": _ptr(dtype)}
    for k in ("ADV", "RW", "OLD", "BEH", "REF", "LOGP", "STATS", "ENT", "LOSS"):
        sig[k] = "*fp32"
    sig.update(IDS="*i64", MASK="*i32")
    for k in ("tau", "lo", "hi", "delta", "dual_c", "beta", "is_cap"):
        sig[k] = "fp32"
    constexprs = {k: options == "all" for k in _FWD_OPTS}
    constexprs.update(FUSED_LOSS=fused, COMPUTE_GRAD=grad, RETURN_ENT=ent, DX_ALIGNED=dx_aligned, BLOCK_V=bv,
                      ALIGN=16 // (_BITS[dtype] // 8), TAU_ONE=tau_one, ROWS_ALIGNED=V % (128 // _BITS[dtype]) == 0)
    divisible = [k for k, v in sig.items() if v.startswith("*")]
    _ints(None, sig, constexprs, divisible, dict(stride_xb=T * V, stride_xt=V, stride_dxb=T * V, stride_dxt=V,
                                                  N=8 * T, T=T, V=V))
    name = f"fwd-{dtype}-V{V}-T{T}-B{bv}-{options}" + ("-grad" if grad else "") + ("-ent" if ent else "") + (
        "" if fused else "-logp") + ("" if tau_one else "-tau") + ("" if dx_aligned else "-dxmisaligned")
    return name, sig, constexprs, divisible, _num_warps(bv)


def grad_spec(dtype="bf16", V=151936, T=512, block_v=None, dx_aligned=True, tau_one=True):
    from .triton_grpo import BLOCK_V_RANGE, _num_warps

    bv = block_v or max(BLOCK_V_RANGE[0], min(1 << (V - 1).bit_length(), 4096))
    sig = {"X": _ptr(dtype), "DX": _ptr(dtype), "IDS": "*i64", "MASK": "*i32", "STATS": "*fp32", "G": "*fp32",
           "tau": "fp32"}
    constexprs = dict(DX_ALIGNED=dx_aligned, BLOCK_V=bv, ALIGN=16 // (_BITS[dtype] // 8), TAU_ONE=tau_one,
                      ROWS_ALIGNED=V % (128 // _BITS[dtype]) == 0)
    divisible = [k for k, v in sig.items() if v.startswith("*")]
    _ints(None, sig, constexprs, divisible, dict(stride_xb=T * V, stride_xt=V, stride_dxb=T * V, stride_dxt=V,
                                                  N=8 * T, T=T, V=V))
    name = f"grad-{dtype}-V{V}-T{T}-B{bv}" + ("" if tau_one else "-tau")
    return name, sig, constexprs, divisible, _num_warps(bv)


def max_block_v(dtype: str) -> int:
    from .triton_grpo import max_block_v as m

    return m(_BITS[dtype] // 8)


def specs(quick: bool = True):
    """Representative specializations: every dtype, aligned and odd vocabularies (151936 = Qwen,
    50257 = GPT-2, 1000, 123), T = 1 (the fused-linear chunks), every option on and off, the logp-only
    forward, both ends of the BLOCK_V range, the grad kernel."""
    out = []
    for dtype in ("bf16", "fp32", "fp16"):
        for V in (151936, 50257):
            out.append(fwd_spec(dtype, V, options="all", tau_one=V != 50257))
        out.append(fwd_spec(dtype, 1000, options="none", ent=True))
        out.append(grad_spec(dtype, 50257, tau_one=dtype != "bf16"))
        out.append(fwd_spec(dtype, 151936, block_v=max_block_v(dtype), options="all", ent=True, tau_one=False))
    out += [
        fwd_spec("bf16", 123, options="all", ent=True),
        fwd_spec("fp32", 50257, T=1, options="all"),  # fused-linear chunk: [n, 1, V]
        fwd_spec("bf16", 151936, options="none", fused=False, grad=False, ent=True),
        fwd_spec("bf16", 50257, block_v=16, options="all"),
        grad_spec("bf16", 151936),
        grad_spec("fp32", 123, block_v=max_block_v("fp32"), tau_one=False),
    ]
    if not quick:
        for dtype in ("bf16", "fp32"):
            for V in (151936, 50257, 1000, 123):
                for opt in ("all", "none"):
                    for ent in (False, True):
                        out.append(fwd_spec(dtype, V, options=opt, ent=ent))
    return out


def traffic(stats: dict) -> dict:
    """Global memory instructions of one compiled kernel, split into vector (128-bit) and scalar ones."""
    def split(d):
        vec = sum(n for k, n in d.items() if k.split("x")[0] != "1")
        return {"vector": vec, "scalar": sum(n for k, n in d.items() if k.split("x")[0] == "1"), "by_width": d}
    return {"loads": split(stats.get("ld_global", {})), "stores": split(stats.get("st_global", {}))}


def run(quick: bool = True, archs=(90, 80)) -> list:
    from . import triton_grpo

    kernels = {"fwd": triton_grpo._grpo_fwd_kernel, "grad": triton_grpo._grpo_grad_kernel}
    rows = []
    for name, sig, constexprs, divisible, warps in specs(quick):
        fn = kernels[name.split("-")[0]]
        for arch in archs:
            r = compile_one(fn, sig, constexprs, arch, warps, divisible)
            r.update(name=name, arch=f"sm_{arch}", num_warps=warps)
            rows.append(r)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the long list of specializations (CI runs the quick one)")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default: 90 and 80)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 replaces the compiler: unset it to compile for a GPU target", file=sys.stderr)
        return 2
    rows = run(quick=not args.full, archs=tuple(args.arch or (90, 80)))
    json.dump(rows, sys.stdout, indent=1)
    print()
    return 0 if all(r["ok"] and not r["spill_stores"] and not r["spill_loads"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
