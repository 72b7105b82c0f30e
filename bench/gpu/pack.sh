#!/usr/bin/env bash
# Runs HERE, after download_wheels.sh: packs the wheels into one tar and splits it into parts small enough
# for one device call each (a call carries at most 64 MiB, the working tree included), in .whl/parts/
# (git-ignored through .gitignore's /.whl/), with the whole tar's sha256 beside them. Prints, per call,
# what to carry (bench/gpu/README.md has the calls).
#
# Usage: bash bench/gpu/pack.sh [WHEEL_DIR]      (default .whl/wheels; PART_SIZE=60M to change the size)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-.whl/wheels}"
PARTS=.whl/parts
SIZE="${PART_SIZE:-60M}"
LIMIT=$((64 * 1024 * 1024))

if ! git check-ignore -q "$PARTS/probe"; then
  echo "$PARTS is not git-ignored: add /.whl/ to .gitignore (or to .git/info/exclude) first" >&2
  exit 1
fi
ls "$SRC"/*.whl >/dev/null
rm -rf "$PARTS"
mkdir -p "$PARTS"
tar -C "$(dirname "$SRC")" -cf "$PARTS/wheels.tar" "$(basename "$SRC")"
sha256sum "$PARTS/wheels.tar" | awk '{print $1}' > "$PARTS/wheels.tar.sha256"
split -b "$SIZE" -d -a 2 "$PARTS/wheels.tar" "$PARTS/wheels.tar.part-"
total=$(stat -c %s "$PARTS/wheels.tar")
rm "$PARTS/wheels.tar"

# What travels with every call besides the carried part: tracked and untracked-not-ignored files (and a
# shared/ folder inside the checkout, if there is one).
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | sort -zu \
        | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
if [ -d shared ]; then tree=$((tree + $(du -sb shared | cut -f1))); fi  # travels, ignored or not

parts=("$PARTS"/wheels.tar.part-*)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "wheels: $(ls "$SRC"/*.whl | wc -l) files, tar $(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1e6}') MB" \
  "($(mib "$total") MiB) -> ${#parts[@]} parts of at most $SIZE; working tree $(mib "$tree") MiB"
n=0
for p in "${parts[@]}"; do
  n=$((n + 1))
  size=$(stat -c %s "$p")
  carry="\"$p\""
  if [ "$n" -eq "${#parts[@]}" ]; then
    carry="$carry, \"$PARTS/wheels.tar.sha256\""
    size=$((size + $(stat -c %s "$PARTS/wheels.tar.sha256")))
  fi
  flag=""
  if [ $((size + tree)) -gt "$LIMIT" ]; then flag="  <-- OVER the 64 MiB a call carries: PART_SIZE=56M bash bench/gpu/pack.sh"; fi
  echo "call $n: carry [$carry]  ($(mib $((size + tree))) MiB with the tree)$flag"
done
