"""img2img over a folder: the images go through one stream in name order (lower-level Stream API, tensors in and
out); the stream's n-1 calls of latency are flushed by repeating the last frame, so every input gets its output.

    python examples/python/img2img_folder.py [--input DIR] [--prompt TEXT] [--output DIR]

Without --input, 6 synthetic drawings are written to output/img2img_folder_input and used.
"""
import argparse
import os

import _common
import streamdiffusion_cpp as sd
from PIL import Image

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None)
ap.add_argument("--input", default=None)
ap.add_argument("--prompt", default="smiling face with sunglasses")
ap.add_argument("--output", default="output/img2img_folder")
args = ap.parse_args()

if args.input is None:
    args.input = _common.write_frames("output/img2img_folder_input", 6)
    print("no --input: using synthetic drawings in", args.input)
names = sorted(n for n in os.listdir(args.input) if n.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))

models = sd.load_pipeline(args.model)               # loaded once, shareable by several streams
config = sd.resolve_config(args.model, "img2img")   # the model's native size and recommended settings
stream = sd.Stream(models, config)
stream.prepare(args.prompt)
latency = stream.denoising_steps - 1

os.makedirs(args.output, exist_ok=True)
inputs = [sd.pil_to_tensor(Image.open(os.path.join(args.input, n)), config.width, config.height) for n in names]
for i, x in enumerate(inputs + [inputs[-1]] * latency):  # NCHW [1, 3, H, W] in [-1, 1]
    out = stream.img2img(x)
    k = i - latency                                    # the input this output belongs to
    if k >= 0:
        path = os.path.join(args.output, os.path.splitext(names[k])[0] + ".png")
        sd.tensor_to_pil(out)[0].save(path)
        print("wrote", path)
print(stream.stats)
