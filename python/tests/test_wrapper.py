"""StreamDiffusionWrapper on the built-in emoji model, both modes, all output types; equal to the CLI's images."""
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import cli_path

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def cli_apple(tmp_path_factory):
    cli = cli_path()
    if not cli:
        pytest.skip("the streamdiffusion CLI is not built")
    out = tmp_path_factory.mktemp("cli") / "apple.png"
    subprocess.run([cli, "txt2img", "--prompt", "red apple", "-o", str(out), "--threads", "2"], check=True,
                   capture_output=True)
    return np.asarray(Image.open(out).convert("RGB"))


def test_txt2img_equals_the_cli(sd, cli_apple):
    w = sd.StreamDiffusionWrapper(mode="txt2img", threads=2)
    # Defaults from the model (streamdiffusion.json), as the CLI takes them.
    assert (w.width, w.height) == (64, 64)
    assert w.t_index_list == [0, 16, 32, 45] and w.cfg_type == "none"
    w.prepare("red apple")
    images = [w() for _ in range(len(w.t_index_list))]  # n-1 warm-up calls, as the CLI runs
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) for im in images)
    last = np.asarray(images[-1])
    diff = np.abs(last.astype(int) - cli_apple.astype(int))
    assert diff.max() == 0, f"wrapper vs CLI: max diff {diff.max()}"
    # A red apple: red dominates green and blue over the non-white pixels.
    fg = last[last.min(axis=2) < 200].astype(float)
    assert len(fg) > 100
    assert fg[:, 0].mean() > fg[:, 1].mean() + 20 and fg[:, 0].mean() > fg[:, 2].mean() + 20


def test_txt2img_output_types(sd):
    w = sd.StreamDiffusionWrapper(mode="txt2img", output_type="pt", t_index_list=[0], threads=2)
    w.prepare("rocket")
    pt = w.txt2img()
    assert isinstance(pt, torch.Tensor) and tuple(pt.shape) == (3, 64, 64)
    assert float(pt.min()) >= 0.0 and float(pt.max()) <= 1.0
    w.output_type = "np"
    w.prepare("rocket")
    arr = w.txt2img()
    assert isinstance(arr, np.ndarray) and arr.shape == (64, 64, 3) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, pt.permute(1, 2, 0).numpy(), atol=1e-6)  # same seed, same image
    w.output_type = "latent"
    w.prepare("rocket")
    raw = w.txt2img()
    assert tuple(raw.shape) == (3, 64, 64) and float(raw.min()) < 0.0  # the decoder output in [-1, 1]
    # "latent" is in the model's dtype (bf16 where "auto" picks it): numpy needs it as float.
    np.testing.assert_allclose(np.clip(raw.float().numpy() / 2 + 0.5, 0, 1).transpose(1, 2, 0), arr, atol=1e-6)


def test_img2img_on_pil_path_and_tensor(sd, tmp_path):
    src = Image.new("RGB", (96, 64), (255, 255, 255))
    src.paste((220, 30, 30), (30, 10, 66, 54))  # a red blob, wider than tall: centre-cropped to 64x64
    path = tmp_path / "in.png"
    src.save(path)
    w = sd.StreamDiffusionWrapper(mode="img2img", threads=2)
    assert w.t_index_list == [32, 45] and w.cfg_type == "self"
    w.prepare("red apple")
    first = w(str(path))  # warm-up output (the zero buffer)
    out = w(src)
    assert isinstance(out, Image.Image) and out.size == (64, 64)
    x = w.preprocess_image(src)
    assert x.shape == (1, 3, 64, 64) and x.dtype == "float32"
    # a pathlib.Path is a path too (it was a TypeError)
    assert np.array_equal(np.asarray(w.preprocess_image(path)), np.asarray(w.preprocess_image(str(path))))
    xa = np.asarray(x)
    assert xa.min() >= -1.0 and xa.max() <= 1.0
    # centre crop: the red blob (x 30..66 of 96) lands at 14..50 of 64
    assert xa[0, 0, 32, 32] > 0.5 and xa[0, 1, 32, 32] < -0.5 and xa[0, 1, 32, 5] > 0.9
    t = torch.from_dlpack(x)
    out_t = w.img2img(t)
    a, b = np.asarray(out).astype(float), np.asarray(out_t).astype(float)
    assert np.abs(a - b).mean() < 40  # same input, stream state moved on: similar pictures
    assert np.abs(np.asarray(first).astype(float) - a).mean() > 1  # the warm-up frame differs
    # The output follows the input: red where the blob was.
    o = np.asarray(out_t).astype(float)
    assert o[20:44, 20:44, 0].mean() > o[20:44, 20:44, 1].mean()


def test_wrapper_equals_the_stream(sd):
    """The wrapper adds nothing to the numbers: the same config through Stream gives the same image."""
    w = sd.StreamDiffusionWrapper(mode="txt2img", output_type="latent", t_index_list=[0, 32], threads=2)
    w.prepare("cat face")
    a = [np.asarray(w.txt2img().float()).copy() for _ in range(2)]  # model dtype (bf16 where auto picks it)
    s = sd.Stream(w.models, w.config)
    s.prepare("cat face")
    b = [np.asarray(s.txt2img().float())[0].copy() for _ in range(2)]
    assert np.array_equal(a[1], b[1])


def test_frame_buffer_size_returns_lists(sd):
    w = sd.StreamDiffusionWrapper(mode="txt2img", frame_buffer_size=2, t_index_list=[0], threads=2)
    w.prepare("rocket")
    out = w()
    assert isinstance(out, list) and len(out) == 2 and all(im.size == (64, 64) for im in out)


def test_upstream_arguments_accepted(sd, caplog):
    w = sd.StreamDiffusionWrapper(None, [32, 45], None, "img2img", "pil", None, None, "cpu", None, 1, 64, 64, 10,
                                  "tensorrt", True, None, True, True, True, 0.98, 10, True, "self", 2, False,
                                  "engines", threads=2)
    assert any("tensorrt" in r.message for r in caplog.records)
    assert w.stream.config.similarity_filter.enabled
    assert w.batch_size == 2


def _cpu_has_native_bf16():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False  # unknown flags: auto takes fp32


def test_dtype_auto_is_the_default_and_reported_resolved(sd, fixtures):
    # A model that names no "cpu_dtype": bf16 only where this CPU computes it natively (emulated bf16 is many times
    # slower than fp32).
    expected = "bf16" if _cpu_has_native_bf16() else "fp32"
    plain = os.path.join(fixtures, "models", "tiny-sd21")
    for kwargs in ({}, {"dtype": None}, {"dtype": "auto"}):
        assert sd.load_pipeline(plain, threads=1, **kwargs).dtype == expected, kwargs
    w = sd.StreamDiffusionWrapper(plain, mode="txt2img", t_index_list=[0], threads=1)
    assert w.dtype == expected and w.models.dtype == expected
    # The built-in model's streamdiffusion.json names fp32 for CPUs (in bf16 its conversions cost half its frame rate).
    for kwargs in ({}, {"dtype": None}, {"dtype": "auto"}):
        assert sd.load_pipeline(None, threads=1, **kwargs).dtype == "fp32", kwargs
    w = sd.StreamDiffusionWrapper(mode="txt2img", t_index_list=[0], threads=1)
    assert w.dtype == "fp32" and w.models.dtype == "fp32"
    assert sd.StreamDiffusionWrapper(mode="txt2img", t_index_list=[0], dtype="fp32", threads=1).dtype == "fp32"
    assert sd.StreamDiffusionWrapper(mode="txt2img", t_index_list=[0], dtype=torch.bfloat16, threads=1).dtype == "bf16"


def test_fp32_models_set_threads(sd, emoji_models):
    assert emoji_models.dtype == "fp32" and emoji_models.device == "cpu"
    assert emoji_models.vae_scale_factor == 8
    assert "emoji-tiny" in emoji_models.describe()
    assert os.path.isdir(sd.default_model_dir())


def test_hub_ids_resolve_to_the_local_cache_only(sd, tmp_path, monkeypatch):
    from streamdiffusion_cpp.wrapper import resolve_model_path

    snap = tmp_path / "hub" / "models--someone--emoji" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(sd.default_model_dir())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("someone/emoji") == str(snap)
    assert resolve_model_path("nobody/missing") == "nobody/missing"  # left for the loader to report
    w = sd.StreamDiffusionWrapper("someone/emoji", mode="txt2img", t_index_list=[0], threads=2)
    assert (w.width, w.height) == (64, 64)
    with pytest.raises(sd.FormatError, match="nobody/missing: no such file or folder"):
        sd.StreamDiffusionWrapper("nobody/missing")


def test_wrapper_on_an_sdxl_folder(sd, fixtures):
    """SDXL folders need nothing new: the wrapper loads the tiny SDXL (two text encoders, TAESDXL) by path."""
    model = os.path.join(fixtures, "sdxl", "models", "tiny-sdxl")
    if not os.path.isdir(model):
        pytest.skip("no sdxl fixtures")
    w = sd.StreamDiffusionWrapper(model, mode="txt2img", output_type="np", threads=2)
    w.prepare("a photo of a cat")
    out = None
    for _ in range(len(w.t_index_list)):
        out = w()
    arr = np.asarray(out)
    assert arr.shape == (64, 64, 3)
    assert arr.std() > 0  # a picture, not a constant
    assert "SDXL" in w.models.describe()
