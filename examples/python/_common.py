"""Helpers shared by the examples: the package import (from the build tree when not installed) and synthetic
input pictures, so every example runs with no arguments on the built-in emoji model."""
import math
import os
import sys

try:
    import streamdiffusion_cpp  # noqa: F401  (installed with `pip install .`)
except ImportError:  # a CMake build of this checkout: build/python
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "build", "python"))
    import streamdiffusion_cpp  # noqa: F401

from PIL import Image, ImageDraw


def drawing(k: int = 0, size: int = 64) -> Image.Image:
    """A simple picture: a coloured disc on white, moving and changing colour with k (synthetic input)."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    r = size // 4
    cx = size // 2 + int(size * 0.2 * math.sin(k / 3.0))
    cy = size // 2 + int(size * 0.1 * math.cos(k / 4.0))
    colour = (220, 40 + (k * 23) % 120, 40)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(60, 30, 20))
    return im


def write_frames(folder: str, count: int, size: int = 64) -> str:
    os.makedirs(folder, exist_ok=True)
    for k in range(count):
        drawing(k, size).save(os.path.join(folder, f"frame_{k:05d}.png"))
    return folder
