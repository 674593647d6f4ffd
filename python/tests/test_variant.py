"""load_pipeline(variant="fp16") and `serve --variant` on a copy of the fixture tiny-sd15 whose unet/ and text_encoder/
also hold <stem>.fp16.safetensors files with other weights (the plain ones times 0.9, in fp16): the variant loads those
files, exactly as a folder whose plain files they are; without it the plain files load; what cannot be loaded is
refused with the engine's message."""
import json
import os
import re
import shutil
import subprocess
import urllib.request

import numpy as np
import pytest

from conftest import child_env, read_safetensors, write_safetensors

_FILES = {"unet": "diffusion_pytorch_model", "text_encoder": "model"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fixtures):
    """(model with fp16 variants beside its plain files, the same model with the variants as its plain files)."""
    src = os.path.join(fixtures, "models", "tiny-sd15")
    if not os.path.isdir(src):
        pytest.skip("no tiny-sd15 fixture")
    root = tmp_path_factory.mktemp("variant")
    model, ref = str(root / "model"), str(root / "ref")
    shutil.copytree(src, model)
    shutil.copytree(src, ref)
    for comp, stem in _FILES.items():
        plain = read_safetensors(os.path.join(model, comp, stem + ".safetensors"))
        fp16 = {k: (v.astype(np.float32) * 0.9).astype(np.float16) if v.dtype.kind == "f" else v
                for k, v in plain.items()}
        write_safetensors(os.path.join(model, comp, stem + ".fp16.safetensors"), fp16)
        write_safetensors(os.path.join(ref, comp, stem + ".safetensors"), fp16)
    return model, ref


def _image(sd, models):
    cfg = sd.resolve_config(None, "txt2img", t_index_list=[0, 32], width=64, height=64)
    s = sd.Stream(models, cfg)
    s.prepare("a red apple")
    s.txt2img()
    return np.asarray(s.txt2img(), np.float64)


def test_load_pipeline_variant_loads_the_variant_files(sd, folders):
    model, ref = folders
    asked = sd.load_pipeline(model, dtype="fp32", threads=2, variant="fp16")
    assert asked.variant == "fp16"
    assert ", variant fp16, fp32, cpu)" in asked.describe()
    a = _image(sd, asked)
    assert np.array_equal(a, _image(sd, sd.load_pipeline(ref, dtype="fp32", threads=2)))
    plain = sd.load_pipeline(model, dtype="fp32", threads=2)
    assert plain.variant == ""
    assert np.abs(a - _image(sd, plain)).max() > 1e-3


def test_variant_errors(sd, folders, fixtures):
    model, _ = folders
    with pytest.raises(sd.InvalidArgument) as e:
        sd.load_pipeline(model, dtype="fp32", threads=2, variant="bf16")
    assert str(e.value) == (
        f"variant 'bf16': no component folder of {model} has 'bf16' weights (<stem>.bf16.safetensors); found "
        "text_encoder/: model.fp16.safetensors, model.safetensors; unet/: diffusion_pytorch_model.fp16.safetensors, "
        "diffusion_pytorch_model.safetensors; vae/: diffusion_pytorch_model.safetensors. Load it without a variant, "
        "or name the variant its files have")
    single = os.path.join(fixtures, "single_file", "tiny-sd15.safetensors")
    if os.path.exists(single):
        with pytest.raises(ValueError, match=re.escape(
                f"variant 'fp16' is for diffusers model folders (it picks <stem>.fp16.safetensors in each component "
                f"folder); {single} is a single-file checkpoint: load it without a variant")):
            sd.load_pipeline(single, dtype="fp32", threads=2, variant="fp16")
    with pytest.raises(sd.InvalidArgument, match=re.escape("variant 'fp16.x': expected the name of a weight-file")):
        sd.load_pipeline(model, dtype="fp32", threads=2, variant="fp16.x")


def test_wrapper_and_settings_file_take_the_variant(sd, folders, tmp_path):
    from streamdiffusion_cpp.settings import load_settings, wrapper_arguments

    model, ref = folders
    f = tmp_path / "v.yaml"
    f.write_text(f"model: {model}\nvariant: fp16\n")
    init = wrapper_arguments(load_settings(str(f)))["init"]
    assert init["variant"] == "fp16" and init["model_id_or_path"] == model
    w = sd.StreamDiffusionWrapper(model, t_index_list=[0, 32], mode="txt2img", width=64, height=64, threads=2,
                                  dtype="fp32", use_lcm_lora=False, warmup=0, variant="fp16")
    assert w.models.variant == "fp16"


def _serve(cli, model, web, extra):
    p = subprocess.Popen([cli, "serve", "--model", model, "--port", "0", "--host", "127.0.0.1", "--web-root", web,
                          "--threads", "2", "--dtype", "fp32"] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        m = re.match(r"listening on http://127\.0\.0\.1:(\d+)/", line)
        if m:
            return p, int(m.group(1))
    p.wait()
    pytest.fail("serve did not start: " + "".join(lines))


def _post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def test_serve_variant_serves_the_variant_model(sd, cli, folders, tmp_path):
    model, ref = folders
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>t</title>")
    bodies, servers = [], []
    try:
        for m, extra in ((model, ["--variant", "fp16"]), (ref, []), (model, [])):
            p, port = _serve(cli, m, str(web), extra)
            servers.append(p)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=60) as r:
                health = json.loads(r.read())
            assert (", variant fp16," in health["model"]) == bool(extra), health
            bodies.append(_post(port, "/api/txt2img", {"prompt": "a red cat", "seed": 5}))
            _post(port, "/api/drain", {})
            assert p.wait(timeout=60) == 0
    finally:
        for p in servers:
            if p.poll() is None:
                p.kill()
    assert bodies[0] == bodies[1], "serve --variant fp16 serves the model whose plain files are the fp16 ones"
    assert bodies[0] != bodies[2]
