#!/usr/bin/env bash
# libFuzzer + AddressSanitizer + UBSan on the safetensors header parser (needs clang and libclang-rt-14-dev).
# Usage: scripts/fuzz.sh [runs (default 200000)] [extra libFuzzer flags]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-200000}"; shift || true
OUT=build-fuzz
mkdir -p "$OUT/corpus"
clang++ -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -Isrc \
  tests/fuzz/fuzz_safetensors.cpp src/io/safetensors_header.cpp -o "$OUT/fuzz_safetensors"
# Seed corpus: the headers of the fixture files (first 64 KiB each) plus a few hand-made files.
FIX="${SD_FIXTURES:-../shared/fixtures}"
if [ -d "$FIX" ]; then
  i=0
  while IFS= read -r -d '' f; do
    head -c 65536 "$f" > "$OUT/corpus/fixture_$i"; i=$((i+1))
  done < <(find "$FIX" -name '*.safetensors' -size -2M -print0)
fi
"$OUT/fuzz_safetensors" -runs="$RUNS" -max_len=70000 "$@" "$OUT/corpus"
