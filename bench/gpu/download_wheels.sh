#!/usr/bin/env bash
# Runs HERE (the machine with pip access), in the repo root. Downloads the wheels that the lent nvidia-h200
# machine lacks to run beam_tarimg's decode core, tests/test_gpu.py and bench/gpu/gpu_bench.py on the GPU:
# DALI's CUDA 13 build and its needs, for that machine's Python 3.12 (x86-64).
#
# What the machine already has (KINDS.md's package list, 2026-11-17) and so is NOT downloaded:
# numpy, pillow, pytest, nvidia-ml-py (pynvml), psutil, six, packaging, pyyaml, typing-extensions, wheel.
# Apache Beam is not needed there: the decode core, read_tar and sample are Beam-free.
#
# Usage: bash bench/gpu/download_wheels.sh [DEST]    (DEST defaults to .whl/wheels, git-ignored via /.whl/)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-.whl/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"

# One version of each: two versions of one name stop the whole install there.
WHEELS=(
  nvidia-dali-cuda130==2.4.0            # DALI for CUDA 13 (the machine's driver 580 is CUDA 13.0)
  nvidia-nvimgcodec-cu13==0.9.0.20      # DALI's image decoders (DALI needs >=0.9.0,<0.10.0 with [all])
  nvidia-nvjpeg==13.0.4.44              # libnvjpeg.so.13: nvimgcodec's [all] extra; its GPU/HW JPEG decode
                                        # looks for it in <site>/nvidia/cu13/lib, so it must sit beside it
  nvidia-libnvcomp-cu13==5.3.0.16       # DALI pins it exactly
  nvidia-nvjpeg2k-cu13==0.11.0.51       # nvimgcodec [all] (JPEG 2000; not used for JPEG)
  nvidia-nvtiff-cu13==0.8.0.82          # nvimgcodec [all] (TIFF; not used for JPEG)
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 makefun==1.16.0 libcst==1.9.0 nvtx==0.2.17  # DALI's Python needs
)

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

n=$(ls "$DEST"/*.whl | wc -l)
if [ "$n" -ne 12 ]; then
  echo "expected 12 wheels in $DEST, found $n:" >&2; ls -la "$DEST" >&2; exit 1
fi
ls -la "$DEST"
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total: %.1f MB in %d wheels\n", $1/1e6, '"$n"'}'
