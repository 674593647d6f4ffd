"""ControlNet and IP-Adapter from Python on the fixtures (tiny-sd15, controlnet/models/tiny-controlnet-sd15,
ipadapter/models/tiny-ip-adapter-sd15): ControlNet.load, Stream.set_controlnets / set_controlnet_scale /
set_control_image / set_controlnet_every, control_preprocess, load_pipeline(ip_adapter=) + set_image_prompt, and the
wrapper's controlnets= / ip_adapter= arguments, run_stream's second sources (control_input, image_prompt_input).
Scale 0 equals no ControlNet bit for bit; a ControlNet and an image
prompt change the output."""
import os

import numpy as np
import pytest

CN = os.path.join("controlnet", "models", "tiny-controlnet-sd15")
IPA = os.path.join("ipadapter", "models", "tiny-ip-adapter-sd15")
MODEL = os.path.join("models", "tiny-sd15")


@pytest.fixture(scope="module")
def paths(fixtures):
    p = {k: os.path.join(fixtures, v) for k, v in (("cn", CN), ("ipa", IPA), ("model", MODEL))}
    if not os.path.exists(os.path.join(p["cn"], "config.json")) or not os.path.isdir(p["model"]):
        pytest.skip("no ControlNet fixtures")
    return p


@pytest.fixture(scope="module")
def models(sd, paths):
    return sd.load_pipeline(paths["model"], dtype="fp32", threads=1)


@pytest.fixture(scope="module")
def cn(sd, paths, models):
    return sd.ControlNet.load(paths["cn"], models)


def config(sd):
    c = sd.StreamConfig()
    c.width = c.height = 64
    c.t_index_list = [32]
    c.cfg_type = "none"
    return c


def frame():
    return np.linspace(-1, 1, 3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)


def control_u8():
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = 255
    img[28:36, :] = 128
    return img


def run(sd, models, setup=None, calls=2):
    s = sd.Stream(models, config(sd))
    s.prepare("a cat")
    if setup:
        setup(s)
    outs = [np.asarray(s.img2img(frame())).copy() for _ in range(calls)]
    return np.concatenate(outs), s


def test_controlnet_load_and_describe(sd, cn, paths):
    assert cn.name == "tiny-controlnet-sd15"
    assert cn.path == paths["cn"]
    assert cn.image_scale == 8
    assert "ControlNet" in cn.describe() and "diffusers folder" in cn.describe()


def test_scale_zero_equals_no_controlnet_bit_for_bit(sd, models, cn):
    plain, _ = run(sd, models)

    def zero(s):
        s.set_controlnets([(cn, 0.0)])
        s.set_control_image(0, control_u8())

    zeroed, _ = run(sd, models, zero)
    assert np.array_equal(plain, zeroed)

    def one(s):
        s.set_controlnets([(cn, 1.0)])
        s.set_control_image(0, control_u8())

    controlled, s = run(sd, models, one)
    assert np.isfinite(controlled).all()
    assert np.abs(controlled - plain).max() > 1e-3
    assert s.stats.controlnet_calls == 2 and s.stats.controlnet_reused == 0
    assert len(s.controlnets) == 1 and s.controlnets[0][1] == 1.0
    # Scale set live to 0: from the next call on exactly the plain stream's output.
    s2 = sd.Stream(models, config(sd))
    s2.prepare("a cat")
    s2.set_controlnets([cn])  # a bare ControlNet: scale 1
    s2.set_control_image(0, control_u8())
    s2.set_controlnet_scale(0, 0.0)
    out = np.concatenate([np.asarray(s2.img2img(frame())).copy() for _ in range(2)])
    assert np.array_equal(out, plain)


def test_guidance_range_from_python(sd, models, cn):
    # Two steps: a range neither keeps (0.9..1: 0/2 and 1/2 < 0.9) is no ControlNet; the first half keeps step 0 and
    # changes the frames; a live range equals the same range given with the list. Bad ranges are the engine's error.
    def run2(setup=None):
        c = config(sd)
        c.t_index_list = [32, 45]
        s = sd.Stream(models, c)
        s.prepare("a cat")
        if setup:
            setup(s)
        return np.concatenate([np.asarray(s.img2img(frame())).copy() for _ in range(3)]), s

    def with_range(start, end, live=False):
        def setup(s):
            if live:
                s.set_controlnets([(cn, 1.0)])
                s.set_controlnet_guidance(0, start, end)
            else:
                s.set_controlnets([(cn, 1.0, start, end)])
            s.set_control_image(0, control_u8())
        return setup

    plain, _ = run2()
    none, s = run2(with_range(0.9, 1.0))
    assert np.array_equal(none, plain)
    assert s.stats.controlnet_calls == 0
    assert s.controlnet_guidance == [(0.9, 1.0)]
    half, _ = run2(with_range(0.0, 0.5))
    full, _ = run2(with_range(0.0, 1.0))
    assert np.abs(half - plain).max() > 1e-3  # the first step is conditioned
    assert np.abs(half - full).max() > 1e-3  # the second is not
    half_live, s = run2(with_range(0.0, 0.5, live=True))
    assert np.array_equal(half_live, half)
    assert s.controlnet_guidance == [(0.0, 0.5)]
    with pytest.raises(sd.InvalidArgument, match="0 <= start < end <= 1"):
        s.set_controlnet_guidance(0, 0.5, 0.5)
    with pytest.raises(sd.InvalidArgument, match="0 <= start < end <= 1"):
        s.set_controlnets([(cn, 1.0, -0.1, 1.0)])
    with pytest.raises(sd.InvalidArgument, match="guidance_start, guidance_end"):
        s.set_controlnets([(cn, 1.0, 0.5)])


def test_control_image_float_chw_equals_uint8_hwc(sd, models, cn):
    u8 = control_u8()

    def with_image(img):
        def setup(s):
            s.set_controlnets([(cn, 0.8)])
            s.set_control_image(0, img)
        return setup

    a, _ = run(sd, models, with_image(u8))
    b, _ = run(sd, models, with_image(np.ascontiguousarray(u8.transpose(2, 0, 1)).astype(np.float32) / 255.0))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Another control image gives another output.
    c, _ = run(sd, models, with_image(255 - u8))
    assert np.abs(c - a).max() > 1e-3


def test_controlnet_every_reuses(sd, models, cn):
    def setup(s):
        s.set_controlnets([(cn, 1.0)])
        s.set_control_image(0, control_u8())
        s.set_controlnet_every(2)

    _, s = run(sd, models, setup, calls=4)
    assert s.controlnet_every == 2
    assert s.stats.controlnet_calls == 2 and s.stats.controlnet_reused == 2


def test_bad_controlnet_arguments(sd, models, cn, paths):
    s = sd.Stream(models, config(sd))
    s.prepare("a cat")
    with pytest.raises(sd.InvalidArgument):
        s.set_controlnets(["not a controlnet"])
    s.set_controlnets([(cn, 1.0)])
    with pytest.raises(sd.InvalidArgument, match="control image"):
        s.img2img(frame())  # no control image yet
    with pytest.raises(sd.InvalidArgument):
        s.set_control_image(3, control_u8())
    with pytest.raises(sd.FormatError):
        sd.ControlNet.load(os.path.join(paths["model"], "no-such-controlnet"), models)


def test_control_preprocess_canny_is_binary(sd):
    if not sd.HAVE_RUNTIME:
        pytest.skip("built without the runtime (OpenCV)")
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = (200, 50, 10)
    edges = sd.control_preprocess("canny", img)
    assert isinstance(edges, np.ndarray)
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) == {0, 255}
    assert edges[32, 32].tolist() == [0, 0, 0]  # inside the square: no edge
    assert edges[14:18, 20:44].max() == 255  # its top border is an edge ...
    assert edges[:10].max() == 0 and edges[54:].max() == 0  # ... the flat background is not
    gray = sd.control_preprocess("gray", img)
    assert gray.shape == (64, 64, 3) and (gray[..., 0] == gray[..., 1]).all()
    assert "canny" in sd.control_preprocessor_names()
    with pytest.raises(sd.InvalidArgument, match="blur"):
        sd.control_preprocess("blur", img)
    with pytest.raises(sd.InvalidArgument):
        sd.control_preprocess("canny", img.astype(np.float32))


def test_ip_adapter_image_prompt_changes_output(sd, paths):
    if not os.path.isdir(paths["ipa"]):
        pytest.skip("no IP-Adapter fixture")
    m = sd.load_pipeline(paths["model"], dtype="fp32", threads=1, ip_adapter=paths["ipa"], ip_adapter_scale=1.0)
    assert m.has_ip_adapter
    plain, _ = run(sd, m)
    picture = np.zeros((40, 56, 3), dtype=np.uint8)
    picture[:, :28] = (250, 30, 30)
    prompted, s = run(sd, m, lambda s: s.set_image_prompt(picture))
    assert s.has_image_prompt and s.stats.image_prompt_encodes == 1
    assert np.isfinite(prompted).all()
    assert np.abs(prompted - plain).max() > 1e-3
    # Scale 0: the plain UNet exactly, image prompt or not.
    m.set_ip_adapter_scale(0.0)
    zero, _ = run(sd, m, lambda s: s.set_image_prompt(picture))
    m.set_ip_adapter_scale(1.0)
    plain_models = sd.load_pipeline(paths["model"], dtype="fp32", threads=1)
    reference, _ = run(sd, plain_models)
    assert np.array_equal(zero, reference)
    with pytest.raises(sd.InvalidArgument):
        plain_models.set_ip_adapter_scale(0.5)
    s2 = sd.Stream(plain_models, config(sd))
    with pytest.raises(sd.InvalidArgument):
        s2.set_image_prompt(picture)  # models without an IP-Adapter


def test_wrapper_controlnets_and_preprocessor(sd, paths):
    w = sd.StreamDiffusionWrapper(paths["model"], t_index_list=[32], cfg_type="none", width=64, height=64,
                                  output_type="np", threads=1, controlnets=[(paths["cn"], 1.0)],
                                  control_preprocessor="canny")
    w.prepare("a cat")
    picture = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    a = w.img2img(picture)
    assert w.stream.stats.controlnet_calls == 1
    w.set_controlnet_scale(0, 0.0)
    w.prepare("a cat")  # a new stream: the ControlNets (now at scale 0) come along
    b = w.img2img(picture)
    plain = sd.StreamDiffusionWrapper(paths["model"], t_index_list=[32], cfg_type="none", width=64, height=64,
                                      output_type="np", threads=1)
    plain.prepare("a cat")
    c = plain.img2img(picture)
    assert np.array_equal(b, c)
    assert np.abs(a - c).max() > 1e-3
    with pytest.raises(sd.InvalidArgument, match="control_preprocessor needs controlnets"):
        sd.StreamDiffusionWrapper(paths["model"], threads=1, control_preprocessor="canny")
    # (path, scale, start, end): the range reaches every stream prepare() makes, and a scale change keeps it.
    r = sd.StreamDiffusionWrapper(paths["model"], t_index_list=[32, 45], cfg_type="none", width=64, height=64,
                                  output_type="np", threads=1, controlnets=[(paths["cn"], 1.0, 0.0, 0.5)])
    r.prepare("a cat")
    assert r.stream.controlnet_guidance == [(0.0, 0.5)]
    r.set_controlnet_scale(0, 0.7)
    r.prepare("a dog")
    assert r.stream.controlnet_guidance == [(0.0, 0.5)]
    assert r.stream.controlnets[0][1] == pytest.approx(0.7)
    r.set_controlnet_guidance(0, 0.5, 1.0)
    r.prepare("a cat")
    assert r.stream.controlnet_guidance == [(0.5, 1.0)]


def test_run_stream_second_sources(sd, paths, models, cn, tmp_path):
    if not sd.HAVE_RUNTIME:
        pytest.skip("built without the runtime (engine-only)")
    from PIL import Image

    def folder(name, colours, size=(64, 64)):
        d = tmp_path / name
        d.mkdir()
        for k, c in enumerate(colours):
            img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            img[:, : size[0] // 2] = c
            Image.fromarray(img).save(d / f"{k:02d}.png")
        return str(d)

    src = folder("in", [(40 * k, 100, 200 - 30 * k) for k in range(4)])
    ctrl = folder("ctrl", [(255, 255, 255), (0, 0, 0)])
    s = sd.Stream(models, config(sd))
    s.set_controlnets([(cn, 1.0)])
    s.prepare("a cat")
    summary = sd.run_stream(s, src, "none", control_input=ctrl)
    assert summary["frames_in"] == 2 and summary["frames_out"] == 2
    assert summary["stop_reason"] == "control input ended"
    assert s.stats.controlnet_calls == s.stats.unet_calls > 0
    with pytest.raises(sd.InvalidArgument, match="3 names for 1 ControlNets"):
        sd.run_stream(s, src, "none", control_preprocessors=["canny", "gray", "gray"])

    # Image prompts A, A, B read with every input frame: two encodes, the repeated A is not encoded again.
    prompts = folder("prompts", [(250, 10, 10), (250, 10, 10), (10, 10, 250)], size=(56, 40))
    ipm = sd.load_pipeline(paths["model"], dtype="fp32", threads=1, ip_adapter=paths["ipa"], ip_adapter_scale=1.0)
    s2 = sd.Stream(ipm, config(sd))
    s2.prepare("a cat")
    summary = sd.run_stream(s2, src, "none", image_prompt_input=prompts)
    assert summary["frames_out"] == 4 and summary["stop_reason"] == "end of input"
    assert summary["image_prompt_source"]["read"] == 3 and summary["image_prompt_source"]["ended"]
    assert s2.stats.image_prompt_encodes == 2 and s2.stats.image_prompt_s > 0
    with pytest.raises(sd.InvalidArgument, match="needs an IP-Adapter"):
        sd.run_stream(s, src, "none", image_prompt_input=prompts)
    with pytest.raises(sd.InvalidArgument, match="read every 0 frames"):
        sd.run_stream(s2, src, "none", image_prompt_input=prompts, image_prompt_every=0)
