#!/usr/bin/env bash
# The CPU build against PyPI's libtorch 2.x (scripts/fetch-libtorch2.sh), kept compiling and tested next to Debian's
# 1.13: builds the engine, its model tests and the CLI in $BUILD_DIR (default build-t2) and runs the model tests,
# whose golden cases include the int8 layers that only libtorch 2 has (oneDNN's int8 operators), the emoji model's
# adherence in int8, and the CLI's
# bench on the tiny fixture model in fp32, auto (bf16 where native) and int8 (where the CPU has VNNI/AMX).
# With SD_COMPILE_PYTHON (a Python with torch of the same version and diffusers, e.g. a venv outside the repository:
# PyPI's torch pulls gigabytes of CUDA libraries, so CI does not install it) it also compiles the tiny fixture's UNet
# with scripts/compile-unet.py and checks the package against the engine's UNet (test_models' CompiledUNet* with
# SD_COMPILED_UNET) and through the CLI's bench (--compiled-unet: rows 'unet=compiled'), and a package of a row range
# (--rows 1-4: test_models with SD_COMPILED_UNET_ROWS, bench's multistream rows one by one and batched).
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
if [ -n "${SD_COMPILE_PYTHON:-}" ]; then
  echo "== libtorch 2: the tiny fixture's UNet compiled by AOTInductor ($SD_COMPILE_PYTHON)"
  "$SD_COMPILE_PYTHON" scripts/compile-unet.py "$SD_FIXTURES/models/tiny-sd21" --out "$BUILD_DIR/tiny-sd21-unet.pt2" \
    --device cpu --dtype fp32 --width 64 --height 64 > "$BUILD_DIR/compile-unet.log" 2>&1 ||
    { cat "$BUILD_DIR/compile-unet.log"; exit 1; }
  tail -n 1 "$BUILD_DIR/compile-unet.log"
  export SD_COMPILED_UNET="$PWD/$BUILD_DIR/tiny-sd21-unet.pt2"
  # A package of a row range (a dynamic row count): 1 to 4 rows, for test_models and bench's multistream rows.
  "$SD_COMPILE_PYTHON" scripts/compile-unet.py "$SD_FIXTURES/models/tiny-sd21" --out "$BUILD_DIR/tiny-sd21-unet-rows.pt2" \
    --device cpu --dtype fp32 --width 64 --height 64 --rows 1-4 > "$BUILD_DIR/compile-unet-rows.log" 2>&1 ||
    { cat "$BUILD_DIR/compile-unet-rows.log"; exit 1; }
  tail -n 1 "$BUILD_DIR/compile-unet-rows.log"
  export SD_COMPILED_UNET_ROWS="$PWD/$BUILD_DIR/tiny-sd21-unet-rows.pt2"
fi
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
if [ -n "${SD_COMPILED_UNET:-}" ]; then
  # With a LoRA fused at load and re-fused live (the bench times a re-fuse): the package must compute with the
  # engine's weights, so one call of it matches the model's own UNet (fp32: 1e-4 of its largest value).
  echo "== libtorch 2: the CLI's bench with the compiled UNet (and a LoRA)"
  "$BUILD_DIR/apps/streamdiffusion" bench --model "$SD_FIXTURES/models/tiny-sd21" --sizes 64 --iters 1 --frames 2 \
    --warmup 0 --sections e2e --dtypes fp32 --compiled-unet "$SD_COMPILED_UNET" \
    --lora "$SD_FIXTURES/lora/files/sd21_kohya.safetensors:0.8" \
    --json "$BUILD_DIR/bench-t2-compiled.json" > "$BUILD_DIR/bench-t2-compiled.log" 2>&1 ||
    { cat "$BUILD_DIR/bench-t2-compiled.log"; exit 1; }
  grep -E "^e2e |compiled UNet" "$BUILD_DIR/bench-t2-compiled.log"
  python3 - "$BUILD_DIR/bench-t2-compiled.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
rows = [r for r in j["results"] if "unet=compiled" in r["variant"]]
assert len(rows) >= 2, "no e2e rows ran the compiled UNet"
for r in rows:
    assert r["extra"]["compiled_unet"]["calls_per_frame"] >= 1, r
checks = j.get("checks", [])
assert checks and checks[0]["relative"] < 1e-4, checks
print(f"compiled UNet: {len(rows)} rows, one call {checks[0]['relative']:.2e} of the own UNet's largest value")
EOF
  echo "== libtorch 2: a call of another shape runs the model's own UNet (and says so)"
  "$BUILD_DIR/apps/streamdiffusion" txt2img --model "$SD_FIXTURES/models/tiny-sd21" --size 128x128 \
    --compiled-unet "$SD_COMPILED_UNET" -o "$BUILD_DIR/compiled-other-size.png" > "$BUILD_DIR/compiled-other.log" 2>&1 ||
    { cat "$BUILD_DIR/compiled-other.log"; exit 1; }
  grep -q "not used for a call (sample \[" "$BUILD_DIR/compiled-other.log" ||
    { echo "no fallback line"; cat "$BUILD_DIR/compiled-other.log"; exit 1; }
  echo "== libtorch 2: info --compiled-unet: what a package was made for, and whether it fits a model"
  "$BUILD_DIR/apps/streamdiffusion" info --compiled-unet "$SD_COMPILED_UNET_ROWS" --model "$SD_FIXTURES/models/tiny-sd21" \
    > "$BUILD_DIR/info-compiled.log" 2>&1 || { cat "$BUILD_DIR/info-compiled.log"; exit 1; }
  grep -q "sample \[1-4, 4, 8, 8\] (rows 1 to 4 per call)" "$BUILD_DIR/info-compiled.log" &&
    grep -q "fits .*tiny-sd21: loaded with it" "$BUILD_DIR/info-compiled.log" ||
    { echo "info --compiled-unet said:"; cat "$BUILD_DIR/info-compiled.log"; exit 1; }
  # Another model (tiny-sd15's UNet config differs): refused, naming the difference.
  if "$BUILD_DIR/apps/streamdiffusion" info --compiled-unet "$SD_COMPILED_UNET_ROWS" \
      --model "$SD_FIXTURES/models/tiny-sd15" > "$BUILD_DIR/info-compiled-other.log" 2>&1 ||
      ! grep -q "compiled from another UNet config" "$BUILD_DIR/info-compiled-other.log"; then
    echo "info --compiled-unet with another model:"; cat "$BUILD_DIR/info-compiled-other.log"; exit 1
  fi
  echo "== libtorch 2: stream (txt2img) through the package of a row range: its summary counts the calls"
  "$BUILD_DIR/apps/streamdiffusion" stream --model "$SD_FIXTURES/models/tiny-sd21" -i none -o none --frames 4 \
    --size 64x64 --compiled-unet "$SD_COMPILED_UNET_ROWS" > "$BUILD_DIR/stream-compiled.log" 2>&1 ||
    { cat "$BUILD_DIR/stream-compiled.log"; exit 1; }
  grep "\[stream\] compiled UNet: [1-9][0-9]* calls, 0 by the model's own UNet" "$BUILD_DIR/stream-compiled.log" ||
    { echo "no compiled UNet line:"; cat "$BUILD_DIR/stream-compiled.log"; exit 1; }
  echo "== libtorch 2: many streams, one by one and batched, through a package of a row range (1-4 rows)"
  "$BUILD_DIR/apps/streamdiffusion" bench --model "$SD_FIXTURES/models/tiny-sd21" --sizes 64 --frames 2 --warmup 0 \
    --sections multistream --streams 1,2 --dtypes fp32 --compiled-unet "$SD_COMPILED_UNET_ROWS" \
    --json "$BUILD_DIR/bench-t2-ms-compiled.json" > "$BUILD_DIR/bench-t2-ms-compiled.log" 2>&1 ||
    { cat "$BUILD_DIR/bench-t2-ms-compiled.log"; exit 1; }
  grep -E "streams" "$BUILD_DIR/bench-t2-ms-compiled.log"
  python3 - "$BUILD_DIR/bench-t2-ms-compiled.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
rows = [r for r in j["results"] if r["section"] == "multistream" and "unet=compiled" in r["variant"]]
assert len(rows) == 4, rows  # 1 and 2 streams, one by one and batched
for r in rows:
    # cfg self, 2 steps: 2 rows a stream; one by one k calls a round, batched one (2k rows), all in the package.
    want = r["extra"]["streams"] if r["name"] == "one-by-one" else 1
    assert r["extra"]["compiled_unet"]["calls_per_round"] == want, r
assert [t["unet"] for t in j["multistream"]] == ["own", "compiled"], j["multistream"]
print(f"compiled UNet of a row range: {len(rows)} multistream rows ran every UNet call in the package")
EOF
fi
echo "libtorch 2 build: OK"
