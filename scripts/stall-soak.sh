#!/usr/bin/env bash
# The stall soak (issue 20, src/runtime/README.md "The watchdog and the stall under CPU contention"): `stream` of the
# built-in model (64x64 txt2img, no input, no output) for FRAMES frames at --threads 2 next to `stress-ng --cpu N`
# (N = the number of cores: every core contended), RUNS times; one table row per run from --stats-json: output fps,
# model median, slowest frame (the longest gap between two outputs), frames the watchdog logged (> 10x the stage's
# median and > 100 ms), and the thread governor's cuts. Exit status 1 when a run has a gap over 2 s or a logged frame.
# Usage: scripts/stall-soak.sh [RUNS=3] [FRAMES=10000] [extra stream arguments, e.g. --fixed-threads]
# Environment: SD_CLI (default build/apps/streamdiffusion), OUT_DIR (default /tmp/stall-soak), SOAK_LOAD (default
# "stress-ng --cpu $(nproc)"; "none" = no load). Needs stress-ng (apt-get install stress-ng).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"; shift || true
FRAMES="${1:-10000}"; shift || true
CLI="${SD_CLI:-build/apps/streamdiffusion}"
OUT_DIR="${OUT_DIR:-/tmp/stall-soak}"
LOAD="${SOAK_LOAD:-stress-ng --cpu $(nproc) --quiet}"
[ -x "$CLI" ] || { echo "stall-soak: $CLI not built (cmake --build build)" >&2; exit 2; }
if [ "$LOAD" != none ]; then
  command -v "${LOAD%% *}" >/dev/null || { echo "stall-soak: ${LOAD%% *} not found (apt-get install stress-ng)" >&2; exit 2; }
fi
mkdir -p "$OUT_DIR"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), family $(lscpu | sed -n 's/^CPU family: *//p'), $(nproc) cores;" \
     "load: $LOAD; stream $* --threads 2 --frames $FRAMES"
echo "| run | output fps | model median | slowest frame (max output gap) | frames logged by the watchdog | cuts to 1 thread (frames at 1) |"
echo "|---|---|---|---|---|---|"
status=0
for i in $(seq 1 "$RUNS"); do
  load_pid=""
  if [ "$LOAD" != none ]; then
    $LOAD & load_pid=$!
    sleep 1
  fi
  set +e
  "$CLI" stream --input none --output none --frames "$FRAMES" --threads 2 --status-interval 0 \
    --stats-json "$OUT_DIR/run$i.json" "$@" > "$OUT_DIR/run$i.log" 2>&1
  rc=$?
  set -e
  if [ -n "$load_pid" ]; then kill "$load_pid" 2>/dev/null || true; wait "$load_pid" 2>/dev/null || true; fi
  if [ $rc -ne 0 ]; then echo "| $i | stream failed (exit $rc): $(tail -1 "$OUT_DIR/run$i.log") |"; status=1; continue; fi
  python3 - "$OUT_DIR/run$i.json" "$i" <<'PY' || status=1
import json, sys
s = json.load(open(sys.argv[1]))
w = s["watchdog"]; g = s.get("thread_governor") or {}
model = w["stages"]["model"]
cuts = "%d (%d of %d)" % (g.get("reductions", 0), g.get("frames_reduced", 0), g.get("frames", 0)) if g.get("active") else "off"
print("| %s | %.1f | %.1f ms | %.0f ms | %d | %s |" % (sys.argv[2], s["output_fps"], model["median_ms"],
      w["max_output_gap_ms"], w["slow_frames"], cuts))
sys.exit(1 if w["max_output_gap_ms"] > 2000 or w["slow_frames"] > 0 else 0)
PY
done
exit $status
