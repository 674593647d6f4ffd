"""diffusers as a user calls it for sd-turbo (its model card): AutoPipelineForText2Image(prompt, num_inference_steps=1,
guidance_scale=0.0) and AutoPipelineForImage2Image(prompt, image, num_inference_steps=2, strength=0.5,
guidance_scale=0.0), i.e. one UNet step each, the full AutoencoderKL, the prompt encoded on every call, a PIL image
out. fp32 is what from_pretrained gives by default; bf16 is torch_dtype=torch.bfloat16.
"""
import numpy as np
import PIL.Image
import torch

from common import Report, parse_args, time_frames


def main():
    args = parse_args("diffusers")
    rep = Report("diffusers", args, ["diffusers", "transformers", "accelerate", "huggingface_hub", "torch"])
    torch.set_num_threads(args.threads)
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    for dt_name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
        t2i = AutoPipelineForText2Image.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None)
        t2i.set_progress_bar_config(disable=True)
        i2i = AutoPipelineForImage2Image.from_pipe(t2i)
        i2i.set_progress_bar_config(disable=True)
        for size in args.sizes:
            image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
            calls = {
                "img2img": ("AutoPipelineForImage2Image vae=full steps=2 strength=0.5",
                            lambda: i2i(args.prompt, image=image, num_inference_steps=2, strength=0.5,
                                        guidance_scale=0.0, height=size, width=size)),
                "txt2img": ("AutoPipelineForText2Image vae=full steps=1",
                            lambda: t2i(args.prompt, num_inference_steps=1, guidance_scale=0.0, height=size,
                                        width=size)),
            }
            for mode in args.modes:
                variant, call = calls[mode]

                def run(mode=mode, variant=variant, call=call, size=size):
                    with torch.no_grad():
                        timing = time_frames(call, args.warmup, args.frames)
                    rep.row(mode, variant, dt_name, size, 1, timing,
                            models="diffusers AutoPipeline, full AutoencoderKL, prompt encoded per call, PIL out")

                rep.attempt(f"{mode} {variant} {dt_name} {size}", run)
        del t2i, i2i
    rep.write()


if __name__ == "__main__":
    main()
