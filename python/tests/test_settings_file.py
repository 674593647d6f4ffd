"""Settings files in Python: the CLI's --dump-config loads into StreamDiffusionWrapper.from_config with the same
effective settings and the same images as explicit arguments; overrides win; every bad key / type / YAML case names
the file, the line, the key and the expected type; every key the CLI's commands dump is known to the package."""
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import child_env

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model(fixtures):
    path = os.path.join(fixtures, "models", "tiny-sd15")
    if not os.path.isdir(path):
        pytest.skip("fixture model tiny-sd15 not present")
    return path


@pytest.fixture(autouse=True)
def _need_reader(sd):
    if not sd._core.HAVE_SETTINGS:
        pytest.skip("engine-only build: no settings-file reader")


def dump(cli, args, path):
    r = subprocess.run([cli] + args + ["--dump-config"], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    path.write_text(r.stdout)
    return r.stdout


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


FLAGS = ["--prompt", "a red fox", "--negative-prompt", "blurry", "--t-index-list", "20,35", "--seed", "7",
         "--size", "64x64", "--cfg-type", "self", "--guidance", "1.3", "--delta", "0.9", "--threads", "1"]


def frame(k):
    return np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_img2img_dump_round_trip_same_settings_and_images(sd, cli, model, tmp_path):
    f = tmp_path / "img2img.yaml"
    text = dump(cli, ["img2img", "--model", model] + FLAGS + ["-i", "in.png", "-o", "out.png"], f)
    assert "\nt_index_list: \"20,35\"\n" in text, text
    s = sd.load_settings(f)
    assert s.command == "img2img" and s["t_index_list"] == "20,35" and s["seed"] == "7"
    assert s.lines["seed"] == text.split("\n").index("seed: 7") + 1
    # The dump holds the command's input / output: an error naming them, unless skipped with a warning.
    with pytest.raises(sd.InvalidArgument, match=r"key '(input|output)': .*ignore_cli_only=True"):
        sd.StreamDiffusionWrapper.from_config(f)
    with pytest.warns(UserWarning, match="input, output"):
        a = sd.StreamDiffusionWrapper.from_config(f, ignore_cli_only=True, output_type="np")
    b = sd.StreamDiffusionWrapper(model, t_index_list=[20, 35], seed=7, width=64, height=64, cfg_type="self",
                                  threads=1, use_lcm_lora=False, output_type="np")
    b.prepare("a red fox", "blurry", guidance_scale=1.3, delta=0.9)
    assert a.mode == b.mode == "img2img"
    assert a.t_index_list == b.t_index_list == [20, 35]
    assert (a.width, a.height, a.cfg_type) == (b.width, b.height, b.cfg_type) == (64, 64, "self")
    for field in ("seed", "num_inference_steps", "guidance_scale", "delta", "frame_buffer_size",
                  "use_denoising_batch", "do_add_noise", "latent_feedback", "deep_cache_every"):
        assert getattr(a.config, field) == getattr(b.config, field), field
    assert a.config.seed == 7 and a.config.guidance_scale == pytest.approx(1.3)
    assert a.dtype == b.dtype
    for k in range(3):
        x, y = a(frame(k)), b(frame(k))
        assert x.dtype == y.dtype and np.array_equal(x, y), f"frame {k}: max diff {np.abs(x - y).max()}"
    # A later prepare(prompt) keeps the file's guidance / delta (they are the wrapper's defaults now).
    a.prepare("a blue fox")
    assert a.config.guidance_scale == pytest.approx(1.3) and a.config.delta == pytest.approx(0.9)


def test_txt2img_dump_gives_a_txt2img_wrapper_with_the_same_images(sd, cli, model, tmp_path):
    f = tmp_path / "txt2img.yaml"
    dump(cli, ["txt2img", "--model", model, "--prompt", "a red fox", "--t-index-list", "0,16", "--seed", "5",
               "--size", "64x64", "--threads", "1", "--no-add-noise", "-o", "x.png"], f)
    a = sd.StreamDiffusionWrapper.from_config(f, ignore_cli_only=True, output_type="np")
    b = sd.StreamDiffusionWrapper(model, mode="txt2img", t_index_list=[0, 16], seed=5, width=64, height=64,
                                  threads=1, do_add_noise=False, use_lcm_lora=False, output_type="np")
    b.prepare("a red fox")
    assert a.mode == "txt2img" and a.config.do_add_noise is False and a.t_index_list == [0, 16]
    for _ in range(3):
        assert np.array_equal(a(), b())


def test_overrides_win_over_the_file(sd, model, tmp_path):
    f = write(tmp_path, f"model: '{model}'\nsize: 64x64\nthreads: 1\nt_index_list: '20,35'\nseed: 7\n"
                        "guidance: 1.3\ncfg_type: self\nprompt: a fox\n")
    w = sd.StreamDiffusionWrapper.from_config(f, seed=9, t_index_list=[30], guidance_scale=1.6, size="32x32",
                                              mode="txt2img", frame_buffer_size=2)
    assert w.config.seed == 9 and w.t_index_list == [30] and (w.width, w.height) == (32, 32)
    assert w.config.guidance_scale == pytest.approx(1.6) and w.mode == "txt2img" and w.frame_buffer_size == 2
    assert w.cfg_type == "self"  # from the file
    # A settings key as an override is read as in a file (and its errors name the override).
    w = sd.StreamDiffusionWrapper.from_config(f, guidance=1.4, no_add_noise=True)
    assert w.config.guidance_scale == pytest.approx(1.4) and w.config.do_add_noise is False
    with pytest.raises(sd.InvalidArgument, match=r"override guidance=\): key 'guidance': expected a number, got 'x'"):
        sd.StreamDiffusionWrapper.from_config(f, guidance="x")
    with pytest.raises(sd.InvalidArgument, match=r"unknown keyword argument 'sed' \(did you mean 'seed'\?\)"):
        sd.StreamDiffusionWrapper.from_config(f, sed=3)


def test_num_inference_steps_without_t_index_list_resolves_as_the_cli(sd, model, tmp_path):
    f = write(tmp_path, f"model: '{model}'\nsize: 64x64\nnum_inference_steps: 20\n")
    w = sd.StreamDiffusionWrapper.from_config(f, threads=1)
    expected = list(sd.resolve_config(model, "img2img", num_inference_steps=20).t_index_list)
    assert w.t_index_list == expected and max(expected) < 20 and w.config.num_inference_steps == 20


def test_dash_and_underscore_name_the_same_key(sd, model, tmp_path):
    f = write(tmp_path, f"model: '{model}'\nsize: 64x64\nt-index-list: '0,16'\nframe-buffer-size: 1\n")
    s = sd.load_settings(f)
    assert s["t_index_list"] == "0,16" and "t-index-list" not in s and s.lines["t_index_list"] == 3
    w = sd.StreamDiffusionWrapper.from_config(f, threads=1)
    assert w.t_index_list == [0, 16]
    # A YAML list of integers is a t_index_list too.
    w = sd.StreamDiffusionWrapper.from_config(write(tmp_path, f"model: '{model}'\nsize: 64x64\n"
                                                              "t_index_list: [0, 16]\n", "l.yaml"), threads=1)
    assert w.t_index_list == [0, 16]
    # Both spellings in one file: the same key twice.
    with pytest.raises(sd.FormatError, match=r"line 2: key 't-index-list' is set twice"):
        sd.load_settings(write(tmp_path, "t_index_list: '0'\nt-index-list: '1'\n", "twice.yaml"))


@pytest.mark.parametrize("text,pattern", [
    ("seed: 3\nseeed: 4\n", r"line 2: unknown key 'seeed' \(did you mean 'seed'\?\)"),
    ("guidanse: 1.2\n", r"line 1: unknown key 'guidanse' \(did you mean 'guidance'\?\)"),
    ("prompt: x\nframe_buffer_size: abc\n", r"line 2: key 'frame_buffer_size': expected an integer, got 'abc'"),
    ("seed: -1\n", r"line 1: key 'seed': expected an integer >= 0, got '-1'"),
    ("guidance: high\n", r"line 1: key 'guidance': expected a number, got 'high'"),
    ("no_add_noise: maybe\n", r"line 1: key 'no_add_noise': expected true or false, got 'maybe'"),
    ("size: 64\n", r"line 1: key 'size': expected WIDTHxHEIGHT \(e.g. 512x512\), got '64'"),
    ("t_index_list: '20,x'\n", r"line 1: key 't_index_list': expected integers, .*got 'x'"),
    ("cfg_type: half\n", r"line 1: key 'cfg_type': expected one of none, full, self, initialize, got 'half'"),
    ("\nseed: [1, 2]\n", r"line 2: key 'seed': expected an integer >= 0, got a list of 2 \(only repeatable"),
    ("output: out.png\n", r"line 1: key 'output': a txt2img / img2img command option.*ignore_cli_only=True"),
    ("port: 8000\n", r"line 1: key 'port': a `streamdiffusion serve` server option"),
    ("mode: live\n", r"line 1: key 'mode': a `streamdiffusion stream` runtime option"),
    ("mode: both\n", r"line 1: key 'mode': expected img2img or txt2img"),
    ("steps: 2\n", r"line 1: key 'steps': not supported by the Python wrapper"),
])
def test_bad_keys_and_types_name_file_line_key_and_type(sd, tmp_path, text, pattern):
    f = write(tmp_path, text, "bad.yaml")
    with pytest.raises(sd.InvalidArgument, match=re.escape(f) + ": " + pattern) as e:
        sd.StreamDiffusionWrapper.from_config(f)
    assert isinstance(e.value, ValueError)


def test_yaml_errors_and_a_missing_file_are_format_errors(sd, tmp_path):
    f = write(tmp_path, "seed: 3\nprompt: [unclosed\n", "broken.yaml")
    with pytest.raises(sd.FormatError, match=re.escape(f) + r": line \d+: not valid YAML") as e:
        sd.StreamDiffusionWrapper.from_config(f)
    assert e.value.file == f and isinstance(e.value, OSError)
    with pytest.raises(sd.FormatError, match=r"line 1: expected a mapping"):
        sd.load_settings(write(tmp_path, "- a\n- b\n", "seq.yaml"))
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(sd.FormatError, match=re.escape(missing) + ": cannot read") as e:
        sd.load_settings(missing)
    assert e.value.file == missing


def test_loras_controlnets_and_vae_map_onto_the_wrapper(sd, tmp_path):
    from streamdiffusion_cpp.settings import load_settings, wrapper_arguments

    f = write(tmp_path, "lora: [a.safetensors:0.5, b.safetensors]\nlcm_lora: lcm.safetensors\ntaesd: none\n"
                        "controlnet: c.safetensors:0.7\ncontrol_preprocessor: canny\nno_denoising_batch: true\n"
                        "similarity_filter: 0.97\nmax_skip_frame: 4\nprompt_list: 'a cat:1 | a dog:0.5'\n"
                        "no_cuda_graphs: yes\nmode: txt2img\n")
    a = wrapper_arguments(load_settings(f))
    init = a["init"]
    assert init["lora_dict"] == {"a.safetensors": 0.5, "b.safetensors": 1.0}
    assert init["lcm_lora_id"] == "lcm.safetensors" and init["use_lcm_lora"] is True
    assert init["use_tiny_vae"] is False and "vae_id" not in init
    assert init["controlnets"] == [("c.safetensors", 0.7)] and init["control_preprocessor"] == "canny"
    assert init["use_denoising_batch"] is False and init["cuda_graphs"] is False
    assert init["enable_similar_image_filter"] is True and init["similar_image_filter_threshold"] == 0.97
    assert init["similar_image_filter_max_skip_frame"] == 4
    assert a["prepare"]["prompt"] == [("a cat", 1.0), ("a dog", 0.5)] and a["mode"] == "txt2img"
    # A stream file: `input: none` is a txt2img stream, `mode: live` its queue policy (both CLI-only, skipped).
    with pytest.warns(UserWarning, match="input, mode"):
        a = wrapper_arguments(load_settings(write(tmp_path, "input: none\nmode: live\n", "st.yaml")),
                              ignore_cli_only=True)
    assert a["mode"] == "txt2img" and a["skipped"] == ["input", "mode"]
    # Without lcm_lora no LCM-LoRA is fused (as the CLI); taesd PATH and vae together cannot be expressed.
    assert wrapper_arguments(load_settings(write(tmp_path, "seed: 1\n", "n.yaml")))["init"]["use_lcm_lora"] is False
    with pytest.raises(sd.InvalidArgument, match=r"line 2: key 'vae': the wrapper takes a TAESD or a VAE"):
        wrapper_arguments(load_settings(write(tmp_path, "taesd: t\nvae: v\n", "v.yaml")))


def test_control_guidance_keys_extend_each_controlnet(sd, tmp_path):
    from streamdiffusion_cpp.settings import load_settings, wrapper_arguments

    a = wrapper_arguments(load_settings(write(tmp_path, "controlnet: [a:0.8, b]\ncontrol_guidance_end: 0.5\n",
                                              "g.yaml")))
    assert a["init"]["controlnets"] == [("a", 0.8, 0.0, 0.5), ("b", 1.0, 0.0, 0.5)]
    a = wrapper_arguments(load_settings(write(tmp_path, "controlnet: [a, b]\ncontrol_guidance_start: [0, 0.25]\n",
                                              "h.yaml")))
    assert a["init"]["controlnets"] == [("a", 1.0, 0.0, 1.0), ("b", 1.0, 0.25, 1.0)]
    with pytest.raises(sd.InvalidArgument, match=r"line 1: key 'control_guidance_start': needs controlnet"):
        wrapper_arguments(load_settings(write(tmp_path, "control_guidance_start: 0.5\n", "i.yaml")))
    with pytest.raises(sd.InvalidArgument, match=r"key 'control_guidance_end': given 3 times for 2 controlnet"):
        wrapper_arguments(load_settings(write(tmp_path, "controlnet: [a, b]\ncontrol_guidance_end: [1, 1, 1]\n",
                                              "j.yaml")))
    with pytest.raises(sd.InvalidArgument, match=r"control_guidance_end"):
        wrapper_arguments(load_settings(write(tmp_path, "controlnet: [a]\ncontrol_guidance_end: half\n", "k.yaml")))


@pytest.mark.parametrize("args", [["txt2img", "-o", "x.png"], ["img2img", "-i", "x.png", "-o", "y.png"],
                                  ["stream", "-i", "none"], ["serve"]])
def test_every_key_the_cli_dumps_is_known(sd, cli, tmp_path, args):
    """The package's key table against the CLI's real option list (set and commented keys of each command's dump)."""
    from streamdiffusion_cpp.settings import _KNOWN

    text = dump(cli, args, tmp_path / "d.yaml")
    keys = re.findall(r"^(?:# )?([a-z0-9_]+):(?: |$)", text, re.M)
    assert len(keys) > 30, text
    unknown = sorted(set(keys) - set(_KNOWN))
    assert not unknown, f"keys of `streamdiffusion {args[0]}` unknown to streamdiffusion_cpp.settings: {unknown}"
