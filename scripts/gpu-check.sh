#!/usr/bin/env bash
# The CUDA check, run on a lent GPU host (device tool, `carry: [".gpu-deps/root", ".gpu-deps/fixtures", ".whl-peer"]`
# after scripts/gpu-prepare.sh here), in under 8 minutes on 16 cores. Steps, most important first (each is
# time-boxed; later ones are skipped when the budget is spent):
#   1. builds the engine-only configuration (-DSD_ENGINE_ONLY=ON: engine libraries, golden tests, bench CLI) against
#      the libtorch inside the host's PyTorch (CMAKE_PREFIX_PATH = torch.utils.cmake_prefix_path; when a CUDA
#      wheel's TorchConfig.cmake cannot find the CUDA toolkit, falls back to -DSD_TORCH_DIR, linking the wheel's
#      libraries directly) plus the unpacked .gpu-deps (header-only / static: see gpu-prepare.sh);
#   2. the goldens on the device, fp16 then fp32: the module goldens (test_device '*DeviceGolden*'; tolerances in
#      tests/models/test_device_golden.cpp: fp16 rtol 6e-2 (UNet) / 5e-2 (VAE, TAESD) / 2.5e-2 (text encoder) of
#      max|ref|, fp32 without TF32 atol 1e-4 + rtol 1e-5) and the CUDA-graph streams against eager streams
#      and the batched many-stream calls with and without their shared graphs (test_device '*StreamGraphs*',
#      tests/pipeline/test_cuda_graphs.cpp: 1e-2 (fp16) / 1e-4 (fp32) of the range), the image up/downloads and
#      the side-stream work (similarity filter, complete inputs: tests/pipeline/test_side_stream.cpp);
#   3. makes a random sd-turbo model (fp16 weights) and runs the 512 px, 1-step txt2img and img2img benchmark in fp16
#      (CUDA graphs on, and off as extra rows; img2img also with the frame already on the GPU, the runtime's case; TAESD
#      with its cuDNN-fused convolution + ReLU off as extra rows, components and e2e), with
#      the per-component rows; each e2e row also times its frames queued back to back (one synchronisation: a
#      runtime's throughput, and whether the host is the limit);
#   3a. the UNet compiled on the host by AOTInductor (scripts/compile-unet.py, diffusers 0.24 from the peer's wheels)
#       and the e2e rows with it beside the model's own UNet in one bench run (bench --compiled-unet);
#   3b. the same e2e rows with cuDNN's autotuner off (SD_CUDNN_BENCHMARK=0; on is the default on CUDA), to compare,
#       and the GPU time by operator of an img2img frame and of a round of 16 batched streams (bench --sections
#       profile --profile-streams 16), and Kineto's kernel trace of graphed frames and rounds (--profile-kernels:
#       how busy the GPU is per frame, in how many kernels of which lengths; traces in kernels-*.json.gz);
#   4. many streams in one UNet call: bench --sections multistream for 1, 2, 4, 8, 16 streams (when the CLI has it);
#   5. the original StreamDiffusion (PyPI streamdiffusion 0.1.1 + diffusers 0.24, wheels carried in .whl-peer by
#      scripts/gpu-peer-prepare.sh) on the same model, GPU and size, side by side (scripts/gpu-peer-check.sh);
#   5b. multi-stream rows for 1, 4, 16 streams in the e2e rows' 1-step configuration (total img2img fps of K clients);
#   4b. (after 5b) step 4's rows for 1, 4, 16 streams with a compiled UNet of a row range (compile-unet.py --rows 1-32,
#       compiled in the background after 3a's) beside the model's own UNet's, in one bench run;
#   5c. the same img2img frame with diffusers 0.24's modules, eager and torch.compile'd (Inductor), both in CUDA graphs
#       (bench/peers/run_compiled.py): what compiling would add to a graphed frame (INDUCTOR_MODE picks the mode);
#   6. the fp32 benchmark rows, as the budget allows.
# The device tests are one small program (test_device, engine-only builds) so the build stays short.
# Results (logs, JSON) go to $OUT (the device tool's output folder; default ./gpu-check-out); summary.txt has the
# figures, and at its end the issue's goals, met or not (goals.txt: scripts/gpu-goals.py over the JSON files).
#
# --dry-run: the same on THIS machine without a GPU (CPU libtorch from the system, device cpu, dtype bf16, the tiny
# fixture model instead of sd-turbo at 512 px): proves the script, the engine-only configuration and the bench work.
# Environment: BUILD_DIR (default build-gpu, build-gpu-dry with --dry-run), JOBS (default nproc), GPU_DEPS
# (default .gpu-deps), TIME_LIMIT_S (default 480: later steps are skipped when the budget is spent).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
DEPS="$(cd "${GPU_DEPS:-.gpu-deps}" 2>/dev/null && pwd)/root/usr"
JOBS="${JOBS:-$(nproc)}"
LIMIT="${TIME_LIMIT_S:-480}"
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
log() { echo "[gpu-check $(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
# Runs a step with a timeout of what is left of the budget; logs to $OUT/<name>.log; records pass/fail.
step() {
  local name="$1"; shift
  local budget; budget=$(left)
  if [ "$budget" -le 10 ]; then log "SKIP $name (time budget spent)"; return 1; fi
  log "RUN  $name: $*"
  timeout "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then log "OK   $name"; else log "FAIL $name (rc $rc, see $name.log)"; tail -n 30 "$OUT/$name.log"; fi
  return $rc
}

if [ ! -d "$DEPS/include" ]; then
  echo "gpu-check: no unpacked dependencies at $DEPS: run scripts/gpu-prepare.sh first (and carry .gpu-deps)" >&2
  exit 2
fi
export PATH="$DEPS/bin:$PATH"  # ninja
# Fixtures: $SD_FIXTURES, else the copy gpu-prepare.sh made, else ../shared/fixtures (this machine).
if [ -z "${SD_FIXTURES:-}" ]; then
  if [ -d "$DEPS/../../fixtures/models" ]; then SD_FIXTURES="$(cd "$DEPS/../../fixtures" && pwd)"; else SD_FIXTURES="$ROOT/../shared/fixtures"; fi
fi
export SD_FIXTURES
GEN=(-G Ninja)
command -v ninja >/dev/null || GEN=()
PREFIX="$DEPS"
EXTRA=()
if [ $DRY = 1 ]; then
  BUILD_DIR="${BUILD_DIR:-build-gpu-dry}"
  DEVICE=cpu; DTYPES=(bf16); BENCH_SIZE=64
  log "dry run on $(hostname): CPU libtorch from the system"
else
  BUILD_DIR="${BUILD_DIR:-build-gpu}"
  DEVICE=cuda; DTYPES=(fp16 fp32); BENCH_SIZE=512
  TORCH_PREFIX="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')" || { log "no python3 torch"; exit 2; }
  TORCH_DIR="$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
  TORCH_ABI="$(python3 -c 'import torch;print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
  PREFIX="$TORCH_PREFIX;$DEPS"
  python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    | tee -a "$SUMMARY"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$SUMMARY" 2>&1 || true
fi
CCACHE_OPT=OFF  # the GPU host has none; the dry run here may reuse this machine's cache
[ $DRY = 1 ] && CCACHE_OPT=ON
CONFIG=(-S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DSD_ENGINE_ONLY=ON "-DSD_USE_CCACHE=$CCACHE_OPT"
        "-DCMAKE_PREFIX_PATH=$PREFIX" "-DSD_GTEST_SOURCE_DIR=$DEPS/src/googletest")

# 1. configure + build
if ! step configure cmake "${CONFIG[@]}"; then
  if [ $DRY = 0 ]; then
    log "find_package(Torch) failed (a CUDA wheel without the CUDA toolkit?): linking $TORCH_DIR directly"
    rm -rf "$BUILD_DIR"
    step configure-direct cmake "${CONFIG[@]}" "-DCMAKE_PREFIX_PATH=$DEPS" "-DSD_TORCH_DIR=$TORCH_DIR" \
      "-DSD_TORCH_CXX11_ABI=$TORCH_ABI" || exit 1
  else
    exit 1
  fi
fi
grep -h "streamdiffusion: libtorch" "$OUT"/configure*.log | tee -a "$SUMMARY"
TARGETS=(streamdiffusion test_device)
step build cmake --build "$BUILD_DIR" -j "$JOBS" --target "${TARGETS[@]}" || exit 1
CLI="$BUILD_DIR/apps/streamdiffusion"

# 2. goldens on the device: module goldens, then CUDA-graph streams against eager streams
for dt in "${DTYPES[@]}"; do
  SD_TEST_DEVICE=$DEVICE SD_TEST_DTYPE=$dt step "golden-$DEVICE-$dt" "$BUILD_DIR/tests/test_device" \
    --gtest_filter='*DeviceGolden*' || true
  grep -h "\[close\]" "$OUT/golden-$DEVICE-$dt.log" | sed "s/^/  /" >> "$SUMMARY"
  SD_TEST_DEVICE=$DEVICE SD_TEST_DTYPE=$dt step "graphs-$DEVICE-$dt" "$BUILD_DIR/tests/test_device" \
    --gtest_filter='GraphCache*:*StreamGraphs*:Image.*:SideStream*:BenchKernel*:FusedConv*:DeviceControlNet*' || true
  grep -hE "\[graphs\]|\[controlnet-range\]|PASSED|FAILED|SKIPPED" "$OUT/graphs-$DEVICE-$dt.log" |
    sed "s/^/  /" >> "$SUMMARY"
done

# 3. benchmark: sd-turbo architecture (random weights) at 512 px, 1 step, txt2img and img2img
if [ $DRY = 1 ]; then
  MODEL="$SD_FIXTURES/models/tiny-sd21"
else
  MODEL="$BUILD_DIR/sd-turbo-random"
  [ -d "$MODEL/unet" ] || step make-random-model "$CLI" make-random-model --arch sd-turbo --out "$MODEL" \
    --tokenizer "$SD_FIXTURES/models/tiny-sd21/tokenizer" --weights-dtype fp16 || true
fi
BENCH=(bench --model "$MODEL" --device "$DEVICE" --sizes "$BENCH_SIZE" --txt2img-t-index 0 --img2img-t-index 35)
BENCH_E2E=("${BENCH[@]}" --sections e2e --iters 20 --frames 100 --warmup 10)
# The profile also takes rounds of 16 batched streams (4 in the dry run): where the batched step's time goes.
# --profile-kernels: Kineto's trace of graphed frames (GPU busy share, kernel count and lengths; the Chrome traces go to
# $OUT/kernels-*.json, gzipped after); a skip line in the dry run.
if [ $DRY = 1 ]; then PROFILE_OPTS=(--frames 3 --warmup 1 --threads 2 --profile-streams 4)
else PROFILE_OPTS=(--frames 20 --warmup 5 --profile-streams 16); fi
PROFILE_OPTS+=(--profile-kernels --profile-trace "$OUT")
BENCH_PROFILE=("${BENCH[@]}" --sections profile "${PROFILE_OPTS[@]}")
if [ $DRY = 1 ]; then
  BENCH+=(--sections components,e2e --threads 2 --iters 2 --frames 3 --warmup 1 --pipelined-frames 3 --frame-on-device)
else
  BENCH+=(--sections components,e2e --iters 20 --frames 200 --warmup 10)
fi
bench_rows() {  # dtype
  step "bench-$1" "$CLI" "${BENCH[@]}" --dtypes "$1" --json "$OUT/bench-$1.json" || true
  grep -hE "^(components|e2e|batch) |graphs on vs off|fused convolution|back to back" "$OUT/bench-$1.log" |
    sed "s/^/  /" >> "$SUMMARY"
}
# 3a (started here, in the background). The UNet compiled by AOTInductor on this host (scripts/compile-unet.py: the
# host's torch, diffusers 0.24 from the peer's wheels, installed first). Compiling takes minutes of CPU, so it runs
# while the GPU steps below run, on the cores above the first four (taskset; Inductor's compile workers likewise),
# which the bench's host threads keep. Waited for after the main bench rows.
COMPILED="$BUILD_DIR/unet-compiled-${DTYPES[0]}-$BENCH_SIZE.pt2"
COMPILE_ENV=()
if [ $DRY = 0 ] && ls .whl-peer/*.whl >/dev/null 2>&1; then
  PEER_INSTALL_ONLY=1 step peer-install bash scripts/gpu-peer-check.sh "$MODEL" "$OUT" &&
    COMPILE_ENV=(env PYTHONPATH="${SDPEER_DIR:-/tmp/sdpeer}" HF_HUB_OFFLINE=1 "${PYTHON:-python3}")
elif [ $DRY = 1 ] && [ -n "${PROBE_PYTHON:-}" ]; then
  COMPILE_ENV=("$PROBE_PYTHON")  # here: a Python with torch (the build's version) and diffusers
fi
# A package of a row range (--rows 1-32: 16 streams of 2 rows) for the multistream rows (4b), compiled after the first.
COMPILED_MS="$BUILD_DIR/unet-compiled-${DTYPES[0]}-$BENCH_SIZE-rows.pt2"
if [ $DRY = 1 ]; then MS_ROWS=1-8; else MS_ROWS=1-32; fi
CAN_COMPILE=0
if [ ${#COMPILE_ENV[@]} -eq 0 ]; then
  log "SKIP compile-unet (needs the peer's wheels, .whl-peer, installed; in a dry run PROBE_PYTHON)"
elif ! "$CLI" version 2>/dev/null | grep -q "compiled UNet.*: available"; then
  log "SKIP compile-unet (this build cannot load compiled UNets: $("$CLI" version 2>/dev/null | grep "compiled UNet"))"
else
  CAN_COMPILE=1
fi
# compile_bg NAME PACKAGE [compile-unet.py options]: compiles in the background (sets COMPILE_PID; "" = not started).
compile_bg() {
  local name="$1" pkg="$2"; shift 2
  COMPILE_PID=""
  if [ $CAN_COMPILE = 0 ]; then return; fi
  if [ -f "$pkg" ]; then log "$name: $pkg is there already (a rerun)"; return; fi
  if [ "$(left)" -le 60 ]; then log "SKIP $name (time budget spent)"; return; fi
  local pin=()
  if [ "$JOBS" -ge 8 ] && command -v taskset >/dev/null; then
    pin=(taskset -c "4-$((JOBS - 1))")
    export TORCHINDUCTOR_COMPILE_THREADS=$((JOBS - 4))
  fi
  log "RUN  $name (background${pin:+, ${pin[*]}}): scripts/compile-unet.py $MODEL --out $pkg $*"
  ( timeout "$(left)" "${pin[@]}" "${COMPILE_ENV[@]}" scripts/compile-unet.py "$MODEL" --out "$pkg" \
      --device "$DEVICE" --dtype "${DTYPES[0]}" --width "$BENCH_SIZE" --height "$BENCH_SIZE" "$@" \
      > "$OUT/$name.log" 2>&1; echo $? > "$OUT/$name.rc" ) &
  COMPILE_PID=$!
}
# compile_wait NAME PID: waits for a background compile and records its outcome.
compile_wait() {
  if [ -z "$2" ]; then return; fi
  wait "$2"
  local rc; rc="$(cat "$OUT/$1.rc" 2>/dev/null || echo '?')"
  if [ "$rc" = 0 ]; then log "OK   $1"; else log "FAIL $1 (rc $rc, see $1.log)"; tail -n 30 "$OUT/$1.log"; fi
  grep -h "^compile-unet:" "$OUT/$1.log" | sed "s/^/  /" >> "$SUMMARY"
}
compile_bg compile-unet "$COMPILED"
COMPILE_PID1="$COMPILE_PID"

bench_rows "${DTYPES[0]}"

# 3a. the compiled UNet's e2e rows beside the same rows on the model's own UNet, in one bench run (rows
# "unet=compiled", the "compiled UNet vs the model's own" comparisons, and one call's max difference).
compile_wait compile-unet "$COMPILE_PID1"
# The row-range package next, while the GPU steps below run (its rows: 4b).
compile_bg compile-unet-rows "$COMPILED_MS" --rows "$MS_ROWS"
COMPILE_PID2="$COMPILE_PID"
if [ -f "$COMPILED" ] && [ ${#COMPILE_ENV[@]} -gt 0 ]; then
  if [ $DRY = 1 ]; then COMPILED_OPTS=(--threads 2 --iters 2 --frames 3 --warmup 1 --frame-on-device)
  else COMPILED_OPTS=(--iters 20 --frames 100 --warmup 10); fi
  step "bench-compiled-${DTYPES[0]}" "$CLI" bench --model "$MODEL" --device "$DEVICE" --sizes "$BENCH_SIZE" \
    --txt2img-t-index 0 --img2img-t-index 35 --sections e2e "${COMPILED_OPTS[@]}" --dtypes "${DTYPES[0]}" \
    --compiled-unet "$COMPILED" --json "$OUT/bench-compiled-${DTYPES[0]}.json" || true
  grep -hE "^e2e |compiled UNet vs|back to back" "$OUT/bench-compiled-${DTYPES[0]}.log" | sed "s/^/  /" >> "$SUMMARY"
fi


if [ $DRY = 0 ]; then
  step "bench-${DTYPES[0]}-autotuner-off" env SD_CUDNN_BENCHMARK=0 "$CLI" "${BENCH_E2E[@]}" \
    --dtypes "${DTYPES[0]}" --json "$OUT/bench-${DTYPES[0]}-autotuner-off.json" || true
  grep -hE "^e2e |back to back" "$OUT/bench-${DTYPES[0]}-autotuner-off.log" | sed "s/^/  autotuner off: /" >> "$SUMMARY"
fi
# Where the time of an img2img frame goes, operator by operator (on CUDA the GPU's, graphs off: read the shares).
step "profile-${DTYPES[0]}" "$CLI" "${BENCH_PROFILE[@]}" --dtypes "${DTYPES[0]}" --json "$OUT/profile-${DTYPES[0]}.json" ||
  true
# Each table's heading and its top 12 operators (the kernel tables: heading, lengths and top 11 kernels).
grep -hE "^profile " "$OUT/profile-${DTYPES[0]}.log" | awk '/^profile    [^ ]/ {n = 0} n++ < 13' | sed "s/^/  /" >> "$SUMMARY"
for t in "$OUT"/kernels-*.json; do if [ -f "$t" ]; then gzip -f "$t"; fi; done

# 4. many streams, one UNet call
# The help into a variable first: `cli | grep -q` under pipefail fails when grep stops reading early (SIGPIPE), which
# skipped this step on the H200.
BENCH_HELP="$("$CLI" bench --help 2>/dev/null || true)"
if grep -q -- "--streams" <<<"$BENCH_HELP"; then
  MS=(bench --model "$MODEL" --device "$DEVICE" --sizes "$BENCH_SIZE" --img2img-t-index 35 --sections multistream)
  if [ $DRY = 1 ]; then MS+=(--streams 1,2,4 --frames 3 --warmup 1 --threads 2); else MS+=(--streams 1,2,4,8,16 --frames 40 --warmup 5); fi
  step "multistream-${DTYPES[0]}" "$CLI" "${MS[@]}" --dtypes "${DTYPES[0]}" --json "$OUT/multistream.json" || true
  grep -hE "^multistream |streams" "$OUT/multistream-${DTYPES[0]}.log" | sed "s/^/  /" >> "$SUMMARY"
else
  log "SKIP multistream (this CLI has no bench --streams)"
fi

# 5. the original StreamDiffusion on the same model and device (gpu-peer-check.sh never aborts; rc says what ran)
if [ $DRY = 0 ] && ls .whl-peer/*.whl >/dev/null 2>&1; then
  step peer-streamdiffusion bash scripts/gpu-peer-check.sh "$MODEL" "$OUT" || true
  grep -hE "^peer " "$OUT/peer-streamdiffusion.log" | sed "s/^/  /" >> "$SUMMARY"
elif [ $DRY = 1 ] && [ -n "${PEER_PYTHON:-}" ] && ls .whl-peer/*.whl >/dev/null 2>&1; then
  # Here: a Python 3.12 with torch like the GPU host's (the carried wheels are cp312), e.g. PEER_PYTHON=/tmp/hostvenv/bin/python.
  PYTHON="$PEER_PYTHON" step peer-streamdiffusion bash scripts/gpu-peer-check.sh "$MODEL" "$OUT" --device cpu \
    --dtype fp32 --size "$BENCH_SIZE" --frames 3 --warmup 1 --threads 2 || true
  grep -hE "^peer " "$OUT/peer-streamdiffusion.log" | sed "s/^/  /" >> "$SUMMARY"
else
  log "SKIP peer (no .whl-peer wheels, or a dry run without PEER_PYTHON: run scripts/gpu-peer-prepare.sh, carry .whl-peer)"
fi

# 5b. the e2e rows' configuration (1 step, t 35) over many streams: total img2img frames per second of K sd-turbo
# clients on one GPU, beside the one-stream img2img row (after the peer: the budget may end here)
if grep -q -- "--streams" <<<"$BENCH_HELP"; then
  MS1=(bench --model "$MODEL" --device "$DEVICE" --sizes "$BENCH_SIZE" --sections multistream --multi-t-index 35)
  if [ $DRY = 1 ]; then MS1+=(--streams 4 --frames 3 --warmup 1 --threads 2); else MS1+=(--streams 1,4,16 --frames 30 --warmup 5); fi
  step "multistream-1step-${DTYPES[0]}" "$CLI" "${MS1[@]}" --dtypes "${DTYPES[0]}" --json "$OUT/multistream-1step.json" ||
    true
  grep -hE "streams:" "$OUT/multistream-1step-${DTYPES[0]}.log" | sed "s/^/  1 step: /" >> "$SUMMARY"
fi

# 4b. the multistream rows of step 4 with the row-range package (1-32 rows: every stream count, one by one and batched,
# runs compiled) beside the model's own UNet's, in one bench run (tables "unet=compiled"; gpu-goals.py's goal 3 counts
# them). 1 and 16 streams (the goal's) and 4.
compile_wait compile-unet-rows "$COMPILE_PID2"
if [ -f "$COMPILED_MS" ] && [ $CAN_COMPILE = 1 ] && grep -q -- "--streams" <<<"$BENCH_HELP"; then
  MSC=(bench --model "$MODEL" --device "$DEVICE" --sizes "$BENCH_SIZE" --img2img-t-index 35 --sections multistream)
  if [ $DRY = 1 ]; then MSC+=(--streams 1,4 --frames 3 --warmup 1 --threads 2); else MSC+=(--streams 1,4,16 --frames 30 --warmup 5); fi
  step "multistream-compiled-${DTYPES[0]}" "$CLI" "${MSC[@]}" --dtypes "${DTYPES[0]}" --compiled-unet "$COMPILED_MS" \
    --json "$OUT/multistream-compiled.json" || true
  grep -hE "streams|compiled UNet vs" "$OUT/multistream-compiled-${DTYPES[0]}.log" | sed "s/^/  /" >> "$SUMMARY"
elif [ $CAN_COMPILE = 1 ]; then
  log "SKIP multistream-compiled (no row-range package: see compile-unet-rows.log, or the budget was spent)"
fi

# 5c. what PyTorch's compiler (Inductor) would add to a graphed frame, before anyone builds it into the engine
# (AOTInductor packages load from C++): bench/peers/run_compiled.py times the e2e rows' img2img frame (frame on the
# device) with diffusers 0.24's modules from the peer's install, eager and torch.compile'd, both replayed in CUDA
# graphs, and the UNet alone; "probe ..." lines give the ratio. Compiling takes minutes: last before the fp32 rows.
PROBE_SITE="${SDPEER_DIR:-/tmp/sdpeer}"
if [ $DRY = 0 ] && [ -d "$PROBE_SITE/diffusers" ]; then
  step inductor-probe env PYTHONPATH="$PROBE_SITE:$ROOT/bench/peers" HF_HOME="$PROBE_SITE/hf-home" HF_HUB_OFFLINE=1 \
    "${PYTHON:-python3}" bench/peers/run_compiled.py --model "$MODEL" --device cuda --dtypes "${DTYPES[0]}" \
    --sizes "$BENCH_SIZE" --frames 50 --warmup 5 --compile-mode "${INDUCTOR_MODE:-default}" \
    --json "$OUT/inductor-probe.json" || true
  grep -hE "^probe |compiled in|peer skipped" "$OUT/inductor-probe.log" | sed "s/^/  /" >> "$SUMMARY"
elif [ $DRY = 1 ] && [ -n "${PROBE_PYTHON:-}" ]; then
  # Here: a Python with torch and diffusers 0.24, e.g. PROBE_PYTHON=/tmp/pyt2/bin/python (CPU: eager and compiled).
  step inductor-probe env PYTHONPATH="$ROOT/bench/peers" "$PROBE_PYTHON" bench/peers/run_compiled.py \
    --model "$MODEL" --device cpu --dtypes fp32 --sizes "$BENCH_SIZE" --frames 3 --warmup 1 --threads 2 \
    --json "$OUT/inductor-probe.json" || true
  grep -hE "^probe |compiled in|peer skipped" "$OUT/inductor-probe.log" | sed "s/^/  /" >> "$SUMMARY"
else
  log "SKIP inductor-probe (needs the peer's diffusers install, $PROBE_SITE; in a dry run PROBE_PYTHON)"
fi

# 6. the rest, as the budget allows
for dt in "${DTYPES[@]:1}"; do bench_rows "$dt"; done

# The issue's goals, read from the JSON files above (scripts/gpu-goals.py; not a step: it runs whatever is left).
GOALS_PY="${PYTHON:-python3}"
if command -v "$GOALS_PY" >/dev/null 2>&1; then
  "$GOALS_PY" scripts/gpu-goals.py "$OUT" --dtype "${DTYPES[0]}" > "$OUT/goals.txt" 2>&1 || true
  sed "s/^/  /" "$OUT/goals.txt" >> "$SUMMARY"
  cat "$OUT/goals.txt"
fi

log "done; results in $OUT"
cat "$SUMMARY" | grep -E "FAIL|SKIP" && exit 1
exit 0
