#!/usr/bin/env bash
# Runs HERE (the machine with pip access), in the repo root. Downloads the wheels that the lent nvidia-h200
# machine lacks to run beam_tarimg's JPEG decode core, tests/test_gpu.py and bench/gpu/gpu_bench.py on the
# GPU: DALI's CUDA 13 build and only what its JPEG path loads, for that machine's Python 3.12 (x86-64).
#
# What the machine already has (the device tool's KINDS.md, 2026-11-17) and so is NOT downloaded: numpy,
# pillow, pytest, nvidia-ml-py (pynvml), psutil, six, packaging, pyyaml, typing-extensions, wheel.
# Apache Beam is not needed there: the decode core, read_tar and sample are Beam-free.
#
# Left out on purpose (measured: DALI imports, builds a pipeline and decodes JPEGs on the CPU without them, as
# remote_install.sh checks in bench/gpu/smoke.sh; none of them is a DT_NEEDED library of DALI or nvImageCodec,
# and none is loaded by a JPEG decode):
#   nvidia-libnvcomp-cu13 (28.5 MB)  DALI dlopens it only for its inflate/compression operators
#   nvidia-nvjpeg2k-cu13  (4.3 MB)   JPEG 2000, nvImageCodec's nvjpeg2k extension (removed by pack.sh)
#   nvidia-nvtiff-cu13    (2.4 MB)   TIFF, nvImageCodec's nvtiff extension (removed by pack.sh)
#   libcst, makefun, nvtx (5.3 MB)   imported only by nvidia.dali.experimental.dynamic
# 12 wheels of 268.5 MB before; these 6 are 228.0 MB (DALI alone is 198.7 MB), and pack.sh trims and
# recompresses what they install.
#
# Usage: bash bench/gpu/download_wheels.sh [DEST]    (DEST defaults to .whl/wheels, git-ignored via /.whl/)
#        bash bench/gpu/download_wheels.sh --extras  -> .whl/extra: nvidia-libnvcomp-cu13 alone (28.5 MB), for
#        the fallback call of README.md, should DALI's GPU decode on the lent machine want nvcomp after all
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)
if [ "${1:-}" = "--extras" ]; then
  mkdir -p .whl/extra
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl/extra \
    nvidia-libnvcomp-cu13==5.3.0.16 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  ls -la .whl/extra
  exit 0
fi
DEST="${1:-.whl/wheels}"
mkdir -p "$DEST"

# One version of each: two versions of one name stop the whole install there.
WHEELS=(
  nvidia-dali-cuda130==2.4.0            # DALI for CUDA 13 (the machine's driver 580 is CUDA 13.0)
  nvidia-nvimgcodec-cu13==0.9.0.20      # DALI's image decoders (DALI needs >=0.9.0,<0.10.0)
  nvidia-nvjpeg==13.0.4.44              # libnvjpeg.so.13: nvImageCodec's GPU/HW JPEG decoders look for it in
                                        # <site>/nvidia/cu13/lib, so it must sit beside them
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0  # imported by nvidia.dali's pipeline API
)
EXPECTED=6

"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne "$EXPECTED" ]; then
  echo "expected $EXPECTED wheels in $DEST, found $n (remove stale ones):" >&2; ls -la "$DEST" >&2; exit 1
fi
ls -la "$DEST"
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total: %.1f MB in %d wheels\n", $1/1e6, '"$n"'}'
