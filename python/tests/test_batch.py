"""StreamBatcher: many streams' calls with their UNet rows in one UNet call (the engine's run_stream_calls) give what
each stream gives on its own (max |diff| / max(1, |ref|) <= 2e-5, the C++ test's tolerance,
tests/pipeline/test_multi_stream.cpp), count the shared calls, and fail a bad call alone."""
import numpy as np
import pytest

TOL = 2e-5


def _streams(sd, models, specs):
    out = []
    for mode, prompt, seed in specs:
        cfg = sd.resolve_config(None, mode)
        cfg.seed = seed
        s = sd.Stream(models, cfg)
        s.prepare(prompt)
        out.append(s)
    return out


def _frame(seed):
    return (np.random.default_rng(seed).random((1, 3, 64, 64), dtype=np.float32) * 2 - 1)


SPECS = [("img2img", "red apple", 3), ("img2img", "grinning face", 5), ("txt2img", "rocket", 7)]


def test_batched_calls_equal_one_call_per_stream(sd, emoji_models):
    one = _streams(sd, emoji_models, SPECS)
    many = _streams(sd, emoji_models, SPECS)
    batcher = sd.StreamBatcher()
    worst = 0.0
    for step in range(3):
        frames = [_frame(10 * step + i) for i in range(2)]
        expect = [one[0].img2img(frames[0]), one[1].img2img(frames[1]), one[2].txt2img()]
        got = batcher.run([(many[0], frames[0]), (many[1], frames[1]), many[2]])
        assert len(got) == 3
        for g, e in zip(got, expect):
            g, e = np.asarray(g, np.float64), np.asarray(e, np.float64)
            assert g.shape == e.shape == (1, 3, 64, 64)
            worst = max(worst, float(np.abs(g - e).max() / max(1.0, np.abs(e).max())))
    assert worst <= TOL, worst
    st = batcher.stats
    assert st["steps"] == 3 and st["stream_calls"] == 9
    assert st["shared_unet_calls"] == 3 and st["batched_calls"] == 9 and st["max_batch"] == 3
    assert st["shared_encode_calls"] == 3  # the two img2img inputs, one TAESD encode per step
    assert st["errors"] == 0 and st["graph_replays"] == 0 and st["graph_failures"] == 0  # no CUDA graphs on the CPU
    for s in many:
        assert s.stats.batched_calls == 3


def test_a_bad_call_fails_alone(sd, emoji_models):
    a, b = _streams(sd, emoji_models, SPECS[:2])
    batcher = sd.StreamBatcher(max_streams=4)
    assert batcher.max_streams == 4
    bad = np.zeros((1, 3, 32, 32), np.float32)
    out = batcher.run([(a, _frame(1)), (b, bad)], return_exceptions=True)
    assert np.asarray(out[0]).shape == (1, 3, 64, 64)
    assert isinstance(out[1], sd.InvalidArgument) and isinstance(out[1], ValueError)
    assert "img2img: input has shape [1, 3, 32, 32]" in str(out[1])
    with pytest.raises(ValueError, match=r"img2img: input has shape \[1, 3, 32, 32\]"):
        batcher.run([(a, _frame(2)), (b, bad)])
    with pytest.raises(ValueError, match="are for the same stream"):
        batcher.run([(a, _frame(3)), (a, _frame(4))])
    assert batcher.stats["errors"] == 3


def test_bad_arguments(sd, emoji_models):
    (a,) = _streams(sd, emoji_models, SPECS[:1])
    batcher = sd.StreamBatcher()
    with pytest.raises(ValueError, match=r"calls\[1\] is a int; expected a Stream \(txt2img\) or a \(Stream, images"):
        batcher.run([(a, _frame(1)), 5])
    with pytest.raises(ValueError, match="max_streams must be >= 0"):
        sd.StreamBatcher(max_streams=-1)
    unprepared = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img"))
    out = batcher.run([unprepared], return_exceptions=True)
    assert isinstance(out[0], sd.InvalidArgument) and "call prepare" in str(out[0])
