"""GPU check of the CUDA backend (impl="cuda"): correctness against the spec, then timing beside Triton.

    python bench/cuda_check.py --out bench/results            # checks + timings -> cuda_check.json
    python bench/cuda_check.py --out DIR --quick              # fewer shapes and reps
    python bench/cuda_check.py --out DIR --memcheck           # one awkward case, for compute-sanitizer
    python bench/cuda_check.py --out DIR --build              # build kernels/lib first if it is missing

Checks (every case through the public ``grpo_loss`` / ``token_logps`` with impl="cuda", loss,
logps, entropy and d loss / d logits under a random upstream scale): awkward shapes (V = 1, 7,
1007, 4099; T = 63; masked rows, a fully masked batch, +-1e4 and -inf logits, TRL's
``logits[:, :-1]`` view, a view starting one element into the vocab, in place, sequence level,
thread counts 32 and 1024, the shared-memory cache off / partial / auto) and real vocabularies
(32000, 128256, 151936) at a few rows. Tolerance (docs/kernels.md, "How the tests judge accuracy"):
bf16/fp16 outputs must satisfy max|ours - ref_fp64| <= 2 max|eager_lowp - ref_fp64| + floor, where
eager_lowp runs log_softmax and its backward in the logits dtype; fp32 outputs are held to 2e-5
relative of the fp64 reference.

Timings (only when every check passed): the backend calls themselves (no autograd around them),
CUDA events, median of reps, for impl cuda (cache auto / off / 2-blocks-per-SM) and triton:
fused forward+gradient (copy and in place), log-prob forward (+ entropy), gradient sweep. The
byte floor is (bytes that must move) / (measured device copy bandwidth); ``floor_ratio`` =
time / floor (the issue's goal: <= 1.25).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rerule import grpo_loss, token_logps  # noqa: E402
from rerule.kernels import cuda_grpo  # noqa: E402
from rerule.kernels.grpo_math import reduction_weights, sequence_terms, token_terms  # noqa: E402
from rerule.kernels.options import LossOptions  # noqa: E402
from tests.kernels._grpo_cases import make_inputs, reference  # noqa: E402

DEV = torch.device("cuda")
ALL_OPTS = dict(beta=0.04, dual_clip=2.0, delta=1.5, epsilon_high=0.28)


# ----------------------------------------------------------------------------- correctness


def _to(inputs: dict, dev) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _lowp_eager(inputs: dict, opts: dict, scale: float):
    """log_softmax and its backward in the logits dtype (what eager torch does), per-token math in fp32."""
    o = LossOptions(**{k: v for k, v in opts.items() if k in LossOptions.__dataclass_fields__})
    x = inputs["logits"].detach().clone().requires_grad_()
    logprobs = torch.log_softmax(x / o.temperature, -1)
    lp = logprobs.gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)
    ent = -(logprobs.exp() * logprobs).nan_to_num(0.0).sum(-1)
    mask = inputs["completion_mask"]
    valid = mask.bool()
    lpf = torch.where(valid, lp.detach().float(), torch.zeros_like(lp, dtype=torch.float32))
    z = lambda k: None if inputs.get(k) is None else torch.where(valid, inputs[k].float(), 0.0)
    rw = reduction_weights(mask, o.loss_type, opts.get("max_completion_length"),
                           opts.get("num_items_in_batch"))
    terms = dict(old=z("old_logps"), behavior=z("behavior_logps"),
                 ref=z("ref_logps") if o.beta != 0.0 else None)
    adv = inputs["advantages"].float()
    if o.sequence_level:
        loss_tok, g = sequence_terms(lpf, mask, adv, rw, o, **terms)
    else:
        loss_tok, g = token_terms(lpf, adv.unsqueeze(-1), rw, o, **terms)
    lp.backward((scale * g * valid).to(lp.dtype))
    return (rw * loss_tok).sum(), lpf, torch.where(valid, ent.float(), 0.0), x.grad


def _maxerr(a, b, mask=None) -> float:
    d = (a.double() - b.double()).abs()
    if mask is not None:
        d = d[mask]
    return d.max().item() if d.numel() else 0.0


def _layout(logits: torch.Tensor, layout: str):
    """(leaf, view passed to grpo_loss, function leaf.grad -> grad of the view)."""
    B, T, V = logits.shape
    if layout == "trl_slice":
        full = torch.cat([logits, torch.randn(B, 1, V, device=logits.device).to(logits.dtype)], 1)
        leaf = full.detach().requires_grad_()
        return leaf, leaf[:, :-1], lambda g: g[:, :-1]
    if layout == "vocab_offset":
        full = torch.cat([torch.randn(B, T, 1, device=logits.device).to(logits.dtype), logits], 2)
        leaf = full.detach().requires_grad_()
        return leaf, leaf[:, :, 1:], lambda g: g[:, :, 1:]
    leaf = logits.detach().clone().requires_grad_()
    return leaf, leaf, lambda g: g


def run_case(name, shape, dtype, opts=None, which=None, layout="contiguous", inplace=False, edit=None,
             mask_fn=None, env=None, logps_only=False, seed=0) -> dict:
    """One case against the fp64 reference (and the eager low-precision run for bf16/fp16)."""
    opts, which = dict(opts or {}), dict(which or {})
    inputs = make_inputs(*shape, seed=seed, dtype=dtype, edit=edit, **which)
    if mask_fn:
        mask_fn(inputs["completion_mask"])
    inputs = _to(inputs, DEV)
    scale = 3.0
    old_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        leaf, view, pick = _layout(inputs["logits"], layout)
        kw = {k: v for k, v in inputs.items() if k != "logits"}
        if logps_only:
            assert dtype == torch.float32, "the log-prob case compares fp32 only"
            lp, ent = token_logps(view, kw["completion_ids"], kw["completion_mask"],
                                  opts.get("temperature", 1.0), return_entropy=True, impl="cuda")
            (scale * lp).sum().backward()
            ours = dict(logps=lp, entropy=ent, loss=lp.sum())
        else:
            out = grpo_loss(view, **kw, **opts, impl="cuda", inplace=inplace, return_entropy=True)
            (scale * out.loss).backward()
            ours = dict(logps=out.logps, entropy=out.entropy, loss=out.loss.detach())
        grad = pick(leaf.grad) if not inplace else leaf.grad
        torch.cuda.synchronize()
    finally:
        for k, v in old_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    valid = inputs["completion_mask"].bool()
    clean = dict(inputs, logits=inputs["logits"].nan_to_num(0.0))
    if logps_only:
        x = clean["logits"].double().requires_grad_()
        lpr = torch.log_softmax(x / opts.get("temperature", 1.0), -1)
        lpr = lpr.gather(-1, clean["completion_ids"].unsqueeze(-1)).squeeze(-1) * valid
        (scale * lpr).sum().backward()
        ref = dict(logps=lpr.detach(), loss=lpr.sum().detach(), grad=x.grad)
    else:
        loss_r, logp_r, ent_r, _, grad_r = reference(clean, **opts)
        ref = dict(loss=loss_r, logps=logp_r, entropy=ent_r, grad=scale * grad_r)
    errs = {"loss": _maxerr(ours["loss"], ref["loss"]), "logps": _maxerr(ours["logps"], ref["logps"], valid),
            "grad": _maxerr(grad, ref["grad"])}
    if "entropy" in ref:
        errs["entropy"] = _maxerr(ours["entropy"], ref["entropy"], valid)
    finite = bool(torch.isfinite(grad).all()) and bool(torch.isfinite(ours["logps"]).all())
    if dtype == torch.float32:
        scale_of = {k: max(ref[k].abs().max().item() if ref[k].numel() else 0.0, 1e-8) for k in errs}
        bounds = {k: 2e-5 * scale_of[k] for k in errs}
    else:
        lo_loss, lo_lp, lo_ent, lo_grad = _lowp_eager(clean, opts, scale)
        lo = {"loss": _maxerr(lo_loss, ref["loss"]), "logps": _maxerr(lo_lp, ref["logps"], valid),
              "grad": _maxerr(lo_grad, ref["grad"]),
              "entropy": _maxerr(lo_ent, ref.get("entropy", lo_ent), valid)}
        bounds = {k: 2 * lo[k] + 1e-6 for k in errs}
    passed = finite and all(errs[k] <= bounds[k] for k in errs)
    return dict(case=name, shape=list(shape), dtype=str(dtype).replace("torch.", ""), layout=layout,
                inplace=inplace, opts=opts, env=env or {}, passed=passed, finite=finite, errors=errs,
                bounds=bounds)


def checks(quick: bool, memcheck: bool) -> list:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

    def extreme(x, ids):
        x[0, 0, :500] = 1e4
        ids[0, 0] = 3
        x[0, 1, :] = -1e4
        x[1, :, 700:] = float("-inf")
        ids[1] %= 700

    def half_mask(m):
        m[0, :3] = 1
        m[1] = 0

    seq = dict(ALL_OPTS, importance_sampling_level="sequence")
    ties = dict(epsilon_low=0.0, epsilon_high=0.0, delta=1.0, beta=0.1)
    awkward = [
        ("trl-slice-masked", (2, 5, 1007), bf16, dict(opts=ALL_OPTS, layout="trl_slice", mask_fn=half_mask)),
        ("vocab-offset-fp32", (2, 5, 1007), fp32, dict(opts=ALL_OPTS, layout="vocab_offset")),
        ("inplace-bf16", (2, 5, 1007), bf16, dict(opts=ALL_OPTS, inplace=True)),
        ("seq-level-grad-kernel", (2, 5, 1007), bf16, dict(opts=seq)),
        ("token-logps-grad-kernel", (2, 5, 1007), fp32, dict(logps_only=True, opts=dict(temperature=0.8))),
    ]
    if memcheck:
        return [run_case(n, s, d, **kw) for n, s, d, kw in awkward]
    awkward += [
        ("B1-T1-V1", (1, 1, 1), fp32, {}),
        ("B1-T1-V7", (1, 1, 7), bf16, dict(opts=ALL_OPTS)),
        ("B1-T63-V1007", (1, 63, 1007), bf16, dict(opts=ALL_OPTS)),
        ("B2-T3-V4099-fp16", (2, 3, 4099), fp16, dict(opts=dict(ALL_OPTS, temperature=0.7))),
        ("extreme-fp32", (2, 5, 1007), fp32, dict(opts=dict(beta=0.1), edit=extreme)),
        ("extreme-bf16", (2, 5, 1007), bf16, dict(opts=dict(beta=0.1), edit=extreme)),
        ("fully-masked", (2, 4, 300), bf16, dict(opts=ALL_OPTS, mask_fn=lambda m: m.zero_())),
        ("threads-32", (2, 5, 4099), bf16, dict(opts=ALL_OPTS, env={"RERULE_CUDA_THREADS": "32"})),
        ("threads-1024", (2, 5, 1007), fp32, dict(opts=ALL_OPTS, env={"RERULE_CUDA_THREADS": "1024"})),
        ("cache-off", (2, 5, 4099), bf16, dict(opts=ALL_OPTS, env={"RERULE_CUDA_CACHE_BYTES": "0"})),
        ("cache-partial", (2, 5, 4099), bf16, dict(opts=ALL_OPTS, env={"RERULE_CUDA_CACHE_BYTES": "2048"})),
        ("onpolicy-ties", (2, 5, 1007), fp32, dict(opts=ties, which=dict(old=False))),
    ]
    real = [(2, 32, 32000), (2, 32, 151936)] if quick else [(2, 64, 32000), (2, 64, 128256), (2, 64, 151936)]
    for B, T, V in real:
        awkward.append((f"real-B{B}-T{T}-V{V}", (B, T, V), bf16, dict(opts=ALL_OPTS, layout="trl_slice")))
        awkward.append((f"real-B{B}-T{T}-V{V}-inplace", (B, T, V), bf16, dict(opts=ALL_OPTS, inplace=True)))
    awkward.append(("real-V151936-fp32", (1, 16, 151936), fp32, dict(opts=ALL_OPTS)))
    return [run_case(n, s, d, seed=i, **kw) for i, (n, s, d, kw) in enumerate(awkward)]


# ----------------------------------------------------------------------------- timing


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_GBps(nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


TIMING_SHAPES = [(4, 1024, 32000), (8, 1024, 32000), (8, 1024, 128256), (8, 1024, 151936), (16, 1024, 151936)]
# cuda: the shared-memory row cache as large as fits (at large V one 1024-thread block per SM), off,
# and ~110 KB with 512 threads (two blocks per SM: one row's barriers hide behind the other's loads;
# 64 registers per thread allow 1024 threads per SM either way)
VARIANTS = [("cuda", {"RERULE_CUDA_CACHE_BYTES": "-1"}), ("cuda", {"RERULE_CUDA_CACHE_BYTES": "0"}),
            ("cuda", {"RERULE_CUDA_CACHE_BYTES": str(110 * 1024), "RERULE_CUDA_THREADS": "512"}),
            ("triton", {})]


def _time_with_env(call, env: dict, reps: int) -> float:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _median_ms(call, reps)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _time_shape(B: int, T: int, V: int, reps: int, copy_GBps: float) -> list:
    from rerule.kernels import triton_grpo

    inp = _to(make_inputs(B, T, 8, seed=1), DEV)  # the [B, T] inputs only; the logits are made at the real V
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32  # the interpreter runs fp32
    x = torch.randn(B, T, V, device=DEV, dtype=dtype)
    ids = torch.randint(0, V, (B, T), device=DEV)
    mask = torch.ones(B, T, dtype=torch.int32, device=DEV)
    adv, rw = inp["advantages"], reduction_weights(mask, "grpo")
    old, beh, ref = inp["old_logps"], inp["behavior_logps"], inp["ref_logps"]
    g = torch.randn(B, T, device=DEV) * 1e-3
    # each backend's per-row softmax statistics for grpo_grad (row max, sums): values are irrelevant to timing
    stats = lambda m: torch.ones(B, T, m.STATS_WIDTH, device=DEV)
    o = LossOptions(beta=0.04, epsilon_high=0.28)
    # byte floors: the logits read once, plus dlogits written once where there is a gradient
    nbytes = x.numel() * x.element_size()
    ops = {
        "fused_fwd_grad": (2 * nbytes, lambda m: m.grpo_fwd(x, ids, mask, adv, rw, old, beh, ref, o,
                                                           True, True, False, False)),
        # last of the fused ops: it overwrites x with gradients (finite values, same work after)
        "fused_fwd_grad_inplace": (2 * nbytes, lambda m: m.grpo_fwd(x, ids, mask, adv, rw, old, beh, ref, o,
                                                                   True, True, False, True)),
        "logp_fwd_entropy": (nbytes, lambda m: m.grpo_fwd(x, ids, mask, None, None, None, None, None, o,
                                                         False, False, True, False)),
        "grad_sweep": (2 * nbytes, lambda m: m.grpo_grad(x, ids, mask, stats(m), g, 1.0, False)),
    }
    rows = []
    for op, (floor_bytes, call) in ops.items():
        # the shared-memory cache only exists in the fused forward + gradient
        for impl, env in VARIANTS if op.startswith("fused") else VARIANTS[:1] + VARIANTS[-1:]:
            mod = cuda_grpo if impl == "cuda" else triton_grpo
            ms = _time_with_env(lambda call=call, mod=mod: call(mod), env, reps)
            floor_ms = floor_bytes / (copy_GBps * 1e9) * 1e3
            rows.append(dict(op=op, impl=impl, env=env, B=B, T=T, N=B * T, V=V, dtype=str(dtype)[6:], ms=ms,
                             GBps=floor_bytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms,
                             floor_ratio=ms / floor_ms))
    return rows


def timings(quick: bool, shapes=None) -> tuple[list, dict]:
    shapes = shapes or ([(8, 1024, 151936)] if quick else TIMING_SHAPES)
    copy = copy_bandwidth_GBps(1 << 31 if DEV.type == "cuda" else 1 << 24)
    rows = []
    for B, T, V in shapes:
        rows += _time_shape(B, T, V, 5 if quick else 15, copy)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    return rows, {"copy_GBps": copy}


def summarize(rows: list) -> list:
    """Per op and shape: the best cuda variant against triton."""
    out = []
    for key in sorted({(r["op"], r["N"], r["V"]) for r in rows}):
        sel = [r for r in rows if (r["op"], r["N"], r["V"]) == key]
        cuda = min((r for r in sel if r["impl"] == "cuda"), key=lambda r: r["ms"])
        tri = next(r for r in sel if r["impl"] == "triton")
        out.append(dict(op=key[0], N=key[1], V=key[2], cuda_ms=cuda["ms"], cuda_env=cuda["env"],
                        cuda_floor_ratio=cuda["floor_ratio"], triton_ms=tri["ms"],
                        triton_floor_ratio=tri["floor_ratio"], triton_over_cuda=tri["ms"] / cuda["ms"]))
    return out


# ----------------------------------------------------------------------------- main


def build_library() -> None:
    major, minor = torch.cuda.get_device_capability()
    build = ROOT / "build-cuda-check"
    subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build), "-DRERULE_BUILD_CUDA=ON",
                           f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}"])
    subprocess.check_call(["cmake", "--build", str(build), "-j"])


def meta() -> dict:
    import triton

    return dict(card=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton.__version__, torch_cuda=torch.version.cuda,
                python=platform.python_version(),
                date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                library=str(cuda_grpo.library_path()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for cuda_check.json (created)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--memcheck", action="store_true", help="small awkward cases only (compute-sanitizer)")
    ap.add_argument("--no-timing", action="store_true", help="checks only")
    ap.add_argument("--build", action="store_true", help="build the library for this card if it is missing")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device; this script only runs on a GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.build and not cuda_grpo.library_path().is_file():
        build_library()
    cuda_grpo.get_library()  # a clear error now if it is missing
    result = dict(meta=meta())
    result["checks"] = checks(args.quick, args.memcheck)
    ok = all(c["passed"] for c in result["checks"])
    for c in result["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'} {c['case']:36s} {c['dtype']:9s} "
              + " ".join(f"{k}={v:.2e}/{c['bounds'][k]:.2e}" for k, v in c["errors"].items()))
    if ok and not (args.memcheck or args.no_timing):
        rows, roof = timings(args.quick)
        result.update(roofline=roof, timings=rows, summary=summarize(rows))
        for s in result["summary"]:
            print(f"{s['op']:24s} N={s['N']:6d} V={s['V']:6d} cuda {s['cuda_ms']:.3f} ms "
                  f"({s['cuda_floor_ratio']:.2f}x floor) triton {s['triton_ms']:.3f} ms "
                  f"({s['triton_floor_ratio']:.2f}x floor) triton/cuda {s['triton_over_cuda']:.2f}")
    elif not ok:
        result["timings_skipped"] = "checks failed: no timings while the op is red"
    name = "cuda_memcheck_cases.json" if args.memcheck else "cuda_check.json"
    (out / name).write_text(json.dumps(result, indent=1, default=str))
    print(f"cuda_check: {'all checks passed' if ok else 'CHECKS FAILED'}; wrote {out / name}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
