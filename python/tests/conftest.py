"""Shared test set-up: the package from the build tree (PYTHONPATH, set by CTest), the fixture root, the CLI."""
import json
import os
import shutil
import struct
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def fixture_root():
    root = os.environ.get("SD_FIXTURES") or os.environ.get("SD_FIXTURES_DEFAULT") or os.path.join(
        REPO, "..", "shared", "fixtures")
    return os.path.abspath(root)


def cli_path():
    cli = os.environ.get("SD_CLI") or os.path.join(REPO, "build", "apps", "streamdiffusion")
    return cli if os.path.exists(cli) else shutil.which("streamdiffusion")


def child_env():
    """Environment for subprocesses: the same package path and a predictable thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


_SAFETENSORS_DTYPES = ("F32", "float32"), ("F16", "float16"), ("I64", "int64"), ("I32", "int32")


def read_safetensors(path):
    """{key: numpy array} of a .safetensors file (the dtypes of _SAFETENSORS_DTYPES)."""
    import numpy as np  # here, not at the top: test files that need no numpy import this module too

    dtypes = {name: np.dtype(d) for name, d in _SAFETENSORS_DTYPES}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k != "__metadata__":
            a, b = v["data_offsets"]
            out[k] = np.frombuffer(data[a:b], dtype=dtypes[v["dtype"]]).reshape(v["shape"])
    return out


def write_safetensors(path, tensors):
    """Writes {key: numpy array} as a .safetensors file (keys sorted, as safetensors.torch.save_file)."""
    import numpy as np

    names = {np.dtype(d): name for name, d in _SAFETENSORS_DTYPES}
    header, blobs, offset = {}, [], 0
    for k in sorted(tensors):
        raw = np.ascontiguousarray(tensors[k]).tobytes()
        header[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape),
                     "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="session")
def fixtures():
    root = fixture_root()
    if not os.path.isdir(os.path.join(root, "pipeline")):
        pytest.skip(f"fixtures not found at {root} (set SD_FIXTURES)")
    return root


@pytest.fixture(scope="session")
def cli():
    """The streamdiffusion CLI's path; tests that run it skip when it is not built."""
    path = cli_path()
    if not path:
        pytest.skip("the streamdiffusion CLI is not built")
    return path


@pytest.fixture(scope="session")
def sd():
    import streamdiffusion_cpp

    return streamdiffusion_cpp


@pytest.fixture(scope="session")
def emoji_models(sd):
    return sd.load_pipeline(None, dtype="fp32", threads=2)
