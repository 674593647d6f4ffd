#!/usr/bin/env bash
# The main job: installs dependencies, builds, and runs the stream pipeline end to end on a model folder
# (default: models/emoji-tiny, the tiny emoji text-to-image model trained in-house and shipped in the repository,
# 64x64), writing images to out/ and printing timings. Works offline.
#   MODEL=/path/to/diffusers/folder SIZE=512x512 PROMPT="a red fox in the snow" scripts/run.sh
#   SD_LIBTORCH=2 scripts/run.sh     (the libtorch 2 build, in build-t2)
# (SIZE defaults to the model's native size: 64x64 for the built-in model.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# SD_LIBTORCH=2: build against PyPI's libtorch 2.x instead of Debian's 1.13 (scripts/fetch-libtorch2.sh downloads it
# once, ~540 MB): the faster CPU build (README "libtorch 2 and int8"), without the Python module.
TORCH_ARGS=()
if [ "${SD_LIBTORCH:-}" = 2 ]; then
  TORCH_ARGS=(-DSD_TORCH_DIR="$(bash scripts/fetch-libtorch2.sh)/torch" -DSD_BUILD_PYTHON=OFF)
  BUILD_DIR="${BUILD_DIR:-build-t2}"
fi
BUILD_DIR="${BUILD_DIR:-build}"
# A build folder configured before keeps its settings: the README test runs this script on the suite's own build
# (BUILD_DIR), which may be a sanitizer build (RelWithDebInfo -O1); forcing Release there rebuilt it all.
if [ -f "$BUILD_DIR/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD_DIR" "${TORCH_ARGS[@]}"
else
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "${TORCH_ARGS[@]}"
fi
cmake --build "$BUILD_DIR" -j "$(nproc)" --target streamdiffusion
SD="$BUILD_DIR/apps/streamdiffusion"
MODEL="${MODEL:-models/emoji-tiny}"
SIZE_ARGS=()
if [ -n "${SIZE:-}" ]; then SIZE_ARGS=(--size "$SIZE"); fi
mkdir -p out/frames out/img2img out/stream
"$SD" info --model "$MODEL"
# txt2img with the stream batch: 4 LCM steps in one UNet call per frame, one image per emoji prompt.
for p in "grinning face" "red apple" "cat face" "rocket" "christmas tree" "pile of poo"; do
  "$SD" txt2img --model "$MODEL" --prompt "${PROMPT:-$p}" --t-index-list 0,16,32,45 --cfg-type none "${SIZE_ARGS[@]}" \
    -o "out/txt2img_${p// /_}.png"
done
cp "out/txt2img_grinning_face.png" out/txt2img.png
# One-shot batch (sd-turbo style): 4 independent images from one UNet call.
"$SD" txt2img --model "$MODEL" --prompt "${PROMPT:-red heart}" --t-index-list 0 --frame-buffer-size 4 --one-shot \
  "${SIZE_ARGS[@]}" -o out/batch.png
# img2img over a folder as one stream (RCFG self, 2 steps): feed the generated images back in.
cp out/txt2img.png out/frames/000.png
cp out/batch_0.png out/frames/001.png
cp out/batch_1.png out/frames/002.png
"$SD" img2img --model "$MODEL" --prompt "${PROMPT:-smiling face with sunglasses}" --t-index-list 32,45 --cfg-type self \
  --guidance 1.4 --delta 0.8 "${SIZE_ARGS[@]}" --input out/frames -o out/img2img
# A short live txt2img stream (the real-time runtime: queues, stats), 60 frames with a prompt change at frame 30.
"$SD" stream --model "$MODEL" --input none --frames 60 --prompt "${PROMPT:-rocket}" --t-index-list 0,16,32,45 \
  --cfg-type none "${SIZE_ARGS[@]}" --at "30:prompt ${PROMPT:-fire}" --control none --output out/stream/%05d.png \
  --stats-json out/stream.json
echo "images written to out/"
