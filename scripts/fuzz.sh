#!/usr/bin/env bash
# libFuzzer + AddressSanitizer + UBSan on every parser of untrusted input (docs/FUZZING.md).
# Usage: scripts/fuzz.sh [TARGET|all] [RUNS|TIMEs] [extra libFuzzer flags...]
#   TARGET  safetensors safetensors_file shard_index weight_names lora ip_adapter single_file config recommendations
#           tokenizer image ws_message api_body control_command settings osc (default: all)
#   RUNS    executions per target (default 200000), or a time per target such as 10s / 5m
# Builds the targets with clang++-14 in build-fuzz (-DSD_FUZZ=ON: only the fuzz targets and the sources they need),
# seeds build-fuzz/corpus/TARGET from tests/fuzz/corpus/TARGET and the fixtures ($SD_FIXTURES, default
# ../shared/fixtures), runs each target and prints one summary line per target. Exit status 1 on any finding (the
# crash input is written to build-fuzz/findings/TARGET/). SD_FUZZ_NO_BUILD=1 skips the build.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
ALL=(safetensors safetensors_file shard_index weight_names lora ip_adapter single_file config recommendations tokenizer
     image ws_message api_body control_command settings osc)
TARGET="${1:-all}"; shift || true
RUNS="${1:-200000}"; shift || true
OUT="${SD_FUZZ_BUILD_DIR:-build-fuzz}"
FIX="${SD_FIXTURES:-$ROOT/../shared/fixtures}"
export SD_FIXTURES="$FIX"
if [ "$TARGET" = all ]; then TARGETS=("${ALL[@]}"); else TARGETS=("$TARGET"); fi
for t in "${TARGETS[@]}"; do
  [[ " ${ALL[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target '$t' (${ALL[*]})" >&2; exit 2; }
done

if [ "${SD_FUZZ_NO_BUILD:-0}" != 1 ]; then
  export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
  export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$ROOT}"
  CXX="${SD_FUZZ_CXX:-clang++-14}"
  command -v "$CXX" >/dev/null || { echo "fuzz.sh: $CXX not found (scripts/setup.sh installs clang-14)" >&2; exit 2; }
  cmake -S . -B "$OUT" -G Ninja -DSD_FUZZ=ON -DCMAKE_CXX_COMPILER="$CXX" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$OUT" -j "${SD_FUZZ_JOBS:-$(nproc)}" --target "${TARGETS[@]/#/fuzz_}"
fi

# Seeds: the committed hand-made ones, plus what the fixtures give (regenerated each run, never committed).
seed_fixtures() {
  local t="$1" dir="$2"
  [ -d "$FIX" ] || return 0
  python3 - "$t" "$FIX" "$dir" <<'PY'
import glob, json, os, struct, sys
t, fix, out = sys.argv[1:4]
def put(name, data):
    with open(os.path.join(out, "fix_" + name.replace("/", "_")), "wb") as f: f.write(data)
def header(path):
    f = open(path, "rb")
    n = struct.unpack("<Q", f.read(8))[0]
    return f.read(n), f
files = sorted(glob.glob(fix + "/**/*.safetensors", recursive=True))
if t == "safetensors":
    for p in files:
        if os.path.getsize(p) < 2 << 20:
            with open(p, "rb") as f: put(os.path.relpath(p, fix), f.read(65536))
elif t == "safetensors_file":
    for p in files:
        if os.path.getsize(p) < 64 << 10:
            with open(p, "rb") as f: put(os.path.relpath(p, fix), f.read())
elif t == "lora":
    # fuzz_util.h FileImage inputs (header JSON, NUL, data). A fixture LoRA has hundreds of keys: seeds of a few
    # neighbouring keys each (a pair and its alpha sort together) keep the inputs small and every layout covered.
    for p in files:
        if "/lora/files/" not in p: continue
        h, f = header(p)
        hdr = json.loads(h)
        base = f.tell()
        keys = sorted(k for k in hdr if k != "__metadata__")
        for w in range(0, len(keys), 24):
            sub, data = {}, b""
            for k in keys[w:w + 6]:
                b, e = hdr[k]["data_offsets"]
                f.seek(base + b)
                sub[k] = dict(hdr[k], data_offsets=[len(data), len(data) + e - b])
                data += f.read(e - b)
            put("%s_%d" % (os.path.relpath(p, fix), w), json.dumps(sub).encode() + b"\0" + data)
elif t == "ip_adapter":
    # fuzz_util.h FileImage inputs: the fixture adapter whole (header JSON, NUL, data).
    for p in files:
        if "/ipadapter/models/" not in p or not os.path.basename(p).startswith("ip-adapter"): continue
        h, f = header(p)
        put(os.path.relpath(p, fix), h.rstrip(b" ") + b"\0" + f.read())
elif t == "single_file":
    # fuzz_util.h FileImage inputs: the header only (the target zero-pads the data region).
    for p in files:
        if not ("/single_file/" in p or "taesd" in p or "controlnet" in p): continue
        h, f = header(p)
        put(os.path.relpath(p, fix), h.rstrip(b" ") + b"\0")
elif t == "config":
    kinds = {"unet/config.json": 0, "controlnet": 1, "vae/config.json": 2, "taesd": 3, "text_encoder": 4,
             "image_encoder": 5, "scheduler_config.json": 6, "model_index.json": 7}
    for p in sorted(glob.glob(fix + "/**/*.json", recursive=True)):
        for k, v in kinds.items():
            if k in p:
                with open(p, "rb") as f: put(os.path.relpath(p, fix), bytes([v]) + f.read())
                break
elif t == "tokenizer":
    p = os.path.join(fix, "tokenizer_cases.json")
    if os.path.exists(p):
        cases = json.load(open(p, encoding="utf-8"))
        cases = cases.get("cases", cases) if isinstance(cases, dict) else cases
        for i, c in enumerate(cases[:200]):
            text = c.get("text", c.get("prompt")) if isinstance(c, dict) else c
            if isinstance(text, str): put("case%d" % i, text.encode("utf-8", "surrogatepass"))
PY
}

status=0
mkdir -p "$OUT/findings"
for t in "${TARGETS[@]}"; do
  corpus="$OUT/corpus/$t"; seeds="$ROOT/tests/fuzz/corpus/$t"; fixseeds="$OUT/seeds/$t"
  mkdir -p "$corpus" "$fixseeds" "$OUT/findings/$t"
  rm -f "$fixseeds"/*
  seed_fixtures "$t" "$fixseeds"
  case "$t" in
    safetensors) maxlen=70000 ;;
    lora|ip_adapter) maxlen=65536 ;;
    single_file) maxlen=70000 ;;
    safetensors_file|image|api_body) maxlen=65536 ;;
    *) maxlen=8192 ;;
  esac
  if [[ "$RUNS" =~ ^[0-9]+[smh]$ ]]; then
    n="${RUNS%?}"; case "${RUNS: -1}" in s) secs=$n ;; m) secs=$((n * 60)) ;; h) secs=$((n * 3600)) ;; esac
    limit=(-max_total_time="$secs")
  else
    limit=(-runs="$RUNS")
  fi
  dirs=("$corpus" "$fixseeds"); [ -d "$seeds" ] && dirs+=("$seeds")
  log="$OUT/findings/$t/last-run.log"
  dict=(); [ -f "$ROOT/tests/fuzz/dict/$t.dict" ] && dict=(-dict="$ROOT/tests/fuzz/dict/$t.dict")
  set +e
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1}" \
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    "$OUT/fuzz_$t" "${limit[@]}" -max_len="$maxlen" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$OUT/findings/$t/" "${dict[@]}" "$@" "${dirs[@]}" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  eps=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ncorp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' <<<"$last" | cut -d' ' -f2 || true)
  if [ $rc -ne 0 ]; then
    status=1
    echo "fuzz $t: FINDING (exit $rc) after ${execs:-?} executions; see $log and $OUT/findings/$t/"
    grep -E 'ERROR|SUMMARY|runtime error|uncaught|what\(\)' "$log" | head -5
  else
    echo "fuzz $t: ${execs:-?} executions (${eps:-?}/s), corpus ${ncorp:-?}, cov ${cov:-?}, ft ${ft:-?}, no finding"
  fi
done
exit $status
