"""txt2img, one image: the wrapper API (upstream's StreamDiffusionWrapper, a changed import).

    python examples/python/txt2img_single.py [--model DIR] [--prompt TEXT] [--output FILE]

With no arguments it runs the built-in emoji model at its native 64x64 with its recommended steps.
"""
import argparse
import os

import _common  # noqa: F401
from streamdiffusion_cpp import StreamDiffusionWrapper

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default=None, help="model folder or .safetensors (default: the built-in emoji model)")
ap.add_argument("--prompt", default="red apple")
ap.add_argument("--output", default="output/txt2img_single.png")
ap.add_argument("--t-index-list", default=None, help="e.g. 0,16,32,45 (default: the model's)")
ap.add_argument("--seed", type=int, default=2)
args = ap.parse_args()

stream = StreamDiffusionWrapper(
    model_id_or_path=args.model,
    t_index_list=[int(x) for x in args.t_index_list.split(",")] if args.t_index_list else None,
    mode="txt2img",
    output_type="pil",
    seed=args.seed,
)
stream.prepare(args.prompt)
# The stream batch returns the image whose noise entered n-1 calls earlier: run n calls, keep the last.
for _ in range(len(stream.t_index_list)):
    image = stream()
os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
image.save(args.output)
print(f"wrote {args.output} ({image.size[0]}x{image.size[1]}, t_index_list {stream.t_index_list})")
