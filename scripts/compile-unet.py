#!/usr/bin/env python3
"""Compiles a model folder's UNet with PyTorch's AOTInductor for one stream shape, into a package the engine loads
(`--compiled-unet FILE`, libtorch >= 2.11 builds): the fused kernels Inductor makes in place of libtorch's eager ones.

    python3 scripts/compile-unet.py MODEL_DIR --out unet.pt2 [--device cuda] [--dtype fp16] [--width 512]
                                    [--height 512] [--rows 1 | --rows 1-32] [--mode default|max-autotune]

Needs Python with torch >= 2.11 (the same version as the engine's libtorch: a package is built against it) and
diffusers (0.24 or later) on the machine whose device it targets (CUDA: that GPU's host, which compiles Triton kernels
for it). The package holds the compiled code only, not the weights: the engine hands its own loaded UNet's weights to
it by name (diffusers' state-dict keys, which are ours), so LoRAs fused at load, single-file checkpoints and every
other conversion of the loader apply, and the compiled UNet computes with exactly the weights the engine's own UNet
holds. Constants folded from the weights are folded again at run time from those (use_runtime_constant_folding).

The shapes: sample [rows, in_channels, height/8, width/8], timesteps [rows] int64, encoder_hidden_states
[rows, 77, cross_attention_dim], in --dtype on --device; rows = the UNet rows per call (stream batch x the cfg rows:
1 for sd-turbo with 1 step and cfg none; K streams batched by serve or bench's multistream section: their sum).
--rows N fixes them; --rows MIN-MAX exports the row count as a dynamic size (torch.export.Dim), so one package serves
every call from MIN to MAX rows (serve's batched streams, whose row count varies with the clients waiting), with the
same fused kernels. The engine uses the package for calls of that shape and its own UNet for any other (and for
ControlNet, SDXL's added conditioning, the deep-feature cache, int8). The package's metadata (streamdiffusion.*)
records the shapes and row range, dtype, device, the UNet config and each weight's shape, which the engine checks at
load, naming what differs.
"""
import argparse
import hashlib
import json
import os
import sys
import time

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="diffusers model folder (with unet/) or a unet folder")
    p.add_argument("--out", required=True, help="package file to write (.pt2)")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--rows", default="1",
                   help="UNet rows per call (stream batch x cfg rows), N or MIN-MAX (a dynamic row count: one package "
                        "for every call from MIN to MAX rows)")
    p.add_argument("--tokens", type=int, default=77, help="prompt-embedding rows (77; + IP-Adapter tokens)")
    p.add_argument("--mode", default="default", choices=["default", "max-autotune"],
                   help="max-autotune: Triton GEMM / convolution templates timed against cuBLAS / cuDNN (slower to "
                        "compile)")
    a = p.parse_args()

    # The arguments first, before torch is imported (seconds), so that a mistake is named at once.
    try:
        lo, dash, hi = a.rows.partition("-")
        rows_min, rows_max = int(lo), int(hi if dash else lo)  # "4-" is not a range
    except ValueError:
        sys.exit(f"compile-unet: --rows {a.rows!r} is not N or MIN-MAX (e.g. 1 or 1-32)")
    if a.width % 8 or a.height % 8 or rows_min < 1 or rows_max < rows_min:
        sys.exit("compile-unet: --width / --height must be multiples of 8, --rows N >= 1 (or MIN-MAX with 1 <= MIN <= "
                 "MAX)")
    # The example inputs' row count. A dynamic one must not be 1: torch.export specialises sizes 0 and 1.
    rows = rows_min if rows_min == rows_max else max(rows_min, 2)
    unet_dir = os.path.join(a.model, "unet") if os.path.isdir(os.path.join(a.model, "unet")) else a.model
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        sys.exit(f"compile-unet: {unet_dir}/config.json not found (expected a diffusers folder with unet/)")

    import torch
    import torch._inductor

    sys.modules.setdefault("peft", None)  # diffusers 0.24 without the PEFT backend, as the engine has no PEFT layers
    import safetensors.torch  # noqa: F401 - diffusers 0.24 calls safetensors.torch without importing it
    from diffusers import UNet2DConditionModel

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 11):
        sys.exit(f"compile-unet: torch {torch.__version__} is older than 2.11, the oldest whose AOTInductor packages the "
                 "engine loads (load_constants with user-managed weights)")
    dtype = getattr(torch, DTYPES[a.dtype])
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("compile-unet: --device cuda but torch.cuda.is_available() is False")

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype).to(device).eval()
    channels_last = device.type == "cuda"  # as the engine converts the UNet's 4-d weights on CUDA (conv_layout.h)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    cfg = unet.config
    ctx = cfg.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    if getattr(cfg, "addition_embed_type", None) or getattr(cfg, "time_cond_proj_dim", None):
        sys.exit("compile-unet: SDXL (added conditioning) and guidance-embedding UNets are not supported here yet")

    h, w = a.height // 8, a.width // 8
    sample = torch.randn(rows, cfg.in_channels, h, w, device=device, dtype=dtype)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    timesteps = torch.full((rows,), 500, dtype=torch.int64, device=device)
    ehs = torch.randn(rows, a.tokens, ctx, device=device, dtype=dtype)

    # Each weight's shape and strides under its diffusers key (the engine's name for it).
    weights = {k: [list(v.shape), list(v.stride()), str(v.dtype).replace("torch.", "")]
               for k, v in unet.state_dict().items()}
    config = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    meta = {
        "streamdiffusion.component": "unet",
        "streamdiffusion.format": "1",
        "streamdiffusion.device": device.type,
        "streamdiffusion.dtype": a.dtype,
        "streamdiffusion.sample": ",".join(map(str, sample.shape)),
        "streamdiffusion.sample_layout": "channels_last" if channels_last else "contiguous",
        "streamdiffusion.context": ",".join(map(str, ehs.shape)),
        "streamdiffusion.rows": f"{rows_min}-{rows_max}",  # the calls it takes: sample and context with these rows
        "streamdiffusion.weights": json.dumps(weights, separators=(",", ":")),
        "streamdiffusion.config": json.dumps(config, sort_keys=True, separators=(",", ":")),
        "streamdiffusion.config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "streamdiffusion.torch": torch.__version__,
        "streamdiffusion.mode": a.mode,
    }
    with torch.no_grad():
        # The UNet itself (not a wrapper module), so that its constants keep diffusers' keys; the inputs flatten to
        # (sample, timesteps, encoder_hidden_states), the output to the noise prediction.
        dynamic = None
        if rows_min != rows_max:  # one size shared by the three inputs' first dimension
            dim = torch.export.Dim("rows", min=rows_min, max=rows_max)
            dynamic = {"sample": {0: dim}, "timestep": {0: dim}, "encoder_hidden_states": {0: dim}, "return_dict": None}
        ep = torch.export.export(unet, (sample, timesteps),
                                 kwargs={"encoder_hidden_states": ehs, "return_dict": False}, dynamic_shapes=dynamic)
        t_export = time.perf_counter() - t0
        configs = {
            "aot_inductor.package_constants_in_so": False,  # the engine provides the weights
            "aot_inductor.use_runtime_constant_folding": True,  # folded constants come from the engine's weights
            "aot_inductor.metadata": meta,
            "max_autotune": a.mode == "max-autotune",
        }
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.abspath(a.out),
                                                        inductor_configs=configs)
    shape = (f"{rows_min}-{rows_max}" if rows_min != rows_max else str(rows),) + tuple(sample.shape[1:])
    print(f"compile-unet: {unet_dir} -> {path}: sample ({', '.join(map(str, shape))}) {a.dtype} on {device.type}, "
          f"export {t_export:.1f} s, total {time.perf_counter() - t0:.1f} s, {len(weights)} weights", flush=True)


if __name__ == "__main__":
    main()
