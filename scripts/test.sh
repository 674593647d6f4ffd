#!/usr/bin/env bash
# Installs dependencies (Debian packages), builds everything and runs the whole test suite with CTest.
# Fixtures: $SD_FIXTURES, default ../shared/fixtures next to the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
# Paths relative to the checkout, so a fresh clone elsewhere still hits the cache.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD_DIR" -j "$(nproc)"
# The libtorch 2 build (PyPI's wheel, int8 kernels) kept compiling and its model tests passing; before the main
# suite, so CTest's summary stays the last line.
if [ "${SD_SKIP_LIBTORCH2:-0}" != 1 ]; then bash scripts/test-libtorch2.sh; fi
# Every libFuzzer target for ~10 s (clang, ASan + UBSan; build-fuzz, docs/FUZZING.md); SD_SKIP_FUZZ=1 skips it.
if [ "${SD_SKIP_FUZZ:-0}" != 1 ]; then bash scripts/fuzz.sh all 10s; fi
cd "$BUILD_DIR"
ctest --output-on-failure -j "$(nproc)" --timeout 900
