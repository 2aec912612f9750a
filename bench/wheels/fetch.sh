#!/usr/bin/env bash
# Re-fetch the pure-Python peer wheels that bench/gpu.sh installs on a GPU machine without a
# package index (committed here: ~0.9 MB each), and check them against SHA256SUMS.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
"$PY" -m pip download --no-deps liger-kernel==0.8.5 trl==1.16.0 -d .
sha256sum -c SHA256SUMS
