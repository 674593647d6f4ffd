"""img2img, one picture.

    python examples/python/img2img_single.py [--input IMG] [--prompt TEXT] [--output FILE]

Without --input a synthetic drawing (a red disc on white) is the input; it is written next to the output.
"""
import argparse
import os

import _common
from PIL import Image
from streamdiffusion_cpp import StreamDiffusionWrapper

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None)
ap.add_argument("--input", default=None, help="image file (default: a synthetic drawing)")
ap.add_argument("--prompt", default="red apple")
ap.add_argument("--output", default="output/img2img_single.png")
args = ap.parse_args()

os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
if args.input is None:
    args.input = os.path.join(os.path.dirname(args.output) or ".", "img2img_single_input.png")
    _common.drawing().save(args.input)
    print("no --input: using the synthetic drawing", args.input)

stream = StreamDiffusionWrapper(model_id_or_path=args.model, mode="img2img")
stream.prepare(args.prompt)
image = Image.open(args.input)  # centre-cropped and resized to the stream size
for _ in range(len(stream.t_index_list)):  # the first n-1 outputs are warm-up frames
    output = stream(image)
output.save(args.output)
print(f"wrote {args.output} (t_index_list {stream.t_index_list}, cfg {stream.cfg_type})")
