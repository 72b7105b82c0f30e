#!/usr/bin/env bash
# Runs HERE, after download_wheels.sh. Installs the wheels into a site folder here (pip --target, for the
# device machine's Python 3.12; nothing is built, a wheel install only copies files), trims what the JPEG
# path never loads, packs the folder as one xz-compressed tar and splits it into parts small enough for one
# device call each (a call carries at most 64 MiB, the working tree included), in .whl/parts/ (git-ignored
# through .gitignore's /.whl/), with the whole tar's sha256 beside them. Prints, per call, what to carry
# (bench/gpu/README.md has the calls).
#
# Trimmed (none of it is loaded by `import nvidia.dali` or by a JPEG decode on Python 3.12):
#   - the extension modules of the other CPython versions (DALI and nvImageCodec ship 8 each; ~76 MB);
#   - nvImageCodec's nvjpeg2k and nvtiff extensions (their libraries are not carried; left in, each pipeline
#     build would print "[ERROR] Failed to load nvJPEG2000/nvTIFF library");
#   - C/C++ headers (DALI's plugin headers, 17 MB) and console scripts.
# xz instead of the wheels' zip deflate: the same files in about two thirds of the bytes; the machine
# unpacks them with xz, or Python's lzma where it has no xz.
#
# Usage: bash bench/gpu/pack.sh [WHEEL_DIR]   (default .whl/wheels; PART_SIZE=60M to change the part size;
#        PYTHON=python3 is the pip that installs; XZ_OPT=-6 the compression level)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-.whl/wheels}"
SITE=.whl/site
PARTS=.whl/parts
SIZE="${PART_SIZE:-60M}"
LIMIT=$((64 * 1024 * 1024))
PY="${PYTHON:-python3}"

if ! git check-ignore -q "$PARTS/probe"; then
  echo "$PARTS is not git-ignored: add /.whl/ to .gitignore (or to .git/info/exclude) first" >&2
  exit 1
fi
ls "$SRC"/*.whl >/dev/null
t0=$SECONDS
rm -rf "$SITE" "$PARTS"
mkdir -p "$SITE" "$PARTS"
"$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --target "$SITE" "$SRC"/*.whl 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
before=$(du -sb "$SITE" | cut -f1)

find "$SITE" -name '*.cpython-*.so' ! -name '*.cpython-312-x86_64-linux-gnu.so' -delete
rm -f "$SITE"/nvidia/nvimgcodec/extensions/libnvjpeg2k_ext.so* "$SITE"/nvidia/nvimgcodec/extensions/libnvtiff_ext.so*
find "$SITE" -type d -name include -prune -exec rm -rf {} +
rm -rf "$SITE/bin"
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
after=$(du -sb "$SITE" | cut -f1)
for need in nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so nvidia/dali/libdali_operators.so \
            nvidia/nvimgcodec/libnvimgcodec.so.0 nvidia/nvimgcodec/extensions/libnvjpeg_ext.so.0.9.0 \
            nvidia/cu13/lib/libnvjpeg.so.13 optree gast astunparse; do
  [ -e "$SITE/$need" ] || { echo "pack.sh: $SITE/$need is missing after the trim" >&2; exit 1; }
done

tar -C .whl -cf - site | xz -T0 ${XZ_OPT:--6} > "$PARTS/site.tar.xz"
sha256sum "$PARTS/site.tar.xz" | awk '{print $1}' > "$PARTS/site.tar.xz.sha256"
total=$(stat -c %s "$PARTS/site.tar.xz")
split -b "$SIZE" -d -a 2 "$PARTS/site.tar.xz" "$PARTS/site.tar.xz.part-"
rm "$PARTS/site.tar.xz"

# What travels with every call besides the carried part: tracked and untracked-not-ignored files (and a
# shared/ folder inside the checkout, if there is one).
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu \
        | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
if [ -d shared ]; then tree=$((tree + $(du -sb shared | cut -f1))); fi  # travels, ignored or not

parts=("$PARTS"/site.tar.xz.part-*)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
mb() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}'; }
wheels=$(du -cb "$SRC"/*.whl | tail -1 | cut -f1)
echo "wheels: $(ls "$SRC"/*.whl | wc -l) files, $(mb "$wheels") MB -> installed $(mb "$before") MB, trimmed" \
  "$(mb "$after") MB -> site.tar.xz $(mb "$total") MB ($(mib "$total") MiB) in ${#parts[@]} parts of at" \
  "most $SIZE; working tree $(mib "$tree") MiB; $((SECONDS - t0)) s"
if [ "${#parts[@]}" -gt 3 ]; then
  echo "pack.sh: ${#parts[@]} parts: the sequence has room for 3 upload calls (README); trim more" >&2
  exit 1
fi
n=0
for p in "${parts[@]}"; do
  n=$((n + 1))
  size=$(stat -c %s "$p")
  carry="\"$p\""
  if [ "$n" -eq "${#parts[@]}" ]; then
    carry="$carry, \"$PARTS/site.tar.xz.sha256\""
    size=$((size + $(stat -c %s "$PARTS/site.tar.xz.sha256")))
  fi
  flag=""
  if [ $((size + tree)) -gt "$LIMIT" ]; then flag="  <-- OVER the 64 MiB a call carries: PART_SIZE=56M bash bench/gpu/pack.sh"; fi
  echo "call $n: carry [$carry]  ($(mib $((size + tree))) MiB with the tree)$flag"
done
