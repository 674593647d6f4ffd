"""Shared by the peer runners: the options of `streamdiffusion bench`, timing, and JSON in its shape.

Each runner measures whole frames (section e2e, rows img2img / txt2img at the requested sizes and dtypes) and writes
{"schema": "streamdiffusion-bench/1", "peer": ..., "versions": {...}, "cpu": {...}, "results": [...],
 "skipped": [{"variant", "reason"}]} with results rows as `streamdiffusion bench --json` writes them
(section, name, variant, dtype, size, steps, median_s, min_s, max_s, mean_s, samples_s, iters, fps) plus "peer".
A peer or a row that cannot run is recorded in "skipped" with the reason, never silently dropped.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback


def parse_args(peer, extra=None):
    p = argparse.ArgumentParser(description=f"{peer}: whole frames as `streamdiffusion bench --sections e2e` times them")
    p.add_argument("--model", required=True, help="diffusers folder (with taesd/ for the TAESD rows)")
    p.add_argument("--sizes", default="512")
    p.add_argument("--dtypes", default="bf16", help="fp32,bf16")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores)")
    p.add_argument("--frames", type=int, default=10, help="timed frames per row (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt", default="a photo of a cat, trending on artstation")
    p.add_argument("--img2img-t-index", default="35")
    p.add_argument("--txt2img-t-index", default="0")
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--modes", default="img2img,txt2img")
    p.add_argument("--json", required=True, help="output file")
    if extra:
        extra(p)
    a = p.parse_args()
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    a.dtypes = [d for d in a.dtypes.split(",") if d]
    a.modes = [m for m in a.modes.split(",") if m]
    a.img2img_t = [int(t) for t in a.img2img_t_index.split(",")]
    a.txt2img_t = [int(t) for t in a.txt2img_t_index.split(",")]
    a.threads = a.threads or os.cpu_count()
    return a


def cpu_info():
    info = {"model": platform.processor(), "flags": []}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "Model name":
                info["model"] = v.strip()
            elif k.strip() == "CPU family":
                info["family"] = v.strip()
            elif k.strip() == "Model":
                info["model_number"] = v.strip()
            elif k.strip() == "Flags":
                info["flags"] = v.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def versions(*packages):
    v = {"python": platform.python_version()}
    for p in packages:
        try:
            v[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            try:  # Debian's python3-torch has no dist-info that importlib sees under every name
                v[p] = __import__(p).__version__
            except Exception:
                v[p] = None
    return v


def allocator():
    pre = os.environ.get("LD_PRELOAD", "")
    return "tcmalloc" if "tcmalloc" in pre else "glibc"


def time_frames(step, warmup, frames):
    """Untimed warm-up calls, then `frames` timed calls: the row's timing fields."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(frames):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    med = statistics.median(samples)
    return {"median_s": med, "min_s": min(samples), "max_s": max(samples), "mean_s": statistics.fmean(samples),
            "samples_s": samples, "iters": len(samples), "fps": 1.0 / med if med > 0 else 0.0}


def time_frames_cuda(step, warmup, frames):
    """Warm-up, then `frames` whole frames each synchronised (the row's timing), plus CUDA-event and back-to-back
    figures for `extra`."""
    import torch  # the runners that time on a GPU have it; this module itself does not need it

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    samples, events = [], []
    for _ in range(frames):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        e0.record()
        step()
        e1.record()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
        events.append(e0.elapsed_time(e1) / 1000.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(frames):
        out = step()
    torch.cuda.synchronize()
    b2b = (time.perf_counter() - t0) / max(1, frames)
    med = statistics.median(samples)
    timing = {"median_s": med, "min_s": min(samples), "max_s": max(samples), "mean_s": statistics.fmean(samples),
              "samples_s": samples, "iters": len(samples), "fps": 1.0 / med if med > 0 else 0.0}
    extra = {"cuda_event_median_s": statistics.median(events),
             "back_to_back_s_per_frame": b2b, "back_to_back_fps": 1.0 / b2b if b2b > 0 else 0.0,
             "output_finite": bool(torch.isfinite(out).all().item()) if torch.is_tensor(out) else None}
    return timing, extra


class Report:
    def __init__(self, peer, args, packages):
        self.args = args
        self.j = {"schema": "streamdiffusion-bench/1", "peer": peer, "model": os.path.abspath(args.model),
                  "versions": versions(*packages), "allocator": allocator(), "threads": args.threads,
                  "sizes": args.sizes, "dtypes": args.dtypes, "cpu": cpu_info(),
                  "options": {"frames": args.frames, "warmup": args.warmup, "prompt": args.prompt,
                              "img2img_t_index": args.img2img_t, "txt2img_t_index": args.txt2img_t,
                              "num_inference_steps": args.num_inference_steps},
                  "results": [], "skipped": []}
        print(f"{peer}: {self.j['versions']}, {args.threads} threads, allocator {self.j['allocator']}", flush=True)

    def row(self, name, variant, dtype, size, steps, timing, **extra):
        r = {"peer": self.j["peer"], "section": "e2e", "name": name, "variant": variant, "dtype": dtype,
             "size": size, "batch": 1, "steps": steps, **timing}
        if extra:
            r["extra"] = extra
        self.j["results"].append(r)
        self.write(quiet=True)  # a later crash of the peer keeps the rows so far
        print(f"  {name:8s} {variant:40s} {dtype:5s} {size:5d} px  {timing['median_s']:9.4f} s  "
              f"{timing['fps']:8.3f} fps", flush=True)

    def skip(self, variant, reason):
        self.j["skipped"].append({"variant": variant, "reason": reason})
        self.write(quiet=True)
        print(f"  peer skipped: {variant}: {reason}", flush=True)

    def attempt(self, variant, fn):
        """Run fn(); an exception becomes a 'skipped' entry with its last line as the reason."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of a peer is a result to record
            traceback.print_exc()
            self.skip(variant, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")

    def write(self, quiet=False):
        with open(self.args.json, "w") as f:
            json.dump(self.j, f, indent=2)
        if not quiet:
            print(f"wrote {self.args.json}", flush=True)


def skip_peer(peer, args, packages, reason):
    """The whole peer cannot run: a report with no rows and the reason."""
    r = Report(peer, args, packages)
    r.skip("all", reason)
    r.write()
    sys.exit(0)
