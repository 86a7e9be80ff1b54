#!/usr/bin/env bash
# Checks the GPU path in one command, on a machine with an NVIDIA GPU: run it from the repository root
# after `make venv`:
#
#     bash scripts/gpu_check.sh
#
# It installs tensorrt and cuda-python into the venv when they are missing, prints the GPU(s) and the
# TensorRT version, and runs every test marked `tensorrt` or `gpu` (TensorRT engine builds in FP16 and
# INT8, the aggregator's native TensorRT backend, compared with ONNX Runtime). It fails when those tests
# fail, and also when they were all skipped (the skip reasons say what is missing).
#
# Environment: VENV (default .venv); TRT_SPEC (default 'tensorrt>=10,<11': TensorRT 11 removed the FP16
# builder flag this project's fp16 build uses); CUDA_PYTHON_SPEC (default 'cuda-python>=12,<13'; match
# your driver's CUDA major version). On a Jetson, TensorRT comes with JetPack: the pip step is skipped
# when `import tensorrt` already works.
set -euo pipefail

VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
TRT_SPEC="${TRT_SPEC:-tensorrt>=10,<11}"
CUDA_PYTHON_SPEC="${CUDA_PYTHON_SPEC:-cuda-python>=12,<13}"

if [ ! -f pyproject.toml ] || [ ! -d tests ]; then
  echo "gpu_check: run this from the repository root (where pyproject.toml is)" >&2
  exit 2
fi
if [ ! -x "$PY" ]; then
  echo "gpu_check: no virtual environment at $VENV: run \`make venv\` first (or set VENV)" >&2
  exit 2
fi

echo "== GPUs"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || echo "nvidia-smi found no GPU (driver not loaded?)"
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | sed 's/^/driver /' || true
else
  echo "nvidia-smi not found: is the NVIDIA driver installed?"
fi

echo "== packages"
if ! "$PY" -c 'import tensorrt' >/dev/null 2>&1; then
  echo "installing $TRT_SPEC"
  "$PY" -m pip install -q "$TRT_SPEC"
fi
if ! "$PY" -c 'import importlib.util as u, sys
ok = False
for name in ("cuda.bindings.runtime", "cuda.cudart"):
    try:
        ok = ok or u.find_spec(name) is not None
    except ImportError:
        pass
sys.exit(0 if ok else 1)' >/dev/null 2>&1; then
  echo "installing $CUDA_PYTHON_SPEC"
  "$PY" -m pip install -q "$CUDA_PYTHON_SPEC"
fi
"$PY" - <<'EOF'
import tensorrt as trt

print(f"TensorRT {trt.__version__}")
try:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    _, runtime = cudart.cudaRuntimeGetVersion()
    _, driver = cudart.cudaDriverGetVersion()
    print(f"CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, "
          f"driver up to CUDA {driver // 1000}.{driver % 1000 // 10}")
except Exception as exc:  # informational only: the tests say what is wrong
    print(f"cuda-python cannot report the CUDA versions: {exc}")
EOF

echo "== tests marked tensorrt or gpu"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
"$PY" -m pytest -q -rs -m "tensorrt or gpu" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ]; then
  echo "gpu_check: FAILED (pytest exit status $status)" >&2
  exit "$status"
fi
if ! grep -Eq '[0-9]+ passed' "$log"; then
  echo "gpu_check: every GPU test was skipped: see the SKIPPED reasons above" >&2
  exit 1
fi
echo "gpu_check: OK"
