"""Resolution tiers, aspect ratios and the frame-count rule."""

from __future__ import annotations

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.model.tiers import RESOLUTION_TIERS, check_frame_count, frame_size


def test_sixteen_by_nine_sizes_match_cosmos3():
    """The 16:9 sizes of the four tiers are 320x192, 832x480, 1280x720 and 1360x768."""
    assert [frame_size(t, "16,9") for t in (256, 480, 720, 768)] == [(320, 192), (832, 480), (1280, 720), (1360, 768)]


def test_every_size_fits_the_vae_grid():
    """Every width and height is a multiple of the VAE's 16x spatial compression."""
    assert all(w % 16 == 0 and h % 16 == 0 for tier in RESOLUTION_TIERS.values() for w, h in tier.values())


@pytest.mark.parametrize("tier, aspect, needle", [(300, "16,9", "256, 480, 720, 768"), (720, "2,1", "1,1 4,3")])
def test_unknown_tier_or_aspect_lists_the_choices(tier, aspect, needle):
    """An unknown tier or aspect ratio names the valid ones."""
    with pytest.raises(InputError, match=needle):
        frame_size(tier, aspect)


@pytest.mark.parametrize("frames", [1, 5, 9, 93, 189])
def test_valid_frame_counts(frames):
    """1 and 4k+1 are accepted."""
    check_frame_count(frames)


@pytest.mark.parametrize("frames, hint", [(20, "use 17 or 21"), (2, "use 1 or 5"), (0, "got 0"), (-3, "got -3")])
def test_invalid_frame_counts_suggest_neighbours(frames, hint):
    """Other counts are refused with the nearest valid ones."""
    with pytest.raises(InputError, match=hint):
        check_frame_count(frames)
