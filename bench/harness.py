"""The two kinds of benchmark test: the correctness gate of an impl, and the timing of an impl.

Every timing test first looks up (or runs) the gate of its impl at the same V, H and dtype: an impl
that fails it gets no timing row (ours fail the test, peers are recorded as excluded). The gate
runs at ``profile().gate_rows`` rows with padded sequences; its reference is fp32 on GPU (fp64 on
CPU) on the same low-precision inputs.
"""

from __future__ import annotations

import time

import pytest
import torch

from .common import SESSION, Case, device, env_filter, hi_dtype, measure_peak, profile, rates, sync
from .gates import judge
from .impls import OPS, Op

_INPUTS: dict = {}  # one slot: real-shape inputs are GBs on a GPU
_REFS: dict = {}


def _one_slot(cache: dict, key, make):
    if key not in cache:
        cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cache[key] = make()
    return cache[key]


def _selected(op_name: str, impl_name: str) -> bool:
    ops, impls = env_filter("RERULE_BENCH_OPS"), env_filter("RERULE_BENCH_IMPLS")
    return (ops is None or op_name in ops) and (impls is None or impl_name in impls)


# ----------------------------------------------------------------------------- parametrization


_OP_RANK = {"loss": 0, "linear": 1, "logps": 2, "advantages": 3}
# (op, test function, param id) -> run order; conftest sorts the collected items by it
PRIORITY: dict = {}


def _priority(op_name, impl_name, gate=False, first=False) -> float:
    """Run order (conftest sorts by it): gates; each op's first (goal) shape, the loss first; the
    other shapes; then torch.compile (its gate included), whose compilation is the slowest part."""
    rank = 0.1 * _OP_RANK.get(op_name, 9)
    if impl_name == "compile":
        return 4 + rank
    if gate:
        return 0 + rank
    return (1 if first else 2) + rank


def _static_unavailable(op, name) -> bool:
    """Impls that cannot run here at all (no GPU, compile off, a missing peer) are not collected:
    they are listed in the results' not_run with the reason instead of showing up as skips."""
    why = op.impls[name].unavailable(device())
    if why:
        SESSION.note_missing(op.name, name, why)
    return bool(why)


def gate_params(op_name: str) -> list:
    """One gate per (impl, V, H) the profile's timing cases use, plus every interpreter-only impl."""
    op, prof = OPS[op_name], profile()
    out, seen = [], set()
    for case, impl_names, _modes in prof.cases[op_name]:
        for name in op.impls:
            if impl_names is not None and name not in impl_names:
                continue
            key = (name, case.V, case.H)
            if key in seen or not _selected(op_name, name) or _static_unavailable(op, name):
                continue
            seen.add(key)
            gid = f"{name}-" + "-".join(p for p in case.id.split("-") if not p.startswith("N"))
            gid = gid.rstrip("-")
            PRIORITY[(op_name, "test_gate", gid)] = _priority(op_name, name, gate=True)
            out.append(pytest.param(name, case, id=gid))
    return out


def timing_params(op_name: str) -> list:
    op, prof, dev = OPS[op_name], profile(), device()
    out = []
    for i, (case, impl_names, modes) in enumerate(prof.cases[op_name]):
        for name, impl in op.impls.items():
            if (impl_names is not None and name not in impl_names) or not _selected(op_name, name):
                continue
            for mode in impl.modes:
                if (modes is not None and mode not in modes) or _static_unavailable(op, name):
                    continue
                if impl.interpreted and dev.type == "cpu":
                    SESSION.note_missing(
                        op_name, name, "CPU: Triton interpreter, correctness gate only", case.as_dict(), mode
                    )
                    continue
                tid = f"{case.id}-{name}-{mode}"
                PRIORITY[(op_name, "test_time", tid)] = _priority(op_name, name, first=i == 0)
                out.append(pytest.param(case, name, mode, id=tid))
    return out


# ----------------------------------------------------------------------------- gate


def _hi_outputs(op: Op, inp: dict, need_grad: bool) -> dict:
    dt = hi_dtype(device())
    leaves = {k: inp[k].detach().to(dt).requires_grad_(need_grad) for k in op.leaf_names}
    # a true fp32 reference: no TF32 in its matmuls, whatever the process default is
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _run_outputs(op, op.reference, inp, leaves, need_grad)
    finally:
        torch.set_float32_matmul_precision(precision)


def _lo_outputs(op: Op, inp: dict, need_grad: bool) -> dict:
    leaves = {k: inp[k].detach().requires_grad_(need_grad) for k in op.leaf_names}
    return _run_outputs(op, op.lo, inp, leaves, need_grad)


def _run_outputs(op: Op, forward, inp, leaves, need_grad, grads=None) -> dict:
    if need_grad and leaves:
        out = forward(inp, leaves)
        op.backward(out, inp)
    else:
        with torch.no_grad():
            out = forward(inp, leaves)
    res = {op.out_name: op.compare_out(out, inp)}
    if need_grad and leaves:
        res.update(grads(leaves) if grads else {f"grad_{k}": t.grad for k, t in leaves.items()})
    return res


def run_gate(op: Op, impl_name: str, case: Case):
    """The gate of ``impl_name`` at (V, H) of ``case``: cached for the session."""
    impl, prof, dev = op.impls[impl_name], profile(), device()
    rows = prof.interp_gate_rows if impl.interpreted and dev.type == "cpu" else prof.gate_rows
    gcase = op.gate_case(case, rows)
    key = (op.name, impl_name, case.V, case.H, str(prof.dtype), rows)
    if key in SESSION.gates:
        return SESSION.gates[key]
    t0 = time.perf_counter()
    need_grad = "fwd+bwd" in impl.modes and bool(op.leaf_names)
    inp = _one_slot(
        _INPUTS,
        ("gate", op.name, gcase, prof.dtype),
        lambda: op.inputs(gcase, prof.dtype, dev, seed=1, padded=True),
    )
    # ops without a low-precision baseline (advantages: rewards are fp32) are judged as fp32
    dtype = prof.dtype if op.lo else torch.float32
    low = dtype in (torch.bfloat16, torch.float16)
    refs = _one_slot(
        _REFS,
        (op.name, gcase, prof.dtype, need_grad),
        lambda: {
            "hi": _hi_outputs(op, inp, need_grad),
            "lo": _lo_outputs(op, inp, need_grad) if low and op.lo else None,
        },
    )
    leaves = impl.leaves(op, inp, need_grad)
    try:
        got = _run_outputs(op, impl.forward, inp, leaves, need_grad, impl.grads)
        sync(dev)
        gate = judge(op.name, impl_name, gcase.as_dict(), dtype, got, refs["hi"], refs["lo"])
    except Exception as err:  # a peer that crashes on valid input fails its gate, with the reason kept
        gate = judge(op.name, impl_name, gcase.as_dict(), dtype, {}, refs["hi"], refs["lo"])
        gate.reason = f"raised {type(err).__name__}: {err}"[:500]
    del leaves
    gate.seconds = time.perf_counter() - t0
    SESSION.gates[key] = gate
    return gate


def gate_test(benchmark, op_name: str, impl_name: str, case: Case):
    op, dev = OPS[op_name], device()
    why = op.impls[impl_name].unavailable(dev)
    if why:
        SESSION.note_missing(op_name, impl_name, why)
        pytest.skip(why)
    # pedantic(rounds=1) makes the gate run under --benchmark-only; its time is the gate's, not a result
    gate = benchmark.pedantic(run_gate, args=(op, impl_name, case), rounds=1, iterations=1)
    benchmark.extra_info.update(
        {"kind": "gate", "passed": gate.passed, "errors": gate.errors, "bounds": gate.bounds}
    )
    if not gate.passed and op.impls[impl_name].ours:
        pytest.fail(f"correctness gate failed for ours ({impl_name}): {gate.reason}")


# ----------------------------------------------------------------------------- timing


def timing_test(benchmark, op_name: str, case: Case, impl_name: str, mode: str):
    op, prof, dev = OPS[op_name], profile(), device()
    impl = op.impls[impl_name]
    shape = case.as_dict()
    why = impl.unavailable(dev)
    if why:
        SESSION.note_missing(op_name, impl_name, why, shape, mode)
        pytest.skip(why)
    if SESSION.deadline_passed():
        SESSION.note_missing(op_name, impl_name, "RERULE_BENCH_DEADLINE_S reached", shape, mode)
        pytest.skip("deadline reached")
    gate = run_gate(op, impl_name, case)
    _REFS.clear()  # the gate's references are GBs at real shapes; timings do not need them
    if not gate.passed:
        SESSION.note_missing(op_name, impl_name, f"failed the correctness gate: {gate.reason}", shape, mode)
        if impl.ours:
            pytest.fail(f"correctness gate failed for ours ({impl_name}): {gate.reason}")
        pytest.skip(f"{impl_name} failed the correctness gate: no timing reported")
    roof = SESSION.roofline(dev, prof)
    try:
        measured = _measure(benchmark, op, impl, case, mode, prof, dev)
    except torch.OutOfMemoryError:
        _INPUTS.clear()
        torch.cuda.empty_cache()
        SESSION.note_missing(op_name, impl_name, "out of device memory at this shape", shape, mode)
        pytest.skip(f"{impl_name} ran out of memory at {case.id}")
    if measured is None:  # --benchmark-disable: the call ran once as a plain test, nothing is recorded
        return
    rounds, st, first_s, mem = measured
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the next impl's peak memory starts from a clean pool
    itemsize = torch.empty((), dtype=prof.dtype).element_size()
    floor_bytes, floor_flops = op.floor(case, mode, itemsize)
    row = {
        "op": op_name,
        "impl": impl_name,
        "label": impl.label,
        "ours": impl.ours,
        "mode": mode,
        "shape": shape,
        "dtype": str(prof.dtype).replace("torch.", ""),
        "median_ms": st.median * 1e3,
        "iqr_ms": st.iqr * 1e3,
        "min_ms": st.min * 1e3,
        "rounds": rounds,
        "first_call_s": first_s,
        "floor_bytes": floor_bytes,
        "floor_flops": floor_flops,
        **rates(st.median, floor_bytes, floor_flops, roof),
        **mem,
        "gate_passed": True,
        "gate_errors": gate.errors,
        "detail": impl.detail() if impl.detail else None,
        "versions": SESSION.row_versions(impl_name),
    }
    skip = ("shape", "gate_errors", "versions")
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in skip})
    SESSION.rows.append(row)


def _measure(benchmark, op, impl, case, mode, prof, dev):
    """Warm up, measure peak memory on the second call, then time ``rounds`` synchronized calls."""
    inp = _one_slot(
        _INPUTS, ("time", op.name, case, prof.dtype), lambda: op.inputs(case, prof.dtype, dev, seed=0)
    )
    need_grad = mode == "fwd+bwd"
    leaves = impl.leaves(op, inp, need_grad)

    def setup():
        for t in leaves.values():
            t.grad = None
        sync(dev)

    def call():
        if need_grad:
            op.backward(impl.forward(inp, leaves), inp)
        else:
            with torch.no_grad():
                impl.forward(inp, leaves)
        sync(dev)

    if benchmark.disabled:
        # pytest-benchmark's --benchmark-disable: run the call once, as a plain test (pedantic runs
        # target once and leaves benchmark.stats None), and report no timing
        benchmark.pedantic(call, setup=setup, rounds=1, iterations=1)
        return None
    setup()
    t0 = time.perf_counter()
    call()  # compilation, autotuning, first-touch allocations: not timed
    first_s = time.perf_counter() - t0
    setup()
    t0 = time.perf_counter()
    mem = measure_peak(call, dev)  # the second call: its peak memory, and a time estimate for the rounds
    est = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(max(prof.budget_s / est, prof.min_rounds), prof.max_rounds))
    benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    st = benchmark.stats.stats
    return rounds, st, first_s, mem
