#!/usr/bin/env bash
# The test suite under the sanitizers (SD_SANITIZE, see the README): a by-hand / nightly check, not part of
# scripts/test.sh (an instrumented build plus the slowed-down suite is far over CI's budget).
#   scripts/test-sanitizers.sh address   ASan + UBSan (SD_SANITIZE=address,undefined) in build-asan: the whole suite
#   scripts/test-sanitizers.sh thread    TSan in build-tsan: the runtime and server tests (the threaded code) and the
#                                        tokenizer's concurrent-use test
# The sanitizer options and suppression files (tests/sanitizers/) are set on the tests by CMake, so a plain `ctest`
# in either build folder does the same. Extra arguments go to ctest (e.g. -R ServerLoopback).
# Environment: JOBS (default: nproc), SD_FIXTURES (default ../shared/fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-address}"; shift || true
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$PWD}"
JOBS="${JOBS:-$(nproc)}"
case "$MODE" in
  address) BUILD_DIR="${BUILD_DIR:-build-asan}"; SANITIZE=address,undefined ;;
  thread) BUILD_DIR="${BUILD_DIR:-build-tsan}"; SANITIZE=thread ;;
  *) echo "usage: $0 [address|thread] [ctest arguments]" >&2; exit 2 ;;
esac
# -O1 -g1: line tables for symbolised reports with less compile work than -O2 -g, and code fast enough for the
# suite's timeouts (the heavy lifting is in uninstrumented libtorch anyway).
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
  -DSD_SANITIZE="$SANITIZE"
if [ "$MODE" = address ]; then
  cmake --build "$BUILD_DIR" -j "$JOBS"
  cd "$BUILD_DIR"
  ctest --output-on-failure -j "$JOBS" --timeout 1800 "$@"
else
  # The threaded code: the stream runtime (stage threads, control channel), the server (Asio threads, model worker,
  # sessions) and the CLI's `stream` / `serve` the tests start; the tokenizer's cache is shared across threads.
  cmake --build "$BUILD_DIR" -j "$JOBS" --target test_runtime test_server test_tokenizer streamdiffusion
  cd "$BUILD_DIR"
  ctest --output-on-failure -j "$JOBS" --timeout 1800 -L '^(runtime|server|tokenizer)$' "$@"
fi
