#!/usr/bin/env bash
# One short GPU session in one command (issue 4): environment report, correctness of every impl in
# bf16 at the real vocabularies (the bench's gates), the timing table against all peers, and the
# results JSON + markdown table + chart, all written to OUTDIR. Meant to end within ~8 minutes on
# an H100 (RERULE_GPU_SH_BUDGET_S, default 450 s: the bench gets what the earlier steps leave,
# minus time for the report; a deadline then skips the lowest-priority timings).
#
#   bench/gpu.sh OUTDIR          on a CUDA machine (no package index needed)
#   bench/gpu.sh OUTDIR --cpu    its CPU-safe parts here: same steps, the `smoke` profile
#                                (RERULE_BENCH_PROFILE=cpu for the full CPU suite)
#
# Works without network: rerule is imported from this checkout (no pip install), and the
# pure-Python wheels in bench/wheels/ (liger-kernel, trl) are installed into a scratch folder when
# the machine lacks them. Needs: a python3 with torch (PYTHON=... to choose), pytest, pytest-benchmark.
set -uo pipefail
# An inherited pytest-xdist worker id (gpu.sh started from a test worker) makes pytest-benchmark
# disable itself; this script always runs its own single-process pytest.
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_ADDOPTS

OUT="" CPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: bench/gpu.sh OUTDIR [--cpu]" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${RERULE_GPU_SH_BUDGET_S:-450}
T0=$SECONDS
exec > >(tee -a "$OUT/gpu_sh.log") 2>&1
stage() { echo; echo "== [$((SECONDS - T0)) s] $*"; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3
fi

stage "environment"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -srm)"
  echo "repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(dirty tree)')"
  echo "python: $PY"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" - <<'EOF'
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for m in ("triton", "pytest", "pytest-benchmark", "matplotlib", "liger-kernel", "trl", "transformers"):
    try:
        print(m, version(m))
    except PackageNotFoundError:
        print(m, "missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    l2 = getattr(p, "L2_cache_size", 0) / 2**20
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, L2 {l2:.0f} MiB, "
          f"cc {p.major}.{p.minor}")
else:
    print("device: no CUDA")
EOF
} | tee "$OUT/env.txt"
if [ "$CPU" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device here; use --cpu for the CPU-safe parts" >&2
  exit 3
fi

stage "python path (rerule from this checkout, peers from bench/wheels if missing)"
SITE=$(mktemp -d /tmp/rerule-gpu-sh.XXXXXX)
# No install of rerule: importing the bench package maps rerule.kernels to kernels/ (bench/__init__.py).
export PYTHONPATH="$SITE/peers:$REPO${PYTHONPATH:+:$PYTHONPATH}"
install_wheel() {  # module, wheel glob, target
  local wheel
  wheel=$(ls "$REPO"/bench/wheels/$2 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then echo "  $1: no wheel $2 in bench/wheels (bench/wheels/fetch.sh makes it)"; return 1; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$3" "$wheel" \
    && echo "  $1: installed $(basename "$wheel") into $3"
}
for spec in "liger_kernel:liger_kernel-*.whl" "trl:trl-*.whl"; do
  mod=${spec%%:*} pat=${spec#*:}
  if "$PY" -c "import $mod" 2>/dev/null; then
    echo "  $mod: present ($("$PY" -c "import $mod; print($mod.__file__)"))"
  else
    install_wheel "$mod" "$pat" "$SITE/peers" || echo "  $mod: unavailable; its impls will be listed as not run"
  fi
done
if [ "$CPU" = 1 ]; then
  # Here the peers are installed already: prove that the carried wheels install offline and hold
  # the modules the bench uses (importing liger takes ~20 s on a loaded CPU; the GPU run imports it).
  for spec in "liger_kernel/ops/grpo_loss.py:liger_kernel-*.whl" "trl/kernels/logprob_entropy.py:trl-*.whl"; do
    file=${spec%%:*} pat=${spec#*:}
    if install_wheel "${file%%/*}" "$pat" "$SITE/wheelcheck" >/dev/null && [ -f "$SITE/wheelcheck/$file" ]; then
      echo "  wheel check: $pat installs offline with $file"
    else
      echo "  wheel check FAILED for $pat"
    fi
  done
fi
"$PY" -c "import bench, rerule, rerule.kernels; print('  rerule', rerule.__version__, 'from', rerule.__file__)" || exit 4

stage "CUDA library check (bench/cuda_check.py, owned by the CUDA backend)"
CUDA_LIB=${RERULE_CUDA_LIB:-$REPO/kernels/lib/librerule_cuda.so}
CUDA_ARGS=${RERULE_GPU_SH_CUDA_ARGS:---quick}
if [ "$CPU" = 1 ]; then
  echo "  skipped: --cpu (no GPU)"
elif [ ! -f "$REPO/bench/cuda_check.py" ]; then
  echo "  skipped: bench/cuda_check.py does not exist"
elif [ ! -f "$CUDA_LIB" ] && [ "${RERULE_GPU_SH_BUILD_CUDA:-0}" != 1 ]; then
  echo "  skipped: the CUDA library is not built ($CUDA_LIB missing; RERULE_GPU_SH_BUILD_CUDA=1 builds it here)"
else
  [ ! -f "$CUDA_LIB" ] && CUDA_ARGS="$CUDA_ARGS --build"
  # through the bench package, so rerule.kernels resolves in a checkout that was never pip-installed
  (cd "$REPO" && timeout -k 10 "${RERULE_GPU_SH_CUDA_TIMEOUT_S:-150}" "$PY" -c \
    "import bench, runpy, sys; sys.argv = ['bench/cuda_check.py'] + sys.argv[1:]; \
runpy.run_path('bench/cuda_check.py', run_name='__main__')" --out "$OUT" $CUDA_ARGS) \
    || echo "  cuda_check.py exited with $?"
fi

stage "benchmarks: correctness gates, then timings"
PROFILE=${RERULE_BENCH_PROFILE:-$([ "$CPU" = 1 ] && echo smoke || echo gpu)}
LEFT=$((BUDGET - (SECONDS - T0) - 40))
[ "$LEFT" -lt 60 ] && LEFT=60
echo "  profile $PROFILE; timings start until $((LEFT - 60)) s from now, hard stop at $LEFT s"
# SIGINT, not KILL, at the hard stop: pytest then still writes the results of what finished.
(cd "$REPO" && RERULE_BENCH_PROFILE=$PROFILE RERULE_BENCH_OUT="$OUT" \
  RERULE_BENCH_DEADLINE_S=${RERULE_BENCH_DEADLINE_S:-$((LEFT - 60))} PYTHONUNBUFFERED=1 \
  timeout -s INT -k 20 "$LEFT" "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider -p no:xdist -rs \
  --benchmark-columns=median,iqr,rounds --benchmark-sort=name)
BENCH_RC=$?
echo "  pytest exit code $BENCH_RC"

stage "report"
RESULT=$(ls -t "$OUT"/*.json 2>/dev/null | grep -v -e cuda_check -e e2e_train | head -1)
if [ -z "$RESULT" ]; then
  echo "  no results JSON in $OUT"
  exit 5
fi
# Few files: the device tool brings back at most 8 from OUT (env, log, JSON, chart, table, cuda_check).
"$PY" "$REPO/bench/report.py" "$RESULT" --md "$OUT/benchmarks.md" --png "${RESULT%.json}.png" --goals
echo
# the loss table last: the device tool returns the end of the output
awk '/^#### /{p = /GRPO loss over logits/} p' "$OUT/benchmarks.md"
stage "done: $RESULT (pytest rc $BENCH_RC)"
exit $BENCH_RC
