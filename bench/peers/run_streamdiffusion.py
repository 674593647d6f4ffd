"""The original StreamDiffusion (PyPI streamdiffusion 0.1.1, diffusers 0.24) on CPU or CUDA, as its README uses it:
StableDiffusionPipeline -> StreamDiffusion(t_index_list, cfg_type="none"), the VAE replaced by TAESD (AutoencoderTiny
from the model's taesd/), prepare(prompt), then stream(image) per img2img frame and stream.txt2img() per txt2img
frame (both return the decoded image tensor, as our stream's img2img / txt2img do).

--device cpu (default): CPU patches, applied here at run time (the package itself is not edited):
StreamDiffusion.__call__ times itself with torch.cuda.Event and torch.cuda.synchronize, which fail without CUDA: both
are replaced by perf_counter stand-ins.

peft: a host with peft installed (the GPU host has it) would switch diffusers 0.24 to its PEFT backend, whose UNet
forward walks every module (scale_lora_layers) on each call and imports whatever peft version is there; the original
StreamDiffusion does not install peft, so it is hidden from diffusers (sys.modules["peft"] = None) unless --with-peft.

--device cuda: nothing is patched (StreamDiffusion's own torch.cuda.Event timing runs); `pipe.to("cuda", dtype)`,
TAESD in the same dtype (--dtypes fp16 is the original's default), diffusers' default attention processor (PyTorch 2's
scaled_dot_product_attention; no xformers, no TensorRT). Each timed frame is wall-clock from the call to the
returned image with torch.cuda.synchronize() after it (our bench's device-synchronised whole frame); CUDA events
around each frame and a back-to-back figure (all frames queued, one synchronize at the end) are recorded in `extra`.
The input frame is a float32 [-1, 1] tensor on the host, as our bench feeds (the original's preprocess and upload
are part of the frame); --frame-on-device also times img2img with the frame already on the GPU in the stream's dtype.
"""
import math
import statistics
import sys
import time

import torch

from common import Report, allocator, parse_args, time_frames, time_frames_cuda


class _CpuEvent:  # torch.cuda.Event stand-in: record() / elapsed_time(end) in ms
    def __init__(self, *a, **k):
        self.t = 0.0

    def record(self, *a, **k):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def extra_args(p):
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--frame-on-device", action="store_true",
                   help="cuda: also an img2img row with the input frame already on the GPU (variant '... frame=device')")
    p.add_argument("--with-peft", action="store_true",
                   help="let diffusers see an installed peft (by default it is hidden: see the module docstring)")


def main():
    args = parse_args("streamdiffusion", extra_args)
    cuda = args.device.startswith("cuda")
    peer = "streamdiffusion" + ("+tcmalloc" if allocator() == "tcmalloc" else "")
    rep = Report(peer, args, ["streamdiffusion", "diffusers", "transformers", "accelerate", "huggingface_hub",
                              "tokenizers", "safetensors", "numpy", "torch", "peft"])
    rep.j["device"] = args.device
    if cuda:
        if not torch.cuda.is_available():
            rep.skip("all", f"--device {args.device} but torch.cuda.is_available() is False (torch {torch.__version__})")
            rep.write()
            return
        rep.j["gpu"] = {"name": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda,
                        "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
        try:
            rep.j["gpu"]["cudnn"] = torch.backends.cudnn.version()
        except Exception as e:  # noqa: BLE001 - metadata only
            rep.j["gpu"]["cudnn"] = f"{type(e).__name__}: {e}"
        print(f"  gpu: {rep.j['gpu']}", flush=True)
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        torch.cuda.Event = _CpuEvent
        torch.cuda.synchronize = lambda *a, **k: None
    if not args.with_peft:
        # find_spec("peft") is None while sys.modules["peft"] is None: diffusers 0.24 then keeps its own LoRA-compatible
        # layers instead of calling peft's scale_lora_layers (a walk over every module) on each UNet call.
        sys.modules.setdefault("peft", None)
    rep.j["options"]["peft"] = "visible" if args.with_peft else "hidden"
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from diffusers.utils import USE_PEFT_BACKEND
    from streamdiffusion import StreamDiffusion

    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        t_load = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None)
        pipe.to(args.device, dtype)
        taesd = AutoencoderTiny.from_pretrained(f"{args.model}/taesd", torch_dtype=dtype).to(args.device, dtype)
        if cuda:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t_load
        print(f"  loaded {args.model} ({dt_name}, {args.device}) in {load_s:.1f} s; attention processor "
              f"{type(next(iter(pipe.unet.attn_processors.values()))).__name__}", flush=True)
        for size in args.sizes:
            for mode in args.modes:
                t = args.img2img_t if mode == "img2img" else args.txt2img_t
                on_device = [False, True] if (cuda and mode == "img2img" and args.frame_on_device) else [False]
                for dev_frame in on_device:
                    variant = f"ae=taesd cfg=none t={','.join(map(str, t))}" + (" frame=device" if dev_frame else "")

                    def run(mode=mode, t=t, size=size, variant=variant, dev_frame=dev_frame):
                        stream = StreamDiffusion(pipe, t_index_list=t, torch_dtype=dtype, width=size, height=size,
                                                 cfg_type="none")
                        stream.vae = taesd
                        stream.prepare(args.prompt, num_inference_steps=args.num_inference_steps)
                        frame = torch.rand(1, 3, size, size) * 2 - 1  # a [-1, 1] image tensor, as our bench feeds
                        if dev_frame:
                            frame = frame.to(args.device, dtype)
                        call = (lambda: stream(frame)) if mode == "img2img" else (lambda: stream.txt2img())
                        last = {}

                        def step():
                            last["out"] = call()
                            return last["out"]

                        extra = {"models": "diffusers StableDiffusionPipeline + streamdiffusion.StreamDiffusion, TAESD",
                                 "device": args.device, "load_s": load_s,
                                 "frame": "device " + dt_name if dev_frame else "host float32",
                                 "attention_processor": type(next(iter(pipe.unet.attn_processors.values()))).__name__,
                                 "diffusers_peft_backend": bool(USE_PEFT_BACKEND)}
                        with torch.no_grad():
                            if cuda:
                                timing, more = time_frames_cuda(step, args.warmup + len(t) - 1, args.frames)
                                extra.update(more)
                                if mode == "img2img":  # its own CUDA-event timing (an EMA), kept by __call__ only
                                    extra["inference_time_ema_s"] = stream.inference_time_ema
                            else:
                                timing = time_frames(step, args.warmup + len(t) - 1, args.frames)
                                extra["output_finite"] = bool(torch.isfinite(last["out"]).all().item())
                        if not math.isfinite(timing["median_s"]):
                            raise RuntimeError("no finite timing")
                        rep.row(mode, variant, dt_name, size, len(t), timing, **extra)

                    rep.attempt(f"{mode} {variant} {dt_name} {size}", run)
        del pipe, taesd
        if cuda:
            torch.cuda.empty_cache()
    rep.write()


if __name__ == "__main__":
    main()
