"""Shared test set-up: the package from the build tree (PYTHONPATH, set by CTest), the fixture root, the CLI."""
import os
import shutil
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
