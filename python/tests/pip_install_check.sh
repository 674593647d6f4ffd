#!/usr/bin/env bash
# `pip install .` into a fresh virtual environment (with the system site packages: Debian's numpy / torch), then
# `python -c "import streamdiffusion_cpp"` from outside the source tree. scikit-build-core comes from PyPI; without
# PyPI the check is skipped (exit 77, CTest SKIP_RETURN_CODE) with a message. The build reuses ccache
# (CCACHE_BASEDIR = the repository) and build-py/ (pyproject.toml), so a rerun compiles little.
set -euo pipefail
PY="${1:-python3}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO"
if ! "$PY" - <<'PYEOF'
import sys, urllib.request
try:
    urllib.request.urlopen("https://pypi.org/simple/scikit-build-core/", timeout=10).read(1)
except Exception as e:
    print(f"pip_install_check: PyPI unreachable ({e}); skipping", file=sys.stderr)
    sys.exit(1)
PYEOF
then
  exit 77
fi
VENV="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
"$PY" -m venv --system-site-packages "$VENV"
export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/ccache}"
export CCACHE_BASEDIR="$REPO"
# The compiler CMake picks by default (c++): scikit-build-core would otherwise take Python's sysconfig CXX
# (x86_64-linux-gnu-g++, the same GCC under another name), and ccache keys on the compiler's name.
export CXX="${CXX:-c++}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "pip_install_check: pip install . into $VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q . 2>&1 | tail -20
cd "$(dirname "$VENV")"   # outside the source tree: the installed package, not python/ in the checkout
"$VENV/bin/python" - <<'PYEOF'
import os, streamdiffusion_cpp as sd
assert "site-packages" in sd.__file__, sd.__file__
print("imported", sd.__file__, "version", sd.__version__, "runtime", sd.HAVE_RUNTIME)
print("default model", sd.default_model_dir())
cfg = sd.resolve_config(None, "txt2img")
assert (cfg.width, cfg.height) == (64, 64), cfg
m = sd.load_pipeline(None, threads=1)
s = sd.Stream(m, cfg)
s.prepare("red apple")
out = s.txt2img()
assert out.shape == (1, 3, 64, 64), out.shape
print("installed package runs the built-in model:", out)
PYEOF
