#!/usr/bin/env bash
# Run HERE (a host that reaches PyPI) before a GPU device run that measures the original StreamDiffusion side by side
# (scripts/gpu-peer-check.sh on the GPU host). Puts the wheels the GPU host lacks into .whl-peer/ (git-ignored; the
# device run names it in `carry`) and prints their total size. Idempotent: downloads are cached outside the repository
# ($SD_PEER_WHEEL_CACHE, default ~/.cache/streamdiffusion-bench/peer-wheels), .whl-peer/ is rebuilt from them, and
# nothing else is left there (two versions of one package would stop the install on the host).
#
# The GPU host (no registry; Python 3.12, torch 2.11 + CUDA 13, numpy 2, transformers 5, huggingface_hub 1.x,
# tokenizers 0.23, accelerate 1.15, safetensors 0.8, peft) keeps its own torch, numpy, safetensors, accelerate, PIL,
# regex, requests, filelock, fsspec, packaging, pyyaml, tqdm; these shadow its newer ones through PYTHONPATH:
#   streamdiffusion 0.1.1   the original (pure Python; its core imports only torch, numpy, PIL and diffusers)
#   diffusers 0.24.0        what streamdiffusion 0.1.1 pins
#   huggingface_hub 0.25.2  diffusers 0.24 imports huggingface_hub.cached_download (removed in 0.26)
#   transformers 4.46.3     diffusers 0.24 predates transformers 5; 4.44+ accepts numpy 2 (4.42 pins numpy<2) and
#                           runs on torch 2.x; needs huggingface_hub>=0.23.2,<1.0 and tokenizers>=0.20,<0.21
#   tokenizers 0.20.3       the cp312 manylinux wheel (transformers 4.46 checks the installed version at import)
# transformers is carried STRIPPED (10.0 MB -> 2.7 MB, as transformers-4.46.3-1-py3-none-any.whl, RECORD rewritten):
# models/ keeps clip/ and auto/ (without their TF / Flax modelling and convert_* scripts), every model's __init__.py
# and configuration_*.py, and whatever those import when they run; the other models' code is dropped. Enough for
# StableDiffusionPipeline (CLIPTextModel, CLIPTokenizer) and streamdiffusion, not for diffusers pipelines built on other
# text encoders (T5, ...) nor for peft (run_streamdiffusion.py hides peft by default). The whole folder that travels
# to the GPU host must stay under 64 MiB (repo ~22 MB + .gpu-deps/root 7 MB + .gpu-deps/fixtures 24 MB + these);
# SD_PEER_FULL_TRANSFORMERS=1 carries the unstripped wheel instead (+7.3 MB).
# Usage: scripts/gpu-peer-prepare.sh [DEST]   (default .whl-peer)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl-peer}"
CACHE="${SD_PEER_WHEEL_CACHE:-$HOME/.cache/streamdiffusion-bench/peer-wheels}"
WHEELS=(streamdiffusion==0.1.1 diffusers==0.24.0 huggingface_hub==0.25.2 transformers==4.46.3 tokenizers==0.20.3)
PY="${PYTHON:-python3}"
mkdir -p "$DEST" "$CACHE"
want=()
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"; ver="${spec##*==}"
  stem="$(echo "$name" | tr '[:upper:]-' '[:lower:]_')-$ver-"
  if ! ls "$CACHE/$stem"*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$CACHE" "$spec" ||
      { echo "gpu-peer-prepare: could not download $spec" >&2; exit 1; }
  fi
  f="$(ls "$CACHE/$stem"*.whl 2>/dev/null | grep -v -- "-$ver-1-py3" | head -1)"
  [ -n "$f" ] || { echo "gpu-peer-prepare: no wheel for $spec in $CACHE" >&2; exit 1; }
  b="$(basename "$f")"
  if [ "$name" = transformers ] && [ "${SD_PEER_FULL_TRANSFORMERS:-0}" != 1 ]; then
    b="transformers-$ver-1-py3-none-any.whl"
    [ -f "$DEST/$b" ] || "$PY" - "$f" "$DEST/$b" <<'EOF' || { rm -f "$DEST/$b"; exit 1; }
"""Strip a transformers wheel down to what StableDiffusionPipeline needs (see the header of gpu-peer-prepare.sh)."""
import ast, base64, hashlib, re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
KEEP = {"clip", "auto"}
zin = zipfile.ZipFile(src)
names = set(zin.namelist())
record = next(n for n in names if n.endswith(".dist-info/RECORD"))


def unneeded(n):
    m = re.match(r"transformers/models/(?:deprecated/)?([^/]+)/(.+)$", n)
    if not m or m.group(2) == "__init__.py" or m.group(2).startswith("configuration_"):
        return False
    if m.group(1) not in KEEP:
        return True
    return bool(re.match(r"(modeling_tf_|modeling_flax_|convert_)", m.group(2).split("/")[-1]))


def relative_imports(code):
    """(dots, module) of each relative import that runs (those under `if TYPE_CHECKING:` do not)."""
    out = []

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                walk(node.orelse)
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                out.append(("." * node.level, node.module or ""))
                if not node.module:  # from . import a, b: the submodules a, b
                    out.extend(("." * node.level, a.name) for a in node.names)
            walk(ast.iter_child_nodes(node))

    walk(ast.parse(code).body)
    return out


keep = {n for n in names if n != record and not unneeded(n)}
# Whatever a kept module imports from a dropped one (e.g. mt5/__init__.py imports t5's tokenizers) is kept too.
todo = [n for n in keep if n.startswith("transformers/models/") and n.endswith(".py")]
while todo:
    n = todo.pop()
    pkg = n.rsplit("/", 1)[0].split("/")
    for dots, mod in relative_imports(zin.read(n)):
        parts = pkg[: len(pkg) - (len(dots) - 1)] + [p for p in mod.split(".") if p]
        for cand in ("/".join(parts) + ".py", "/".join(parts) + "/__init__.py"):
            if cand in names and cand not in keep:
                keep.add(cand)
                todo.append(cand)
rows = []
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for i in zin.infolist():
        if i.filename not in keep:
            continue
        data = zin.read(i.filename)
        zout.writestr(i, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{i.filename},sha256={digest},{len(data)}")
    rows.append(f"{record},,")
    zout.writestr(record, "\n".join(rows) + "\n")
print(f"gpu-peer-prepare: transformers stripped: {len(keep)} of {len(names) - 1} files kept")
EOF
  else
    cmp -s "$f" "$DEST/$b" 2>/dev/null || cp "$f" "$DEST/$b"
  fi
  want+=("$b")
done
for f in "$DEST"/*; do
  b="$(basename "$f")"
  printf '%s\n' "${want[@]}" | grep -qxF "$b" || { echo "gpu-peer-prepare: removing $b (not listed)"; rm -rf "$f"; }
done
for f in "${want[@]}"; do printf '  %9d  %s\n' "$(stat -c %s "$DEST/$f")" "$f"; done
total=$(cat "$DEST"/*.whl | wc -c)
echo "gpu-peer-prepare: ${#want[@]} wheels, $total bytes ($(du -sh "$DEST" | cut -f1)) in $DEST (carry \"$DEST\")"
