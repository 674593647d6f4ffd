#!/usr/bin/env bash
# The main job: installs dependencies, builds, and runs the stream pipeline end to end on a model folder
# (default: the tiny SD 2.1-class fixture model, random weights, 64x64), writing images to out/ and printing timings.
#   MODEL=/path/to/diffusers/folder SIZE=512x512 scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)" --target streamdiffusion
SD="$BUILD_DIR/apps/streamdiffusion"
MODEL="${MODEL:-${SD_FIXTURES:-../shared/fixtures}/models/tiny-sd21}"
SIZE="${SIZE:-64x64}"
mkdir -p out/frames out/img2img
"$SD" info --model "$MODEL"
# txt2img with the stream batch: 4 LCM steps in one UNet call per frame.
"$SD" txt2img --model "$MODEL" --prompt "a photo of a cat, trending on artstation" --t-index-list 0,16,32,45 \
  --cfg-type none --size "$SIZE" -o out/txt2img.png
# One-shot batch (sd-turbo style): 4 independent images from one UNet call.
"$SD" txt2img --model "$MODEL" --prompt "a red fox in the snow" --t-index-list 0 --frame-buffer-size 4 --one-shot \
  --size "$SIZE" -o out/batch.png
# img2img over a folder as one stream (RCFG self, 2 steps): feed the generated images back in.
cp out/txt2img.png out/frames/000.png
cp out/batch_0.png out/frames/001.png
cp out/batch_1.png out/frames/002.png
"$SD" img2img --model "$MODEL" --prompt "an oil painting" --t-index-list 32,45 --cfg-type self --guidance 1.4 \
  --delta 0.8 --size "$SIZE" --input out/frames -o out/img2img
echo "images written to out/"
