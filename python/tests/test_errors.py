"""Engine errors surface as Python exceptions carrying the C++ message."""
import numpy as np
import pytest


def test_bad_path_is_format_error_with_the_message(sd):
    with pytest.raises(sd.FormatError) as e:
        sd.load_pipeline("/nonexistent/model-folder")
    assert isinstance(e.value, OSError) and isinstance(e.value, sd.Error)
    assert str(e.value).startswith("/nonexistent/model-folder: no such file or folder")
    assert e.value.file == "/nonexistent/model-folder"


def test_wrapper_bad_path(sd):
    with pytest.raises(OSError, match="no such file or folder"):
        sd.StreamDiffusionWrapper("/nonexistent/model-folder")


def test_bad_t_index_list_is_value_error_with_the_message(sd, emoji_models):
    cfg = sd.resolve_config(None, "img2img", t_index_list=[32, 60])
    with pytest.raises(ValueError) as e:
        sd.Stream(emoji_models, cfg)
    assert isinstance(e.value, sd.InvalidArgument)
    assert "t_index_list[1] = 60" in str(e.value)
    with pytest.raises(sd.InvalidArgument, match=r"t_index_list\[0\] = 99"):
        sd.StreamDiffusionWrapper(t_index_list=[99], threads=2)


def test_wrong_image_shape_is_value_error_with_the_message(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "img2img"))
    s.prepare("red apple")
    with pytest.raises(ValueError, match=r"img2img: input has shape \[1, 3, 32, 32\] and dtype Float; expected a "
                                         r"float tensor \[1, 3, 64, 64\] in \[-1, 1\]"):
        s.img2img(np.zeros((1, 3, 32, 32), np.float32))


def test_unprepared_stream_and_bad_options(sd, emoji_models):
    s = sd.Stream(emoji_models, sd.resolve_config(None, "txt2img"))
    with pytest.raises(sd.InvalidArgument, match="call prepare"):
        s.txt2img()
    # A refused call leaves the prompts the stream has (run_stream starts from them).
    with pytest.raises(sd.InvalidArgument, match="prepare"):
        s.update_prompt("rocket", "blurry")
    assert s.prompt == "" and s.negative_prompt == ""
    with pytest.raises(ValueError, match="unknown cfg_type 'bogus'"):
        sd.resolve_config(None, "img2img", cfg_type="bogus")
    with pytest.raises(ValueError, match="multiples of 8"):
        sd.resolve_config(None, "img2img", width=60, height=64)
    with pytest.raises(ValueError, match="fp64|dtype"):
        sd.load_pipeline(None, dtype="fp64")
