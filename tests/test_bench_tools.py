"""Tests of the benchmark tooling (bench/): report.py, the roofline math, the correctness gate and
the timing harness, the TRL-style eager baseline, the GPU profile's plan, and ``gpu.sh --cpu``."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import harness, report
from bench.common import SESSION, Case, floor_time_s, measure_peak, measure_roofline, rates
from bench.gates import judge, rel_err
from bench.impls import OPS, Impl, eager_logps, trl_style_loss
from bench.peers import MODES

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- report.py


def _row(op, impl, mode, ms, *, ours=False, N=8192, V=151936, H=0, frac=None, tflops=None, mem=100.0):
    return {
        "op": op,
        "impl": impl,
        "label": f"L-{impl}",
        "ours": ours,
        "mode": mode,
        "shape": {"B": N // 512, "T": 512, "N": N, "V": V, "H": H},
        "dtype": "bfloat16",
        "median_ms": ms,
        "GBps": None if tflops else 123.0,
        "TFLOPs": tflops,
        "roofline_frac": frac,
        "peak_over_inputs_mb": mem,
        "gate_passed": True,
        "gate_errors": {"loss": 1e-7, "grad_logits": 2e-3},
    }


def _results(device="cuda"):
    rows = [
        _row("loss", "triton", "fwd+bwd", 2.0, ours=True, frac=0.83, mem=10.0),
        _row("loss", "torch", "fwd+bwd", 8.0, ours=True, frac=0.2, mem=20.0),
        _row("loss", "liger", "fwd+bwd", 3.0, frac=0.55, mem=30.0),
        _row("loss", "trl_eager", "fwd+bwd", 12.0, frac=0.14, mem=400.0),
        _row("loss", "triton", "fwd", 1.0, ours=True, frac=0.8),
        _row("linear", "triton", "fwd+bwd", 60.0, ours=True, H=4096, tflops=680.0, mem=500.0),
        _row("linear", "liger_chunked", "fwd+bwd", 150.0, H=4096, tflops=272.0, mem=900.0),
        _row("linear", "trl_eager", "fwd+bwd", 140.0, H=4096, tflops=290.0, mem=10000.0),
    ]
    gates = [
        {
            "op": "loss",
            "impl": "trl",
            "shape": {},
            "dtype": "bfloat16",
            "passed": False,
            "errors": {"loss": 0.5},
            "bounds": {"loss": 0.01},
            "reason": "loss: rel err 0.5 > 0.01",
        },
        {
            "op": "loss",
            "impl": "liger",
            "shape": {},
            "dtype": "bfloat16",
            "passed": True,
            "errors": {},
            "bounds": {},
            "reason": "",
        },
    ]
    return {
        "schema": 1,
        "card": "Synthetic H100" if device == "cuda" else "CPU Synthetic",
        "device": device,
        "threads": None if device == "cuda" else 1,
        "profile": "gpu",
        "dtype": "bfloat16",
        "date": "2026-01-02",
        "versions": {"torch": "2.x", "rerule": "0.1"},
        "roofline": {"copy_GBps": 3000.0, "gemm_TFLOPs": 790.0, "gemm_dtype": "bfloat16", "gemm_n": 8192},
        "gates": gates,
        "rows": rows,
        "not_run": [
            {"op": "loss", "impl": "compile", "reason": "torch.compile is off", "shape": None, "mode": None}
        ],
    }


def test_report_table_chart_and_goals(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_results()))
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{report.START}\nold table\n{report.END}\noutro\n")
    png = tmp_path / "chart.png"
    assert report.main([str(path), "--update", str(doc), "--png", str(png), "--goals"]) == 0
    out = capsys.readouterr().out
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    lines = text.splitlines()
    loss_fb = [ln for ln in lines if ln.startswith("| N=8192 V=151936 | fwd+bwd |")]
    # sorted by time; ratios against our fastest impl (triton, 2 ms)
    assert [ln.split("|")[3].strip() for ln in loss_fb] == [
        "**L-triton**",
        "L-liger",
        "**L-torch**",
        "L-trl_eager",
    ]
    cells = [[c.strip() for c in ln.split("|")] for ln in loss_fb]
    assert cells[1][-4] == "1.50" and cells[3][-4] == "6.00"  # time over ours
    assert cells[1][-3] == "3.00"  # memory ratio 30 / 10
    assert cells[0][-2] == "2.0e-03"  # the largest gate error
    assert "83.0%" in loss_fb[0]
    assert "trl: failed the correctness gate" in text and "torch.compile is off" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    goals = {
        ln.split(": ", 1)[1].split(" (measured")[0]: ln.split()[1].rstrip(":")
        for ln in out.splitlines()
        if ln.startswith("goal ")
    }
    assert (
        goals["loss fwd+bwd N=8192 V=151936 within 1.25x of the 4NV-byte floor (fraction >= 0.8)"] == "PASS"
    )
    assert goals["loss fwd+bwd N=8192 V=151936 >= 1.3x faster than Liger triton_grpo_loss"] == "PASS"
    assert goals["loss fwd+bwd N=8192 V=151936 >= 5.0x faster than TRL-style eager"] == "PASS"
    assert goals["fused-linear fwd+bwd N=8192 V=151936 H=4096 >= 750 TFLOP/s (8NHV)"] == "MISS"
    assert goals["fused-linear >= 2x faster than Liger chunked"] == "PASS"
    assert goals["fused-linear peak memory <= 1/10 of eager"] == "PASS"


def test_report_cpu_file_and_bad_input(tmp_path):
    data = _results("cpu")
    assert report.goals(data)[0][2] is None  # goals are GPU goals
    assert "1 thread" in report.markdown(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a rerule benchmark results file"):
        report.load(bad)
    doc = tmp_path / "nomarkers.md"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_doc(doc, "x")


# ----------------------------------------------------------------------------- roofline


def test_floors_follow_the_issue():
    case = Case(16, 512, 151936, 4096)
    N, V, H = case.N, case.V, case.H
    assert OPS["loss"].floor(case, "fwd+bwd", 2) == (4 * N * V, 0.0)  # read logits + write gradient, bf16
    assert OPS["loss"].floor(case, "fwd", 2) == (2 * N * V, 0.0)
    assert OPS["logps"].floor(case, "fwd+bwd", 2) == (6 * N * V, 0.0)
    nbytes, flops = OPS["linear"].floor(case, "fwd+bwd", 2)
    assert flops == 8 * N * H * V and nbytes == 4 * (N + V) * H
    assert OPS["linear"].floor(case, "fwd", 2)[1] == 2 * N * H * V


def test_floor_time_and_rates():
    roof = {"copy_GBps": 1000.0, "gemm_TFLOPs": 100.0}
    assert floor_time_s(1e9, 0, roof) == pytest.approx(1e-3)
    assert floor_time_s(1e9, 1e12, roof) == pytest.approx(1e-2)  # the larger term wins
    r = rates(2e-3, 1e9, 0, roof)
    assert (
        r["GBps"] == pytest.approx(500.0) and r["roofline_frac"] == pytest.approx(0.5) and r["TFLOPs"] is None
    )
    r = rates(0.02, 0, 1e12, roof)
    assert r["TFLOPs"] == pytest.approx(50.0) and r["roofline_frac"] == pytest.approx(0.5)


def test_measure_roofline_and_peak_on_cpu():
    roof = measure_roofline(torch.device("cpu"), torch.float32, copy_bytes=4 << 20, gemm_n=128)
    assert roof["copy_GBps"] > 0.01 and roof["gemm_TFLOPs"] > 1e-5 and roof["gemm_dtype"] == "float32"
    mem = measure_peak(lambda: torch.ones(16 << 20).sum(), torch.device("cpu"))  # a 64 MiB temporary
    if mem["peak_over_inputs_mb"] is not None:
        assert 50 < mem["peak_over_inputs_mb"] < 1000


# ----------------------------------------------------------------------------- correctness gate


def test_judge_fp32_and_bf16_rules():
    torch.manual_seed(0)
    ref = {"loss": torch.tensor(0.7, dtype=torch.float64), "grad": torch.randn(64, dtype=torch.float64)}
    same = {k: v.float() for k, v in ref.items()}
    assert judge("loss", "x", {}, torch.float32, same, ref, None).passed
    off = {"loss": same["loss"] * 1.001, "grad": same["grad"]}
    g = judge("loss", "x", {}, torch.float32, off, ref, None)
    assert not g.passed and "loss" in g.reason
    nan = {"loss": same["loss"], "grad": same["grad"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
    assert not judge("loss", "x", {}, torch.float32, nan, ref, None).passed
    assert not judge(
        "loss", "x", {}, torch.float32, {"loss": same["loss"], "grad": same["grad"][:5]}, ref, None
    ).passed
    assert not judge("loss", "x", {}, torch.float32, {}, ref, None).passed
    # bf16: within 2x the error of eager torch in bf16, plus a floor
    lo = {k: v + 1e-2 * torch.randn_like(v) * v.abs().max() for k, v in ref.items()}
    e_lo = {k: rel_err(lo[k], ref[k]) for k in ref}
    close = {k: v + 0.5 * (lo[k] - v) for k, v in ref.items()}
    far = {k: v + 3.0 * (lo[k] - v) for k, v in ref.items()}
    assert judge("loss", "x", {}, torch.bfloat16, close, ref, lo).passed
    g = judge("loss", "x", {}, torch.bfloat16, far, ref, lo)
    assert not g.passed and g.bounds["grad"] == pytest.approx(2 * e_lo["grad"] + 1e-5)
    with pytest.raises(ValueError, match="low-precision"):
        judge("loss", "x", {}, torch.bfloat16, close, ref, None)


def _eager_loss(tau):
    def forward(inp, lv):
        logp = eager_logps(lv["logits"], inp["ids"], temperature=tau)
        return trl_style_loss(logp, inp["mask"], inp["adv"], inp["old"], inp["ref"])

    return forward


class FakeBenchmark:
    """What harness uses of pytest-benchmark's fixture: pedantic(), stats, extra_info, disabled."""

    disabled = False

    def __init__(self):
        self.extra_info, self.stats = {}, None

    def pedantic(self, fn, args=(), setup=None, rounds=1, iterations=1, warmup_rounds=0):
        import time
        from types import SimpleNamespace

        times, out = [], None
        for _ in range(rounds):
            if setup:
                setup()
            t0 = time.perf_counter()
            out = fn(*args)
            times.append(time.perf_counter() - t0)
        times.sort()
        st = SimpleNamespace(median=times[len(times) // 2], iqr=0.0, min=times[0])
        self.stats = SimpleNamespace(stats=st)
        return out


@pytest.fixture
def smoke(monkeypatch):
    monkeypatch.setenv("RERULE_BENCH_PROFILE", "smoke")
    monkeypatch.delenv("RERULE_BENCH_DEADLINE_S", raising=False)
    monkeypatch.setattr(SESSION, "roof", {"copy_GBps": 10.0, "gemm_TFLOPs": 0.1})
    yield
    for key in [k for k in SESSION.gates if k[1].startswith("t_")]:
        del SESSION.gates[key]
    SESSION.rows[:] = [r for r in SESSION.rows if not r["impl"].startswith("t_")]
    SESSION.missing[:] = [m for m in SESSION.missing if not m["impl"].startswith("t_")]


def test_gate_rejects_a_wrong_impl_and_timing_reports_only_correct_ones(smoke, monkeypatch):
    op, case = OPS["loss"], Case(2, 16, 1007)
    # Liger's default temperature 0.9 against our 1.0: the kind of mismatch the gate exists for
    impls = {
        "t_tau09": Impl("t_tau09", "wrong temperature", _eager_loss(0.9)),
        "t_ours_bad": Impl("t_ours_bad", "ours, wrong", _eager_loss(0.9), ours=True),
        "t_right": Impl("t_right", "TRL-style eager", _eager_loss(1.0)),
    }
    for name, impl in impls.items():
        monkeypatch.setitem(op.impls, name, impl)
    bad = harness.run_gate(op, "t_tau09", case)
    assert not bad.passed and bad.errors["loss"] > 1e-3 and bad.errors["grad_logits"] > 1e-3
    good = harness.run_gate(op, "t_right", case)
    assert good.passed and max(good.errors.values()) < 1e-5

    with pytest.raises(pytest.skip.Exception, match="failed the correctness gate"):
        harness.timing_test(FakeBenchmark(), "loss", case, "t_tau09", "fwd+bwd")
    assert any(m["impl"] == "t_tau09" and "correctness gate" in m["reason"] for m in SESSION.missing)
    with pytest.raises(pytest.fail.Exception, match="correctness gate failed for ours"):
        harness.timing_test(FakeBenchmark(), "loss", case, "t_ours_bad", "fwd+bwd")
    assert not any(r["impl"] in ("t_tau09", "t_ours_bad") for r in SESSION.rows)

    bench = FakeBenchmark()
    harness.timing_test(bench, "loss", case, "t_right", "fwd+bwd")
    row = [r for r in SESSION.rows if r["impl"] == "t_right"][-1]
    assert row["median_ms"] > 0 and row["rounds"] >= 1 and row["gate_passed"]
    assert row["floor_bytes"] == 2 * case.N * case.V * 4  # fp32 in the smoke profile
    assert row["GBps"] == pytest.approx(row["floor_bytes"] / (row["median_ms"] / 1e3) / 1e9)
    assert bench.extra_info["roofline_frac"] == row["roofline_frac"]


def test_ours_pass_the_gate_on_cpu(smoke):
    # the same gate make bench runs, on the smoke shapes: our torch backend on all three ops with leaves
    for op_name in ("loss", "logps", "linear"):
        case = Case(2, 16, 1007, 64 if op_name == "linear" else 0)
        gate = harness.run_gate(OPS[op_name], "torch", case)
        assert gate.passed, gate.reason


# ----------------------------------------------------------------------------- peers and plan


def test_trl_style_eager_is_trls_eager_path():
    selective_log_softmax = pytest.importorskip("trl.trainer.utils").selective_log_softmax

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (3 * torch.randn(3, 7, 1007)).to(dtype)
        ids = torch.randint(0, 1007, (3, 7))
        assert torch.equal(eager_logps(x, ids), selective_log_softmax(x, ids))


def test_gpu_plan(monkeypatch):
    monkeypatch.setenv("RERULE_BENCH_PROFILE", "gpu")
    monkeypatch.setattr(harness, "device", lambda: torch.device("cuda"))
    monkeypatch.setattr(Impl, "unavailable", lambda self, dev: None)
    monkeypatch.delenv("RERULE_BENCH_OPS", raising=False)
    monkeypatch.delenv("RERULE_BENCH_IMPLS", raising=False)
    loss = harness.timing_params("loss")
    first = loss[0].values
    assert first[0] == Case(16, 512, 151936) and first[1] == "triton"  # the issue's goal shape first
    main = {(p.values[1], p.values[2]) for p in loss if p.values[0] == first[0]}
    for impl in ("triton", "torch", "reference", "trl", "trl_eager", "liger"):
        assert {(impl, "fwd"), (impl, "fwd+bwd")} <= main
    assert ("compile", "fwd+bwd") in main and ("compile", "fwd") not in main
    assert {p.values[0].V for p in loss} == {32000, 128256, 151936}
    assert {p.values[0].N for p in loss} == {2048, 8192, 16384}
    linear = harness.timing_params("linear")
    assert {p.values[0].H for p in linear} == {2048, 4096}
    assert any(p.values[1] == "liger_chunked" for p in linear)
    gates = harness.gate_params("loss")
    prio = lambda p: harness.PRIORITY[("loss", "test_time" if len(p.values) == 3 else "test_gate", p.id)]
    assert max(prio(p) for p in gates if p.values[0] != "compile") < min(prio(p) for p in loss)
    assert prio(loss[0]) < min(prio(p) for p in loss if p.values[0] != first[0])
    assert max(prio(p) for p in loss if p.values[1] != "compile") < min(
        prio(p) for p in loss if p.values[1] == "compile"
    )


@pytest.mark.slow
def test_gpu_sh_cpu_smoke(tmp_path):
    # A machine without the peers, like the GPU image: gpu.sh must install trl from bench/wheels
    # and the bench must then use it; Liger stays missing here and is reported as not run.
    blocked = tmp_path / "blocked"
    for pkg in ("liger_kernel", "trl"):
        (blocked / pkg).mkdir(parents=True)
        (blocked / pkg / "__init__.py").write_text("raise ImportError('not installed on this machine')\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(blocked), RERULE_BENCH_OPS="loss", RERULE_BENCH_IMPLS="torch,trl",
               RERULE_GPU_SH_BUDGET_S="400")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=420)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert log.count("installs offline") == 2, log[-3000:]
    assert "trl: installed trl-1.16.0-py3-none-any.whl" in log, log[-3000:]
    result = list(out.glob("*.json"))
    assert len(result) == 1
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back
    data = json.loads(result[0].read_text())
    assert data["device"] == "cpu" and data["profile"] == "smoke"
    assert {(r["impl"], r["mode"]) for r in data["rows"]} == {(i, m) for i in ("torch", "trl") for m in MODES}
    assert all(g["passed"] for g in data["gates"]) and {g["impl"] for g in data["gates"]} == {"torch", "trl"}
    assert data["versions"]["trl"] == "1.16.0"
    assert math.isfinite(data["roofline"]["copy_GBps"])
    table = (out / "benchmarks.md").read_text()
    assert "#### GRPO loss over logits" in table and "TRL selective_log_softmax + TRL loss" in table
    assert (out / "env.txt").is_file() and result[0].with_suffix(".png").is_file()


def test_benchmark_disable_runs_every_benchmark_once_and_writes_nothing(tmp_path):
    """pytest-benchmark's convention: ``pytest bench --benchmark-disable`` runs each benchmark once as a
    plain test (no crash on benchmark.stats being None) and leaves no results file behind. The smoke
    shapes, on two of the four ops (the harness is shared by all)."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RERULE_BENCH_"))}
    env.update(RERULE_BENCH_PROFILE="smoke", RERULE_BENCH_OUT=str(out))
    files = ["bench/test_bench_loss.py", "bench/test_bench_advantages.py"]
    res = subprocess.run([sys.executable, "-m", "pytest", *files, "-v", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "--benchmark-disable", "-rs"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    passed = [line for line in log.splitlines() if line.rstrip().endswith("PASSED") or " PASSED " in line]
    gates = [p for p in passed if "::test_gate[" in p]
    times = [p for p in passed if "::test_time[" in p]
    assert len(gates) >= 2 and len(times) >= 4, log[-3000:]
    assert f"{len(gates) + len(times)} passed" in log and "skipped" not in log and "failed" not in log, log[-3000:]
    assert {p.split("::")[0].split("/")[-1] for p in times} == {"test_bench_loss.py", "test_bench_advantages.py"}
    assert not out.exists()  # no results JSON


def test_gpu_e2e_sh_cpu_smoke(tmp_path):
    """bench/gpu_e2e.sh --cpu: `rerule train` on the tiny model, RULE and ReRULE, 2 steps each, and the kernel
    bf16 checks at a small shape; two result files (plus the shared log) for the device tool."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "RERULE_"))}
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_e2e.sh"), str(out), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["e2e_train.json", "e2e_train.md", "gpu_sh.log"]
    data = json.loads((out / "e2e_train.json").read_text())
    assert data["device"] == "cpu" and set(data["models"]) == {"tiny"} and not data["not_run"]
    tiny = data["models"]["tiny"]
    for arm in ("rule", "rerule"):
        s = tiny[arm]
        assert s["steps"] == 2 and s["generated_tokens"] > 0 and s["train_tokens"] > 0
        assert 0 < s["rollout_s"] < s["step_s"] and 0 < s["update_s"] < s["step_s"]
        assert s["rollout_tok_per_s"] > 0 and s["update_tok_per_s"] > 0
    assert math.isfinite(tiny["overhead"]["step"]) and math.isfinite(tiny["overhead"]["update"])
    checks = data["kernel_checks"]
    assert len(checks) == 2 and all(c["ok"] for c in checks), checks
    assert all(set(c["logits"]) == {"loss", "logps", "grad_logits"} for c in checks)
    table = (out / "e2e_train.md").read_text()
    assert "| tiny | rule |" in table and "| tiny | rerule |" in table and "FAILED" not in table
