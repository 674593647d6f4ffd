"""Tensors cross without copies: torch and numpy in and out, checked by data pointer; lifetimes; dtypes."""
import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_torch_in_is_zero_copy(sd):
    t = torch.randn(1, 3, 8, 8)
    s = sd.as_tensor(t)
    assert s.data_ptr() == t.data_ptr()
    assert s.shape == (1, 3, 8, 8) and s.dtype == "float32"
    t[0, 0, 0, 0] = 42.0  # the same memory
    assert np.asarray(s)[0, 0, 0, 0] == 42.0


def test_engine_out_to_torch_and_numpy_is_zero_copy(sd):
    img = np.zeros((2, 16, 24, 3), np.uint8)
    img[..., 0] = 255
    out = sd.image_to_tensor(img)  # engine-allocated [2, 3, 16, 24] in [-1, 1]
    assert out.shape == (2, 3, 16, 24)
    tt = torch.from_dlpack(out)
    assert tt.data_ptr() == out.data_ptr()
    assert tt.shape == (2, 3, 16, 24)
    assert float(tt[0, 0].min()) == 1.0 and float(tt[0, 1].max()) == -1.0
    nd = np.from_dlpack(out)
    assert nd.ctypes.data == out.data_ptr()
    na = np.asarray(out)
    assert na.ctypes.data == out.data_ptr()
    # Writes through one view are seen by the others.
    tt[1, 2, 3, 4] = 0.25
    assert na[1, 2, 3, 4] == 0.25 and nd[1, 2, 3, 4] == 0.25


def test_numpy_in_is_zero_copy_and_keeps_the_array_alive(sd):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ptr = a.ctypes.data
    s = sd.as_tensor(a)
    assert s.data_ptr() == ptr
    del a
    gc.collect()
    assert np.asarray(s).ravel().tolist() == list(range(24))  # still valid: the engine holds numpy's buffer


def test_readonly_numpy_is_copied_once(sd):
    a = np.ones((4, 4, 3), np.uint8)
    a.flags.writeable = False  # e.g. np.asarray(PIL image)
    s = sd.as_tensor(a)
    assert s.data_ptr() != a.ctypes.data
    assert np.asarray(s).sum() == 48


def test_round_trip_torch_engine_torch_keeps_pointer_and_bf16(sd):
    t = torch.randn(3, 5).to(torch.bfloat16)
    s = sd.as_tensor(t)
    assert s.dtype == "bfloat16" and s.data_ptr() == t.data_ptr()
    back = torch.from_dlpack(s)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)
    with pytest.raises(TypeError, match="numpy has no bfloat16"):
        np.asarray(s)
    assert np.asarray(s.float()).dtype == np.float32


def test_strided_views_cross_as_views(sd):
    t = torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1:4]
    s = sd.as_tensor(t)
    assert s.data_ptr() == t.data_ptr()
    assert np.asarray(s).tolist() == t.tolist()


def test_reversed_numpy_views_are_copied_not_an_abort(sd):
    # numpy exports negative strides through DLPack; libtorch 1.13's from_blob aborted the interpreter on them
    # (std::terminate). The usual BGR -> RGB idiom frame[..., ::-1] must simply work.
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for v in (a[:, :, ::-1], a[::-1], np.flip(a, 1), np.rot90(a[0])):
        s = sd.as_tensor(v)
        assert np.asarray(s).tolist() == v.tolist()
    bgr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    rgb = bgr[..., ::-1]
    assert torch.equal(torch.from_dlpack(sd.as_tensor(rgb)), torch.from_numpy(np.ascontiguousarray(rgb)))
    # A bare capsule cannot be copied from: a clear error instead.
    with pytest.raises(ValueError, match="negative strides"):
        sd.as_tensor(a[:, ::-1].__dlpack__())


def test_stream_output_reaches_torch_without_copy(sd, emoji_models):
    cfg = sd.resolve_config(None, "img2img")
    s = sd.Stream(emoji_models, cfg)
    s.prepare("red apple")
    x = torch.zeros(1, 3, cfg.height, cfg.width)  # NCHW in [-1, 1]
    out = s.img2img(x)
    tt = torch.from_dlpack(out)
    assert tt.data_ptr() == out.data_ptr()
    assert tuple(tt.shape) == (1, 3, 64, 64)
    assert torch.isfinite(tt).all()


def test_a_consumed_capsule_is_refused(sd):
    t = torch.zeros(2)
    cap = t.__dlpack__()
    sd.as_tensor(cap)
    with pytest.raises(TypeError, match="already consumed"):
        sd.as_tensor(cap)


def test_non_tensor_is_a_type_error(sd):
    with pytest.raises(TypeError, match="expected a tensor"):
        sd.as_tensor(object())
