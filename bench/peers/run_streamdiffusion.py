"""The original StreamDiffusion (PyPI streamdiffusion 0.1.1, diffusers 0.24) on CPU, as its README uses it:
StableDiffusionPipeline -> StreamDiffusion(t_index_list, cfg_type="none"), the VAE replaced by TAESD (AutoencoderTiny
from the model's taesd/), prepare(prompt), then stream(image) per img2img frame and stream.txt2img() per txt2img
frame (both return the decoded image tensor, as our stream's img2img / txt2img do).

CPU patches, applied here at run time (the package itself is not edited): StreamDiffusion.__call__ times itself with
torch.cuda.Event and torch.cuda.synchronize, which fail without CUDA: both are replaced by perf_counter stand-ins.
"""
import time

import torch

from common import Report, allocator, parse_args, time_frames


class _CpuEvent:  # torch.cuda.Event stand-in: record() / elapsed_time(end) in ms
    def __init__(self, *a, **k):
        self.t = 0.0

    def record(self, *a, **k):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


def main():
    args = parse_args("streamdiffusion")
    peer = "streamdiffusion" + ("+tcmalloc" if allocator() == "tcmalloc" else "")
    rep = Report(peer, args, ["streamdiffusion", "diffusers", "transformers", "accelerate", "huggingface_hub", "torch"])
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        torch.cuda.Event = _CpuEvent
        torch.cuda.synchronize = lambda *a, **k: None
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from streamdiffusion import StreamDiffusion

    for dt_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None)
        pipe.to(device="cpu", dtype=dtype)
        taesd = AutoencoderTiny.from_pretrained(f"{args.model}/taesd", torch_dtype=dtype).to("cpu", dtype)
        for size in args.sizes:
            for mode in args.modes:
                t = args.img2img_t if mode == "img2img" else args.txt2img_t
                variant = f"ae=taesd cfg=none t={','.join(map(str, t))}"

                def run(mode=mode, t=t, size=size, variant=variant):
                    stream = StreamDiffusion(pipe, t_index_list=t, torch_dtype=dtype, width=size, height=size,
                                             cfg_type="none")
                    stream.vae = taesd
                    stream.prepare(args.prompt, num_inference_steps=args.num_inference_steps)
                    frame = torch.rand(1, 3, size, size) * 2 - 1  # a [-1, 1] image tensor, as our bench feeds
                    step = (lambda: stream(frame)) if mode == "img2img" else (lambda: stream.txt2img())
                    with torch.no_grad():
                        timing = time_frames(step, args.warmup + len(t) - 1, args.frames)
                    rep.row(mode, variant, dt_name, size, len(t), timing,
                            models="diffusers StableDiffusionPipeline + streamdiffusion.StreamDiffusion, TAESD")

                rep.attempt(f"{mode} {variant} {dt_name} {size}", run)
        del pipe, taesd
    rep.write()


if __name__ == "__main__":
    main()
