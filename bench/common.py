"""Shared machinery of the kernel benchmarks: profiles and shapes, device sync, roofline, peak memory,
and the results file (the correctness gate's arithmetic is in bench/gates.py).

Profiles (``RERULE_BENCH_PROFILE``; default ``gpu`` when CUDA is available, else ``cpu``):

* ``gpu``: real vocabularies (32000, 128256, 151936), 2k-16k tokens, H in {2048, 4096}, bf16.
* ``cpu``: what ``make bench`` runs here: small shapes, fp32, the torch paths timed; Triton kernels
  (ours and Liger's) run under the Triton interpreter for the correctness gate only.
* ``smoke``: tiny shapes and one round, for ``bench/gpu.sh --cpu`` and the tests.

Roofline: the copy bandwidth and the GEMM rate (in the bench dtype) are measured once, at the first
timed benchmark of the run, never taken from a datasheet. An op's floor time is
``max(floor_bytes / bandwidth, floor_flops / gemm_rate)``; its roofline fraction is floor / measured.

Other knobs: ``RERULE_BENCH_OUT`` (results folder, default bench/results), ``RERULE_BENCH_DEADLINE_S``
(timing tests starting later than this after the session start are skipped and listed as such),
``RERULE_BENCH_OPS`` / ``RERULE_BENCH_IMPLS`` (comma lists to restrict), ``RERULE_BENCH_DTYPE``
(bfloat16 / float16 / float32 instead of the profile's), ``RERULE_BENCH_COMPILE``
(0/1: time torch.compile of the reference; default on for gpu only, since inductor needs ~50 s per
graph on this CPU), ``RERULE_BENCH_THREADS`` (CPU threads, default 1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


# ----------------------------------------------------------------------------- profile and shapes


@dataclass(frozen=True)
class Case:
    """One benchmark shape: B sequences of T tokens (N = B*T rows), vocab V, hidden H (0 = no hidden)."""

    B: int
    T: int
    V: int = 0
    H: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def id(self) -> str:
        parts = [f"N{self.N}"]
        if self.V:
            parts.append(f"V{self.V}")
        if self.H:
            parts.append(f"H{self.H}")
        return "-".join(parts)

    def as_dict(self) -> dict:
        return {"B": self.B, "T": self.T, "N": self.N, "V": self.V, "H": self.H}


@dataclass(frozen=True)
class Profile:
    name: str
    dtype: torch.dtype
    cases: dict  # op name -> list of (Case, impl names or None = all, modes or None = all)
    gate_rows: int  # rows of the gate's inputs (fp32/fp64 reference at the real V and H)
    interp_gate_rows: int  # rows for impls run by the Triton interpreter on CPU (gate only)
    budget_s: float  # timed seconds per benchmark (rounds = budget / one call)
    min_rounds: int
    max_rounds: int
    compile: bool


def _cases_gpu():
    qwen, llama3, llama2 = 151936, 128256, 32000
    main = Case(16, 512, qwen)
    sweep = ("triton", "torch", "cuda", "reference", "trl", "trl_eager", "liger")
    lean = ("triton", "cuda", "trl", "trl_eager", "liger")
    fb = ("fwd+bwd",)
    loss = [
        (main, None, None),
        (Case(16, 512, llama2), sweep, fb),
        (Case(16, 512, llama3), sweep, fb),
        (Case(4, 512, qwen), lean, fb),
        # 16k rows: the fp32 reference would hold ~10 GB per [N, V] intermediate; peers and ours only
        (Case(32, 512, qwen), lean, fb),
    ]
    logps = [
        (main, None, None),
        (Case(16, 512, llama2), lean, fb),
        (Case(16, 512, llama3), lean, fb),
    ]
    linear_impls = ("triton", "trl_eager", "liger_chunked")
    linear = [
        (Case(8, 1024, qwen, 4096), None, None),
        (Case(8, 1024, llama3, 4096), linear_impls, fb),
        (Case(8, 1024, qwen, 2048), linear_impls, fb),
        (Case(4, 1024, qwen, 4096), linear_impls, fb),
    ]
    adv = [(Case(1024, 8), None, None), (Case(16384, 8), None, None)]
    return {"logps": logps, "loss": loss, "linear": linear, "advantages": adv}


PROFILES = {
    "gpu": Profile(
        "gpu",
        torch.bfloat16,
        _cases_gpu(),
        gate_rows=2048,
        interp_gate_rows=2048,
        budget_s=0.5,
        min_rounds=5,
        max_rounds=30,
        compile=True,
    ),
    "cpu": Profile(
        "cpu",
        torch.float32,
        {
            "logps": [(Case(2, 128, 32000), None, None)],
            "loss": [(Case(2, 128, 32000), None, None)],
            "linear": [(Case(2, 128, 32000, 256), None, None)],
            "advantages": [(Case(512, 8), None, None)],
        },
        gate_rows=128,
        interp_gate_rows=16,
        budget_s=2.0,
        min_rounds=3,
        max_rounds=10,
        compile=False,
    ),
    "smoke": Profile(
        "smoke",
        torch.float32,
        {
            "logps": [(Case(2, 16, 1007), None, None)],
            "loss": [(Case(2, 16, 1007), None, None)],
            "linear": [(Case(2, 16, 1007, 64), None, None)],
            "advantages": [(Case(32, 8), None, None)],
        },
        gate_rows=32,
        interp_gate_rows=8,
        budget_s=0.05,
        min_rounds=1,
        max_rounds=2,
        compile=False,
    ),
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def profile() -> Profile:
    name = os.environ.get("RERULE_BENCH_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(f"RERULE_BENCH_PROFILE must be one of {sorted(PROFILES)}, got {name!r}")
    dtype = os.environ.get("RERULE_BENCH_DTYPE")
    if dtype:
        if dtype not in DTYPES:
            raise ValueError(f"RERULE_BENCH_DTYPE must be one of {sorted(DTYPES)}, got {dtype!r}")
        return dataclasses.replace(PROFILES[name], dtype=DTYPES[dtype])
    return PROFILES[name]


def compile_enabled(prof: Profile) -> bool:
    env = os.environ.get("RERULE_BENCH_COMPILE")
    return prof.compile if env is None else env == "1"


def env_filter(name: str) -> set | None:
    raw = os.environ.get(name, "").strip()
    return {s.strip() for s in raw.split(",") if s.strip()} or None


def hi_dtype(dev: torch.device) -> torch.dtype:
    """The reference precision of the gate: fp64 on CPU (as the tests), fp32 on GPU (the issue)."""
    return torch.float64 if dev.type == "cpu" else torch.float32


# ----------------------------------------------------------------------------- sync and memory


def sync(dev: torch.device) -> None:
    """Wait for the device: every timed call ends with this, so host timers see finished work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_malloc_threshold() -> None:
    """Make glibc return large blocks to the OS on free (mmap threshold fixed at 64 KiB), so a freed
    tensor leaves RSS and the next benchmark's peak RSS is its own, not reused heap pages."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD


def measure_peak(fn, dev: torch.device) -> dict:
    """Run ``fn`` once; return peak memory (MB) during the call, absolute and above what was live before.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (VmHWM, reset through
    /proc/self/clear_refs), or None where Linux' /proc is missing.
    """
    # No gc.collect() here (0.5 s with transformers loaded): garbage left from earlier calls only
    # raises the baseline, and the numbers are peaks above that baseline.
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return {
            "peak_mem_mb": peak / 2**20,
            "peak_over_inputs_mb": (peak - base) / 2**20,
            "mem_source": "torch.cuda.max_memory_allocated",
        }
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_mb("VmRSS")
    except OSError:
        fn()
        return {"peak_mem_mb": None, "peak_over_inputs_mb": None, "mem_source": "unavailable"}
    fn()
    peak = _proc_status_mb("VmHWM")
    return {"peak_mem_mb": peak, "peak_over_inputs_mb": peak - base, "mem_source": "rss (VmHWM)"}


# ----------------------------------------------------------------------------- roofline


def _median_time(fn, dev, reps: int) -> float:
    fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_roofline(
    dev: torch.device, dtype: torch.dtype, copy_bytes: int | None = None, gemm_n: int | None = None
) -> dict:
    """Measure this machine's copy bandwidth (bytes read + written per second) and GEMM rate.

    GPU: a 2 GiB device-to-device copy and an 8192^3 product in ``dtype`` on random data
    (METHOD.md: zeros run faster than real data). CPU: 256 MiB and 1024^3 in fp32 by default.
    """
    cuda = dev.type == "cuda"
    copy_bytes = copy_bytes or (2 << 30 if cuda else 256 << 20)
    gemm_n = gemm_n or (8192 if cuda else 1024)
    gemm_dtype = dtype if cuda else torch.float32

    def copy_time():
        src = torch.randn(copy_bytes // 4, device=dev)
        dst = torch.empty_like(src)
        return _median_time(lambda: dst.copy_(src), dev, reps=10 if cuda else 5)

    def gemm_time():
        a = torch.randn(gemm_n, gemm_n, device=dev, dtype=gemm_dtype)
        b = torch.randn(gemm_n, gemm_n, device=dev, dtype=gemm_dtype)
        return _median_time(lambda: a @ b, dev, reps=10 if cuda else 3)

    t_copy, t_gemm = copy_time(), gemm_time()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "copy_GBps": 2 * copy_bytes / t_copy / 1e9,
        "gemm_TFLOPs": 2 * gemm_n**3 / t_gemm / 1e12,
        "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "copy_bytes": copy_bytes,
        "gemm_n": gemm_n,
    }


def floor_time_s(floor_bytes: float, floor_flops: float, roof: dict) -> float:
    """The time no implementation can beat: the larger of the byte time and the arithmetic time."""
    t_bytes = floor_bytes / (roof["copy_GBps"] * 1e9) if floor_bytes else 0.0
    t_flops = floor_flops / (roof["gemm_TFLOPs"] * 1e12) if floor_flops else 0.0
    return max(t_bytes, t_flops)


def rates(median_s: float, floor_bytes: float, floor_flops: float, roof: dict) -> dict:
    """GB/s and TFLOP/s in the floor's convention (floor bytes or flops over the measured time)."""
    out = {"GBps": None, "TFLOPs": None, "roofline_frac": None}
    if median_s and median_s > 0:
        if floor_bytes:
            out["GBps"] = floor_bytes / median_s / 1e9
        if floor_flops:
            out["TFLOPs"] = floor_flops / median_s / 1e12
        out["roofline_frac"] = floor_time_s(floor_bytes, floor_flops, roof) / median_s
    return out


# ----------------------------------------------------------------------------- session results


def card_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def versions() -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "rerule", "liger_kernel", "trl", "pytest_benchmark"):
        try:
            from importlib.metadata import version as _v

            out[mod] = _v(mod.replace("_", "-"))
        except Exception:
            try:
                out[mod] = getattr(__import__(mod), "__version__", "?")
            except Exception:
                out[mod] = None
    try:
        out["git"] = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    # the device machine gets a copy of the tree without .git: the caller can pass the commit
    out["git"] = out["git"] or os.environ.get("RERULE_BENCH_GIT")
    return out


def device_info(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    p = torch.cuda.get_device_properties(dev)
    return {"name": p.name, "sm_count": p.multi_processor_count, "memory_gib": p.total_memory / 2**30,
            "capability": f"{p.major}.{p.minor}", "l2_mib": getattr(p, "L2_cache_size", 0) / 2**20}


class Session:
    """What one pytest run collects: roofline, gates, timing rows, and what could not run."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.roof: dict | None = None
        self.gates: dict = {}
        self.rows: list = []
        self.missing: list = []
        self.compile_cache: dict = {}
        self._versions: dict | None = None

    def versions(self) -> dict:
        if self._versions is None:
            self._versions = versions()
        return self._versions

    def row_versions(self, impl_name: str) -> dict:
        """The versions a timing row depends on: torch, triton, and the impl's own library."""
        lib = "trl" if impl_name == "trl" else "liger_kernel" if impl_name.startswith("liger") else "rerule"
        v = self.versions()
        return {k: v.get(k) for k in ("torch", "triton", lib)}

    def roofline(self, dev, prof) -> dict:
        if self.roof is None:
            t = time.perf_counter()
            self.roof = measure_roofline(dev, prof.dtype)
            self.roof["seconds"] = time.perf_counter() - t
        return self.roof

    def deadline_passed(self) -> bool:
        limit = os.environ.get("RERULE_BENCH_DEADLINE_S")
        return limit is not None and time.monotonic() - self.t0 > float(limit)

    def note_missing(self, op: str, impl: str, why: str, shape: dict | None = None, mode: str | None = None):
        entry = {"op": op, "impl": impl, "reason": why, "shape": shape, "mode": mode}
        if entry not in self.missing:
            self.missing.append(entry)

    def payload(self, dev, prof) -> dict:
        card = card_name(dev)
        return {
            "schema": 1,
            "card": card,
            "device": dev.type,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "profile": prof.name,
            "dtype": str(prof.dtype).replace("torch.", ""),
            "date": _dt.date.today().isoformat(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "versions": self.versions(),
            "device_info": device_info(dev),
            "roofline": self.roof,
            "gates": [asdict(g) for g in self.gates.values()],
            "rows": self.rows,
            "not_run": self.missing,
            "wall_s": time.monotonic() - self.t0,
        }

    def write(self, dev, prof, out_dir: Path | None = None) -> Path | None:
        if not self.rows and not self.gates:
            return None
        data = self.payload(dev, prof)
        out_dir = Path(out_dir or os.environ.get("RERULE_BENCH_OUT") or RESULTS_DIR)
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if prof.name in ("gpu", "cpu") else f"-{prof.name}"
        path = out_dir / f"{slug(data['card'])}-{data['date']}{suffix}.json"
        path.write_text(json.dumps(data, indent=1, default=float) + "\n")
        return path


SESSION = Session()
