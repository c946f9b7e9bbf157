"""Shared fixtures; the helper modules beside this file (tiny_models, joint_cases, published_layout) are
importable from every test folder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from diffusers import Cosmos3OmniPipeline  # noqa: E402
from tiny_models import tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def pipeline() -> Cosmos3OmniPipeline:
    """A shared tiny pipeline; tests must not modify its weights."""
    return tiny_pipeline()
