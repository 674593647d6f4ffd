"""run_stream: the real-time runtime from Python -- per-frame callback, live control, lossless folders, and Ctrl-C
(SIGINT to a process running run_stream) ending it cleanly with KeyboardInterrupt."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from conftest import child_env


@pytest.fixture(autouse=True)
def need_runtime(sd):
    if not sd.HAVE_RUNTIME:
        pytest.skip("built without the runtime (engine-only)")


def test_txt2img_ticks_with_callback_and_control(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img", t_index_list=[0]))
    s.prepare("red apple")
    seen = []

    def on_frame(image, index):
        arr = np.asarray(image)
        assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
        seen.append((index, arr.copy()))
        return "prompt rocket" if index == 2 else None

    summary = sd.run_stream(s, "none", "none", callback=on_frame, max_frames=6)
    assert [i for i, _ in seen] == list(range(6))
    assert summary["frames_out"] == 6
    assert any("prompt rocket" in str(c) for c in summary["controls"])
    assert s.stats.calls == 6


def test_callback_false_stops_and_exceptions_propagate(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img", t_index_list=[0]))
    s.prepare("cat face")
    n = []
    summary = sd.run_stream(s, callback=lambda im, i: n.append(i) or len(n) < 3)
    assert len(n) == 3 and "callback returned False" in summary["stop_reason"]

    def boom(image, index):
        raise ZeroDivisionError("from the callback")

    with pytest.raises(ZeroDivisionError, match="from the callback"):
        sd.run_stream(s, callback=boom, max_frames=50)


def test_img2img_folder_lossless(sd, emoji_models, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for k in range(5):
        Image.new("RGB", (80, 64), (40 * k, 100, 200 - 30 * k)).save(src / f"f{k:02d}.png")
    s = sd.Stream(emoji_models, sd.resolve_config(None, "img2img"))
    s.prepare("smiling face with sunglasses")
    got = []
    summary = sd.run_stream(s, str(src), str(tmp_path / "out"), callback=lambda im, i: got.append(i))
    assert got == [0, 1, 2, 3, 4]  # one output per input, in order, latency flushed
    assert summary["frames_in"] == 5 and summary["frames_out"] == 5 and summary["mode"] == "lossless"
    assert len(os.listdir(tmp_path / "out")) == 5


def test_unprepared_stream_refused(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img"))
    with pytest.raises(sd.InvalidArgument, match="prepare"):
        sd.run_stream(s)


CHILD = textwrap.dedent("""
    import sys, time
    import streamdiffusion_cpp as sd
    s = sd.Stream(sd.load_pipeline(None, threads=1), sd.resolve_config(None, "txt2img", t_index_list=[0]))
    s.prepare("rocket")
    frames = []
    def on_frame(image, index):
        frames.append(index)
        print("frame", index, flush=True)
    try:
        sd.run_stream(s, "none", "none", callback=on_frame, fps=20)  # endless ticks
    except KeyboardInterrupt:
        t = time.monotonic()
        print("KeyboardInterrupt after", len(frames), "frames", flush=True)
        # The stream is stopped and joined: the stream can run again at once.
        s2 = sd.run_stream(s, callback=lambda im, i: None, max_frames=2)
        print("rerun", s2["frames_out"], flush=True)
        sys.exit(42)
    print("run_stream returned without an interrupt", flush=True)
    sys.exit(3)
""")


def test_ctrl_c_ends_run_stream_cleanly(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env())
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.startswith("frame 3"):
                break
        assert lines and lines[-1] == "frame 3", (lines, p.stderr.read() if p.poll() is not None else "")
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        stopped_s = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    lines += out.splitlines()
    assert p.returncode == 42, (p.returncode, lines, err)
    assert any(l.startswith("KeyboardInterrupt after") for l in lines), lines
    assert "rerun 2" in lines
    assert stopped_s < 20, stopped_s
    assert "Traceback" not in err, err


def test_bad_control_line_is_invalid_argument(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img", t_index_list=[0]))
    s.prepare("rocket")
    with pytest.raises(sd.InvalidArgument, match="frobnicate"):
        sd.run_stream(s, callback=lambda image, index: "frobnicate 3", max_frames=20)
