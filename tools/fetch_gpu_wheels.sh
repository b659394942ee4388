#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels that bench/bench_gpu.py needs on an offline GPU machine into
# .whl/ (ignored by git), for CPython 3.12 on manylinux x86_64, without their dependencies:
#   liger-kernel        the Triton kernels of Liger-Kernel (a competitor in the side-by-side bench)
#   cut-cross-entropy   Apple's Cut Cross-Entropy (linear + cross-entropy without the logits)
# Their own Requires-Dist are torch and triton, which the GPU machine has (its image: torch, triton, numpy,
# pytest, hypothesis, matplotlib); the script prints each wheel's Requires-Dist so that a new version's extra
# needs show, and fails if one names a package not in HAVE below.
#
#   bash tools/fetch_gpu_wheels.sh            # then carry .whl to the GPU machine
#
# bench/gpu_check.sh's bench stage installs them there, when .whl/ exists, with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
# and puts /tmp/site on PYTHONPATH. Environment: PYTHON (the one whose pip downloads; any version works, the
# target is given explicitly), WHEELS (default .whl), PY_VERSION (default 3.12).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=${WHEELS:-$ROOT/.whl}
PY_VERSION=${PY_VERSION:-3.12}
PINS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
# What the GPU machine's image already has (a Requires-Dist outside this list must be fetched too).
HAVE="torch triton numpy pytest hypothesis matplotlib packaging"
mkdir -p "$DEST"
# Pure-Python wheels match any platform; the manylinux tags cover a compiled dependency if one is ever added.
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do plats+=(--platform "$p"); done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${plats[@]}" -d "$DEST" "${PINS[@]}"
missing=()
for w in "$DEST"/*.whl; do
  printf '%-60s %6s KiB\n' "$(basename "$w")" "$(($(stat -c %s "$w") / 1024))"
  # Requires-Dist without an extra marker: what the package needs to import.
  while read -r req; do
    name=$(echo "$req" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr A-Z_ a-z-)
    echo "    needs $name  (${req#Requires-Dist: })"
    case " $HAVE " in *" $name "*) ;; *) missing+=("$name") ;; esac
  done < <(unzip -p "$w" '*.dist-info/METADATA' | tr -d '\r' | grep '^Requires-Dist:' | grep -v 'extra ==' || true)
done
total=$(du -ck "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $total KiB in $DEST"
if [ ${#missing[@]} -gt 0 ]; then
  echo "fetch_gpu_wheels: the GPU machine lacks ${missing[*]}: add them to PINS" >&2
  exit 1
fi
[ "$total" -lt $((20 * 1024)) ] || { echo "fetch_gpu_wheels: over 20 MiB" >&2; exit 1; }
