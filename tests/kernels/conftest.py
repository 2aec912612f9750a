"""Fixtures shared by the CUDA backend's tests and the differential fuzz: the CMake build of
kernels/csrc (the library and its host emulator) and impl="cuda" routed through the emulator."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import rerule.kernels.cuda_grpo as cuda_grpo

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """Configure and build librerule_cuda.so and the host emulator with CMake (sm_90 only, to keep
    the test short; users get 80;90). Returns the folder holding both libraries.

    Once per session: under pytest-xdist the workers share one build (a file lock), not one each."""
    if NVCC is None or CMAKE is None:
        pytest.skip("nvcc or cmake is not on PATH: cannot build the CUDA sources")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by its workers
    build = root / "cuda-build"
    lib_dir = build / "lib"
    with FileLock(str(root / "cuda-build.lock")):
        if not (lib_dir / "librerule_cuda_emu.so").is_file():
            _cmake_build(build, lib_dir)
    return lib_dir


def _cmake_build(build: Path, lib_dir: Path) -> None:
    configure = [CMAKE, "-S", str(ROOT), "-B", str(build), "-DRERULE_BUILD_CUDA=ON",
                 "-DRERULE_CUDA_HOST_EMU=ON", "-DCMAKE_CUDA_ARCHITECTURES=90",
                 f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DRERULE_CUDA_LIB_DIR={lib_dir}"]
    for cmd in (configure, [CMAKE, "--build", str(build), "-j2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


@pytest.fixture
def emulated(built, monkeypatch):
    """impl="cuda" runs on CPU tensors through the host emulator; outputs start as NaN."""
    lib = cuda_grpo.Library(built / "librerule_cuda_emu.so", prefix="rerule_emu_", device_type="cpu")
    monkeypatch.setattr(cuda_grpo, "_LIB", lib)
    poison = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(cuda_grpo, "_empty", poison)
    for name in ("RERULE_CUDA_THREADS", "RERULE_CUDA_CACHE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch
