"""Shared fixtures."""

from __future__ import annotations

import pytest
from diffusers import Cosmos3OmniPipeline
from tiny_models import tiny_pipeline


@pytest.fixture(scope="session")
def pipeline() -> Cosmos3OmniPipeline:
    """A shared tiny pipeline; tests must not modify its weights."""
    return tiny_pipeline()
