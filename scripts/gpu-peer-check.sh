#!/usr/bin/env bash
# The original StreamDiffusion (PyPI streamdiffusion 0.1.1, diffusers 0.24) on the GPU host, side by side with our
# bench: installs the wheels that scripts/gpu-peer-prepare.sh put in .whl-peer/ (carried) into $SDPEER_DIR (default
# /tmp/sdpeer, never over the host's own packages: they shadow them only through PYTHONPATH), prints the versions,
# then runs bench/peers/run_streamdiffusion.py on the model folder: txt2img (t_index 0) and img2img (t_index 35 of
# 50), 1 step, cfg none, TAESD, whole frames (warm-up, then --frames timed), into OUT_DIR/peer-streamdiffusion.json
# (the shape of `streamdiffusion bench --json`; the only file it writes there), its output on stdout (warnings and
# progress bars filtered out) and one summary line per row, starting with "peer " (grep "^peer " for the summary).
#   scripts/gpu-peer-check.sh MODEL_DIR OUT_DIR [--device cuda|cpu] [--dtype fp16] [--size 512] [--frames 20]
#                             [--warmup 3] [--threads N] [--timeout S]
# Defaults are the GPU run (cuda, fp16, 512 px, 20 frames, 3 warm-up); PEER_INSTALL_ONLY=1 stops after the install.
# On a machine without a GPU, e.g.
#   PYTHON=/path/to/python scripts/gpu-peer-check.sh ../shared/fixtures/models/tiny-sd21 /tmp/peer --device cpu \
#     --dtype fp32 --size 64 --frames 3 --warmup 1
# Never aborts its caller: every failure is printed, and the exit code says what happened (0 ok, 2 usage/no wheels,
# 3 install failed, 4 no row or a row not measured, 5 no Python 3.12 with torch here (PYTHON, default python3),
# 124 timeout, else the runner's own exit code). The run is bounded by --timeout (default 240 s).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; }
[ $# -ge 2 ] || { usage; exit 2; }
MODEL="$1"; OUTDIR="$2"; shift 2
DEVICE=cuda; DTYPE=fp16; SIZE=512; FRAMES=20; WARMUP=3; THREADS=0; TMO=240
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --frames) FRAMES="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --timeout) TMO="$2"; shift 2 ;;
    *) echo "gpu-peer-check: unknown option $1" >&2; usage; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
WHL="${WHL_PEER:-$ROOT/.whl-peer}"
SITE="${SDPEER_DIR:-/tmp/sdpeer}"
mkdir -p "$OUTDIR" || { echo "gpu-peer-check: cannot create $OUTDIR" >&2; exit 2; }
OUTDIR="$(cd "$OUTDIR" && pwd)"
JSON="$OUTDIR/peer-streamdiffusion.json"
say() { echo "[gpu-peer-check] $*"; }
START=$(date +%s)

if ! ls "$WHL"/*.whl >/dev/null 2>&1; then
  say "FAIL: no wheels in $WHL (run scripts/gpu-peer-prepare.sh here and carry .whl-peer)"; exit 2
fi
if [ ! -f "$MODEL/model_index.json" ] || [ ! -d "$MODEL/taesd" ]; then
  say "FAIL: $MODEL is not a diffusers folder with taesd/"; exit 2
fi
MODEL="$(cd "$MODEL" && pwd)"
# The wheels are for CPython 3.12 (tokenizers is cp312) and need the host's torch: elsewhere, say so and stop (rc 5).
if ! pyv="$("$PY" -c 'import sys, torch; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || [ "$pyv" != 3.12 ]; then
  say "not run: $PY is not a Python 3.12 with torch (${pyv:-no torch}); set PYTHON"; exit 5
fi

# 1. install (skipped when the same wheels are already installed there: a rerun on a warm machine)
stamp="$(cd "$WHL" && ls -l --time-style=+%s *.whl | awk '{print $5, $6, $7}' | md5sum | cut -c1-16)"
if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$SITE"
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$WHL"/*.whl > "$SITE.install.log" 2>&1; then
    say "FAIL: pip install of the carried wheels failed:"; tail -n 20 "$SITE.install.log"; exit 3
  fi
  echo "$stamp" > "$SITE/.installed"
fi
say "installed $(ls "$WHL"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - START )) s"
# PEER_INSTALL_ONLY=1: only the install (gpu-check's compiled-UNet step imports diffusers 0.24 from $SITE).
if [ "${PEER_INSTALL_ONLY:-0}" = 1 ]; then exit 0; fi
export PYTHONPATH="$SITE:$ROOT/bench/peers${PYTHONPATH:+:$PYTHONPATH}"
# HF_HOME inside $SITE: transformers 4.x would otherwise migrate the host's cache folder (written by hub 1.x).
export HF_HOME="$SITE/hf-home"
mkdir -p "$HF_HOME/hub" && echo 1 > "$HF_HOME/hub/version.txt"  # no cache migration message from transformers 4.x
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1

# 2. versions (which copy each import comes from: the carried ones must win over the host's)
"$PY" - <<'EOF' 2>&1 | sed 's/^/  /'
import importlib, importlib.metadata as md, sys, warnings
warnings.filterwarnings("ignore")
sys.modules.setdefault("peft", None)  # as run_streamdiffusion.py does (without --with-peft)
try:
    print(f"{'peft':16s} {md.version('peft'):14s} (installed on this host; hidden from diffusers)")
except md.PackageNotFoundError:
    pass
for n in ["streamdiffusion", "diffusers", "transformers", "huggingface_hub", "tokenizers", "accelerate",
          "safetensors", "numpy", "torch"]:
    try:
        m = importlib.import_module(n)
        print(f"{n:16s} {md.version(n):14s} {getattr(m, '__file__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"{n:16s} IMPORT FAILED: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# 3. the bench
rm -f "$JSON"
RUN=("$PY" "$ROOT/bench/peers/run_streamdiffusion.py" --model "$MODEL" --device "$DEVICE" --dtypes "$DTYPE"
     --sizes "$SIZE" --modes txt2img,img2img --txt2img-t-index 0 --img2img-t-index 35 --num-inference-steps 50
     --warmup "$WARMUP" --frames "$FRAMES" --threads "$THREADS" --json "$JSON")
[ "${DEVICE%%:*}" = cuda ] && RUN+=(--frame-on-device)
say "run: ${RUN[*]}"
T0=$(date +%s)
timeout "$TMO" "${RUN[@]}" 2>&1 | tr '\r' '\n' |
  grep --line-buffered -vE "^\s*$|FutureWarning|warnings.warn|_register_pytree_node|Loading pipeline components|Ignored unknown kwarg" |
  sed -u 's/^/  /'
rc=${PIPESTATUS[0]}
[ $rc -eq 124 ] && say "TIMEOUT after $TMO s"

# 4. one line per mode
"$PY" - "$JSON" <<'EOF'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"[gpu-peer-check] no result JSON: {e}"); sys.exit(4)
v = j.get("versions", {})
stack = f"streamdiffusion {v.get('streamdiffusion')}, diffusers {v.get('diffusers')}, torch {v.get('torch')}"
gpu = j.get("gpu", {}).get("name", j.get("device", "?"))
for r in j["results"]:
    x = r.get("extra", {})
    b2b = f", back-to-back {x['back_to_back_fps']:.1f} fps" if "back_to_back_fps" in x else ""
    print(f"peer streamdiffusion {r['name']:7s} {r['size']} px {r['dtype']} {r['variant']}: {r['fps']:.2f} fps "
          f"(median {r['median_s'] * 1e3:.2f} ms{b2b}; output finite {x.get('output_finite')}) on {gpu}; {stack}")
for s in j.get("skipped", []):
    print(f"peer streamdiffusion not measured: {s['variant']}: {s['reason']}")
sys.exit(0 if j["results"] and not j.get("skipped") else 4)
EOF
src=$?
[ $rc -eq 0 ] && rc=$src
say "done in $(( $(date +%s) - START )) s (bench $(( $(date +%s) - T0 )) s), rc $rc; $JSON"
exit $rc
