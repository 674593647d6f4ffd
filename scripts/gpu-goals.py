#!/usr/bin/env python3
"""Issue 22's goals, read from a gpu-check.sh result folder (its JSON files), one line each.

    scripts/gpu-goals.py OUT_DIR [--dtype fp16]

Goals (512 px, sd-turbo, 1 step, TAESD, on the lent GPU):
  1. img2img >= 150 fps (bench e2e rows, CUDA graphs on, the frame a host tensor and already on the device; the
     per-frame figure synchronises after every frame, the back-to-back one once for all: all are printed, the
     verdict names the first that met it: per-frame figures first, the host frame before the frame on device);
  2. img2img >= 1.5x the original StreamDiffusion on the same GPU and model (peer-streamdiffusion.json), host frame
     against host frame (and frame on device against its --frame-on-device row, when both are there);
  3. 16 batched streams >= 4x the throughput of 16 streams run one by one (multistream.json: the largest K).
Goals 1 and 2 also count the compiled UNet's rows (bench-compiled-DTYPE.json, bench --compiled-unet), goal 3 the
multistream rows with a compiled UNet of a row range (multistream-compiled.json), named as such.
Also printed: txt2img, the autotuner-off rows and the 1-step multi-stream rows when present. A missing file is
reported as "not measured", never as a failure of the script; the exit code is 0 unless OUT_DIR does not exist.
"""
import argparse
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def e2e(bench, mode, graphs, on_device=False, compiled=False, fused=True):
    """The e2e row of `mode` with CUDA graphs on/off (and the frame on the device or not; the compiled UNet's rows,
    variant 'unet=compiled', or the model's own UNet's; TAESD's convolutions fused or, fused=False, not: variant
    'fused-conv=off'): (fps, back-to-back fps or None), or None. Off CUDA (a dry run) the bench has no graphs rows: its
    row stands for "on"."""
    rows = [r for r in (bench or {}).get("results", []) if r.get("section") == "e2e" and r.get("name") == mode
            and r.get("variant", "").endswith(" frame=device") == on_device
            and ("unet=compiled" in r.get("variant", "")) == compiled
            and ("fused-conv=off" in r.get("variant", "")) != fused]
    if not any(r.get("extra", {}).get("cuda_graphs") for r in rows):
        rows = rows[:1] if graphs else []
        graphs = False
    for r in rows:
        x = r.get("extra", {})
        if bool(x.get("cuda_graphs")) == graphs:
            return r.get("fps", 0.0), (x.get("pipelined") or {}).get("fps")
    return None


def peer_fps(peer, mode, on_device=False):
    for r in (peer or {}).get("results", []):
        if r.get("name") == mode and r.get("variant", "").endswith(" frame=device") == on_device:
            return r.get("fps")
    return None


def multistream(ms, compiled=False):
    """{K: {"one-by-one": fps_total, "batched": fps_total}} of a multistream JSON: the rows of the model's own UNet, or
    of the compiled UNet (variant 'unet=compiled', bench --compiled-unet)."""
    rows = {}
    for r in (ms or {}).get("results", []):
        x = r.get("extra", {})
        if (r.get("section") == "multistream" and "streams" in x
                and ("unet=compiled" in r.get("variant", "")) == compiled):
            rows.setdefault(int(x["streams"]), {})[r.get("name")] = x.get("fps_total", 0.0)
    return rows


def verdict(ok):
    return "MET" if ok else "NOT MET"


def fmt_row(row):
    if row is None:
        return "not measured"
    fps, b2b = row
    return f"{fps:.1f} fps per frame" + (f", {b2b:.1f} back to back" if b2b else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dtype", default="fp16")
    a = ap.parse_args()
    if not os.path.isdir(a.out):
        print(f"gpu-goals: no folder {a.out}", file=sys.stderr)
        return 2
    bench = load(os.path.join(a.out, f"bench-{a.dtype}.json"))
    tuner_off = load(os.path.join(a.out, f"bench-{a.dtype}-autotuner-off.json"))
    compiled = load(os.path.join(a.out, f"bench-compiled-{a.dtype}.json"))  # step 3a: --compiled-unet
    peer = load(os.path.join(a.out, "peer-streamdiffusion.json"))
    ms = multistream(load(os.path.join(a.out, "multistream.json")))
    ms1 = multistream(load(os.path.join(a.out, "multistream-1step.json")))
    ms_c_json = load(os.path.join(a.out, "multistream-compiled.json"))  # step 4b: --compiled-unet, a row range
    ms_c, ms_c_own = multistream(ms_c_json, compiled=True), multistream(ms_c_json)
    device = (bench or {}).get("device", "?")
    out = []

    img = e2e(bench, "img2img", True)
    img_dev = e2e(bench, "img2img", True, on_device=True)
    # The compiled UNet's rows (bench --compiled-unet): the same engine and frame with the UNet calls run by the
    # AOTInductor package; its file also has the model's own UNet's rows of the same run, side by side.
    c_img = e2e(compiled, "img2img", True, compiled=True)
    c_img_dev = e2e(compiled, "img2img", True, on_device=True, compiled=True)
    if img is None and img_dev is None and c_img is None and c_img_dev is None:
        out.append("goal 1 img2img >= 150 fps: not measured (no e2e img2img row with CUDA graphs on)")
    else:
        # Every figure of the goal's configuration, the verdict by the first that reaches 150 (most conservative first).
        figures = []
        for i, how in ((0, "per frame"), (1, "back to back")):  # synchronised every frame first
            for row, where in ((img, "host frame"), (img_dev, "frame on device"), (c_img, "compiled UNet, host frame"),
                               (c_img_dev, "compiled UNet, frame on device")):
                if row and row[i]:
                    figures.append((row[i], f"{where}, {how}"))
        met = next((how for fps, how in figures if fps >= 150), None)
        line = f"goal 1 img2img >= 150 fps: {fmt_row(img)}; frame on device {fmt_row(img_dev)}"
        if compiled is not None:
            line += f"; compiled UNet {fmt_row(c_img)}, frame on device {fmt_row(c_img_dev)}"
        out.append(line + " -> " + (f"MET ({met})" if met else "NOT MET"))
        if compiled is not None:
            own_same_run = e2e(compiled, "img2img", True)
            if own_same_run and c_img:
                out.append(f"     compiled vs own UNet, same run: img2img {c_img[0]:.1f} / {own_same_run[0]:.1f} fps = "
                           f"x{c_img[0] / own_same_run[0]:.2f}")
            for c in compiled.get("checks", []):
                if "max_abs_diff" in c:
                    out.append(f"     {c['what']}: max |diff| {c['max_abs_diff']:.3g} of {c['max_abs_own']:.3g}")
            # What the package costs in device memory: the model set loaded with it against without (bench-DTYPE).
            own_mib = next((l["device_mib"] for l in (bench or {}).get("loads", []) if "device_mib" in l), None)
            c_mib = next((l["device_mib"] for l in compiled.get("loads", []) if "device_mib" in l), None)
            if own_mib is not None and c_mib is not None:
                out.append(f"     device memory after load: {c_mib:.0f} MiB with the compiled UNet, {own_mib:.0f} MiB "
                           f"without (+{c_mib - own_mib:.0f})")
    for mode in ("txt2img",):
        out.append(f"     {mode}: {fmt_row(e2e(bench, mode, True))}; graphs off {fmt_row(e2e(bench, mode, False))}")
    out.append(f"     img2img graphs off: {fmt_row(e2e(bench, 'img2img', False))}")
    if tuner_off is not None:
        out.append(f"     autotuner off: img2img {fmt_row(e2e(tuner_off, 'img2img', True))}, "
                   f"txt2img {fmt_row(e2e(tuner_off, 'txt2img', True))}")

    u_img, u_txt = e2e(bench, "img2img", True, on_device=True, fused=False), e2e(bench, "txt2img", True, fused=False)
    if u_img or u_txt:  # TAESD's cuDNN-fused convolution + ReLU off, same run (the rows above have it on)
        out.append(f"     TAESD unfused: img2img frame on device {fmt_row(u_img)} (fused {fmt_row(img_dev)}), "
                   f"txt2img {fmt_row(u_txt)} (fused {fmt_row(e2e(bench, 'txt2img', True))})")

    theirs = peer_fps(peer, "img2img")
    theirs_dev = peer_fps(peer, "img2img", on_device=True)
    if img is None or not theirs:
        out.append("goal 2 img2img >= 1.5x the original: not measured"
                   + ("" if theirs else " (no peer-streamdiffusion.json img2img row)"))
    else:
        ratio = img[0] / theirs
        out.append(f"goal 2 img2img >= 1.5x the original: {img[0]:.1f} / {theirs:.1f} fps = x{ratio:.2f} -> "
                   f"{verdict(ratio >= 1.5)}")
        if c_img:
            out.append(f"     compiled UNet: {c_img[0]:.1f} / {theirs:.1f} fps = x{c_img[0] / theirs:.2f}")
        if img_dev and theirs_dev:
            out.append(f"     frame on device: {img_dev[0]:.1f} / {theirs_dev:.1f} fps = x{img_dev[0] / theirs_dev:.2f}")
        t_ours, t_theirs = e2e(bench, "txt2img", True), peer_fps(peer, "txt2img")
        if t_ours and t_theirs:
            out.append(f"     txt2img: {t_ours[0]:.1f} / {t_theirs:.1f} fps = x{t_ours[0] / t_theirs:.2f}")

    def paired(table):
        return [k for k, v in table.items() if "batched" in v and "one-by-one" in v]

    both, both_c = paired(ms), paired(ms_c)
    if not both and not both_c:
        out.append("goal 3 16 batched streams >= 4x one by one: not measured (no multistream.json rows)")
    else:
        # The model's own UNet (step 4) and the compiled UNet of a row range (step 4b, both ways compiled); the verdict
        # by either at 16 streams.
        figures, by_k, met, kmax = [], [], False, max(both + both_c)
        for table, keys, what in ((ms, both, ""), (ms_c, both_c, "compiled UNet ")):
            if not keys:
                continue
            k = max(keys)
            b, o = table[k]["batched"], table[k]["one-by-one"]
            ratio = b / o if o else 0.0
            met = met or (k == 16 and ratio >= 4)
            figures.append(f"{what}{b:.1f} / {o:.1f} fps total = x{ratio:.2f}" + ("" if k == kmax else f" (K {k})"))
            by_k.append(f"     {what}by K: " + ", ".join(
                f"{kk}: x{table[kk]['batched'] / table[kk]['one-by-one']:.2f}" for kk in sorted(keys)
                if table[kk]["one-by-one"]))
        label = "goal 3 16 batched streams >= 4x one by one" + ("" if kmax == 16 else f" (largest K measured: {kmax})")
        out.append(f"{label}: {'; '.join(figures)} -> {verdict(met)}")
        out.extend(by_k)
        for k in sorted(ms_c):  # compiled vs the own UNet of the same run (step 4b)
            if "batched" in ms_c[k] and "batched" in ms_c_own.get(k, {}) and ms_c_own[k]["batched"]:
                out.append(f"     {k} streams batched, compiled vs own UNet, same run: {ms_c[k]['batched']:.1f} / "
                           f"{ms_c_own[k]['batched']:.1f} fps = x{ms_c[k]['batched'] / ms_c_own[k]['batched']:.2f}")
    for k in sorted(ms1):
        v = ms1[k]
        if "batched" in v:
            out.append(f"     1 step, {k} streams: {v['batched']:.1f} fps total batched"
                       + (f", {v['one-by-one']:.1f} one by one" if "one-by-one" in v else ""))
    print(f"goals on {device} ({a.dtype}):")
    for line in out:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
