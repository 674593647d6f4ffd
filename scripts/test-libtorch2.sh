#!/usr/bin/env bash
# The CPU build against PyPI's libtorch 2.x (scripts/fetch-libtorch2.sh), kept compiling and tested next to Debian's
# 1.13: builds the engine, its model tests and the CLI in $BUILD_DIR (default build-t2) and runs the model tests,
# whose golden cases include the int8 layers that only libtorch 2 has (oneDNN's int8 operators), the emoji model's
# adherence in int8, and the CLI's
# bench on the tiny fixture model in fp32, auto (bf16 where native) and int8 (where the CPU has VNNI/AMX).
# Called by scripts/test.sh (SD_SKIP_LIBTORCH2=1 skips it); runnable alone once scripts/setup.sh has run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${BUILD_DIR_T2:-build-t2}"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
TORCH2="$(bash scripts/fetch-libtorch2.sh)/torch"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSD_TORCH_DIR="$TORCH2" -DSD_BUILD_PYTHON=OFF
cmake --build "$BUILD_DIR" -j "$(nproc)" --target test_models test_train streamdiffusion
export SD_FIXTURES="${SD_FIXTURES:-$PWD/../shared/fixtures}"
echo "== libtorch 2: test_models"
"$BUILD_DIR/tests/test_models" --gtest_brief=1
echo "== libtorch 2: the built-in emoji model's adherence with --dtype int8"
"$BUILD_DIR/tests/test_train" --gtest_brief=1 --gtest_filter='EmojiAdherence.Int8*'
echo "== libtorch 2: the CLI's bench on the tiny fixture model"
MODEL="$SD_FIXTURES/models/tiny-sd21"
[ -d "$MODEL" ] || MODEL="$(ls -d "$SD_FIXTURES"/models/*/ | head -1)"
"$BUILD_DIR/apps/streamdiffusion" version
# int8 needs VNNI/AMX (an AVX2-only CPU has neither): the bench covers it where `version` says it is available.
DTYPES=fp32,auto
if grep -q "int8: available" <<<"$("$BUILD_DIR/apps/streamdiffusion" version)"; then DTYPES=fp32,auto,int8; fi
"$BUILD_DIR/apps/streamdiffusion" bench --model "$MODEL" --sizes 64 --iters 1 --frames 2 --warmup 0 \
  --sections components,e2e --dtypes "$DTYPES" --json "$BUILD_DIR/bench-t2.json" > "$BUILD_DIR/bench-t2.log" 2>&1 ||
  { cat "$BUILD_DIR/bench-t2.log"; exit 1; }
grep -E "^(e2e|unet) " "$BUILD_DIR/bench-t2.log" | head -12
echo "libtorch 2 build: OK"
