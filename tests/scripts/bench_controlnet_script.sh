#!/usr/bin/env bash
# scripts/bench-controlnet.sh end to end at 64 px on the fixtures (tiny-sd15 + tiny-controlnet-sd15 instead of the
# random sd-turbo + controlnet-sd21): all nine configurations run, the table prints, and summary.json holds one row
# per configuration and mode with the ControlNet counts each configuration implies. Timings are not checked.
#   bench_controlnet_script.sh CLI DEFAULT_FIXTURES   ($SD_FIXTURES, when set, wins)
set -euo pipefail
CLI="$1"
FIX="${SD_FIXTURES:-$2}"
if [ ! -f "$FIX/controlnet/models/tiny-controlnet-sd15/config.json" ]; then
  echo "no ControlNet fixtures under $FIX: skipped"
  exit 77
fi
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
cd "$(dirname "$0")/../.."
SD_BIN="$CLI" SD_BENCH_MODEL="$FIX/models/tiny-sd15" SD_BENCH_CONTROLNET="$FIX/controlnet/models/tiny-controlnet-sd15" \
  bash scripts/bench-controlnet.sh --sizes 64 --threads 1 --dtype fp32 --frames 2 --out "$OUT" | tee "$OUT/out.txt"
grep -q "^CPU: " "$OUT/out.txt"
grep -q "1 ControlNet, every 4" "$OUT/out.txt"
grep -q "2 steps, CN steps 0.5..1" "$OUT/out.txt"
python3 - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rows = s["rows"]
assert s["schema"] == "streamdiffusion-bench-controlnet/1"
assert len(rows) == 18, len(rows)  # 9 configurations x (txt2img, img2img) at one size
want = {"none": (0, 1), "cn1": (1, 1), "cn2": (2, 1), "cn1_every2": (1, 2), "cn1_every4": (1, 4),
        "none_2steps": (0, 1), "cn1_2steps": (1, 1), "cn1_2steps_first": (1, 1), "cn1_2steps_second": (1, 1)}
ranges = {"cn1_2steps_first": [0.0, 0.5], "cn1_2steps_second": [0.5, 1.0]}
assert {r["config"] for r in rows} == set(want), rows
for r in rows:
    n, every = want[r["config"]]
    assert r["controlnets"] == n and r["controlnet_every"] == every, r
    assert r["steps"] == (2 if "2steps" in r["config"] else 1), r
    assert r["control_guidance"] == ranges.get(r["config"], [0.0, 1.0]), r
    assert r["s_per_frame"] > 0 and abs(r["fps"] * r["s_per_frame"] - 1) < 1e-9, r
    assert r["frames"] % every == 0, r
    if n:
        # one UNet call per frame (the stream batch holds both steps): n ControlNet calls on each computing frame
        # (a half range runs on its step's row), reuse on the others
        assert r["controlnet_calls"] == n * r["frames"] // every, r
        assert r["controlnet_reused"] == r["frames"] - r["frames"] // every, r
        assert r["time_vs_none"] > 0, r
    else:
        assert r["time_vs_none"] == 1.0 and r["controlnet_calls"] == 0, r
print("bench-controlnet.sh: summary consistent,", len(rows), "rows")
PY
