#!/usr/bin/env bash
# Draws docs/emoji-live-stream.png: one live txt2img stream of the built-in model (`streamdiffusion stream --input
# none`, 4 steps in one UNet batch) whose prompt changes twice mid-stream (scheduled control commands, morphing over
# a few frames), every third output frame in a row. Run after retraining (scripts/train-emoji.sh) to redraw it.
#   scripts/stream-strip.sh                       # OUT=docs/emoji-live-stream.png, BUILD_DIR=build
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR:-build}"
OUT="${OUT:-docs/emoji-live-stream.png}"
SD="$BUILD_DIR/apps/streamdiffusion"
[ -x "$SD" ] || { echo "stream-strip: $SD is not built (cmake --build $BUILD_DIR --target streamdiffusion)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The prompt at each input frame; the stream's output lags by the steps in flight (3 frames for 4 steps).
P0="red apple" P1="rocket" P2="grinning face"
"$SD" stream --input none --output "$tmp/%03d.png" --frames 42 --threads 2 --dtype fp32 --seed 2 --control none \
  --status-interval 0 --prompt "$P0" --transition 6f --at "12:prompt $P1" --at "27:prompt $P2" >/dev/null
files=() labels=()
for f in $(seq 0 3 41); do
  files+=("$(printf '%s/%03d.png' "$tmp" "$f")")
  p="$P0"; [ "$f" -ge 12 ] && p="$P1"; [ "$f" -ge 27 ] && p="$P2"
  labels+=("$f: $p")
done
"$SD" montage "${files[@]}" --tile 112 --labels "$(IFS=';'; echo "${labels[*]}")" --out "$OUT"
