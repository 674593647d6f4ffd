"""streamdiffusion_cpp: the streamdiffusion.cpp engine (C++ / libtorch) from Python.

Two levels:

* :class:`StreamDiffusionWrapper` -- upstream StreamDiffusion's ``utils/wrapper.py`` API (constructor arguments,
  ``prepare``, ``__call__``, ``txt2img``, ``img2img``, ``preprocess_image``, ``postprocess_image``) on this engine,
  without diffusers, transformers or a pinned torch.
* :func:`load_pipeline`, :class:`Stream`, :func:`resolve_config`, :func:`run_stream` -- the engine itself: one loaded
  model set shared by any number of streams, every runtime setter, statistics and the real-time runtime.

Tensors cross without copies through DLPack: inputs may be any object with ``__dlpack__`` (torch, numpy >= 1.22,
CuPy, JAX) and results are :class:`Tensor` objects that ``torch.from_dlpack`` / ``np.from_dlpack`` / ``np.asarray``
take as they are. Layouts: model-side images are NCHW float in [-1, 1]; picture-side images are uint8 HWC RGB or
(wrapper ``output_type="pt"|"np"``) float in [0, 1].

Engine errors are Python exceptions carrying the C++ message: :class:`InvalidArgument` (a ``ValueError``) for bad
arguments, :class:`FormatError` (an ``OSError``) for missing or malformed files, :class:`Error` (a ``RuntimeError``,
the base of both) for the rest.

Settings files: :func:`load_settings` reads the CLI's ``--config FILE.yaml`` files (and ``--dump-config`` output);
:meth:`StreamDiffusionWrapper.from_config` builds a wrapper from one (keyword arguments override the file).
"""
from ._core import (  # noqa: F401
    HAVE_RUNTIME,
    ControlNet,
    Error,
    FormatError,
    InvalidArgument,
    Models,
    Mt19937UniformSource,
    ReplayRng,
    ReplayUniformSource,
    Rng,
    SimilarityFilterOptions,
    Stream,
    StreamBatcher,
    StreamConfig,
    StreamStats,
    Tensor,
    TorchRng,
    UniformSource,
    __version__,
    as_tensor,
    control_preprocess,
    control_preprocessor_names,
    default_model_dir,
    image_to_tensor,
    load_pipeline,
    load_safetensors,
    model_defaults,
    resolve_config,
    run_stream,
    set_threads,
    tensor_to_image,
)
from .image_utils import pil_to_tensor, postprocess_image, preprocess_image, tensor_to_pil  # noqa: F401
from .settings import Settings, load_settings  # noqa: F401
from .wrapper import StreamDiffusionWrapper  # noqa: F401

__all__ = [
    "StreamDiffusionWrapper",
    "load_settings",
    "Settings",
    "load_pipeline",
    "Stream",
    "StreamBatcher",
    "StreamConfig",
    "StreamStats",
    "resolve_config",
    "run_stream",
    "Tensor",
    "as_tensor",
    "Models",
    "ControlNet",
    "control_preprocess",
    "control_preprocessor_names",
    "model_defaults",
    "default_model_dir",
    "image_to_tensor",
    "tensor_to_image",
    "load_safetensors",
    "set_threads",
    "SimilarityFilterOptions",
    "Rng",
    "TorchRng",
    "ReplayRng",
    "UniformSource",
    "Mt19937UniformSource",
    "ReplayUniformSource",
    "Error",
    "InvalidArgument",
    "FormatError",
    "HAVE_RUNTIME",
    "pil_to_tensor",
    "tensor_to_pil",
    "preprocess_image",
    "postprocess_image",
]
