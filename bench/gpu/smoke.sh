#!/usr/bin/env bash
# Runs HERE: the whole device sequence of bench/gpu/README.md, dry, on this machine's CPU, before any device
# time is spent. Each call gets what the device tool would send (the tracked and untracked-not-ignored files
# of the working tree plus that call's carry) in a scratch copy, an empty $OUT, and the same command with
# --smoke added; the checks: each call exits 0, what travels is under 64 MiB, and what lands in $OUT keeps to
# what comes back (at most 8 files of at most 16 MiB, at most 2 folders down, names of [A-Za-z0-9._-]).
#
# The Python is a 3.12 virtual environment holding only the packages that the device machine has (KINDS.md:
# numpy, Pillow, pytest, PyYAML, six, packaging, typing-extensions, wheel, psutil, nvidia-ml-py), no DALI:
# DALI comes from the packed parts, as there. Without a GPU the GPU tests run their own code on the CPU
# (TARIMG_GPU_TESTS_ON_CPU=1) and gpu_bench.py --smoke runs the GPU cases' code on the CPU: this proves the
# scripts, the packing and the slim DALI, not the GPU path.
#
# Usage: bash bench/gpu/smoke.sh     (makes .whl/parts with download_wheels.sh and pack.sh if missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
SCRATCH="${TARIMG_SMOKE_DIR:-/tmp/gpukit-smoke}"
VENV="${TARIMG_SMOKE_VENV:-/tmp/gpukit-venv}"
LIMIT=$((64 * 1024 * 1024))

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  py312=$(command -v python3.12 || ls /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)
  [ -n "$py312" ] || { echo "smoke: needs a python3.12 (the device machine's version)" >&2; exit 1; }
  rm -rf "$VENV"
  "$py312" -m venv "$VENV"
  "$VENV/bin/pip" install -q numpy pillow pytest pyyaml six packaging typing-extensions wheel psutil nvidia-ml-py \
    2>&1 | grep -v "is ignored: it is neither" || true
fi
if "$VENV/bin/python" -c 'import nvidia.dali' 2>/dev/null; then
  echo "smoke: $VENV has DALI installed: it must not (DALI has to come from the parts)" >&2; exit 1
fi
if [ ! -f .whl/parts/site.tar.xz.sha256 ]; then
  bash bench/gpu/download_wheels.sh
  bash bench/gpu/pack.sh
fi
parts=(.whl/parts/site.tar.xz.part-*)
rm -rf "$SCRATCH" /tmp/parts-smoke /tmp/site-smoke
mkdir -p "$SCRATCH"

failures=0
call() {  # call N "carry paths" command...
  local n="$1" carry="$2"; shift 2
  local dir="$SCRATCH/call$n" cmd="$* --smoke"
  mkdir -p "$dir/repo" "$dir/out"
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu \
    | tar --null --ignore-failed-read -cf - -T - 2>/dev/null | tar -xf - -C "$dir/repo"
  for c in $carry; do
    mkdir -p "$dir/repo/$(dirname "$c")"
    cp -r "$c" "$dir/repo/$c"
  done
  local size t rc=0
  size=$(du -sb "$dir/repo" | cut -f1)
  t=$SECONDS
  (cd "$dir/repo" && OUT="$dir/out" TARIMG_PYTHON="$VENV/bin/python" PATH="$VENV/bin:$PATH" \
     timeout 900 bash -c "$cmd") > "$dir/output.txt" 2>&1 || rc=$?
  local secs=$((SECONDS - t)) problems=()
  [ "$rc" -eq 0 ] || problems+=("exit $rc")
  [ "$size" -le "$LIMIT" ] || problems+=("$((size >> 20)) MiB travels, over 64")
  local files
  files=$(cd "$dir/out" && find . -type f | sed 's|^\./||')
  [ "$(echo "$files" | grep -c .)" -le 8 ] || problems+=("more than 8 files in OUT")
  while read -r f; do
    [ -n "$f" ] || continue
    [ "$(stat -c %s "$dir/out/$f")" -le $((16 << 20)) ] || problems+=("$f over 16 MiB")
    [ "$(echo "$f" | tr -cd / | wc -c)" -le 2 ] || problems+=("$f too deep")
    [[ "$f" =~ ^[A-Za-z0-9._/-]+$ ]] || problems+=("$f: odd name")
  done <<< "$files"
  printf 'call %s: %-70s %4d s, %5.1f MiB travelled, OUT: %s\n' "$n" "$cmd" "$secs" \
    "$(awk -v b="$size" 'BEGIN {print b / 1048576}')" "$(echo $files)"
  if [ "${#problems[@]}" -gt 0 ]; then
    echo "  FAILED: ${problems[*]}; the call's output:"
    tail -40 "$dir/output.txt" | sed 's/^/    /'
    failures=$((failures + 1))
  fi
}

last=$((${#parts[@]} - 1))
for i in "${!parts[@]}"; do
  if [ "$i" -eq 0 ] && [ "$i" -ne "$last" ]; then
    call $((i + 1)) "${parts[$i]}" bash bench/gpu/stage_part.sh --check
  elif [ "$i" -ne "$last" ]; then
    call $((i + 1)) "${parts[$i]}" bash bench/gpu/stage_part.sh
  else
    call $((i + 1)) "${parts[$i]} .whl/parts/site.tar.xz.sha256" bash bench/gpu/device_run.sh --total-s 400
  fi
done
out="$SCRATCH/call$((last + 1))"
echo "--- the last call's output (as output_tail would show it), from $out/output.txt:"
tail -60 "$out/output.txt"
if [ "$failures" -gt 0 ]; then
  echo "smoke: $failures call(s) FAILED" >&2
  exit 1
fi
echo "smoke: all ${#parts[@]} calls passed (scratch: $SCRATCH; remove /tmp/parts-smoke /tmp/site-smoke when done)"
