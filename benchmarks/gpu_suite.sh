#!/usr/bin/env bash
# The GPU acceptance suite (benchmarks/gpu_suite.py; docs/PERFORMANCE.md "GPU suite").
#   bash benchmarks/gpu_suite.sh OUT             on a CUDA machine: installs the carried wheels, then every part
#   bash benchmarks/gpu_suite.sh --dry-run OUT   every part on the CPU with tiny shapes
#   bash benchmarks/gpu_suite.sh --prepare       here, before a device call: wheels into benchmarks/gpu_suite_assets/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ASSETS=benchmarks/gpu_suite_assets
PACKAGES="diffusers datasets safetensors tensorboard schedulefree prodigyopt bitsandbytes"
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$ASSETS/wheels"
  # What the device image lacks (it has torch, accelerate, transformers, peft, torchvision), at our pinned versions,
  # with their dependencies, for this machine's platform (the device's: Linux x86_64, the same Python); then the
  # wheels a torch image already has are dropped (numpy, pillow, sympy, CUDA libraries, ...).
  for name in $PACKAGES; do
    spec=$(grep -iE "^${name}==" requirements.lock || true)
    [ -n "$spec" ] || continue
    deps=""; [ "$name" = bitsandbytes ] && deps="--no-deps"
    if ! $PY -m pip download -q $deps -d "$ASSETS/wheels" --only-binary=:all: "$spec" >"$ASSETS/pip.log" 2>&1; then
      echo "could not download $spec (its part will be skipped): $(grep ERROR "$ASSETS/pip.log" | head -1)"
    fi
  done
  (cd "$ASSETS/wheels" && rm -f torch-*.whl nvidia_*.whl triton-*.whl cuda_*.whl numpy-*.whl pillow-*.whl \
    sympy-*.whl mpmath-*.whl networkx-*.whl jinja2-*.whl markupsafe-*.whl filelock-*.whl fsspec-*.whl \
    typing_extensions-*.whl setuptools-*.whl)
  # A device call carries at most 64 MiB with the tree: the wheels go into batches of <= 50 MiB
  # (gpu_suite_assets/wheels/1, 2, ...), each carried by its own call on the warm machine (docs/PERFORMANCE.md).
  $PY - "$ASSETS/wheels" <<'PYEOF'
import os, sys
root = sys.argv[1]
wheels = sorted((os.path.getsize(os.path.join(root, n)), n) for n in os.listdir(root) if n.endswith(".whl"))
batches = []
for size, name in reversed(wheels):
    batch = next((b for b in batches if b[0] + size <= 50 * 2**20), None)
    if batch is None:
        batches.append(batch := [0, []])
    batch[0] += size
    batch[1].append(name)
for index, (size, names) in enumerate(batches, start=1):
    os.makedirs(os.path.join(root, str(index)), exist_ok=True)
    for name in names:
        os.replace(os.path.join(root, name), os.path.join(root, str(index), name))
    print(f"{root}/{index}: {size / 2**20:.0f} MiB, {len(names)} wheels")
PYEOF
  exit 0
fi
if ls "$ASSETS"/wheels/*/*.whl >/dev/null 2>&1; then  # install what this machine lacks from the carried wheels
  links=""; for d in "$ASSETS"/wheels/*/; do links="$links --find-links $d"; done
  $PY -m pip install -q --no-index $links $PACKAGES || echo "some carried wheels did not install (their parts skip)"
fi
exec $PY benchmarks/gpu_suite.py "$@"
