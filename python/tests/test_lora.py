"""Models.loras(): the report of each fused LoRA, for kohya files made here on the fixture tiny-sd15 - one with a
LoHa module and a DoRA pair, one plain - and the same methods as the CLI's `info --lora --json` gives."""
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import child_env, write_safetensors


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, fixtures):
    model = os.path.join(fixtures, "models", "tiny-sd15")
    if not os.path.isdir(model):
        pytest.skip("no tiny-sd15 fixture")
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj."  # Linear [32, 32]
    t = "lora_unet_time_embedding_linear_1."  # Linear [128, 32]
    c = "lora_unet_down_blocks_0_resnets_0_conv1."  # Conv2d [32, 32, 3, 3]
    root = tmp_path_factory.mktemp("lora")
    lyco, plain = str(root / "lyco.safetensors"), str(root / "plain.safetensors")
    write_safetensors(lyco, {te + "lora_down.weight": r(2, 32), te + "lora_up.weight": r(32, 2),
                             te + "dora_scale": np.full((32, 1), 0.8, np.float32),
                             t + "hada_w1_a": r(128, 2), t + "hada_w1_b": r(2, 32), t + "hada_w2_a": r(128, 2),
                             t + "hada_w2_b": r(2, 32), t + "alpha": np.array(1.0, np.float32)})
    write_safetensors(plain, {c + "lora_down.weight": r(4, 32, 3, 3), c + "lora_up.weight": r(32, 4, 1, 1)})
    return model, lyco, plain


def test_loras_report_the_methods_beyond_plain_lora(sd, lora_files, cli):
    model, lyco, plain = lora_files
    models = sd.load_pipeline(model, dtype="fp32", taesd="none", loras=[(lyco, 0.5), plain], strict_lora=True,
                              threads=-1)
    got = models.loras()
    assert [(r["name"], r["layout"], r["scale"], r["keys"], r["matched_keys"], r["methods"]) for r in got] == [
        ("lyco", "kohya", 0.5, 8, 8, ["DoRA", "LoHa"]),
        ("plain", "kohya", 1.0, 2, 2, []),
    ]
    # The struct the CLI's info --lora prints: the same names, "layout kohya (DoRA, LoHa)".
    out = subprocess.run([cli, "info", "--json", "--model", model, "--lora", lyco + ":0.5", "--lora", plain],
                         capture_output=True, text=True, env=child_env(), check=True).stdout
    assert [r["methods"] for r in json.loads(out)["loras"]] == [r["methods"] for r in got]


def test_loras_report_ranks_modules_and_unmatched_keys_as_info_does(sd, lora_files, cli, tmp_path):
    model, lyco, plain = lora_files
    # The plain file plus a key no module of tiny-sd15 has: listed (not refused) without strict_lora.
    extra = str(tmp_path / "extra.safetensors")
    stray = "lora_unet_no_such_block.lora_down.weight"
    c = "lora_unet_down_blocks_0_resnets_0_conv1."
    rng = np.random.default_rng(1)
    write_safetensors(extra, {c + "lora_down.weight": rng.standard_normal((4, 32, 3, 3)).astype(np.float32),
                              c + "lora_up.weight": rng.standard_normal((32, 4, 1, 1)).astype(np.float32),
                              stray: np.zeros((4, 32), np.float32),
                              "lora_unet_no_such_block.lora_up.weight": np.zeros((32, 4), np.float32)})
    models = sd.load_pipeline(model, dtype="fp32", taesd="none", loras=[(lyco, 0.5), extra], threads=-1)
    got = models.loras()
    assert [(r["ranks"], r["modules"], r["unmatched_keys"]) for r in got] == [
        ([2], {"text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj"], "unet": ["time_embedding.linear_1"]},
         []),
        ([4], {"unet": ["down_blocks.0.resnets.0.conv1"]},
         [stray, "lora_unet_no_such_block.lora_up.weight"]),
    ]
    # Every field as the CLI's info --lora --json prints it (which names the path "file").
    out = subprocess.run([cli, "info", "--json", "--model", model, "--lora", lyco + ":0.5", "--lora", extra],
                         capture_output=True, text=True, env=child_env(), check=True).stdout
    info = json.loads(out)["loras"]
    for r in info:
        r["path"] = r.pop("file")
    assert got == info


def test_lora_scale_set_from_another_thread_never_meets_a_frame_half_way(sd, fixtures, tmp_path):
    # A GUI thread moving a LoRA slider while worker threads run frames: set_lora_scale re-fuses the shared weights
    # module by module with the GIL released, so without the model set's lock a frame could read the first module
    # at one scale and the last at the other (or a weight in the middle of its re-fusion). With it, every frame is
    # the frame of one scale, bit for bit; and with two workers whose frames overlap, the setter still gets its turns
    # (a reader-first lock would keep it waiting until both finished).
    import threading

    model = os.path.join(fixtures, "models", "tiny-sd15")
    if not os.path.isdir(model):
        pytest.skip("no tiny-sd15 fixture")
    rng = np.random.default_rng(3)
    path = str(tmp_path / "two_ends.safetensors")
    tensors = {}
    # The first convolution of the UNet and one of its last, both [32, 32, 3, 3].
    for stem in ("lora_unet_down_blocks_0_resnets_0_conv1.", "lora_unet_up_blocks_1_resnets_1_conv2."):
        tensors[stem + "lora_down.weight"] = (rng.standard_normal((4, 32, 3, 3)) * 0.3).astype(np.float32)
        tensors[stem + "lora_up.weight"] = (rng.standard_normal((32, 4, 1, 1)) * 0.3).astype(np.float32)
    write_safetensors(path, tensors)
    models = sd.load_pipeline(model, dtype="fp32", taesd=os.path.join(model, "taesd"), loras=[path], threads=-1)
    cfg = sd.resolve_config(model, "txt2img", t_index_list=[0], width=64, height=64)
    streams = [sd.Stream(models, cfg) for _ in range(2)]
    for s in streams:
        s.prepare("a cat")

    def frame(s):  # the same noise every frame: a frame is a function of the weights alone
        s.set_seed(7)
        return np.asarray(s.txt2img()).copy()

    refs = []
    for scale in (0.0, 1.0):
        models.set_lora_scale("two_ends", scale)
        refs.append(frame(streams[0]))
        for s in streams:
            assert np.array_equal(frame(s), refs[-1]), "one step from the same noise repeats its frame"
    assert not np.array_equal(refs[0], refs[1])

    errors, running, frames = [], [len(streams)], [0]
    lock = threading.Lock()

    def worker(s):
        try:
            for _ in range(60):
                out = frame(s)
                with lock:
                    if not any(np.array_equal(out, r) for r in refs):
                        errors.append(f"frame {frames[0]} is neither scale's (max diff to scale 0: "
                                      f"{np.abs(out - refs[0]).max():.3g}, to scale 1: "
                                      f"{np.abs(out - refs[1]).max():.3g})")
                    frames[0] += 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=worker, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    k = 0
    while True:
        with lock:
            if running[0] == 0:
                break
            done_frames = frames[0]
        models.set_lora_scale("two_ends", float(k % 2))
        _ = models.loras()
        k += 1
        if k == 10:
            first_ten_at = done_frames
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert k > 10, "the scale changed while the frames ran"
    # Each change waits for the (at most two) frames in flight. Measured on a 2-core Zen 4: the first 10 changes
    # within 6-10 of the 120 frames, 144-194 changes in all; with the reader-first lock, 37-82 frames and 11-47.
    print(f"  [lora setter] first 10 changes within {first_ten_at} frames, {k} changes in 120 frames")
    assert first_ten_at < 40, f"the setter waited for {first_ten_at} of 120 frames to make its first 10 changes"
