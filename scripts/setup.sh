#!/usr/bin/env bash
# Installs every Debian package the build, tests and demos need. Idempotent, non-interactive.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libtorch-dev libopenblas0-pthread
  libopencv-dev libboost-dev libboost-system-dev libx11-dev libxext-dev
  libcli11-dev nlohmann-json3-dev libspdlog-dev libfmt-dev libpcre2-dev
  # Settings files (--config FILE.yaml) and OSC control (--control osc://...); liblo-tools' oscsend drives the OSC tests.
  libyaml-cpp-dev liblo-dev liblo-tools
  libgtest-dev libgmock-dev libbenchmark-dev
  # The libFuzzer targets (scripts/fuzz.sh, tests/fuzz): clang and its fuzzer / sanitizer runtimes.
  clang-14 libclang-rt-14-dev
  chromium nodejs
  # The fleet test (tests/fleet, scripts/fleet.sh): Debian's nginx, started by the test as a plain process on loopback.
  nginx-light
  # The Python package (python/, streamdiffusion_cpp): pybind11 + Python headers to build it; pytest, numpy, Pillow
  # and torch for its tests and the DLPack round trips. Debian's python3-torch is the same libtorch 1.13 build the
  # engine links (one libtorch in the process, same ABI); venv + pip for the `pip install .` check.
  pybind11-dev python3-dev python3-pytest python3-numpy python3-pil python3-torch python3-venv python3-pip
)
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all packages present"
fi

# The browser test of `serve` (tests/web): npm (unless node came with its own) and playwright-core from the lock
# file. It drives Debian's chromium; playwright downloads no browser.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing npm"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends npm
fi
WEB_TESTS="$(cd "$(dirname "$0")/.." && pwd)/tests/web"
if [ -f "$WEB_TESTS/package-lock.json" ] && { [ ! -d "$WEB_TESTS/node_modules/playwright-core" ] ||
     [ "$WEB_TESTS/package-lock.json" -nt "$WEB_TESTS/node_modules/.package-lock.json" ]; }; then
  echo "setup: npm ci in tests/web"
  (cd "$WEB_TESTS" && npm ci --no-audit --no-fund --loglevel=error)
fi
# The emoji data (training data of models/emoji-tiny, and what tests/train compares generated images with):
# npm packages installed into a cache folder outside the repository (scripts/fetch-emoji-data.sh). Not fatal: the
# emoji tests skip without it. SKIP_EMOJI_DATA=1 skips this step.
if [ -z "${SKIP_EMOJI_DATA:-}" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: installing npm (for the emoji data)"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends npm; } ||
      echo "setup: npm could not be installed; the emoji data is not fetched"
  fi
  bash "$(dirname "$0")/fetch-emoji-data.sh" >/dev/null || echo "setup: emoji data not fetched (the emoji tests will skip)"
fi
