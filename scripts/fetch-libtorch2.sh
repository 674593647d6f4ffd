#!/usr/bin/env bash
# Lays out PyPI's libtorch 2.x for the CPU build: scripts/fetch-libtorch2.sh [DEST] prints DEST.
#
# PyPI's Linux torch wheel is the CUDA one, and there is no libtorch zip on PyPI. Its CPU half is complete by itself:
# libtorch_cpu.so + libc10.so (+ the libgomp it was built with), whose only CUDA needs are the profiler's
# libcudart/libcupti sonames (loaded, never called without a GPU). So this downloads the wheel (~540 MB, once),
# keeps include/, share/cmake and the CPU libraries (~560 MB unpacked), adds libcudart + libcupti from NVIDIA's
# small runtime wheels next to them (libtorch_cpu's RPATH has $ORIGIN), and leaves out libtorch.so / libtorch_cuda*.so
# so that `-DSD_TORCH_DIR=DEST/torch` links the CPU backend alone (libtorch.so: a stand-in over libtorch_cpu, below). The wheel's C++ ABI is read from libc10.so.
#   cmake -S . -B build-t2 -G Ninja -DSD_TORCH_DIR="$(scripts/fetch-libtorch2.sh)/torch"
# SD_TORCH2_VERSION (default below) picks the wheel; DEST defaults to ~/.cache/streamdiffusion/libtorch-$VERSION.
set -euo pipefail
VERSION="${SD_TORCH2_VERSION:-2.15.0}"
DEST="${1:-$HOME/.cache/streamdiffusion/libtorch-$VERSION}"
say() { echo "fetch-libtorch2: $*" >&2; }
# PyTorch's libtorch.so is a thin library over libtorch_cpu.so and libtorch_cuda.so. The CPU half gets a stand-in of
# that name over libtorch_cpu.so alone (linked by the build, so loaded with it): AOTInductor's compiled packages
# (--compiled-unet) name libtorch.so, which would otherwise resolve to another libtorch on the system (Debian's 1.13).
stub_libtorch() {
  [ -f "$DEST/torch/lib/libtorch.so" ] && return 0
  printf '' | "${CC:-cc}" -shared -x c - -o "$DEST/torch/lib/libtorch.so" -Wl,-soname,libtorch.so -Wl,--no-as-needed \
    -L"$DEST/torch/lib" -ltorch_cpu -lc10 -Wl,-rpath,'$ORIGIN' ||
    { say "could not make the libtorch.so stand-in in $DEST/torch/lib"; exit 1; }
}
if [ -f "$DEST/.complete" ]; then
  stub_libtorch
  echo "$DEST"
  exit 0
fi
DL="$DEST/download"
mkdir -p "$DL"
PIP=(python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_25_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --python-version 3.11
  --implementation cp -d "$DL" --quiet)
if ! ls "$DL"/torch-"$VERSION"-*.whl >/dev/null 2>&1; then
  say "downloading torch $VERSION (the wheel is ~540 MB)"
  "${PIP[@]}" "torch==$VERSION"
fi
WHEEL="$(ls "$DL"/torch-"$VERSION"-*.whl | head -1)"
rm -rf "$DEST/torch"
# Only what a C++ build reads: headers, CMake configs, libraries (not the Python sources or libtorch_python).
python3 - "$WHEEL" "$DEST" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
keep = ("torch/include/", "torch/share/cmake/", "torch/lib/libtorch_cpu.so", "torch/lib/libc10.so",
        "torch/lib/libgomp", "torch/lib/libgfortran", "torch/version.py")
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(keep)]
    meta = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    z.extractall(dest, names + meta)
EOF
# The wheel's include/ also carries the third-party headers it was built with. fmt 12 there would shadow Debian's
# fmt 9, which Debian's spdlog and libfmt.so were built against (spdlog 1.10 does not compile against fmt 12, and
# mixing the two would break the ABI); libtorch's own headers on our include path compile against either. pybind11:
# the Python module is built against Debian's.
rm -rf "$DEST/torch/include/fmt" "$DEST/torch/include/pybind11"
# The CUDA runtime pieces libtorch_cpu.so names (DT_NEEDED), at the versions the wheel pins.
NEEDED="$(readelf -d "$DEST/torch/lib/libtorch_cpu.so" | sed -n 's/.*Shared library: \[\(libcu[a-z]*\.so[.0-9]*\)\].*/\1/p')"
if [ -n "$NEEDED" ]; then
  TOOLKIT="$(sed -n 's/^Requires-Dist: cuda-toolkit\[[^]]*\]==\([0-9.]*\).*/\1/p' "$DEST"/torch-*.dist-info/METADATA | head -1)"
  PKGS=()
  if [ -n "$TOOLKIT" ]; then
    # cuda-toolkit is a meta package: its extras name nvidia-cuda-runtime / -cupti at the matching version.
    "${PIP[@]}" "cuda-toolkit==$TOOLKIT"
    TK="$(ls "$DL"/cuda_toolkit-"$TOOLKIT"-*.whl | head -1)"
    for p in nvidia-cuda-runtime nvidia-cuda-cupti; do
      V="$(unzip -p "$TK" '*.dist-info/METADATA' | sed -n "s/^Requires-Dist: $p==\([0-9.]*\)\.\*.*/\1/p" | head -1)"
      [ -n "$V" ] && PKGS+=("$p==$V.*")
    done
  else
    # Older wheels (CUDA 12) pin the nvidia-*-cu12 packages directly.
    while read -r req; do PKGS+=("$req"); done < <(sed -n \
      's/^Requires-Dist: \(nvidia-cuda-\(runtime\|cupti\)-cu[0-9]*==[0-9.]*\).*/\1/p' "$DEST"/torch-*.dist-info/METADATA)
  fi
  [ ${#PKGS[@]} -gt 0 ] || { say "cannot tell which CUDA runtime wheels torch $VERSION needs"; exit 1; }
  "${PIP[@]}" "${PKGS[@]}"
  for w in "$DL"/nvidia_cuda_runtime*.whl "$DL"/nvidia_cuda_cupti*.whl; do
    python3 - "$w" "$DEST/torch/lib" <<'EOF'
import os, sys, zipfile
wheel, lib = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if base.startswith(("libcudart.so", "libcupti.so")):
            with z.open(n) as src, open(os.path.join(lib, base), "wb") as dst:
                dst.write(src.read())
EOF
  done
  for so in $NEEDED; do
    [ -f "$DEST/torch/lib/$so" ] || { say "$so (needed by libtorch_cpu.so) is not in the runtime wheels"; exit 1; }
  done
fi
ABI="$(if [ "$(nm -D --defined-only "$DEST/torch/lib/libc10.so" | grep -c __cxx11)" -gt 0 ]; then echo 1; else echo 0; fi)"
echo "${ABI:-1}" > "$DEST/torch/cxx11_abi"
stub_libtorch
touch "$DEST/.complete"
say "libtorch $VERSION (CPU, C++11 ABI ${ABI:-1}) in $DEST/torch ($(du -sh "$DEST/torch" | cut -f1)); the download can go: $DL"
echo "$DEST"
