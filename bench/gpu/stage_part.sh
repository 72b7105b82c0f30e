#!/usr/bin/env bash
# Runs THERE (the lent GPU machine), in the repo root, once per upload call: copies the wheel parts that this
# call carried (.whl/parts/wheels.tar.*) into a scratch folder outside the work tree (/tmp/parts, kept while
# the machine stays warm) and lists what has arrived so far. With --check it also prints what the machine has
# (GPU, driver, Python and the packages the tests use) at no extra cost: use it on the first call.
set -uo pipefail
PARTS="${TARIMG_PARTS:-/tmp/parts}"
mkdir -p "$PARTS"
found=0
for f in .whl/parts/wheels.tar.*; do
  [ -e "$f" ] || continue
  cp "$f" "$PARTS/" && found=$((found + 1))
done
echo "copied $found file(s) from .whl/parts; $PARTS now holds:"
ls -l "$PARTS"
df -h /tmp | tail -1
if [ "${1:-}" = "--check" ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("numpy", "PIL", "pytest", "pynvml", "nvidia.dali", "nvidia.nvimgcodec", "apache_beam"):
    try:
        m = importlib.import_module(name)
        print(f"  {name}: {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"  {name}: missing ({type(e).__name__})")
PY
  ls /usr/local/cuda/lib64/libnvjpeg.so* 2>/dev/null || echo "  no libnvjpeg in /usr/local/cuda/lib64 (the carried nvidia-nvjpeg wheel provides it)"
fi
[ "$found" -gt 0 ]
