"""The pipeline golden cases (fixtures pipeline/, lora/pipeline/ and sdxl/stream/) through Python: the recorded random draws are
replayed (ReplayRng / ReplayUniformSource), every call's output and the recorded stream state are compared with the
C++ golden test's tolerances (tests/pipeline/test_pipeline_golden.cpp: atol 5e-4 + rtol 1e-4 * max|ref|)."""
import json
import os

import numpy as np
import pytest

PIPE_ATOL, PIPE_RTOL = 5e-4, 1e-4
MODULE_ATOL, MODULE_RTOL = 1e-4, 1e-5
SETS = ("pipeline", "lora/pipeline", "sdxl/stream")  # sdxl/stream: StreamDiffusion on the tiny SDXL


def _cases():
    from conftest import fixture_root

    out = []
    for s in SETS:
        path = os.path.join(fixture_root(), s, "cases.json")
        if not os.path.exists(path):
            continue
        for i, c in enumerate(json.load(open(path))["cases"]):
            if c["result"]["ok"]:
                out.append(pytest.param(s, i, id=c["params"]["name"]))
    return out


def assert_close(actual, ref, atol, rtol, what):
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    assert a.shape == r.shape, f"{what}: shape {a.shape} != reference {r.shape}"
    err = float(np.abs(a - r).max())
    bound = atol + rtol * float(np.abs(r).max())
    assert err <= bound, f"{what}: max abs err {err} > bound {bound}"
    return err


_models = {}


def models_for(sd, root, p):
    key = (p["model"], p["vae"], json.dumps(p.get("loras", [])))
    if key not in _models:
        loras = [(os.path.join(root, "lora", "files", l["file"] + ".safetensors"), l["scale"])
                 for l in p.get("loras", [])]
        # The SDXL set's models live in sdxl/models/, the others' in models/.
        sub = ("sdxl", "models") if "sdxl" in p["model"] else ("models",)
        model_dir = os.path.join(root, *sub, p["model"])
        taesd = os.path.join(model_dir, p["vae"]) if p["vae"] in ("taesd", "taesdxl") else "none"
        # The goldens and their tolerances are float32 ("auto" may pick bf16 on some CPUs).
        _models[key] = sd.load_pipeline(model_dir, dtype="fp32", taesd=taesd, loras=loras, strict_lora=True,
                                        threads=-1)
    return _models[key]


@pytest.mark.parametrize("case_set,index", _cases())
def test_pipeline_golden(sd, fixtures, case_set, index):
    cases = json.load(open(os.path.join(fixtures, case_set, "cases.json")))["cases"]
    c = cases[index]
    p, result = c["params"], c["result"]
    f = sd.load_safetensors(os.path.join(fixtures, case_set, c["file"]))
    imgs = sd.load_safetensors(os.path.join(fixtures, case_set, "input_images.safetensors"))
    models = models_for(sd, fixtures, p)

    cfg = sd.StreamConfig()
    cfg.t_index_list = p["t_index_list"]
    cfg.num_inference_steps = p["num_inference_steps"]
    cfg.cfg_type = p["cfg_type"]
    cfg.guidance_scale = p["guidance_scale"]
    cfg.delta = p["delta"]
    cfg.frame_buffer_size = p["frame_buffer_size"]
    cfg.use_denoising_batch = p["use_denoising_batch"]
    cfg.do_add_noise = p["do_add_noise"]
    cfg.seed = p["seed"]
    if "prepare.init_noise" in f:
        shape = f["prepare.init_noise"].shape
        cfg.height, cfg.width = shape[2] * models.vae_scale_factor, shape[3] * models.vae_scale_factor
    else:
        cfg.height, cfg.width = imgs["image0"].shape[0], imgs["image0"].shape[1]
    if p.get("similar_image_filter"):
        sf = p["similar_image_filter"]
        cfg.similarity_filter = sd.SimilarityFilterOptions(True, sf["threshold"], sf["max_skip_frame"], False)

    draws = [f[f"rng{j}.{d['kind']}"] for j, d in enumerate(result["random_draws"])]
    for j, d in enumerate(result["random_draws"]):
        assert list(draws[j].shape) == d["shape"]
    rng = sd.ReplayRng(draws, p["name"])
    uniform = sd.ReplayUniformSource(result.get("python_uniform_draws", []))
    s = sd.Stream(models, cfg, rng, uniform)
    s.prepare(p["prompt"], p["negative_prompt"])

    assert_close(s.cond_embeds, f["prepare.prompt_embeds_cond"], MODULE_ATOL, MODULE_RTOL, "prompt_embeds_cond")
    assert np.array_equal(np.asarray(s.init_noise), np.asarray(f["prepare.init_noise"])), "init_noise = rng0"
    assert s.timesteps == result["timesteps_all"]
    assert s.sub_timesteps == result["sub_timesteps"]
    assert s.batch_size == result["batch_size"]
    assert s.unet_batch_size == result["trt_unet_batch_size"]
    assert s.guidance_scale == result["guidance_scale_effective"]

    calls = result["calls"]
    assert len(calls) == p["n_calls"]
    worst = 0.0
    for i, call in enumerate(calls):
        unet_before = s.stats.unet_calls
        if p["mode"] == "img2img":
            x = np.concatenate([np.asarray(sd.image_to_tensor(imgs[f"image{k}"])) for k in call["input_image_ids"]])
            out = s.img2img(x)
        else:
            out = s.txt2img()
        assert s.stats.unet_calls - unet_before == call["unet_calls"], f"call {i}: UNet calls"
        if isinstance(call.get("skipped_by_similarity_filter"), bool) and p.get("similar_image_filter"):
            assert s.last_skipped == call["skipped_by_similarity_filter"], f"call {i}: filter decision"
        pre = f"call{i}."
        worst = max(worst, assert_close(out, f[pre + "output"], PIPE_ATOL, PIPE_RTOL, pre + "output"))
        if pre + "stock_noise_after" in f:
            assert_close(s.stock_noise, f[pre + "stock_noise_after"], PIPE_ATOL, PIPE_RTOL, pre + "stock_noise")
        else:
            assert float(np.abs(np.asarray(s.stock_noise)).max()) == 0.0
        if pre + "x_t_latent_buffer_after" in f:
            assert_close(s.latent_buffer, f[pre + "x_t_latent_buffer_after"], PIPE_ATOL, PIPE_RTOL,
                         pre + "latent_buffer")
        if pre + "init_noise_after" in f:
            assert_close(s.init_noise, f[pre + "init_noise_after"], PIPE_ATOL, PIPE_RTOL, pre + "init_noise")
    assert rng.remaining == 0, "recorded random draws left unused"
    assert uniform.consumed == len(result.get("python_uniform_draws", []))
    print(f"{p['name']}: worst output error {worst:.3g}")


def test_replay_rng_shape_mismatch_is_the_engine_error(sd, fixtures):
    models = sd.load_pipeline(os.path.join(fixtures, "models", "tiny-sd15"), dtype="fp32", threads=-1,
                              taesd=os.path.join(fixtures, "models", "tiny-sd15", "taesd"))
    cfg = sd.resolve_config(os.path.join(fixtures, "models", "tiny-sd15"), "txt2img", t_index_list=[0],
                            width=64, height=64)
    s = sd.Stream(models, cfg, sd.ReplayRng([np.zeros((1, 4, 4, 4), np.float32)], "short"))
    with pytest.raises(sd.InvalidArgument, match="short"):
        s.prepare("a cat")
