"""CUDA backend (impl="cuda") on a machine without a GPU.

* the CMake build of kernels/csrc compiles and links with the local nvcc, and exports exactly the
  C API (skipped only when nvcc is absent);
* the ctypes structs of kernels/cuda_grpo.py match rerule_grpo.h field for field (gcc);
* import never loads the library; CPU tensors and a missing library are clear errors;
* the kernels' row algorithm (kernels/csrc/grpo_row.cuh), replayed thread by thread on the CPU by
  the host emulator (grpo_emu.cu) and driven through the same ctypes marshalling, matches the fp64
  spec through ``grpo_loss(..., impl="cuda")``: options, awkward and misaligned shapes, masks,
  extreme logits (the logp pair at +-1e4, a label holding nearly all the mass), bf16/fp16, in place,
  the shared-memory cache on, off and partial.

What only a GPU can check (bench/cuda_check.py, bench/cuda_memcheck.sh): the device-only
branches (__ldcs/__stcs/__expf), the block reduction and barriers, and the launches.
"""

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rerule.kernels.cuda_grpo as cuda_grpo
from rerule import grpo_loss, token_logps
from tests.kernels._grpo_cases import (
    assert_close,
    assert_grad_close,
    assert_like_eager,
    check_near_reference_kl,
    huge_logit_case,
    make_inputs,
    near_reference_kl_case,
    reference,
)

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "kernels" / "csrc" / "rerule_grpo.h"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot compile the CUDA sources")
API = {"grpo_fwd", "grpo_grad", "cuda_abi_version", "grpo_args_size", "grpo_grad_args_size",
       "cuda_error_string", "cuda_last_message"}
TOL = 2e-5


# ------------------------------------------------------------------ build, ABI, errors


@needs_nvcc
def test_cmake_build_exports_exactly_the_c_api(built):
    for name, prefix in (("librerule_cuda.so", "rerule_"), ("librerule_cuda_emu.so", "rerule_emu_")):
        nm = ["nm", "-D", "--defined-only", str(built / name)]
        out = subprocess.run(nm, capture_output=True, text=True, check=True).stdout
        symbols = {line.split()[-1] for line in out.splitlines() if line.strip()}
        # nothing else: the static CUDA runtime stays private (see kernels/csrc/rerule_cuda.map)
        assert symbols == {prefix + s for s in API}, name
    readelf = ["readelf", "-d", str(built / "librerule_cuda.so")]
    needed = subprocess.run(readelf, capture_output=True, text=True, check=True).stdout
    assert "libcudart" not in needed  # static runtime: only the driver is needed at run time


@needs_nvcc
def test_built_library_loads_checks_abi_and_rejects_bad_arguments(built):
    lib = cuda_grpo.Library(built / "librerule_cuda.so")  # checks ABI version and both struct sizes
    args = cuda_grpo.GrpoArgs(B=2, T=3, V=10, dtype=7, tau=1.0)
    # rejected before any CUDA call, so this is safe with or without a GPU
    with pytest.raises(RuntimeError, match="dtype must be"):
        lib.check(lib.fwd(ctypes.byref(args), None), "rerule_grpo_fwd")
    gargs = cuda_grpo.GrpoGradArgs(B=1, T=1, V=10, dtype=2, tau=float("inf"))
    with pytest.raises(RuntimeError, match="tau must be"):
        lib.check(lib.grad(ctypes.byref(gargs), None), "rerule_grpo_grad")
    empty = cuda_grpo.GrpoArgs(B=0, T=5, V=10, dtype=2, tau=1.0)
    assert lib.fwd(ctypes.byref(empty), None) == 0  # nothing to do: no launch, no device needed
    if not torch.cuda.is_available():
        # well-formed arguments reach the CUDA runtime, which finds no device and says so
        x = torch.zeros(1, 1, 8)
        ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.int32)
        from rerule.kernels.options import LossOptions

        lib_cpu = cuda_grpo.Library(built / "librerule_cuda.so", device_type="cpu")
        a, _, _keep = cuda_grpo.fwd_args(lib_cpu, x, ids, mask, None, None, None, None, None, LossOptions(),
                                         False, False, False, False)
        code = lib.fwd(ctypes.byref(a), None)
        assert code not in (0, 1)
        with pytest.raises(RuntimeError, match="CUDA error"):
            lib.check(code, "rerule_grpo_fwd")


@needs_nvcc
def test_library_of_another_abi_is_refused(built, monkeypatch):
    # ABI 2 added bias_correction_kl without changing sizeof(RerGrpoArgs): only the version
    # keeps a stale library from reading the flags at the wrong offsets
    monkeypatch.setattr(cuda_grpo, "ABI_VERSION", 3)
    with pytest.raises(RuntimeError, match=r"ABI 4, struct sizes .*expects ABI 3.*rebuild it"):
        cuda_grpo.Library(built / "librerule_cuda_emu.so", prefix="rerule_emu_", device_type="cpu")


def _header_fields(struct: str) -> list[str]:
    body = re.search(rf"typedef struct {struct} \{{(.*?)\}} {struct};", HEADER.read_text(), re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if decl:
            # "const float* a" / "int64_t B, T, V"
            first, *rest = [p.strip() for p in decl.split(",")]
            names += [first.replace("*", " ").split()[-1]] + rest
    return names


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not on PATH")
@pytest.mark.parametrize("struct,cls", [("RerGrpoArgs", cuda_grpo.GrpoArgs),
                                        ("RerGrpoGradArgs", cuda_grpo.GrpoGradArgs)])
def test_ctypes_structs_match_the_header(struct, cls, tmp_path):
    names = [f[0] for f in cls._fields_]
    assert names == _header_fields(struct)  # same fields, same order
    prog = tmp_path / "layout.c"
    lines = [f'printf("%zu %zu\\n", offsetof({struct}, {n}), sizeof(((({struct}*)0)->{n})));' for n in names]
    prog.write_text(
        f'#include <stddef.h>\n#include <stdio.h>\n#include "{HEADER}"\n'
        f"int main(void) {{ printf(\"%zu\\n\", sizeof({struct}));\n" + "\n".join(lines) + "\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", str(prog), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split("\n")
    assert int(out[0]) == ctypes.sizeof(cls)
    for name, line in zip(names, out[1:]):
        offset, size = map(int, line.split())
        assert (offset, size) == (getattr(cls, name).offset, getattr(cls, name).size), name


def test_import_never_loads_the_library(tmp_path):
    code = ("import rerule, rerule.kernels.cuda_grpo as c, rerule.kernels.grpo_loss as g; "
            "g.backend_module('cuda'); assert c._LIB is None; print('ok')")
    env = dict(os.environ, RERULE_CUDA_LIB=str(tmp_path / "missing.so"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_missing_or_broken_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_grpo, "_LIB", None)
    monkeypatch.setenv("RERULE_CUDA_LIB", str(tmp_path / "missing.so"))
    hint = r"cmake -S \. -B build -DRERULE_BUILD_CUDA=ON && cmake --build build"
    with pytest.raises(RuntimeError, match=hint):
        cuda_grpo.get_library()
    bad = tmp_path / "broken.so"
    bad.write_text("not a library")
    monkeypatch.setenv("RERULE_CUDA_LIB", str(bad))
    with pytest.raises(RuntimeError, match="could not load.*RERULE_BUILD_CUDA=1 pip install -e"):
        cuda_grpo.get_library()
    monkeypatch.delenv("RERULE_CUDA_LIB")
    assert cuda_grpo.library_path() == ROOT / "kernels" / "lib" / "librerule_cuda.so"


def test_cpu_tensors_are_a_clear_error(monkeypatch):
    monkeypatch.setattr(cuda_grpo, "_LIB", None)
    inputs = make_inputs(2, 3, 11, seed=1)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        grpo_loss(**inputs, impl="cuda")
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        token_logps(inputs["logits"], inputs["completion_ids"], impl="cuda")


# ------------------------------------------------------------------ the row algorithm, emulated

CASES = [
    ("plain", dict(), dict(old=False, behavior=False, ref=False)),
    ("all-beta", dict(beta=0.04), {}),
    ("bnpo-delta", dict(loss_type="bnpo", delta=1.1, beta=0.1, is_cap=1.5), {}),
    ("dr_grpo-dual-temp", dict(loss_type="dr_grpo", dual_clip=1.5, temperature=0.7), {}),
    # r == 1 exactly with a zero-width clip range and delta = 1: every tie convention at once
    ("ties", dict(epsilon_low=0.0, epsilon_high=0.0, delta=1.0, beta=0.1), dict(old=False)),
    ("seq-level", dict(importance_sampling_level="sequence", beta=0.05, dual_clip=1.2), {}),
    # bias_correction_kl: KL x r with r = exp(logp - old) off policy (old given) and r == 1 (no old);
    # at sequence level the kernel gives logps and the gradient kernel the torch step's g
    ("klis-token", dict(beta=0.2, bias_correction_kl=True, delta=1.2, dual_clip=1.5), {}),
    ("klis-token-noold-bnpo", dict(loss_type="bnpo", beta=0.3, bias_correction_kl=True), dict(old=False)),
    ("klis-seq-dapo", dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.2,
                           bias_correction_kl=True), {}),
    # is_weight_kl: the behavior weight also multiplies the KL term (ReRULE's replay.weight_kl)
    ("wkl-token", dict(beta=0.3, is_weight_kl=True, is_cap=1.5), {}),
    ("wkl-klis-token-noold", dict(loss_type="bnpo", beta=0.3, is_weight_kl=True, bias_correction_kl=True),
     dict(old=False)),
    ("wkl-seq", dict(importance_sampling_level="sequence", beta=0.2, is_weight_kl=True), {}),
]


def _run(inputs, inplace=False, impl="cuda", **opts):
    x = inputs["logits"].clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(x, **kw, **opts, impl=impl, inplace=inplace, return_entropy=True)
    out.loss.backward()
    return out, x.grad


def _check(out, grad, ref, tol=TOL, eager_grad=None):
    """Element-wise against the fp64 spec (gradients times the token count); with ``eager_grad`` the
    gradient is instead held to the kernel rule: error <= 2x eager fp32's + 1e-6."""
    loss_r, logp_r, ent_r, _, grad_r = ref
    assert torch.isfinite(grad).all()
    assert_close(out.loss.detach(), loss_r, tol, tol, "loss")
    assert_close(out.logps, logp_r, tol, tol, "logps")
    assert_close(out.entropy, ent_r, tol, tol, "entropy")
    if eager_grad is None:
        assert_grad_close(grad, grad_r, tol)
    else:
        assert_like_eager(grad, eager_grad, grad_r, "grad", scale=float(grad.shape[0] * grad.shape[1]))


@needs_nvcc
@pytest.mark.parametrize("name,opts,which", CASES, ids=[c[0] for c in CASES])
def test_emulated_kernels_match_reference(name, opts, which, emulated):
    # V = 1007 fp32: rows start at every offset mod 16 bytes (head, body and tail all used);
    # 32 threads: each owns several chunks, so the 4-deep load loop wraps
    emulated.setenv("RERULE_CUDA_THREADS", "32")
    inputs = make_inputs(3, 7, 1007, seed=len(name), **which)
    _check(*_run(inputs, **opts), reference(inputs, **opts))


SHAPES = [(1, 1, 1), (1, 1, 5), (2, 3, 2), (1, 63, 33), (2, 2, 4099)]


@needs_nvcc
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in SHAPES])
def test_emulated_awkward_shapes(shape, emulated):
    inputs = make_inputs(*shape, seed=sum(shape), mask_p=0.2)
    inputs["completion_mask"][0, 0] = 1
    opts = dict(beta=0.05, dual_clip=2.0)
    _check(*_run(inputs, **opts), reference(inputs, **opts))


@needs_nvcc
@pytest.mark.parametrize("cache", ["0", "1600", "-1"], ids=["cache-off", "cache-partial", "cache-auto"])
def test_emulated_cache_modes_agree_bitwise(cache, emulated):
    """The shared-memory row cache changes where sweep 2 reads x, never the result."""
    inputs = make_inputs(2, 5, 1007, seed=2)
    emulated.setenv("RERULE_CUDA_THREADS", "64")
    base, gbase = _run(inputs, beta=0.1)
    emulated.setenv("RERULE_CUDA_CACHE_BYTES", cache)
    out, grad = _run(inputs, beta=0.1)
    assert torch.equal(grad, gbase) and torch.equal(out.logps, base.logps)
    assert torch.equal(out.loss, base.loss)
    _check(out, grad, reference(inputs, beta=0.1))


@needs_nvcc
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_emulated_misaligned_views(inplace, emulated):
    """TRL's logits[:, :-1] and a view starting one element into the vocab: x and dx rows sit at
    different offsets mod 16 bytes, so the gradient takes the scalar-store path (or, in place, the
    vector path with the same misalignment)."""
    inputs = make_inputs(2, 5, 301, seed=10)
    ref = reference(inputs, beta=0.1)
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    full = torch.cat([torch.randn(2, 5, 1), inputs["logits"]], dim=2)  # [2, 5, 302]
    full = torch.cat([full, torch.randn(2, 1, 302)], dim=1)  # [2, 6, 302]
    xf = full.clone().requires_grad_()
    view = xf[:, :-1, 1:] if not inplace else xf.detach().clone()[:, :-1, 1:].requires_grad_()
    out = grpo_loss(view, **kw, beta=0.1, impl="cuda", inplace=inplace)
    (3.0 * out.loss).backward()
    grad = xf.grad[:, :-1, 1:] if not inplace else view.grad
    assert_grad_close(grad, 3.0 * ref[4], TOL)
    if not inplace:
        assert (xf.grad[:, -1] == 0).all() and (xf.grad[:, :, 0] == 0).all()


@needs_nvcc
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_emulated_masked_rows_extreme_logits_and_inplace(level, emulated):
    def edit(x, ids):
        # the label inside the 1e4 block: a logp near -1e4 could not be held to TOL in fp32 at all
        x[0, 0, :500] = 1e4
        ids[0, 0] = 3
        x[0, 1, :] = -1e4
        x[1, :, 700:] = float("-inf")
        ids[1] %= 700

    inputs = make_inputs(3, 5, 1007, seed=6, edit=edit)
    inputs["completion_mask"][0, :2] = 1
    inputs["completion_mask"][2] = 0
    inputs["logits"][2] = float("nan")  # padding may hold anything
    opts = dict(beta=0.1, importance_sampling_level=level)
    ref = reference(dict(inputs, logits=inputs["logits"].nan_to_num(0.0)), **opts)
    for inplace in (False, True):
        out, grad = _run(inputs, inplace=inplace, **opts)
        _check(out, grad, ref)
        assert (grad[2] == 0).all() and (out.logps[2] == 0).all() and (out.entropy[2] == 0).all()
    inputs["completion_mask"].zero_()
    out, grad = _run(inputs, **opts)
    assert out.loss.item() == 0.0 and (grad == 0).all()


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_emulated_low_precision_tolerance_rule(dtype, emulated):
    """|ours - ref_fp64| <= 2 |eager_lowp - ref_fp64| + floor (docs/kernels.md, "How the tests judge
    accuracy"), logps and gradient."""
    inputs = make_inputs(2, 6, 1007, seed=9, dtype=dtype)
    mask = inputs["completion_mask"].bool()
    loss_r, logp_r, _, _, grad_r = reference(inputs, beta=0.05)
    out, grad = _run(inputs, beta=0.05)
    assert grad.dtype == dtype
    xe = inputs["logits"].clone().requires_grad_()
    lp = torch.log_softmax(xe, -1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    eager_err = (lp.double() - logp_r)[mask].abs().max().item()
    assert (out.logps.double() - logp_r)[mask].abs().max().item() <= 2 * eager_err + 1e-6
    assert_close(out.loss.detach(), loss_r, 1e-5, 1e-4, "loss")
    # one rounding of each gradient element to the logits dtype: half an ulp relative, or half the
    # subnormal spacing (fp16 gradients of ~1e-6 are subnormal); a full one allows for the fp32 math
    fi = torch.finfo(dtype)
    assert ((grad.double() - grad_r).abs() <= fi.eps * grad_r.abs() + fi.eps * fi.smallest_normal).all()


@needs_nvcc
def test_emulated_token_logps_forward_and_grad_kernel(emulated):
    inputs = make_inputs(2, 9, 515, seed=4)
    x, ids, mask = inputs["logits"], inputs["completion_ids"], inputs["completion_mask"]
    xr = x.double().requires_grad_()
    lp_r = torch.log_softmax(xr / 1.3, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    g = torch.randn(2, 9, dtype=torch.float64)
    (lp_r * g).sum().backward()
    xc = x.clone().requires_grad_()
    lp, ent = token_logps(xc, ids, mask, temperature=1.3, return_entropy=True, impl="cuda")
    (lp * g.float()).sum().backward()
    assert_close(lp, lp_r.detach(), TOL, TOL, "logps")
    assert_close(xc.grad, xr.grad, 1e-6, TOL, "grad")
    assert ent is not None and torch.isfinite(ent).all()


@needs_nvcc
def test_emulated_out_of_range_id_gives_nan_not_a_read(emulated):
    """The C side never reads outside a row, even for an id the Python checks would reject."""
    from rerule.kernels.options import LossOptions

    x = torch.randn(1, 2, 16)
    ids = torch.tensor([[3, 16]])
    mask = torch.ones(1, 2, dtype=torch.int32)
    logp, stats, _, _, _ = cuda_grpo.grpo_fwd(x, ids, mask, None, None, None, None, None, LossOptions(),
                                               False, False, False, False)
    assert torch.isfinite(logp[0, 0]) and torch.isnan(logp[0, 1]) and torch.isfinite(stats).all()
    # no label inside the row: every term is in the sum without the label
    assert stats[0, 1, 1] == stats[0, 1, 2]


@needs_nvcc
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 300)),
    offset=st.integers(0, 3),
    threads=st.sampled_from(["32", "64", "96", "0"]),
    cache=st.sampled_from(["-1", "0", "16", "48", "160"]),
    opts=st.fixed_dictionaries({
        "delta": st.sampled_from([None, 1.1]), "dual_clip": st.sampled_from([None, 1.5]),
        "beta": st.sampled_from([0.0, 0.1]), "temperature": st.sampled_from([1.0, 0.7]),
        "bias_correction_kl": st.booleans(),
        "importance_sampling_level": st.sampled_from(["token", "sequence"]),
        "loss_type": st.sampled_from(["grpo", "bnpo", "dr_grpo", "dapo"]),
    }),
    seed=st.integers(0, 1000),
)
def test_emulated_property_alignment_threads_cache_options(shape, offset, threads, cache, opts, seed,
                                                           emulated):
    """Any row offset mod 16 bytes x any thread count x any cache size x any option set."""
    emulated.setenv("RERULE_CUDA_THREADS", threads)
    emulated.setenv("RERULE_CUDA_CACHE_BYTES", cache)
    inputs = make_inputs(*shape, seed=seed)
    ref = reference(inputs, **opts)
    B, T, V = shape
    # the vocab view starts `offset` elements into a wider buffer: every row alignment occurs
    full = torch.randn(B, T, V + offset)
    full[:, :, offset:] = inputs["logits"]
    xf = full.requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(xf[:, :, offset:], **kw, **opts, impl="cuda", return_entropy=True)
    out.loss.backward()
    # STYLE's tolerance rule against the fp32 torch backend: a draw like logp ~ -9.35 with
    # ref - logp ~ 0.009 leaves the KL gradient 1 - exp(ref - logp) with ~5e-5 relative error in
    # any fp32 logp, above TOL while the emulated kernel is exactly as good as eager fp32
    eager_grad = reference(inputs, torch.float32, **opts)[4]
    _check(out, xf.grad[:, :, offset:], ref, eager_grad=eager_grad)
    assert (xf.grad[:, :, :offset] == 0).all()


@needs_nvcc
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_emulated_huge_logits_and_temperature_like_eager(level, emulated):
    """+-1e4 logits with ties at the max, tau = 0.7: the gradient kernel (sequence level) works relative
    to the kept row max, so its error stays within 2x eager fp32's (through an fp32 lse it was 1e3x)."""
    def edit(x, ids):
        x[:, :, :2] = 1e4
        x[:, :, 2:] = torch.randn(x[:, :, 2:].shape, dtype=torch.float64) * 1e4

    inputs = make_inputs(2, 4, 301, seed=3, edit=edit)
    opts = dict(importance_sampling_level=level, temperature=0.7)
    ref, eager = reference(inputs, **opts), reference(inputs, torch.float32, **opts)
    out, grad = _run(inputs, **opts)
    for what, o_, e_, r_, sc in (("loss", out.loss.detach(), eager[0], ref[0], 1.0),
                                 ("logps", out.logps, eager[1], ref[1], 1.0),
                                 ("grad", grad, eager[4], ref[4], 8.0)):
        assert_like_eager(o_, e_, r_, what, scale=sc)


@needs_nvcc
def test_emulated_logp_pair_and_stats_layout(emulated):
    """logp + logp_lo is the log-prob of the fp32 logits to ~1e-6 where the fp32 logp alone is ~1e-3 off,
    and the stats are torch's and Triton's columns (max, sum, sum without the label, logp_lo); masked rows
    read (0, 1, 0, 0)."""
    from rerule.kernels import torch_grpo
    from rerule.kernels.options import LossOptions

    x, ids, truth, _ = huge_logit_case()
    mask = torch.ones(ids.shape, dtype=torch.int32)
    mask[1, 2] = 0
    args = (x, ids, mask, None, None, None, None, None, LossOptions(), False, False, False, False)
    logp, stats, _, _, _ = cuda_grpo.grpo_fwd(*args)
    logp_t, stats_t, _, _, _ = torch_grpo.grpo_fwd(*args)
    assert stats.shape == (2, 8, cuda_grpo.STATS_WIDTH) == stats_t.shape
    assert torch.equal(cuda_grpo.logp_lo(stats), stats[..., 3])
    valid = mask.bool()
    pair = logp.double() + cuda_grpo.logp_lo(stats).double()
    assert (logp.double() - truth)[valid].abs().max() > 1e-4  # the input is one where the low part matters
    assert (pair - truth)[valid].abs().max() <= 2e-6, (pair - truth)[valid].abs().max()
    assert torch.equal(stats[..., 0], stats_t[..., 0])
    assert_close(stats[..., 1:3][valid], stats_t[..., 1:3][valid], 0.0, 1e-6, "row sums")
    assert stats[1, 2].tolist() == [0.0, 1.0, 0.0, 0.0] and logp[1, 2] == 0


@needs_nvcc
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_emulated_huge_logit_loss_is_exact_where_eager_fp32_is_not(level, emulated):
    """At +-1e4 logits the loss depends on logp - old (O(1)); from the fp32 logps alone it carries their
    ~5e-4 rounding (eager fp32 does, and so did the CUDA kernels before ABI 4)."""
    x, ids, truth, old = huge_logit_case(seed=12)
    inputs = dict(logits=x, completion_ids=ids, completion_mask=torch.ones(ids.shape),
                  advantages=torch.tensor([1.0, -0.7]), old_logps=old, ref_logps=(truth + 0.1).float())
    opts = dict(importance_sampling_level=level, beta=0.3, epsilon_low=0.9, epsilon_high=10.0)
    ref, eager = reference(inputs, **opts), reference(inputs, torch.float32, **opts)
    x_ = x.clone().requires_grad_()
    kw = {k: v for k, v in inputs.items() if k != "logits"}
    out = grpo_loss(x_, **kw, **opts, impl="cuda")
    out.loss.backward()
    err = abs(out.loss.item() - ref[0].item())
    assert abs(eager[0].item() - ref[0].item()) > 1e-5  # eager's error: what the test would miss
    assert err <= 1e-6 * (1 + abs(ref[0].item())), (err, abs(eager[0].item() - ref[0].item()))
    assert_like_eager(x_.grad, eager[4], ref[4], "grad", scale=float(ids.numel()))


@needs_nvcc
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_emulated_confident_label_keeps_its_digits(level, emulated):
    """The label holds all but ~1e-9 of the mass: its gradient coef * (1 - p) comes from the sum of the
    other terms (coef - p * coef would be 0 or an ulp of coef), and logp from -log1p(q / e_label)."""
    def edit(x, ids):
        x.scatter_(-1, ids.unsqueeze(-1), 25.0)

    # on policy and no KL: d loss / d logp = -adv * rw, far from 0 on every token
    inputs = make_inputs(2, 3, 301, seed=5, scale=1.0, edit=edit, old=False, behavior=False, ref=False)
    opts = dict(importance_sampling_level=level)
    ref = reference(inputs, **opts)
    out, grad = _run(inputs, **opts)
    ids, valid = inputs["completion_ids"], inputs["completion_mask"].bool()
    g_lab = grad.double().gather(-1, ids.unsqueeze(-1)).squeeze(-1)[valid]
    r_lab = ref[4].gather(-1, ids.unsqueeze(-1)).squeeze(-1)[valid]
    assert (r_lab.abs() > 0).all()
    assert ((g_lab - r_lab).abs() <= 1e-5 * r_lab.abs()).all(), (g_lab, r_lab)
    lp = out.logps.double()[valid]
    assert ((lp - ref[1][valid]).abs() <= 1e-5 * ref[1][valid].abs()).all()
    _check(out, grad, ref)


@needs_nvcc
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_emulated_kl_near_the_reference_keeps_its_digits(level, emulated):
    """The k3 KL and its gradient from the series of exp(d) - 1 - d (k3_terms in grpo_row.cuh), as in
    torch and Triton: near the reference the textbook forms cancel in fp32."""
    inputs, opts = near_reference_kl_case(level)
    truth, eager = reference(inputs, **opts), reference(inputs, torch.float32, **opts)
    out, grad = _run(inputs, **opts)
    check_near_reference_kl(out.loss, grad, truth, eager)
