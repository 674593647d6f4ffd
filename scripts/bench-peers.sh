#!/usr/bin/env bash
# Our `streamdiffusion bench` (sections e2e, components) and the peers (bench/peers/) on the same model folder, sizes,
# thread count and prompt, then one table (our fps, each peer's, ours/peer) and a PNG chart. See bench/peers/README.md.
#   scripts/bench-peers.sh [--sizes 256[,512]] [--threads 2] [--peers a,b,c] [--out DIR] [--model DIR]
#                          [--arch sd-turbo|bk-sdm-tiny|sdxs-512|sd15] [--frames N] [--warmup N] [--bin PATH]
# --arch picks the random-weight model (made once with `make-random-model --arch`, in
# ~/.cache/streamdiffusion-bench/<arch>-random); --model gives any diffusers folder instead.
# Peers: streamdiffusion, streamdiffusion-tcmalloc, diffusers, openvino, sdcpp (default: all). Each is installed on
# first use into ~/.cache/streamdiffusion-bench/venvs/<peer> (bench/peers/install.sh); one that cannot install or run
# is listed with the reason.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
peers_dir=$repo/bench/peers
model= arch=sd-turbo
sizes=512 threads=2 frames=10 warmup=1 out=bench-peers-out
peers=streamdiffusion,streamdiffusion-tcmalloc,diffusers,openvino,sdcpp
bin=${SD_BIN:-$repo/build/apps/streamdiffusion}
while (($#)); do
  case $1 in
    --sizes) sizes=$2 ;; --threads) threads=$2 ;; --peers) peers=$2 ;; --out) out=$2 ;; --model) model=$2 ;; --arch) arch=$2 ;;
    --frames) frames=$2 ;; --warmup) warmup=$2 ;; --bin) bin=$2 ;;
    -h|--help) sed -n 2,10p "$0"; exit 0 ;;
    *) echo "bench-peers.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
mkdir -p "$out"
# The default model: the random-weight architecture --arch, made once (as scripts/bench-controlnet.sh does).
if [[ -z $model ]]; then
  model=$HOME/.cache/streamdiffusion-bench/$arch-random
  if [[ ! -f $model/.complete ]]; then
    echo "making the random $arch model in $model (once)"
    rm -rf "$model"
    "$bin" make-random-model --arch "$arch" --out "$model" --tokenizer "$repo/models/clip-tokenizer" \
      --weights-dtype bf16 && touch "$model/.complete" || { echo "make-random-model --arch $arch failed" >&2; exit 1; }
  fi
fi
venvs=${SD_PEERS_VENVS:-$HOME/.cache/streamdiffusion-bench/venvs}
common=(--model "$model" --sizes "$sizes" --threads "$threads" --frames "$frames" --warmup "$warmup")

# A peer that cannot run: a JSON with no rows and the reason, so the report lists it.
skipped() {
  python3 - "$out/$1.json" "$1" "$2" <<'EOF'
import json, sys
json.dump({"schema": "streamdiffusion-bench/1", "peer": sys.argv[2], "results": [],
           "skipped": [{"variant": "all", "reason": sys.argv[3]}]}, open(sys.argv[1], "w"), indent=2)
EOF
  echo "  peer skipped: $1: $2"
}

echo "== ours: $bin bench --sections e2e,components"
if [[ -x $bin ]]; then
  "$bin" bench "${common[@]}" --iters "$frames" --sections e2e,components --dtypes bf16 --json "$out/ours.json" \
    > "$out/ours.log" 2>&1 || echo "  our bench failed: see $out/ours.log"
  grep -E "^e2e " "$out/ours.log"
else
  echo "  no CLI at $bin (build it, or give --bin / SD_BIN)"
fi

for peer in ${peers//,/ }; do
  echo "== $peer"
  venv=$peer env=() dtypes=
  case $peer in
    streamdiffusion) runner=run_streamdiffusion.py dtypes=bf16 ;;
    streamdiffusion-tcmalloc)
      venv=streamdiffusion runner=run_streamdiffusion.py dtypes=bf16
      tc=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc.so.4 /usr/lib/*/libtcmalloc.so.4 2>/dev/null | head -1)
      [[ -n $tc ]] || { skipped "$peer" "libtcmalloc.so.4 not found (apt-get install libgoogle-perftools4)"; continue; }
      env=(LD_PRELOAD="$tc") ;;
    diffusers) runner=run_diffusers.py dtypes=fp32,bf16 ;;
    openvino) runner=run_openvino.py dtypes=fp32,bf16 ;;
    sdcpp) runner=run_sdcpp.py dtypes=f16,q8_0 ;;
    *) skipped "$peer" "unknown peer"; continue ;;
  esac
  if ! bash "$peers_dir/install.sh" "$venv" > "$out/$peer.install.log" 2>&1; then
    skipped "$peer" "install failed: $(tail -1 "$out/$peer.install.log")"
    continue
  fi
  rm -f "$out/$peer.json"
  (cd "$peers_dir" && env "${env[@]}" "$venvs/$venv/bin/python" "$runner" "${common[@]}" --dtypes "$dtypes" \
    --json "$out/$peer.json") > "$out/$peer.log" 2>&1
  rc=$?
  grep -E "fps|peer skipped" "$out/$peer.log"
  [[ -f $out/$peer.json ]] || skipped "$peer" "runner exited $rc: $(grep -v '^\s*$' "$out/$peer.log" | tail -1)"
done

chart=()
bash "$peers_dir/install.sh" report > "$out/report.install.log" 2>&1 && chart=(--chart "$out/peers.png")
py=python3
[[ ${#chart[@]} -gt 0 ]] && py=$venvs/report/bin/python
"$py" "$peers_dir/report.py" "$out" --peers "$peers" "${chart[@]}" | tee "$out/table.txt"
