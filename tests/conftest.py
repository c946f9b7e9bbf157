"""Shared fixtures; the helper modules beside this file (tiny_models, joint_cases, published_layout) are
importable from every test folder.

The session's checkpoints are written once and shared: tests read them and never write into them (a test that
changes a folder copies it first)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import Cosmos3OmniPipeline  # noqa: E402
from tiny_models import tiny_pipeline  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each runs its tests single-threaded, the workers side by side.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipeline() -> Cosmos3OmniPipeline:
    """A shared tiny pipeline; tests must not modify its weights."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def published_checkpoint(tmp_path_factory) -> Path:
    """The tiny folder in the published Hub layout (published_layout.py), with sound; read-only."""
    from published_layout import write_published_checkpoint

    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")


@pytest.fixture(scope="session")
def fp8_checkpoint(tmp_path_factory) -> Path:
    """The tiny folder in the layout of NVIDIA's FP8 release (fp8_layout.py), with its step policy; read-only."""
    from fp8_layout import write_fp8_checkpoint

    return write_fp8_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano-fp8")


@pytest.fixture
def no_hang():
    """A test whose code blocks (reading a FIFO, say) fails after 60 s instead of hanging the suite."""

    def hung(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
