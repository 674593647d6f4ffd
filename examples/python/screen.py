"""Screen capture -> img2img, live (latest frame wins; stale frames are dropped and counted).

    python examples/python/screen.py [--region x,y,w,h] [--frames N] [--window] [--prompt TEXT]

Captures the X11 screen (DISPLAY must be set). Without a display it says so and runs the same live pipeline on
synthetic frames delivered in real time instead. Outputs go to output/screen/ (and a window with --window).
"""
import argparse
import os

import _common
import numpy as np
import streamdiffusion_cpp as sd
from PIL import Image

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None)
ap.add_argument("--region", default=None, help="x,y,w,h (default: the whole screen)")
ap.add_argument("--frames", type=int, default=8, help="stop after this many captured frames (0 = until Ctrl-C)")
ap.add_argument("--fps", type=float, default=10)
ap.add_argument("--window", action="store_true", help="also show the output in a window")
ap.add_argument("--prompt", default="red apple")
ap.add_argument("--output", default="output/screen")
args = ap.parse_args()

if os.environ.get("DISPLAY"):
    source = "screen" + (":" + args.region if args.region else "")
    realtime = False
else:
    print("no DISPLAY: capturing synthetic frames instead of the screen")
    source = _common.write_frames("output/screen_input", max(args.frames, 8))
    realtime = True  # delivered at --fps like a live capture

models = sd.load_pipeline(args.model)
stream = sd.Stream(models, sd.resolve_config(args.model, "img2img"))
stream.prepare(args.prompt)
os.makedirs(args.output, exist_ok=True)


def save(image, index):
    Image.fromarray(np.asarray(image)).save(os.path.join(args.output, f"{index:05d}.png"))


try:
    summary = sd.run_stream(stream, source, "window" if args.window else "none", callback=save, mode="live",
                            fps=args.fps, realtime=realtime, max_frames=args.frames)
    print(f"{summary['frames_out']} frames -> {args.output}/ ({summary['dropped']} dropped)")
except KeyboardInterrupt:
    print("stopped")
