"""Overhead of the Python binding: Stream.img2img called from Python vs the same C++ call timed in C++.

    python3 python/bench/overhead.py --model /tmp/sdturbo [--size 256] [--dtype fp32] [--iters 5] [--blocks 6]

One process, one model, one stream, one input: blocks of `iters` calls alternate between the Python loop
(time.perf_counter around stream.img2img(x), i.e. argument conversion, GIL release, the call, result wrapping) and
the C++ loop (Stream._time_img2img_native: std::chrono around sd::StreamDiffusion::img2img, no Python between
calls). Reports medians (ms per call) and the ratio. Waits until no compiler runs (`pgrep cc1plus`), as timings on a
shared 2-core machine are meaningless otherwise.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "..", "..", "build", "python"))
import numpy as np  # noqa: E402
import streamdiffusion_cpp as sd  # noqa: E402


def compilers_running() -> int:
    r = subprocess.run(["pgrep", "-c", "cc1plus"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", required=True)
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--dtype", default="fp32")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--t-index-list", default="32,45")
ap.add_argument("--cfg-type", default="self")
ap.add_argument("--iters", type=int, default=5, help="calls per block")
ap.add_argument("--blocks", type=int, default=6, help="blocks per side, alternating")
ap.add_argument("--json", default=None)
ap.add_argument("--no-wait", action="store_true", help="do not wait for compilers to finish")
args = ap.parse_args()

models = sd.load_pipeline(args.model, dtype=args.dtype, threads=args.threads, tokenizer="")
cfg = sd.resolve_config(args.model, "img2img", t_index_list=[int(x) for x in args.t_index_list.split(",")],
                        cfg_type=args.cfg_type, width=args.size, height=args.size)
stream = sd.Stream(models, cfg)
stream.prepare("a photo of a red fox in the snow")
rng = np.random.default_rng(0)
x = (rng.random((1, 3, args.size, args.size), dtype=np.float32) * 2 - 1)  # NCHW in [-1, 1]
for _ in range(2):
    stream.img2img(x)  # warm-up (oneDNN primitives, buffers)

py_s, cpp_s = [], []
for b in range(2 * args.blocks):
    while not args.no_wait and compilers_running():
        print("waiting: a compiler is running", flush=True)
        time.sleep(20)
    if b % 2 == 0:
        for _ in range(args.iters):
            t0 = time.perf_counter()
            stream.img2img(x)
            py_s.append(time.perf_counter() - t0)
    else:
        cpp_s += stream._time_img2img_native(x, args.iters)
    print(f"block {b}: python median {1e3 * statistics.median(py_s) if py_s else 0:.1f} ms, "
          f"C++ median {1e3 * statistics.median(cpp_s) if cpp_s else 0:.1f} ms", flush=True)

py_med, cpp_med = statistics.median(py_s), statistics.median(cpp_s)
report = {
    "cpu": cpu_model(),
    "model": args.model,
    "size": args.size,
    "dtype": args.dtype,
    "threads": args.threads,
    "t_index_list": cfg.t_index_list,
    "cfg_type": cfg.cfg_type,
    "calls_per_side": len(py_s),
    "python_ms_median": 1e3 * py_med,
    "cpp_ms_median": 1e3 * cpp_med,
    "python_ms_mean": 1e3 * statistics.mean(py_s),
    "cpp_ms_mean": 1e3 * statistics.mean(cpp_s),
    "ratio_median": py_med / cpp_med,
    "ratio_mean": statistics.mean(py_s) / statistics.mean(cpp_s),
}
print(json.dumps(report, indent=2))
if args.json:
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
