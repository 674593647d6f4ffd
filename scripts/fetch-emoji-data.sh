#!/usr/bin/env bash
# Installs the emoji training/test data (npm packages emoji-datasource-google, MIT, and emoji-datasource-twitter,
# CC-BY 4.0) into a cache folder outside the repository. Idempotent: does nothing when the data is already there.
# Prints the data folder (the one holding node_modules/) on its last line.
#   EMOJI_DATA_DIR=/some/folder scripts/fetch-emoji-data.sh
set -euo pipefail
DIR="${EMOJI_DATA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/streamdiffusion/emoji}"
VERSION="${EMOJI_DATASOURCE_VERSION:-16.0.0}"
PKGS=(emoji-datasource-google emoji-datasource-twitter)
mkdir -p "$DIR"
need=0
for p in "${PKGS[@]}"; do
  [ -f "$DIR/node_modules/$p/emoji.json" ] || need=1
done
if [ "$need" = 1 ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "fetch-emoji-data: npm is not installed (apt-get install npm); the emoji data cannot be fetched" >&2
    exit 1
  fi
  echo "fetch-emoji-data: installing ${PKGS[*]} $VERSION into $DIR" >&2
  [ -f "$DIR/package.json" ] || echo '{"name":"streamdiffusion-emoji-cache","private":true}' > "$DIR/package.json"
  (cd "$DIR" && npm install --no-audit --no-fund --loglevel=error "${PKGS[@]/%/@$VERSION}" >&2)
fi
echo "$DIR"
