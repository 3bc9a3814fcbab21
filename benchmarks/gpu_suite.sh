#!/usr/bin/env bash
# The GPU acceptance suite (benchmarks/gpu_suite.py; docs/PERFORMANCE.md "GPU suite").
#   bash benchmarks/gpu_suite.sh OUT             on a CUDA machine: installs the carried wheels, then every part
#   bash benchmarks/gpu_suite.sh --dry-run OUT   every part on the CPU with tiny shapes
#   bash benchmarks/gpu_suite.sh --prepare       here, before a device call: wheels + the reference script into
#                                                benchmarks/gpu_suite_assets/ (git-ignored)
#   bash benchmarks/gpu_suite.sh --install       on the CUDA machine: only install the carried wheels (one batch a call)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # here the venv, there the image's
ASSETS=benchmarks/gpu_suite_assets
if [ "${1:-}" = "--prepare" ]; then
  exec $PY benchmarks/gpu_suite.py --prepare
fi
# The carried wheels are the exact closure prepare() chose (our pins; what the image lacks): installed as they are.
if [ "${1:-}" != "--dry-run" ] && ls "$ASSETS"/wheels/*/*.whl >/dev/null 2>&1 \
    && $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  $PY -m pip install -q --no-index --no-deps "$ASSETS"/wheels/*/*.whl || echo "some carried wheels did not install (their parts skip)"
fi
if [ "${1:-}" = "--install" ]; then
  exit 0
fi
exec $PY benchmarks/gpu_suite.py "$@"
