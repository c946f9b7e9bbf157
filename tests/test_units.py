"""How sizes print: the largest unit a size fills, so a small budget or a huge one reads as the user wrote it."""

from __future__ import annotations

import pytest

from cosmos3_offload.units import GIB, KIB, MIB, PIB, TIB, format_budget, format_bytes


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (KIB, "1.0 KiB"),
        (MIB, "1.0 MiB"),
        (1536 * KIB, "1.5 MiB"),
        (8 * GIB, "8.00 GiB"),
        (GIB + GIB // 4, "1.25 GiB"),
        (3 * TIB, "3.00 TiB"),
        (PIB, "1.00 PiB"),
        (-2 * MIB, "-2.0 MiB"),
    ],
)
def test_format_bytes_uses_the_largest_unit_filled(value, shown):
    """Fails when a size under 1 GiB prints as 0.00 GiB again, or a huge one as thousands of GiB."""
    assert format_bytes(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [(MIB, "1.0 MiB"), (7500 * MIB, "7.3 GiB"), (8 * GIB, "8.0 GiB"), (PIB, "1.0 PiB"), (512, "512 B")],
)
def test_format_budget_reads_as_a_budget_is_written(value, shown):
    """Fails when `--vram-budget 1MiB` is reported as 'a 0.0 GiB budget' (issue 23)."""
    assert format_budget(value) == shown
