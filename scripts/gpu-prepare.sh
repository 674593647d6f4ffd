#!/usr/bin/env bash
# Run HERE (a Debian host with a package registry) before a GPU device run. The lent GPU host has no registry and no
# internet, only Python's PyTorch (its libtorch + CMake config), a compiler and CMake. This downloads the few Debian
# packages an engine-only build (-DSD_ENGINE_ONLY=ON) needs beyond libtorch with `apt-get download` and unpacks them
# (dpkg-deb -x) into .gpu-deps/root (git-ignored), which travels with the device run (`carry: [".gpu-deps"]`,
# 64 MiB limit). Everything is used header-only or statically, so no C++ library compiled against another ABI is
# linked (PyTorch wheels may use _GLIBCXX_USE_CXX11_ABI=0):
#   nlohmann-json3-dev, libcli11-dev           header-only
#   libspdlog-dev + libfmt-dev                 used header-only (SD_HEADER_ONLY_DEPS: SPDLOG_FMT_EXTERNAL, FMT_HEADER_ONLY)
#   libpcre2-dev                               the static libpcre2-8.a + pcre2.h (C, no C++ ABI)
#   googletest                                 GoogleTest sources, built in-tree with libtorch's flags (SD_GTEST_SOURCE_DIR)
#   ninja-build                                the ninja binary (the host may only have make)
# and copies the fixtures the device tests read ($SD_FIXTURES, default ../shared/fixtures: models/, modules/ and
# the tiny ControlNet, ~26 MB; the whole folder would not fit the 64 MiB a device run carries) into
# .gpu-deps/fixtures.
# Usage: scripts/gpu-prepare.sh [DEST]   (default .gpu-deps; idempotent: re-downloads only what is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.gpu-deps}"
PKGS=(nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev libpcre2-dev googletest ninja-build)
mkdir -p "$DEST/debs"
(
  cd "$DEST/debs"
  for p in "${PKGS[@]}"; do
    if ! ls "${p}"_*.deb >/dev/null 2>&1; then
      # apt-get download runs as _apt when it can; a root-owned folder only costs a warning.
      apt-get download "$p" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true
    fi
    ls "${p}"_*.deb >/dev/null 2>&1 || { echo "gpu-prepare: could not download $p" >&2; exit 1; }
  done
)
rm -rf "$DEST/root"
mkdir -p "$DEST/root"
for deb in "$DEST"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST/root"; done
R="$DEST/root/usr"
# Only what the build reads: headers, CMake configs, the static PCRE2, GoogleTest sources, ninja.
rm -rf "$R/share/doc" "$R/share/man" "$R/share/lintian" "$R/share/bug"
find "$R/lib" -name 'libpcre2-16*' -o -name 'libpcre2-32*' -o -name 'libpcre2-posix*' | xargs rm -f
# pkg-config files would point at /usr; the engine-only build searches pcre2.h / libpcre2-8.a directly instead.
rm -rf "$R/lib/x86_64-linux-gnu/pkgconfig"
# The .so symlinks point at runtime packages we do not ship: drop them so the static archives are found.
find "$R/lib" -name '*.so' -type l -delete
test -f "$R/include/nlohmann/json.hpp" && test -f "$R/include/CLI/CLI.hpp" && test -f "$R/include/spdlog/spdlog.h" &&
  test -f "$R/include/fmt/format.h" && test -f "$R/include/pcre2.h" && test -f "$R/lib/x86_64-linux-gnu/libpcre2-8.a" &&
  test -f "$R/src/googletest/CMakeLists.txt" && test -x "$R/bin/ninja" ||
  { echo "gpu-prepare: unpacked tree is incomplete under $R" >&2; exit 1; }
# The golden fixtures (../shared/fixtures is outside the repository, so it does not travel with the working tree).
FIX="${SD_FIXTURES:-../shared/fixtures}"
if [ -d "$FIX/models" ]; then
  rm -rf "$DEST/fixtures"
  mkdir -p "$DEST/fixtures"
  cp -r "$FIX/models" "$FIX/modules" "$DEST/fixtures/"
  # The tiny ControlNet and its control images (~2 MB) for the guidance range test on the device.
  if [ -d "$FIX/controlnet/models/tiny-controlnet-sd15" ]; then
    mkdir -p "$DEST/fixtures/controlnet/models"
    cp -r "$FIX/controlnet/models/tiny-controlnet-sd15" "$DEST/fixtures/controlnet/models/"
    cp "$FIX/controlnet/control_images.safetensors" "$DEST/fixtures/controlnet/"
  else
    echo "gpu-prepare: no tiny ControlNet under $FIX/controlnet: DeviceControlNet.* will skip on the GPU host" >&2
  fi
  chmod -R u+w "$DEST/fixtures"
else
  echo "gpu-prepare: no fixtures at $FIX (set SD_FIXTURES): the GPU host will have no golden tests" >&2
fi
echo "gpu-prepare: $(du -sh "$DEST" | cut -f1) in $DEST (fixtures $(du -sh "$DEST/fixtures" 2>/dev/null | cut -f1))"
echo "gpu-prepare: $(du -sh "$DEST/root" | cut -f1) in $DEST/root (carry \"$DEST\"; the .deb files under $DEST/debs"
echo "             may be deleted to save carry space: $(du -sh "$DEST/debs" | cut -f1))"
