"""stable-diffusion.cpp (ggml) through stable-diffusion-cpp-python, built from source for this CPU: the diffusers
folder loaded as it is (sd.cpp converts diffusers names itself), TAESD from taesd/ for encode and decode, weights
converted at load time to the row's type (--dtypes f16,q8_0; f32 too). sd-turbo settings: txt2img 1 step cfg 1,
img2img 2 steps strength 0.49 (one denoising step, see below); each call encodes the prompt and returns a PIL image.
"""
import os

import numpy as np
import PIL.Image

from common import Report, parse_args, time_frames


def main():
    args = parse_args("sdcpp")
    rep = Report("sdcpp", args, ["stable_diffusion_cpp_python"])
    from stable_diffusion_cpp import StableDiffusion

    for wtype in args.dtypes:
        wtype = {"fp32": "f32", "fp16": "f16"}.get(wtype, wtype)

        def load(wtype=wtype):
            return StableDiffusion(model_path=args.model, taesd_path=f"{args.model}/taesd/diffusion_pytorch_model.safetensors",
                                   wtype=wtype, n_threads=args.threads, vae_decode_only=False, verbose=os.environ.get("SDCPP_VERBOSE") == "1")

        try:
            sd = load()
            if not sd._model.model:  # the binding does not raise when sd.cpp cannot load the folder
                raise RuntimeError("new_sd_ctx returned NULL (an architecture sd.cpp does not recognise? rerun "
                                   "with SDCPP_VERBOSE=1)")
        except Exception as e:  # noqa: BLE001
            rep.skip(",".join(args.dtypes), f"load failed: {type(e).__name__}: {e}")
            break  # the other types would fail the same way (and a second failed load can crash the process)
        for size in args.sizes:
            image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
            calls = {
                # sd.cpp runs int(steps * strength) + 1 sampler steps on an image: 2 x 0.49 gives one UNet call
                # at the lower of the 2 sigmas (diffusers' sd-turbo "2 steps, strength 0.5" would be 2 calls here).
                "img2img": ("ae=taesd steps=2 strength=0.49 (1 UNet call)",
                            lambda: sd.generate_image(args.prompt, init_image=image, width=size, height=size,
                                                      cfg_scale=1.0, sample_steps=2, strength=0.49)),
                "txt2img": ("ae=taesd steps=1",
                            lambda: sd.generate_image(args.prompt, width=size, height=size, cfg_scale=1.0,
                                                      sample_steps=1)),
            }
            for mode in args.modes:
                variant, call = calls[mode]

                def run(mode=mode, variant=variant, call=call, size=size):
                    timing = time_frames(call, args.warmup, args.frames)
                    rep.row(mode, variant, wtype, size, 1, timing,
                            models="stable-diffusion.cpp (ggml), diffusers folder, TAESD, PIL out")

                rep.attempt(f"{mode} {variant} {wtype} {size}", run)
        del sd
    rep.write()
    os._exit(0)  # skip interpreter teardown: freeing a context whose load failed segfaults in the binding


if __name__ == "__main__":
    main()
