"""txt2img, several images per call: frame_buffer_size frames go through the stream batch together.

    python examples/python/txt2img_batch.py [--model DIR] [--prompt TEXT] [--count N] [--output DIR]
"""
import argparse
import os

import _common  # noqa: F401
from streamdiffusion_cpp import StreamDiffusionWrapper

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None)
ap.add_argument("--prompt", default="cat face")
ap.add_argument("--count", type=int, default=4, help="images per call (frame_buffer_size)")
ap.add_argument("--output", default="output/txt2img_batch")
args = ap.parse_args()

stream = StreamDiffusionWrapper(model_id_or_path=args.model, mode="txt2img", frame_buffer_size=args.count)
stream.prepare(args.prompt)
for _ in range(len(stream.t_index_list)):  # n-1 warm-up calls, then count real images
    images = stream()
os.makedirs(args.output, exist_ok=True)
for k, image in enumerate(images):
    path = os.path.join(args.output, f"{k:02d}.png")
    image.save(path)
    print("wrote", path)
