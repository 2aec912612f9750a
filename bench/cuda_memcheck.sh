#!/usr/bin/env bash
# compute-sanitizer over impl="cuda" at small awkward shapes (bench/cuda_check.py --memcheck):
# V = 1007 (rows at every offset mod 16 bytes), TRL's logits[:, :-1] view, a view starting one
# element into the vocab, masked rows, in place, sequence level (the separate gradient kernel),
# log-probs only. Exit status 0 = no errors found.
#
#   bash bench/cuda_memcheck.sh [OUT_DIR]            # memcheck (default OUT_DIR: bench/results)
#   RERULE_SANITIZER_TOOLS="memcheck racecheck" bash bench/cuda_memcheck.sh
#
# API-error reports are off: torch probes the runtime with calls that fail on purpose; a failed
# call of ours already raises in cuda_check.py. Leak checking is off: torch's caching allocator
# keeps its memory until exit, and librerule_cuda.so allocates nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ ! -x "$SAN" ]; then
  echo "cuda_memcheck: compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
mkdir -p "$OUT"
status=0
for tool in ${RERULE_SANITIZER_TOOLS:-memcheck}; do
  log="$OUT/cuda_${tool}.log"
  echo "cuda_memcheck: $tool -> $log"
  if "$SAN" --tool "$tool" --error-exitcode 3 --report-api-errors no --print-limit 50 \
      "$PY" bench/cuda_check.py --memcheck --out "$OUT" >"$log" 2>&1; then
    echo "cuda_memcheck: $tool clean ($(grep -c '^PASS' "$log") cases)"
  else
    status=$?
    echo "cuda_memcheck: $tool FAILED (exit $status), see $log" >&2
    tail -40 "$log" >&2
  fi
done
exit $status
