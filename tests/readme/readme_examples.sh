#!/usr/bin/env bash
# Runs the README's commands that need no outside weights, exactly as written, so the README cannot drift from the
# program (CTest `readme_examples`).
#
#   tests/readme/readme_examples.sh README.md BUILD_DIR
#
# A fenced ```sh block directly preceded by the line `<!-- readme-test: workdir -->` runs as one bash script (set -e)
# in a fresh temporary folder (the repository's models/ and scripts/ linked into it), with `streamdiffusion` on PATH
# being BUILD_DIR's binary; `<!-- readme-test: repo -->` runs it from the repository root (the quick start, with
# BUILD_DIR exported so scripts reuse this build). scripts/test.sh itself is never run from here (it runs this).
# Exit 0 = every marked block passed; 1 = a block failed (its output is printed); 2 = no marked block was found.
set -uo pipefail
readme="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
build="$(cd "$2" && pwd)"
repo="$(dirname "$readme")"
[ -x "$build/apps/streamdiffusion" ] || { echo "no binary at $build/apps/streamdiffusion"; exit 1; }
bin="$(mktemp -d)"
ln -s "$build/apps/streamdiffusion" "$bin/streamdiffusion"
trap 'rm -rf "$bin"' EXIT

# Extract the marked blocks: one file per block, its mode in the name.
blocks="$bin/blocks"
mkdir -p "$blocks"
awk -v dir="$blocks" '
  /^<!-- readme-test: (workdir|repo) -->$/ { mode = $3; armed = 1; next }
  armed && /^```sh$/ { n++; file = sprintf("%s/%02d_%s.sh", dir, n, mode); inblock = 1; armed = 0; next }
  inblock && /^```$/ { inblock = 0; close(file); next }
  inblock { print > file; next }
  { armed = 0 }
' "$readme"
count=$(ls "$blocks" | wc -l)
[ "$count" -gt 0 ] || { echo "no <!-- readme-test: ... --> block in $readme"; exit 2; }

passed=0 failed=0
for f in "$blocks"/*.sh; do
  name="$(basename "$f" .sh)"
  if grep -q "scripts/test.sh" "$f"; then echo "FAIL $name: runs scripts/test.sh (recursion)"; failed=$((failed + 1)); continue; fi
  if [[ "$name" == *_repo ]]; then
    wd="$repo"
  else
    wd="$bin/work_$name"
    mkdir -p "$wd"
    ln -s "$repo/models" "$wd/models"
    ln -s "$repo/scripts" "$wd/scripts"
  fi
  echo "---- $name (in $wd):"
  sed 's/^/  | /' "$f"
  start=$(date +%s)
  if out="$(cd "$wd" && PATH="$bin:$PATH" BUILD_DIR="$build" bash -e "$f" 2>&1)"; then
    echo "ok   $name ($(( $(date +%s) - start )) s)"
    passed=$((passed + 1))
  else
    echo "$out" | tail -40 | sed 's/^/  > /'
    echo "FAIL $name"
    failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
