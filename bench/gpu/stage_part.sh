#!/usr/bin/env bash
# Runs THERE (the lent GPU machine), in the repo root, in every call: copies the part(s) of the packed site
# folder that this call carried (.whl/parts/site.tar.xz.*, made by pack.sh) into a scratch folder outside
# the work tree (/tmp/parts, kept while the machine stays warm) and lists what has arrived so far. With
# --check (first call) it also prints what the machine has (GPU, driver, Python, the packages the tests use,
# xz) into $OUT/machine.txt, at no extra cost.
#
# --smoke: the same, here, into a scratch folder (TARIMG_PARTS, default /tmp/parts-smoke); `nvidia-smi` may
# be absent. bench/gpu/smoke.sh runs it so.
set -uo pipefail
smoke=0 check=0
for a in "$@"; do
  case "$a" in
    --smoke) smoke=1 ;;
    --check) check=1 ;;
    *) echo "stage_part.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
if [ "$smoke" = 1 ]; then PARTS="${TARIMG_PARTS:-/tmp/parts-smoke}"; else PARTS="${TARIMG_PARTS:-/tmp/parts}"; fi
mkdir -p "$PARTS"
found=0
for f in .whl/parts/site.tar.xz.*; do
  [ -e "$f" ] || continue
  cp "$f" "$PARTS/" && found=$((found + 1))
done
echo "stage_part: copied $found file(s) from .whl/parts at $(date -u +%H:%M:%S); $PARTS now holds:"
ls -l "$PARTS"
if [ "$check" = 1 ]; then
  report="${OUT:-/tmp}/machine.txt"
  {
    echo "uptime: $(cut -d' ' -f1 /proc/uptime) s; cpus $(nproc); $(grep MemTotal /proc/meminfo)"
    df -h /tmp | tail -1
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || echo "no nvidia-smi"
    echo "xz: $(command -v xz || echo "missing: Python's lzma unpacks")"
    "${TARIMG_PYTHON:-python3}" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("numpy", "PIL", "pytest", "pynvml", "psutil", "yaml", "six", "packaging", "typing_extensions",
             "nvidia.dali", "nvidia.nvimgcodec", "apache_beam"):
    try:
        m = importlib.import_module(name)
        print(f"  {name}: {getattr(m, '__version__', 'present')}")
    except Exception as e:
        print(f"  {name}: missing ({type(e).__name__})")
PY
    ls /usr/local/cuda/lib64/libnvjpeg.so* 2>/dev/null || echo "no libnvjpeg in /usr/local/cuda/lib64 (the carried nvidia-nvjpeg provides it)"
  } 2>&1 | tee "$report"
fi
[ "$found" -gt 0 ]
