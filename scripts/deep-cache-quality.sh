#!/usr/bin/env bash
# Error of the deep-feature reuse (--deep-cache-every K) against the exact stream, on a moving picture: the built-in
# emoji model draws an emoji (txt2img), which then slides and turns slowly across N frames (a 2-pixel step, 1.5
# degrees per frame); `stream` img2img runs on those frames exactly and with K = 2, 3, 4, and each output frame is
# compared with the exact stream's (PSNR in dB and relative L2 over all frames), with the share of shallow UNet calls.
# Usage: scripts/deep-cache-quality.sh [--bin PATH] [--frames N] [--prompt TEXT] [--out DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${SD_BIN:-$here/build/apps/streamdiffusion}
frames=48 prompt="red apple" out=$(mktemp -d /tmp/deep-cache-quality.XXXXXX)
while [[ $# -gt 0 ]]; do
  case $1 in
    --bin) bin=$2 ;; --frames) frames=$2 ;; --prompt) prompt=$2 ;; --out) out=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
mkdir -p "$out/in"
"$bin" txt2img --prompt "$prompt" -o "$out/still.png" --threads 2 >/dev/null 2>&1
# Debian's python3 with python3-pil / python3-numpy (scripts/setup.sh installs them).
/usr/bin/python3 - "$out" "$frames" <<'PY'
import sys
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
img = Image.open(f"{out}/still.png").convert("RGB")
w, h = img.size
for k in range(n):
    moved = img.rotate(1.5 * k, resample=Image.BICUBIC, translate=(2 * k - n, 0), fillcolor=(255, 255, 255))
    moved.save(f"{out}/in/{k:04d}.png")
PY
run() {  # $1 = K
  "$bin" stream --input "$out/in" --output "$out/k$1" --control none --prompt "$prompt" --threads 2 \
    --status-interval 0 --deep-cache-every "$1" --stats-json "$out/k$1.json" >/dev/null 2>&1
}
for k in 1 2 3 4; do run "$k"; done
/usr/bin/python3 - "$out" "$frames" <<'PY'
import sys, json, glob
import numpy as np
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
def load(k):
    return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64)
                     for f in sorted(glob.glob(f"{out}/k{k}/*.png"))])
exact = load(1)
print(f"deep-cache quality: built-in emoji model, {n} moving frames ({out})")
print(f"{'K':>3} {'shallow UNet calls':>19} {'forced full':>12} {'PSNR dB':>9} {'rel-L2':>8} {'worst frame PSNR':>17}")
for k in (2, 3, 4):
    a = load(k)
    s = json.load(open(f"{out}/k{k}.json"))["pipeline"]
    mse = ((a - exact) ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse.mean(), 1e-12))
    worst = 10 * np.log10(255.0 ** 2 / np.maximum(mse.max(), 1e-12))
    rel = np.linalg.norm(a - exact) / np.linalg.norm(exact)
    print(f"{k:>3} {s['unet_shallow_calls']:>12} of {s['calls']:<4} {s['deep_cache_forced']:>12} {psnr:>9.2f} {rel:>8.4f} {worst:>17.2f}")
PY
