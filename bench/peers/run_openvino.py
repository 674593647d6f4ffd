"""OpenVINO as FastSD CPU uses it: optimum-intel's OVStableDiffusionPipeline / OVStableDiffusionImg2ImgPipeline on IR
exported from the diffusers folder (optimum's exporter, done once and kept under
~/.cache/streamdiffusion-bench/peers/openvino-ir/), reshaped to the static size (batch left dynamic) and compiled for
CPU with the thread count and the inference precision of the row (fp32 -> f32, bf16 -> bf16 hint). sd-turbo
settings: txt2img 1 step guidance 0, img2img 2 steps strength 0.5 (one UNet step), the full VAE as the pipeline
has it, PIL image out.
"""
import hashlib
import os

import numpy as np
import PIL.Image

from common import Report, parse_args, time_frames


def exported(model):
    """The IR folder of this diffusers folder, exported on first use."""
    model = os.path.abspath(model)
    key = hashlib.sha1(f"{model}:{os.path.getmtime(os.path.join(model, 'unet'))}".encode()).hexdigest()[:10]
    out = os.path.expanduser(f"~/.cache/streamdiffusion-bench/peers/openvino-ir/{os.path.basename(model)}-{key}")
    if not os.path.exists(os.path.join(out, "model_index.json")):
        from optimum.intel import OVStableDiffusionPipeline
        print(f"exporting {model} to OpenVINO IR in {out} (once)", flush=True)
        OVStableDiffusionPipeline.from_pretrained(model, export=True, compile=False).save_pretrained(out)
    return out


def main():
    args = parse_args("openvino")
    rep = Report("openvino", args, ["openvino", "optimum-intel", "optimum", "diffusers", "transformers", "torch"])
    from optimum.intel import OVStableDiffusionImg2ImgPipeline, OVStableDiffusionPipeline
    try:
        ir = exported(args.model)
    except Exception as e:  # noqa: BLE001
        rep.skip("all", f"export to OpenVINO IR failed: {type(e).__name__}: {e}")
        rep.write()
        return
    for dt_name in args.dtypes:
        ov_config = {"INFERENCE_NUM_THREADS": args.threads, "CACHE_DIR": "",
                     "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[dt_name]}
        for size in args.sizes:
            image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
            for mode in args.modes:
                cls = OVStableDiffusionImg2ImgPipeline if mode == "img2img" else OVStableDiffusionPipeline
                variant = ("OVStableDiffusionImg2ImgPipeline vae=full steps=2 strength=0.5" if mode == "img2img"
                           else "OVStableDiffusionPipeline vae=full steps=1")

                def run(cls=cls, mode=mode, variant=variant, size=size):
                    pipe = cls.from_pretrained(ir, compile=False, ov_config=ov_config)
                    # Static height / width; the batch stays dynamic (as FastSD CPU reshapes): optimum-intel's static
                    # UNet batch assumes CFG (2 rows), which guidance 0 does not run.
                    pipe.reshape(batch_size=-1, height=size, width=size, num_images_per_prompt=1)
                    pipe.compile()
                    if mode == "img2img":
                        call = lambda: pipe(args.prompt, image=image, num_inference_steps=2, strength=0.5,  # noqa
                                            guidance_scale=0.0)
                    else:
                        call = lambda: pipe(args.prompt, num_inference_steps=1, guidance_scale=0.0,  # noqa
                                            height=size, width=size)
                    timing = time_frames(call, args.warmup, args.frames)
                    prec = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
                    rep.row(mode, variant, dt_name, size, 1, timing, inference_precision=prec.get_type_name() if hasattr(prec, "get_type_name") else str(prec),
                            models="optimum-intel OV pipeline on exported IR, static shapes, full VAE, PIL out")

                rep.attempt(f"{mode} {variant} {dt_name} {size}", run)
    rep.write()


if __name__ == "__main__":
    main()
