"""The live performance controls from Python: prompt lists (blends), seed lists, timed transitions, prompt weights
and latent feedback, on the Stream, in the runtime's control commands and in the wrapper (built-in emoji model)."""
import numpy as np
import pytest


def cfg(sd, mode="txt2img", size=None, **kw):
    c = sd.resolve_config(None, mode, t_index_list=[0] if mode == "txt2img" else [32, 45])
    if size:
        c.width = c.height = size
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def emb(stream):
    return np.asarray(stream.cond_embeds).copy()


def test_prompt_list_one_zero_is_the_single_prompt_bit_for_bit(sd, emoji_models):
    for method in ("linear", "slerp"):
        a = sd.Stream(emoji_models, cfg(sd, prompt_blend=method))
        a.prepare("red apple")
        b = sd.Stream(emoji_models, cfg(sd, prompt_blend=method))
        b.prepare([("red apple", 1.0), ("rocket", 0.0)])
        assert np.array_equal(emb(a), emb(b))
        assert np.array_equal(np.asarray(a.txt2img()), np.asarray(b.txt2img()))
    s = sd.Stream(emoji_models, cfg(sd))
    s.prepare({"red apple": 3.0, "rocket": 1.0})
    apple, rocket = sd.Stream(emoji_models, cfg(sd)), sd.Stream(emoji_models, cfg(sd))
    apple.prepare("red apple")
    rocket.prepare("rocket")
    np.testing.assert_allclose(emb(s), 0.75 * emb(apple) + 0.25 * emb(rocket), rtol=1e-5, atol=1e-6)
    assert s.prompt_list == [("red apple", 3.0), ("rocket", 1.0)]
    assert [round(w, 6) for _, w in s.effective_prompts] == [0.75, 0.25]


def test_transition_over_n_frames_hits_the_target_at_frame_n(sd, emoji_models):
    target = sd.Stream(emoji_models, cfg(sd))
    target.prepare("rocket")
    s = sd.Stream(emoji_models, cfg(sd, transition="4f"))
    assert s.config.transition == "4f"
    s.prepare("red apple")
    start = emb(s)
    encodes = s.stats.text_encodes
    s.set_prompt_list([("rocket", 1.0)])
    for k in range(1, 5):
        s.txt2img()
        t = k / 4
        if k < 4:
            assert s.transition_active
            np.testing.assert_allclose(emb(s), (1 - t) * start + t * emb(target), rtol=1e-5, atol=1e-6)
    assert not s.transition_active
    assert np.array_equal(emb(s), emb(target))
    assert s.stats.text_encodes == encodes + 1  # "rocket" once, nothing per frame


def test_seed_list_noise_is_standard_normal_and_one_seed_is_the_seed(sd, emoji_models):
    s = sd.Stream(emoji_models, cfg(sd, size=512, seed_list=[(1, 0.5), (2, 0.3), (3, 0.2)]))
    s.prepare("cat face")
    noise = np.asarray(s.init_noise)
    assert noise.size >= 16384
    assert abs(float(noise.std()) - 1.0) < 0.02
    one = sd.Stream(emoji_models, cfg(sd, seed=7))
    one.prepare("cat face")
    listed = sd.Stream(emoji_models, cfg(sd, seed_list="7:1, 8:0"))
    listed.prepare("cat face")
    assert listed.config.seed_list == [(7, 1.0), (8, 0.0)]
    assert np.array_equal(np.asarray(one.init_noise), np.asarray(listed.init_noise))
    listed.set_seed_list({9: 1.0})
    one.set_seed(9)
    assert np.array_equal(np.asarray(one.init_noise), np.asarray(listed.init_noise))
    assert listed.effective_seeds == [(9, 1.0)]


def test_prompt_weights_change_the_embedding_plain_text_does_not(sd, emoji_models):
    plain, weighted, escaped = (sd.Stream(emoji_models, cfg(sd)) for _ in range(3))
    plain.prepare("red apple")
    weighted.prepare("(red:1.5) apple")
    escaped.prepare("red apple (")  # an unbalanced bracket is text
    assert not np.array_equal(emb(plain), emb(weighted))
    assert abs(float(emb(plain).mean()) - float(emb(weighted).mean())) < 1e-5  # A1111: the mean is restored
    assert not np.array_equal(emb(plain), emb(escaped))


def test_latent_feedback_and_bad_values(sd, emoji_models):
    s = sd.Stream(emoji_models, cfg(sd, "img2img", latent_feedback=0.5))
    s.prepare("cat face")
    x = np.zeros((1, 3, 64, 64), np.float32)
    outs = [np.asarray(s.img2img(x)).copy() for _ in range(4)]
    s2 = sd.Stream(emoji_models, cfg(sd, "img2img"))
    s2.prepare("cat face")
    outs2 = [np.asarray(s2.img2img(x)).copy() for _ in range(4)]
    assert np.array_equal(outs[1], outs2[1])  # the first real output: nothing fed back yet
    assert not np.array_equal(outs[3], outs2[3])
    s.set_latent_feedback(0.0)
    with pytest.raises(sd.InvalidArgument, match=r"\[0, 1\]"):
        s.set_latent_feedback(1.5)
    with pytest.raises(sd.InvalidArgument, match="every weight is 0"):
        s.set_prompt_list([("a", 0), ("b", 0)])
    with pytest.raises(sd.InvalidArgument, match="30f"):
        s.set_transition("soon")
    with pytest.raises(sd.InvalidArgument, match="linear or slerp"):
        s.set_prompt_blend("cubic")


def test_control_commands_in_the_runtime(sd, emoji_models):
    if not sd.HAVE_RUNTIME:
        pytest.skip("built without the runtime (engine-only)")
    s = sd.Stream(emoji_models, cfg(sd))
    s.prepare("red apple")
    commands = {1: "transition 2f", 2: "prompt_list red apple:1 | rocket:1", 3: "seed_list 3:1, 4:1",
                4: "prompt_blend slerp"}
    summary = sd.run_stream(s, "none", "none", callback=lambda im, i: commands.get(i), max_frames=12)
    applied = [c["command"] if isinstance(c, dict) and "command" in c else str(c) for c in summary["controls"]]
    for cmd in commands.values():
        assert any(cmd in a for a in applied), (cmd, summary["controls"])
    assert s.prompt_list == [("red apple", 1.0), ("rocket", 1.0)]
    assert s.config.prompt_blend == "slerp"
    assert [seed for seed, _ in s.effective_seeds] == [3, 4]


def test_wrapper_controls(sd):
    w = sd.StreamDiffusionWrapper(mode="txt2img", t_index_list=[0], output_type="np", seed_list=[(1, 1), (2, 1)],
                                  transition="2f", prompt_blend="slerp")
    w.prepare([("red apple", 1.0), ("rocket", 1.0)])
    assert w.stream.config.seed_list == [(1, 1.0), (2, 1.0)]
    assert w.stream.prompt_list == [("red apple", 1.0), ("rocket", 1.0)]
    a = w.txt2img()
    assert a.shape == (64, 64, 3)
    w(prompt="cat face")
    assert w.stream.transition_active  # morphing towards "cat face" over 2 frames
    w.txt2img()
    assert not w.stream.transition_active
    w.set_latent_feedback(0.0)
    with pytest.raises(sd.InvalidArgument):
        sd.StreamDiffusionWrapper(mode="txt2img", latent_feedback=0.5)


def test_the_prompt_passed_with_every_frame_still_finishes_the_transition(sd):
    # Upstream's usage: wrapper(image, prompt) on every frame. Each call used to restart the morph, so it never ended.
    w = sd.StreamDiffusionWrapper(mode="txt2img", t_index_list=[0], output_type="np", transition="3f")
    w.prepare("red apple")
    encodes = w.stream.stats.text_encodes
    for k in range(3):
        w(prompt="cat face")
        assert w.stream.transition_active == (k < 2), k
    assert w.stream.stats.text_encodes == encodes + 1


def test_settings_from_another_thread_while_a_thread_runs_frames(sd, emoji_models):
    # A GUI thread changing settings while a worker thread runs frames: the calls release the GIL, so without the
    # stream's lock a setter could swap buffers under a running UNet call or free the filter while it runs.
    import threading

    s = sd.Stream(emoji_models, cfg(sd, "img2img", cfg_type="self", guidance_scale=1.4))
    s.prepare("red apple")
    x = np.zeros((1, 3, s.height, s.width), dtype=np.float32)
    errors, done = [], threading.Event()

    def worker():
        try:
            for _ in range(150):
                out = np.asarray(s.img2img(x))
                assert out.shape == (1, 3, s.height, s.width)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=worker)
    t.start()
    k = 0
    while not done.is_set():
        s.set_similarity_filter(k % 2 == 0, threshold=0.9)
        s.set_t_index_list([32, 45] if k % 3 else [40])
        s.set_guidance_scale(1.0 if k % 4 == 0 else 1.6)
        s.update_prompt("rocket" if k % 2 else "red apple")
        _ = s.latent_buffer, s.stats, s.config
        k += 1
    t.join()
    assert not errors, errors
    assert k > 10, "the setters ran while the frames did"
    with pytest.raises(TypeError, match="threshold goes by name"):
        s.set_similarity_filter(0.95)


def test_stream_config_is_a_read_only_snapshot(sd, emoji_models):
    # A plain copy took `s.config.guidance_scale = 2` and changed nothing, silently.
    import copy
    s = sd.Stream(emoji_models, cfg(sd))
    s.prepare("red apple")
    with pytest.raises(AttributeError, match=r"read-only snapshot: setting 'guidance_scale' .*set_guidance_scale"):
        s.config.guidance_scale = 2.0
    with pytest.raises(AttributeError, match="setting 'seed'"):
        setattr(s.config, "seed", 5)
    assert isinstance(s.config, sd.StreamConfig)
    s.set_guidance_scale(2.0)
    assert s.config.guidance_scale == 2.0
    # Changeable copies, to build another stream from.
    for c in (s.config.copy(), sd.StreamConfig(s.config), copy.copy(s.config), copy.deepcopy(s.config)):
        assert type(c) is sd.StreamConfig and c.guidance_scale == 2.0
        c.seed = 99
        assert c.seed == 99 and s.config.seed != 99
    assert sd.Stream(emoji_models, c).config.seed == 99
