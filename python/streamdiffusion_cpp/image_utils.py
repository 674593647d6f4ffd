"""PIL / numpy <-> engine tensors.

Layouts: the model side is NCHW float32 in [-1, 1]; pictures are PIL images or uint8 HWC RGB arrays. Fitting a
picture to the stream size is a centre crop to the target aspect ratio, then a resize (area-like BOX filter when
shrinking, LANCZOS when enlarging) -- what the CLI and the runtime do, so a picture is never distorted.
"""
from __future__ import annotations

import os

from typing import List, Optional, Sequence, Union

from . import _core

try:  # PIL is optional: only the PIL conversions need it
    from PIL import Image
except ImportError:  # pragma: no cover
    Image = None  # type: ignore


def _require_pil():
    if Image is None:
        raise ImportError("streamdiffusion_cpp: PIL (Pillow) is needed for PIL images (Debian: python3-pil)")


def fit_image(image: "Image.Image", width: int, height: int) -> "Image.Image":
    """Centre-crops ``image`` to the aspect ratio width:height and resizes it to exactly (width, height), RGB."""
    _require_pil()
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) == (width, height):
        return image
    if w * height > h * width:  # too wide: crop the sides
        cw = max(1, round(h * width / height))
        left = (w - cw) // 2
        image = image.crop((left, 0, left + cw, h))
    elif w * height < h * width:  # too tall: crop top and bottom
        ch = max(1, round(w * height / width))
        top = (h - ch) // 2
        image = image.crop((0, top, w, top + ch))
    shrink = image.size[0] >= width
    return image.resize((width, height), Image.BOX if shrink else Image.LANCZOS)


def pil_to_tensor(image: Union["Image.Image", Sequence["Image.Image"]], width: Optional[int] = None,
                  height: Optional[int] = None) -> _core.Tensor:
    """PIL image(s) -> float32 NCHW [N, 3, H, W] in [-1, 1] (fitted to width x height when given)."""
    import numpy as np

    _require_pil()
    images = [image] if isinstance(image, Image.Image) else list(image)
    if width is not None and height is not None:
        images = [fit_image(im, width, height) for im in images]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return _core.image_to_tensor(arr)


def tensor_to_pil(images) -> List["Image.Image"]:
    """NCHW [N, 3, H, W] in [-1, 1] (any tensor-like) -> a list of N PIL RGB images."""
    import numpy as np

    _require_pil()
    u8 = np.asarray(_core.tensor_to_image(images))
    return [Image.fromarray(u8[i]) for i in range(u8.shape[0])]


def preprocess_image(image, width: int, height: int) -> _core.Tensor:
    """A path, PIL image, uint8 HWC / NHWC array or float NCHW tensor -> float32 NCHW in [-1, 1].

    Paths and PIL images are fitted (centre crop + resize) to width x height; uint8 arrays must already have that
    size; float tensors are taken as they are (already in [-1, 1], NCHW or CHW) without a copy.
    """
    if isinstance(image, (str, os.PathLike)):
        _require_pil()
        with Image.open(image) as im:
            return pil_to_tensor(im, width, height)
    if Image is not None and isinstance(image, Image.Image):
        return pil_to_tensor(image, width, height)
    if isinstance(image, (list, tuple)):
        import numpy as np

        parts = [np.asarray(preprocess_image(x, width, height)) for x in image]
        return _core.as_tensor(np.concatenate(parts, 0))
    t = _core.as_tensor(image)
    if t.dtype == "uint8":
        return _core.image_to_tensor(t, height, width)
    return t


def postprocess_image(images, output_type: str = "pil"):
    """Decoder output NCHW [N, 3, H, W] in [-1, 1] -> upstream's output types.

    "pil": list of PIL images; "pt": torch NCHW float in [0, 1]; "np": numpy NHWC float32 in [0, 1];
    "latent": the raw decoder output unchanged (NCHW, [-1, 1]: what upstream returns for "latent" too).
    """
    if output_type == "latent":
        return _to_torch_or_tensor(images)
    if output_type == "pil":
        return tensor_to_pil(images)
    import numpy as np

    x = np.asarray(_core.as_tensor(images).float())
    x = np.clip(x / 2.0 + 0.5, 0.0, 1.0).astype(np.float32)
    if output_type == "np":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if output_type == "pt":
        return _to_torch_or_tensor(_core.as_tensor(x))
    raise _core.InvalidArgument(f"output_type must be 'pil', 'pt', 'np' or 'latent', got {output_type!r}")


def _to_torch_or_tensor(t):
    """A torch.Tensor sharing the memory when torch is importable, else the engine Tensor itself."""
    try:
        import torch
    except ImportError:
        return t
    return torch.from_dlpack(_core.as_tensor(t))
