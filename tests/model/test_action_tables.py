"""The action registry equals diffusers' tables, and its geometry equals diffusers' helpers."""

from __future__ import annotations

import pytest
from diffusers.pipelines.cosmos import pipeline_cosmos3_omni as omni
from diffusers.video_processor import VideoProcessor

from cosmos3_offload.model.actions import (
    ACTION_TIERS,
    ACTION_WIDTHS,
    DOMAIN_IDS,
    VIEW_POINTS,
    canvas_aspect,
    content_size,
    decoded_frames,
)


def test_domains_widths_and_views_are_diffusers():
    assert DOMAIN_IDS == omni._EMBODIMENT_TO_DOMAIN_ID
    assert ACTION_WIDTHS == omni._EMBODIMENT_TO_RAW_ACTION_DIM
    assert list(VIEW_POINTS) == list(omni._ACTION_VIEWPOINT_TEMPLATES)


def test_tier_canvases_are_diffusers_bins_in_their_order():
    assert sorted(ACTION_TIERS) == sorted(int(t) for t in omni._ACTION_RESOLUTION_BINS)
    for tier, canvases in ACTION_TIERS.items():
        bins = omni._ACTION_RESOLUTION_BINS[str(tier)]
        assert list(canvases.values()) == list(bins.values())
        for key, (height, width) in bins.items():
            assert float(key) == pytest.approx(height / width)


@pytest.mark.parametrize("tier", sorted(ACTION_TIERS))
@pytest.mark.parametrize("size", [(200, 300), (480, 640), (720, 1280), (1280, 720), (96, 96), (1000, 1001), (64, 300)])
def test_canvas_and_content_are_diffusers(tier, size):
    height, width = size
    expected = VideoProcessor.classify_height_width_bin(height, width, ratios=omni._ACTION_RESOLUTION_BINS[str(tier)])
    canvas = ACTION_TIERS[tier][canvas_aspect(height, width, tier)]
    assert canvas == expected
    content = content_size(height, width, canvas)
    assert content[0] <= canvas[0] and content[1] <= canvas[1]
    assert content[0] <= height and content[1] <= width  # never up


def test_decoded_frames_drop_an_incomplete_group():
    assert [decoded_frames(c) for c in (1, 3, 4, 6, 8, 16)] == [1, 1, 5, 5, 9, 17]
