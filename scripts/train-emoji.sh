#!/usr/bin/env bash
# (Re)trains the shipped tiny emoji model models/emoji-tiny with the project's own code, then redraws
# docs/emoji-contact-sheet.png. Resumes from $BUILD_DIR/emoji-train/checkpoint.safetensors when present.
# Extra arguments go to `streamdiffusion train` (e.g. --unet-steps 3000, --no-resume). THREADS (default 1, what the
# shipped model used: results are bitwise reproducible for a seed and thread count; two seeds can train side by side
# on a 2-core machine).
#   scripts/train-emoji.sh                       # the shipped recipe (seed 0)
#   BUILD_DIR=build-x OUT=/tmp/emoji scripts/train-emoji.sh --limit 50 --ae-steps 20 --unet-steps 20   # smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
OUT="${OUT:-models/emoji-tiny}"
DATA="$(bash scripts/fetch-emoji-data.sh | tail -1)"
if [ -z "${SKIP_BUILD:-}" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$BUILD_DIR" -j "$(nproc)" --target streamdiffusion
fi
SD="$BUILD_DIR/apps/streamdiffusion"
"$SD" train --data "$DATA" --out "$OUT" --work-dir "$BUILD_DIR/emoji-train" --seed "${SEED:-0}" --threads "${THREADS:-1}" "$@"
"$SD" contact-sheet --model "$OUT" --data "$DATA" --out "${SHEET:-docs/emoji-contact-sheet.png}"
