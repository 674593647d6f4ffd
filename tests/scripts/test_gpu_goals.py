#!/usr/bin/env python3
"""scripts/gpu-goals.py: issue 22's goal lines from gpu-check.sh's JSON files.

    test_gpu_goals.py CLI FIXTURES

A real (CPU) bench output read as a dry run reads it, and made-up GPU results in the same schema: the verdicts and
ratios for goals met and not met, missing files reported as not measured.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "gpu-goals.py")
CLI, FIXTURES = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else (None, None)


def goals(out, dtype):
    r = subprocess.run([sys.executable, SCRIPT, out, "--dtype", dtype], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def e2e_row(mode, fps, graphs, pipelined=None, on_device=False, compiled=False, fused=True):
    extra = {"cuda_graphs": graphs}
    if pipelined:
        extra["pipelined"] = {"fps": pipelined, "frames": 100}
    variant = ("ae=taesd cfg=none t=35" + ("" if graphs else " graphs=off") + (" unet=compiled" if compiled else "")
               + ("" if fused else " fused-conv=off") + (" frame=device" if on_device else ""))
    return {"section": "e2e", "name": mode, "variant": variant, "fps": fps, "extra": extra}


def ms_rows(k, one, batched, compiled=False):
    variant = f"k={k} ae=taesd cfg=self t=32,45" + (" unet=compiled" if compiled else "")
    return [{"section": "multistream", "name": "one-by-one", "variant": variant,
             "extra": {"streams": k, "fps_total": one}},
            {"section": "multistream", "name": "batched", "variant": variant,
             "extra": {"streams": k, "fps_total": batched}}]


def write(folder, name, obj):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f)


class MadeUpGpuRun(unittest.TestCase):
    def test_taesd_unfused_rows_are_reported_and_never_taken_for_the_goal(self):
        with tempfile.TemporaryDirectory() as d:
            # The unfused rows first and faster: the goal must still read the fused (default) rows.
            write(d, "bench-fp16.json", {"device": "cuda", "results": [
                e2e_row("img2img", 151.0, True, on_device=True, fused=False), e2e_row("txt2img", 160.0, True, fused=False),
                e2e_row("img2img", 120.0, True, 125.0), e2e_row("img2img", 130.0, True, on_device=True),
                e2e_row("txt2img", 140.0, True)]})
            out = goals(d, "fp16")
            self.assertIn("goal 1 img2img >= 150 fps: 120.0 fps per frame, 125.0 back to back; frame on device 130.0 "
                          "fps per frame -> NOT MET", out)
            self.assertIn("TAESD unfused: img2img frame on device 151.0 fps per frame (fused 130.0 fps per frame), "
                          "txt2img 160.0 fps per frame (fused 140.0 fps per frame)", out)

    def test_the_compiled_unet_rows_count_and_are_named(self):
        with tempfile.TemporaryDirectory() as d:
            write(d, "bench-fp16.json", {"device": "cuda", "loads": [{"dtype": "fp16", "device_mib": 2600.0}],
                                         "results": [
                e2e_row("img2img", 90.0, True, 95.0), e2e_row("img2img", 30.0, False),
                e2e_row("img2img", 92.0, True, 97.0, on_device=True)]})
            # bench --compiled-unet: the own UNet's rows of the same run, and the compiled ones.
            write(d, "bench-compiled-fp16.json", {"device": "cuda", "loads": [{"dtype": "fp16", "device_mib": 3800.0}],
                                                  "results": [
                e2e_row("img2img", 88.0, True), e2e_row("img2img", 155.0, True, 170.0, compiled=True),
                e2e_row("img2img", 158.0, True, on_device=True, compiled=True)],
                "checks": [{"what": "compiled UNet vs the model's own UNet, one call, fp16 512 px",
                                 "max_abs_diff": 0.004, "max_abs_own": 3.5, "relative": 0.004 / 3.5}]})
            write(d, "peer-streamdiffusion.json", {"results": [
                {"name": "img2img", "variant": "ae=taesd cfg=none t=35", "fps": 50.0}]})
            out = goals(d, "fp16")
            self.assertIn("compiled UNet 155.0 fps per frame, 170.0 back to back, frame on device 158.0 fps per "
                          "frame -> MET (compiled UNet, host frame, per frame)", out)
            self.assertIn("compiled vs own UNet, same run: img2img 155.0 / 88.0 fps = x1.76", out)
            self.assertIn("max |diff| 0.004 of 3.5", out)
            self.assertIn("device memory after load: 3800 MiB with the compiled UNet, 2600 MiB without (+1200)", out)
            self.assertIn("goal 2 img2img >= 1.5x the original: 90.0 / 50.0 fps = x1.80 -> MET", out)
            self.assertIn("compiled UNet: 155.0 / 50.0 fps = x3.10", out)
            # Without the compiled run the own rows decide (and nothing about a compiled UNet is printed).
            os.remove(os.path.join(d, "bench-compiled-fp16.json"))
            out = goals(d, "fp16")
            self.assertIn("-> NOT MET", out.splitlines()[1])
            self.assertNotIn("compiled", out)

    def test_the_compiled_multistream_rows_count_for_goal_3(self):
        with tempfile.TemporaryDirectory() as d:
            write(d, "multistream.json", {"results": ms_rows(1, 58.0, 57.4) + ms_rows(16, 58.0, 97.7)})
            # Step 4b: the own UNet's table and the compiled one (a row range) of the same run.
            write(d, "multistream-compiled.json", {"results": ms_rows(1, 60.0, 60.0) + ms_rows(16, 60.0, 100.0)
                                                   + ms_rows(1, 90.0, 90.0, True) + ms_rows(16, 90.0, 400.0, True)})
            out = goals(d, "fp16")
            self.assertIn("goal 3 16 batched streams >= 4x one by one: 97.7 / 58.0 fps total = x1.68; compiled UNet "
                          "400.0 / 90.0 fps total = x4.44 -> MET", out)
            self.assertIn("     by K: 1: x0.99, 16: x1.68", out)
            self.assertIn("     compiled UNet by K: 1: x1.00, 16: x4.44", out)
            self.assertIn("16 streams batched, compiled vs own UNet, same run: 400.0 / 100.0 fps = x4.00", out)
            # Compiled rows below the goal: not met by either.
            write(d, "multistream-compiled.json", {"results": ms_rows(16, 60.0, 100.0)
                                                   + ms_rows(16, 90.0, 200.0, True)})
            out = goals(d, "fp16")
            self.assertIn("compiled UNet 200.0 / 90.0 fps total = x2.22 -> NOT MET", out)
            # Only the compiled file: goal 3 is still read.
            os.remove(os.path.join(d, "multistream.json"))
            out = goals(d, "fp16")
            self.assertIn("goal 3 16 batched streams >= 4x one by one: compiled UNet 200.0 / 90.0 fps total = x2.22 "
                          "-> NOT MET", out)

    def test_goals_met(self):
        with tempfile.TemporaryDirectory() as d:
            write(d, "bench-fp16.json", {"device": "cuda", "results": [
                e2e_row("txt2img", 190.0, True, 230.0), e2e_row("txt2img", 60.0, False),
                e2e_row("img2img", 160.0, True, 200.0), e2e_row("img2img", 50.0, False),
                e2e_row("img2img", 170.0, True, 210.0, on_device=True)]})
            write(d, "peer-streamdiffusion.json", {"results": [
                {"name": "img2img", "variant": "ae=taesd cfg=none t=35", "fps": 40.0},
                {"name": "img2img", "variant": "ae=taesd cfg=none t=35 frame=device", "fps": 42.5},
                {"name": "txt2img", "variant": "ae=taesd cfg=none t=0", "fps": 50.0}]})
            write(d, "multistream.json", {"results": ms_rows(1, 60, 60) + ms_rows(16, 60, 300)})
            out = goals(d, "fp16")
            self.assertIn("goal 1 img2img >= 150 fps: 160.0 fps per frame, 200.0 back to back; frame on device 170.0 "
                          "fps per frame, 210.0 back to back -> MET (host frame, per frame)", out)
            self.assertIn("frame on device: 170.0 / 42.5 fps = x4.00", out)
            self.assertIn("img2img graphs off: 50.0 fps per frame", out)
            self.assertIn("goal 2 img2img >= 1.5x the original: 160.0 / 40.0 fps = x4.00 -> MET", out)
            self.assertIn("txt2img: 190.0 / 50.0 fps = x3.80", out)
            self.assertIn("goal 3 16 batched streams >= 4x one by one: 300.0 / 60.0 fps total = x5.00 -> MET", out)
            self.assertIn("by K: 1: x1.00, 16: x5.00", out)

    def test_goals_not_met_or_met_back_to_back_only(self):
        with tempfile.TemporaryDirectory() as d:
            write(d, "bench-fp16.json", {"device": "cuda", "results": [e2e_row("img2img", 120.0, True, 130.0),
                                                                     e2e_row("img2img", 140.0, True, 155.0, True)]})
            write(d, "peer-streamdiffusion.json", {"results": [{"name": "img2img", "fps": 100.0}]})
            write(d, "multistream.json", {"results": ms_rows(16, 58.0, 97.7)})
            out = goals(d, "fp16")
            self.assertIn("goal 1 img2img >= 150 fps: 120.0 fps per frame, 130.0 back to back; frame on device 140.0 "
                          "fps per frame, 155.0 back to back -> MET (frame on device, back to back)", out)
            self.assertIn("x1.20 -> NOT MET", out)
            self.assertIn("97.7 / 58.0 fps total = x1.68 -> NOT MET", out)

    def test_missing_files_are_not_measured(self):
        with tempfile.TemporaryDirectory() as d:
            out = goals(d, "fp16")
            self.assertEqual(out.count("not measured"), 6, out)
            self.assertNotIn("MET", out.replace("NOT MET", ""))
        r = subprocess.run([sys.executable, SCRIPT, "/nonexistent/gpu-out"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("no folder /nonexistent/gpu-out", r.stderr)


@unittest.skipUnless(CLI and FIXTURES and os.path.isdir(os.path.join(FIXTURES or "", "models", "tiny-sd21")),
                     "needs the CLI and the fixtures")
class RealBenchOutput(unittest.TestCase):
    def test_dry_run_figures(self):
        with tempfile.TemporaryDirectory() as d:
            base = [CLI, "bench", "--model", os.path.join(FIXTURES, "models", "tiny-sd21"), "--device", "cpu",
                    "--sizes", "64", "--dtypes", "fp32", "--threads", "2", "--frames", "2", "--warmup", "1",
                    "--img2img-t-index", "35"]
            for extra, name in ((["--sections", "e2e", "--iters", "2", "--txt2img-t-index", "0", "--frame-on-device"],
                                 "bench-fp32.json"),
                                (["--sections", "multistream", "--streams", "1,2"], "multistream.json")):
                r = subprocess.run(base + extra + ["--json", os.path.join(d, name)], capture_output=True, text=True,
                                   timeout=600)
                self.assertEqual(r.returncode, 0, r.stderr[-2000:])
            out = goals(d, "fp32")
            self.assertIn("goals on cpu (fp32):", out)
            line = next(l for l in out.splitlines() if "goal 1" in l)
            fps = float(line.split(": ")[1].split(" fps")[0])
            self.assertGreater(fps, 0.0)
            dev = float(line.split("frame on device ")[1].split(" fps")[0])
            self.assertGreater(dev, 0.0)
            self.assertIn("goal 3 16 batched streams >= 4x one by one (largest K measured: 2):", out)
            self.assertIn("by K: 1: x", out)
            self.assertIn("goal 2 img2img >= 1.5x the original: not measured", out)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
