#!/usr/bin/env bash
# Run HERE (a host that reaches PyPI) before a GPU device run that measures the original StreamDiffusion side by side
# (scripts/gpu-peer-check.sh on the GPU host). Downloads the wheels the GPU host lacks into .whl-peer/ (git-ignored;
# the device run names it in `carry`) and prints their total size. Idempotent: a wheel already there is kept, a wheel
# of a version no longer listed is removed (two versions of one package would stop the install there).
#
# The GPU host (no registry; Python 3.12, torch 2.11 + CUDA 13, numpy 2, transformers 5, huggingface_hub 1.x,
# tokenizers 0.23, accelerate 1.15, safetensors 0.8) keeps its own torch, numpy, safetensors, accelerate, PIL, regex,
# requests, filelock, fsspec, packaging, pyyaml, tqdm; these shadow its newer ones through PYTHONPATH:
#   streamdiffusion 0.1.1   the original (pure Python; its core imports only torch, numpy, PIL and diffusers)
#   diffusers 0.24.0        what streamdiffusion 0.1.1 pins
#   huggingface_hub 0.25.2  diffusers 0.24 imports huggingface_hub.cached_download (removed in 0.26)
#   transformers 4.46.3     diffusers 0.24 predates transformers 5; 4.44+ accepts numpy 2 (4.42 pins numpy<2) and
#                           runs on torch 2.x; needs huggingface_hub>=0.23.2,<1.0 and tokenizers>=0.20,<0.21
#   tokenizers 0.20.3       the cp312 manylinux wheel transformers 4.46 checks its version of at import
# Usage: scripts/gpu-peer-prepare.sh [DEST]   (default .whl-peer)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl-peer}"
WHEELS=(streamdiffusion==0.1.1 diffusers==0.24.0 huggingface_hub==0.25.2 transformers==4.46.3 tokenizers==0.20.3)
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
keep=()
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  stem="$(echo "$name" | tr '[:upper:]-' '[:lower:]_')-$ver-"
  if ! ls "$DEST/$stem"*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$DEST" "$spec" ||
      { echo "gpu-peer-prepare: could not download $spec" >&2; exit 1; }
  fi
  f="$(ls "$DEST/$stem"*.whl 2>/dev/null | head -1)"
  [ -n "$f" ] || { echo "gpu-peer-prepare: no wheel for $spec in $DEST" >&2; exit 1; }
  keep+=("$(basename "$f")")
done
for f in "$DEST"/*.whl; do
  b="$(basename "$f")"
  printf '%s\n' "${keep[@]}" | grep -qxF "$b" || { echo "gpu-peer-prepare: removing $b (not listed)"; rm -f "$f"; }
done
for f in "${keep[@]}"; do printf '  %8d  %s\n' "$(stat -c %s "$DEST/$f")" "$f"; done
total=$(cat "$DEST"/*.whl | wc -c)
echo "gpu-peer-prepare: ${#keep[@]} wheels, $total bytes ($(du -sh "$DEST" | cut -f1)) in $DEST (carry \"$DEST\")"
