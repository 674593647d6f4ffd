"""vid2vid: a video (or image sequence) through the real-time runtime, lossless: one output frame per input frame.

    python examples/python/vid2vid.py [--input VIDEO|DIR] [--output DIR|FILE.mp4] [--prompt TEXT]

Without --input, 12 synthetic frames (a moving disc) are written to output/vid2vid_input and used as the video.
The runtime decodes, fits, runs and encodes on its own threads with the GIL released; the callback sees each frame.
"""
import argparse

import _common
import streamdiffusion_cpp as sd

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None)
ap.add_argument("--input", default=None, help="video file or image folder (default: synthetic frames)")
ap.add_argument("--output", default="output/vid2vid", help="folder, 'out/%%05d.png', a video file or 'window'")
ap.add_argument("--prompt", default="red apple")
args = ap.parse_args()

if args.input is None:
    args.input = _common.write_frames("output/vid2vid_input", 12)
    print("no --input: using synthetic frames in", args.input)

models = sd.load_pipeline(args.model)
stream = sd.Stream(models, sd.resolve_config(args.model, "img2img"))
stream.prepare(args.prompt)
frames = []
summary = sd.run_stream(stream, args.input, args.output, mode="lossless",
                        callback=lambda image, index: frames.append(index))
print(f"{summary['frames_in']} frames in, {summary['frames_out']} out -> {args.output} "
      f"(callback saw {len(frames)}; stop: {summary['stop_reason']})")
