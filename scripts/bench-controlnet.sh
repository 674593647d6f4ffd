#!/usr/bin/env bash
# What ControlNets cost per frame (issue 15): one `streamdiffusion bench --sections e2e` run per configuration, all
# in one go on the same machine state -- no ControlNet, 1 ControlNet, 2 ControlNets, 1 ControlNet with
# --controlnet-every 2 and 4; then at two denoising steps (t_index_list 32,45 img2img, 0,16 txt2img) no ControlNet, 1
# ControlNet and 1 ControlNet on the first or the second half of the steps (--control-guidance-end / -start 0.5) --
# on the real architectures with random weights (make-random-model: sd-turbo, i.e. SD 2.1's UNet, + a controlnet-sd21
# ControlNet). Prints the CPU, then a table of seconds per frame and fps per size and mode with the ratio to the
# no-ControlNet run at the same steps, and writes every bench JSON plus a summary JSON.
#
#   scripts/bench-controlnet.sh [--sizes "256 512"] [--threads N] [--dtype bf16] [--frames 8] [--warmup 2] [--out DIR]
#
# Environment:
#   SD_BENCH_CACHE     where the random models are made once and kept (default ~/.cache/streamdiffusion-bench;
#                      about 2.4 GB in bf16 weights)
#   SD_BIN             the streamdiffusion CLI (default build/apps/streamdiffusion)
#   SD_BENCH_MODEL     use this model folder instead of the random sd-turbo (e.g. a tiny fixture model)
#   SD_BENCH_CONTROLNET  use this ControlNet folder instead of the random controlnet-sd21
# Timings of the --controlnet-every rows are the mean over a multiple of N timed frames (the amortised cost: frames
# alternate between computing and reusing the residuals); the others are the mean too, so every row compares alike.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES="256 512"
THREADS=0
DTYPE=bf16
FRAMES=8
WARMUP=2
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) SIZES="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --frames) FRAMES="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench-controlnet.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

SD="${SD_BIN:-build/apps/streamdiffusion}"
if [ ! -x "$SD" ]; then
  echo "bench-controlnet.sh: no CLI at $SD (build it: cmake --build build --target streamdiffusion, or set SD_BIN)" >&2
  exit 1
fi
CACHE="${SD_BENCH_CACHE:-$HOME/.cache/streamdiffusion-bench}"
OUT="${OUT:-bench-controlnet-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

MODEL="${SD_BENCH_MODEL:-}"
CONTROLNET="${SD_BENCH_CONTROLNET:-}"
if [ -z "$MODEL" ]; then
  MODEL="$CACHE/sd-turbo-random"
  if [ ! -f "$MODEL/.complete" ]; then
    echo "making the random sd-turbo model in $MODEL (once)"
    rm -rf "$MODEL"
    "$SD" make-random-model --arch sd-turbo --out "$MODEL" --tokenizer models/clip-tokenizer --weights-dtype bf16
    touch "$MODEL/.complete"
  fi
fi
if [ -z "$CONTROLNET" ]; then
  CONTROLNET="$CACHE/controlnet-sd21-random"
  if [ ! -f "$CONTROLNET/.complete" ]; then
    echo "making the random controlnet-sd21 in $CONTROLNET (once)"
    rm -rf "$CONTROLNET"
    "$SD" make-random-model --arch controlnet-sd21 --out "$CONTROLNET" --weights-dtype bf16
    touch "$CONTROLNET/.complete"
  fi
fi

# The CPU at the top: what the figures belong to.
CPU_MODEL="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1 || true)"
CPU_FAMILY="$(lscpu 2>/dev/null | sed -n 's/^CPU family:[[:space:]]*//p' | head -1 || true)"
CPU_MODEL_NO="$(lscpu 2>/dev/null | sed -n 's/^Model:[[:space:]]*//p' | head -1 || true)"
CPU_FLAGS="$(lscpu 2>/dev/null | sed -n 's/^Flags:[[:space:]]*//p' | tr ' ' '\n' |
  grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|avx512_fp16|amx_tile|amx_bf16|amx_int8)$' |
  tr '\n' ' ' || true)"
echo "CPU: ${CPU_MODEL:-unknown} (family ${CPU_FAMILY:-?}, model ${CPU_MODEL_NO:-?}); flags: ${CPU_FLAGS:-none of the listed}"
echo "cores: $(nproc), threads: $THREADS (0 = all), dtype: $DTYPE, sizes: $SIZES, frames: $FRAMES, warm-up: $WARMUP"
echo "model: $MODEL"
echo "ControlNet: $CONTROLNET"

SIZES_CSV="$(echo "$SIZES" | tr ' ' ',' | sed 's/,,*/,/g; s/^,//; s/,$//')"
TWO_STEPS="--img2img-t-index 32,45 --txt2img-t-index 0,16"
# name | bench arguments
CONFIGS=(
  "none|"
  "cn1|--controlnet $CONTROLNET"
  "cn2|--controlnet $CONTROLNET --controlnet $CONTROLNET"
  "cn1_every2|--controlnet $CONTROLNET --controlnet-every 2"
  "cn1_every4|--controlnet $CONTROLNET --controlnet-every 4"
  "none_2steps|$TWO_STEPS"
  "cn1_2steps|$TWO_STEPS --controlnet $CONTROLNET"
  "cn1_2steps_first|$TWO_STEPS --controlnet $CONTROLNET --control-guidance-end 0.5"
  "cn1_2steps_second|$TWO_STEPS --controlnet $CONTROLNET --control-guidance-start 0.5"
)
for c in "${CONFIGS[@]}"; do
  name="${c%%|*}"
  args="${c#*|}"
  echo
  echo "=== $name: bench $args"
  # shellcheck disable=SC2086  # the ControlNet arguments split on purpose (cache paths have no spaces)
  "$SD" bench --model "$MODEL" --sections e2e --sizes "$SIZES_CSV" --dtypes "$DTYPE" --threads "$THREADS" \
    --frames "$FRAMES" --warmup "$WARMUP" $args --json "$OUT/$name.json" | tee "$OUT/$name.log"
done

python3 - "$OUT" "$CPU_MODEL" "$CPU_FAMILY" "$CPU_MODEL_NO" "$CPU_FLAGS" "$MODEL" "$CONTROLNET" <<'EOF'
import json, os, sys
out, cpu_model, family, model_no, flags, model, controlnet = sys.argv[1:8]
names = ["none", "cn1", "cn2", "cn1_every2", "cn1_every4",
         "none_2steps", "cn1_2steps", "cn1_2steps_first", "cn1_2steps_second"]
labels = {"none": "no ControlNet", "cn1": "1 ControlNet", "cn2": "2 ControlNets",
          "cn1_every2": "1 ControlNet, every 2", "cn1_every4": "1 ControlNet, every 4",
          "none_2steps": "2 steps, no ControlNet", "cn1_2steps": "2 steps, 1 ControlNet",
          "cn1_2steps_first": "2 steps, CN steps 0..0.5", "cn1_2steps_second": "2 steps, CN steps 0.5..1"}
# each row's time ratio is to the no-ControlNet run at the same number of steps
steps = {n: 2 if n.endswith(("2steps", "_first", "_second")) else 1 for n in names}
runs = {n: json.load(open(os.path.join(out, n + ".json"))) for n in names}
rows = []
for n in names:
    for r in runs[n]["results"]:
        if r["section"] != "e2e":
            continue
        e = r.get("extra", {})
        rows.append({"config": n, "label": labels[n], "steps": steps[n], "mode": r["name"], "size": r["size"],
                     "dtype": r["dtype"], "control_guidance": runs[n].get("control_guidance"),
                     "s_per_frame": r["mean_s"], "median_s": r["median_s"], "frames": r["iters"],
                     "controlnets": e.get("controlnets", 0), "controlnet_every": e.get("controlnet_every", 1),
                     "controlnet_calls": e.get("controlnet_calls", 0),
                     "controlnet_reused": e.get("controlnet_reused", 0),
                     "per_frame_s": e.get("per_frame_s", {})})
base = {(r["mode"], r["size"], r["dtype"], r["steps"]): r["s_per_frame"] for r in rows
        if r["config"] in ("none", "none_2steps")}
for r in rows:
    b = base.get((r["mode"], r["size"], r["dtype"], r["steps"]))
    r["fps"] = 1.0 / r["s_per_frame"] if r["s_per_frame"] > 0 else 0.0
    r["time_vs_none"] = r["s_per_frame"] / b if b else None
    r["fps_vs_none"] = b / r["s_per_frame"] if b and r["s_per_frame"] > 0 else None
print()
print(f"CPU: {cpu_model or 'unknown'} (family {family or '?'}, model {model_no or '?'}); flags: {flags.strip() or '-'}")
print(f"threads {runs['none']['threads']}, libtorch {runs['none']['libtorch']}, SIMD {runs['none']['cpu_simd']}")
print(f"model {model}\nControlNet {controlnet}")
print("s/frame = mean over the timed frames (the amortised cost with --controlnet-every); time x and fps x are to "
      "the no-ControlNet run at the same steps")
print()
hdr = f"{'mode':8} {'size':>5} {'dtype':6} {'configuration':26} {'s/frame':>9} {'fps':>8} {'time x':>7} {'fps x':>7} {'CN s/frame':>11}"
print(hdr)
print("-" * len(hdr))
for key in sorted({(r["mode"], r["size"], r["dtype"]) for r in rows}):
    for r in [x for x in rows if (x["mode"], x["size"], x["dtype"]) == key]:
        tv = f"{r['time_vs_none']:.2f}" if r["time_vs_none"] else "-"
        fv = f"{r['fps_vs_none']:.2f}" if r["fps_vs_none"] else "-"
        cn = r["per_frame_s"].get("controlnet", 0.0)
        print(f"{r['mode']:8} {r['size']:>5} {r['dtype']:6} {r['label']:26} {r['s_per_frame']:>9.4f} "
              f"{r['fps']:>8.3f} {tv:>7} {fv:>7} {cn:>11.4f}")
    print()
summary = {"schema": "streamdiffusion-bench-controlnet/1",
           "cpu": {"model_name": cpu_model, "family": family, "model": model_no, "flags": flags.split()},
           "threads": runs["none"]["threads"], "libtorch": runs["none"]["libtorch"],
           "cpu_simd": runs["none"]["cpu_simd"], "model": model, "controlnet": controlnet,
           "runs": {n: n + ".json" for n in names}, "rows": rows}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"wrote {os.path.join(out, 'summary.json')} (and one bench JSON + log per configuration)")
EOF
