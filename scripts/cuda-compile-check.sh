#!/usr/bin/env bash
# The CUDA variant kept compiling on a machine without a GPU: builds the engine (its libraries, the CLI and the test
# programs with the CUDA-only code: CUDA graphs, the device goldens) against PyPI's CUDA torch wheel, and links it.
# Nothing runs (there is no GPU); scripts/gpu-check.sh runs it on a lent GPU host.
#
# The wheel is the one scripts/fetch-libtorch2.sh downloads for the libtorch 2 CPU build (PyPI's Linux torch wheel is
# the CUDA one), so CI downloads nothing more than NVIDIA's small runtime wheel it also fetched. This unpacks the
# CUDA half next to the CPU half (libtorch.so, libtorch_cuda.so, libc10_cuda.so) and the CUDA runtime headers
# (nvidia/cu13/include from that runtime wheel and the ~130 KB nvidia-cuda-crt wheel) into ~/.cache/streamdiffusion/libtorch-cuda-$VERSION (~1.1 GB), then
# configures build-cuda with -DSD_TORCH_DIR (SD_WITH_CUDA on) and builds. The CUDA libraries that libtorch_cuda.so
# needs at run time (cuBLAS, cuDNN, ...) are not downloaded (libcudart is: our code calls it): the link allows their symbols to stay unresolved
# (-Wl,--allow-shlib-undefined); every symbol of ours and of libtorch's is still resolved.
# Called by .ci/run after the README's test command; SD_SKIP_CUDA_CHECK=1 skips it there.
# Environment: BUILD_DIR_CUDA (default build-cuda), SD_TORCH2_VERSION (as fetch-libtorch2.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${SD_TORCH2_VERSION:-2.15.0}"
BUILD_DIR="${BUILD_DIR_CUDA:-build-cuda}"
DEST="$HOME/.cache/streamdiffusion/libtorch-cuda-$VERSION"
say() { echo "cuda-compile-check: $*" >&2; }
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"

T2="$(bash scripts/fetch-libtorch2.sh)"
DL="$T2/download"
if [ ! -f "$DEST/.complete" ]; then
  WHEEL="$(ls "$DL"/torch-"$VERSION"-*.whl 2>/dev/null | head -1)"
  RUNTIME="$(ls "$DL"/nvidia_cuda_runtime*.whl 2>/dev/null | head -1)"
  [ -n "$WHEEL" ] && [ -n "$RUNTIME" ] || { say "the torch / CUDA runtime wheels are not in $DL"; exit 1; }
  # cuda_runtime.h includes crt/host_config.h, which NVIDIA ships apart (nvidia-cuda-crt, ~130 KB) at the runtime's
  # version; CUDA 12 wheels keep it in nvidia-cuda-nvcc-cu12.
  RV="$(basename "$RUNTIME" | sed -n 's/^nvidia_cuda_runtime[a-z0-9_]*-\([0-9.]*\)-.*/\1/p')"
  if ! ls "$DL"/nvidia_cuda_crt-"$RV"-*.whl "$DL"/nvidia_cuda_nvcc*-"$RV"-*.whl >/dev/null 2>&1; then
    PIP=(python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --python-version 3.11 --implementation cp -d "$DL" --quiet)
    "${PIP[@]}" "nvidia-cuda-crt==$RV" 2>/dev/null || "${PIP[@]}" "nvidia-cuda-nvcc-cu12==$RV" ||
      { say "could not download the CUDA crt headers (nvidia-cuda-crt / nvidia-cuda-nvcc-cu12 $RV)"; exit 1; }
  fi
  CRT="$(ls "$DL"/nvidia_cuda_crt-"$RV"-*.whl "$DL"/nvidia_cuda_nvcc*-"$RV"-*.whl 2>/dev/null | head -1 || true)"
  rm -rf "$DEST"
  mkdir -p "$DEST"
  say "unpacking the CUDA half of $(basename "$WHEEL") and the CUDA runtime headers into $DEST"
  python3 - "$WHEEL" "$DEST" "$RUNTIME" "$CRT" <<'EOF'
import sys, zipfile
wheel, dest, headers = sys.argv[1], sys.argv[2], sys.argv[3:]
keep = ("torch/include/", "torch/share/cmake/", "torch/version.py", "torch/lib/libtorch.so", "torch/lib/libtorch_cpu.so",
        "torch/lib/libtorch_cuda.so", "torch/lib/libc10.so", "torch/lib/libc10_cuda.so", "torch/lib/libgomp",
        "torch/lib/libgfortran", "torch/lib/libtorch_cuda_linalg.so", "torch/lib/libtorch_nvshmem.so",
        "torch/lib/libcaffe2_nvrtc.so")
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith(keep)])
for h in headers:
    # nvidia/cu13/include (CUDA 13 wheels) or nvidia/cuda_runtime/include (CUDA 12): beside torch/, where CMake looks.
    with zipfile.ZipFile(h) as z:
        z.extractall(dest, [n for n in z.namelist() if "/include/" in n or "/lib/libcudart.so" in n])
EOF
  # As fetch-libtorch2.sh: the wheel's fmt 12 would shadow Debian's fmt 9 (spdlog); pybind11 is not built here.
  rm -rf "$DEST/torch/include/fmt" "$DEST/torch/include/pybind11"
  cp "$T2/torch/cxx11_abi" "$DEST/torch/cxx11_abi"
  touch "$DEST/.complete"
fi
say "libtorch $VERSION with CUDA in $DEST/torch ($(du -sh "$DEST" | cut -f1))"
mkdir -p "$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSD_TORCH_DIR="$DEST/torch" -DSD_BUILD_PYTHON=OFF \
  -DSD_ENGINE_ONLY=ON "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" > "$BUILD_DIR/sd-configure.log" 2>&1 ||
  { cat "$BUILD_DIR/sd-configure.log"; exit 1; }
grep "streamdiffusion: libtorch" "$BUILD_DIR/sd-configure.log"
grep -q "CUDA ON" "$BUILD_DIR/sd-configure.log" || { say "the configuration did not see CUDA"; exit 1; }
cmake --build "$BUILD_DIR" -j "$(nproc)" --target streamdiffusion test_device
# What was built is CUDA code: the CLI links libtorch_cuda and ours calls into at::cuda (the CUDA graphs).
# (Whole outputs into variables: `cmd | grep -q` under pipefail fails when grep stops reading early.)
NEEDED_LIBS="$(readelf -d "$BUILD_DIR/apps/streamdiffusion")"
grep -q "libtorch_cuda.so" <<<"$NEEDED_LIBS" || { say "the CLI does not link libtorch_cuda.so"; exit 1; }
SYMBOLS="$(nm -C "$BUILD_DIR/apps/streamdiffusion")"
grep -q "at::cuda::CUDAGraph::replay" <<<"$SYMBOLS" ||
  { say "the CLI has no CUDA graph code (SD_WITH_CUDA not in effect?)"; exit 1; }
echo "CUDA compile check: OK (streamdiffusion and test_device compiled and linked against libtorch $VERSION with CUDA)"
