"""Refusing NaN or infinity where it would be written as a video: denoised latents (they decode to a black
or garbage video), a VAE decoder's frames (black or white) and the sound decoder's waveform (silence).

The advice depends on the precision: in float32 an overflow of finite weights and inputs is all but
impossible, so the weights (or inputs) are broken; in a narrower dtype an overflow comes first.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .generate import Latents

# What holds NaN or infinity when a decoder's output has them (its input latents were finite).
VAE_BROKEN = "the checkpoint's VAE weights hold NaN or infinity: check or re-download it"
SOUND_BROKEN = "the checkpoint's sound tokenizer weights hold NaN or infinity: check or re-download it"


def check_finite(latents: Latents, dtype: torch.dtype = torch.float32) -> None:
    """Refuse to decode NaN or infinite latents (they decode to a black or garbage video), denoised by a
    transformer computing in `dtype`. Waits for the device."""
    values = torch.cat([part.flatten() for part in latents if part is not None])
    if not bool(torch.isfinite(values).all()):
        broken = "the checkpoint's weights or the inputs hold NaN or infinity: check or re-download the checkpoint"
        raise not_finite(
            "the denoised latents are", broken, dtype, "lower --guidance or --shift, or use --dtype float32"
        )


def not_finite(what: str, broken: str, dtype: torch.dtype, narrower: str = "use --dtype float32") -> InputError:
    """The one line refusing NaN or infinite `what` ("the X are"), computed in `dtype`. In float32 an overflow
    of finite weights and inputs is all but impossible, so the advice is `broken` (what must hold them); in a
    narrower dtype it is `narrower` first (an overflow), `broken` if that does not help."""
    refused = f"{what} not finite (NaN or infinity), so nothing was written"
    if dtype in (torch.float32, torch.float64):
        return InputError(f"{refused}; in a {str(dtype).removeprefix('torch.')} run that means {broken}")
    return InputError(f"{refused}; {narrower} (if it persists, {broken})")
