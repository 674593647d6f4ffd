"""How much PyTorch's compiler (Inductor) would add to a graphed frame: a probe for the GPU host, not a peer.

Issue 22 asks 150 fps for sd-turbo 512 px 1-step img2img on the H200. Our engine replays each frame's kernels in CUDA
graphs already (fp16, channels-last, SDPA), so what is left is the kernels themselves: fewer and fused ones (norm +
activation, epilogues) are what Inductor (torch.compile, or AOTInductor's packages that libtorch 2 loads from C++)
makes. This runs the same img2img frame as our bench's e2e row with the frame on the device, in the same dtype, on the
same model folder, with diffusers 0.24's modules (the original StreamDiffusion's):

    TAESD encode -> add noise at t -> UNet (cfg none, one row) -> LCM denoise -> TAESD decode

and times it as
  - eager             the modules as they are (as the original StreamDiffusion runs them),
  - graphs=on         the eager frame captured once in a CUDA graph and replayed (what our engine does),
  - graphs=on inductor the UNet, TAESD encoder and decoder each torch.compile'd (Inductor, --compile-mode), then the
                       frame captured in a CUDA graph and replayed;
and the UNet alone with graphs on, eager and compiled. The ratio inductor / eager (graphs on) is what compiling would
add to our graphed frame (gpu-check prints it). Outputs are compared (the compiled frame's max |difference| from the
eager one, in `extra`). On a CPU (a dry run) only the eager and, where torch has torch.compile, the compiled rows run;
rows that cannot run are recorded in "skipped" with the reason.

Random prompt embeddings stand in for the text encoder (its output is computed once per prompt, outside the frame).
"""
import sys
import time

import torch

from common import Report, parse_args, time_frames, time_frames_cuda

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def extra_args(p):
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, or max-autotune-no-cudagraphs (Triton GEMM / convolution "
                        "templates timed against cuBLAS / cuDNN: minutes more); the frame is captured in a CUDA "
                        "graph here, so not reduce-overhead")
    p.add_argument("--no-channels-last", action="store_true", help="keep the modules NCHW (our engine: channels-last)")


def cuda_graph(fn, warmup=3):
    """fn() captured once (after warm-up calls on a side stream, as PyTorch's docs do) -> a replaying step."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def step():
        g.replay()
        return out
    return step


class Frame:
    """The img2img frame's arithmetic (spec section 3: the original's 1-step img2img with cfg none) over given modules."""

    def __init__(self, unet, encoder, decoder, vae_config, size, dtype, device):
        self.unet, self.encoder, self.decoder = unet, encoder, decoder
        self.sf = float(getattr(vae_config, "scaling_factor", 1.0))
        h = size // 8
        g = torch.Generator().manual_seed(0)
        self.image = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
        self.noise = torch.randn(1, 4, h, h, generator=g).to(device, dtype)
        width = unet.config.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        self.ehs = torch.randn(1, 77, width, generator=g).to(device, dtype)
        self.t = torch.tensor([299], device=device)
        # alpha_prod_t of the scaled-linear schedule at t = 299 and LCM's boundary scalings (values only shape the math).
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        a = torch.cumprod(1 - betas, 0)[299]
        self.alpha, self.beta = float(a.sqrt()), float((1 - a).sqrt())
        c = (299 * 10.0) ** 2
        self.c_skip, self.c_out = 0.25 / (c + 0.25), (299 * 10.0) / (c + 0.25) ** 0.5
        self.latent = self.noise.clone()

    def unet_only(self):
        return self.unet(self.latent, self.t, encoder_hidden_states=self.ehs, return_dict=False)[0]

    def __call__(self):
        lat = self.encoder(self.image) * self.sf                 # [1, 4, h, w] (AutoencoderTiny.encode's .latents)
        x = self.alpha * lat + self.beta * self.noise
        eps = self.unet(x, self.t, encoder_hidden_states=self.ehs, return_dict=False)[0]
        x0 = (x - self.beta * eps) / self.alpha
        den = self.c_skip * x + self.c_out * x0
        return self.decoder(den / self.sf).clamp(-1, 1)          # AutoencoderTiny.decode's .sample


def main():
    args = parse_args("diffusers+inductor", extra_args)
    cuda = args.device.startswith("cuda")
    rep = Report("diffusers+inductor", args, ["diffusers", "torch", "triton"])
    rep.j["device"] = args.device
    rep.j["options"]["compile_mode"] = args.compile_mode
    if cuda and not torch.cuda.is_available():
        rep.skip("all", f"--device {args.device} but torch.cuda.is_available() is False (torch {torch.__version__})")
        rep.write()
        return
    if cuda:
        rep.j["gpu"] = {"name": torch.cuda.get_device_name(0), "torch_cuda": torch.version.cuda}
        torch.backends.cudnn.benchmark = True  # as our engine does on CUDA (fixed shapes)
    torch.set_num_threads(args.threads)
    sys.modules.setdefault("peft", None)  # as run_streamdiffusion.py: diffusers 0.24 without the PEFT backend
    import safetensors.torch  # noqa: F401 - diffusers 0.24 calls safetensors.torch without importing it
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    can_compile = hasattr(torch, "compile")
    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        unet = UNet2DConditionModel.from_pretrained(f"{args.model}/unet", torch_dtype=dtype).to(args.device).eval()
        taesd = AutoencoderTiny.from_pretrained(f"{args.model}/taesd", torch_dtype=dtype).to(args.device).eval()
        layout = "nchw"
        if cuda and not args.no_channels_last:
            unet.to(memory_format=torch.channels_last)
            taesd.to(memory_format=torch.channels_last)
            layout = "channels-last"
        for size in args.sizes:
            eager = Frame(unet, taesd.encoder, taesd.decoder, taesd.config, size, dtype, args.device)
            variant = f"ae=taesd cfg=none t=35 frame=device {layout}"
            common = {"models": "diffusers 0.24 UNet2DConditionModel + AutoencoderTiny", "layout": layout}
            results = {}

            def timed(name, var, step, **extra):
                with torch.no_grad():
                    if cuda:
                        timing, more = time_frames_cuda(step, args.warmup, args.frames)
                        extra.update(more)
                    else:
                        timing = time_frames(step, args.warmup, args.frames)
                results[(name, var)] = timing["median_s"]
                rep.row(name, f"{variant} {var}", dt_name, size, 1, timing, **common, **extra)

            def run_eager():
                timed("img2img", "graphs=off", eager)
                if not cuda:  # on CUDA the UNet row is the graphed one
                    timed("unet", "graphs=off", eager.unet_only)

            rep.attempt(f"img2img eager {dt_name} {size}", run_eager)
            ref = {}
            if cuda:
                def run_graphs():
                    with torch.no_grad():
                        frame = cuda_graph(eager)
                        unet_step = cuda_graph(eager.unet_only)
                        ref["frame"] = frame().clone()
                    timed("img2img", "graphs=on", frame)
                    timed("unet", "graphs=on", unet_step)
                rep.attempt(f"img2img graphs=on {dt_name} {size}", run_graphs)
            else:
                rep.skip(f"img2img graphs=on {dt_name} {size}", "CUDA graphs need --device cuda")
            if not can_compile:
                rep.skip(f"inductor {dt_name} {size}", f"torch {torch.__version__} has no torch.compile")
                continue

            def run_compiled():
                t0 = time.perf_counter()
                cu = torch.compile(unet, mode=args.compile_mode, fullgraph=False)
                ce = torch.compile(taesd.encoder, mode=args.compile_mode, fullgraph=False)
                cd = torch.compile(taesd.decoder, mode=args.compile_mode, fullgraph=False)
                compiled = Frame(cu, ce, cd, taesd.config, size, dtype, args.device)
                with torch.no_grad():
                    out = compiled()  # compiles (the graph capture must not)
                    compiled.unet_only()
                    if cuda:
                        torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    base = ref.get("frame")
                    if base is None:
                        base = eager()
                    diff = float((out.float() - base.float()).abs().max())
                    print(f"  compiled in {compile_s:.1f} s; max |compiled - eager| = {diff:.4g}", flush=True)
                    frame = cuda_graph(compiled) if cuda else compiled
                    unet_step = cuda_graph(compiled.unet_only) if cuda else compiled.unet_only
                graphs = "graphs=on" if cuda else "graphs=off"
                timed("img2img", f"{graphs} inductor", frame, compile_s=compile_s, max_abs_diff_vs_eager=diff,
                      compile_mode=args.compile_mode)
                timed("unet", f"{graphs} inductor", unet_step, compile_s=compile_s, compile_mode=args.compile_mode)

            rep.attempt(f"inductor {dt_name} {size}", run_compiled)
            for name in ("img2img", "unet"):
                graphs = "graphs=on" if cuda else "graphs=off"
                base, fast = results.get((name, graphs)), results.get((name, f"{graphs} inductor"))
                if base and fast:
                    print(f"probe {name:7s} {dt_name} {size} px {graphs}: eager {1 / base:8.1f} fps, inductor "
                          f"{1 / fast:8.1f} fps: x{base / fast:.2f}", flush=True)
        del unet, taesd
        if cuda:
            torch.cuda.empty_cache()
    rep.write()


if __name__ == "__main__":
    main()
