"""Every Triton kernel compiles for real GPU targets (sm_90, sm_80) without register spills.

The Triton interpreter that the rest of the suite runs accepts code a real compile rejects (it
caught a loop-carried variable whose shape changed, which the interpreter ran happily), so this
compiles representative specializations ahead of time with the ptxas that Triton ships; no GPU is
needed. It runs ``python -m rerule.kernels.aot`` in a subprocess because the suite sets
TRITON_INTERPRET=1, which replaces the compiler, before triton is imported.

It also checks the memory instructions of the compiled code: 128-bit vector loads and stores in the
row body even when V is not a multiple of 8 (GPT-2's 50257) or the rows start unaligned.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "rerule.kernels.aot"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.stdout.strip(), f"no output (rc {r.returncode}): {r.stderr[-3000:]}"
    return {(row["name"], row["arch"]): row for row in json.loads(r.stdout)}


def test_every_specialization_compiles_without_spills(compiled):
    assert len(compiled) >= 40  # ~20 specializations x 2 targets
    kernels = {name.split("-")[0] for name, _ in compiled}
    assert kernels == {"fwd", "grad"}
    assert {arch for _, arch in compiled} == {"sm_90", "sm_80"}
    bad = {k: row.get("error") for k, row in compiled.items() if not row["ok"]}
    assert not bad, bad
    spills = {k: (row["spill_stores"], row["spill_loads"]) for k, row in compiled.items()
              if row["spill_stores"] or row["spill_loads"]}
    assert not spills, spills
    assert all(0 < row["registers"] <= 255 for row in compiled.values())


def _vec(stats, kind):
    return sum(n for width, n in stats[kind].items() if not width.startswith("1x"))


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp16"])
def test_vector_memory_instructions_for_odd_vocab(compiled, arch, dtype):
    """V = 50257 (not a multiple of 8): the body of each sweep still uses 128-bit loads, and the
    gradient sweep 128-bit stores (before this layout: 33 scalar loads, no vector ones)."""
    fwd = compiled[(f"fwd-{dtype}-V50257-T512-B4096-all-grad-tau", arch)]
    # both sweeps (log-sum-exp, gradient) have vector loads in their body; the gradient vector stores
    assert _vec(fwd, "ld_global") >= 2 and _vec(fwd, "st_global") >= 1, fwd
    grad = compiled[(f"grad-{dtype}-V50257-T512-B4096", arch)] if dtype != "bf16" else \
        compiled[(f"grad-{dtype}-V50257-T512-B4096-tau", arch)]
    assert _vec(grad, "ld_global") >= 1 and _vec(grad, "st_global") >= 1, grad
