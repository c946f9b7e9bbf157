"""An action run's inputs as the generation path takes them, and the geometry they fix.

A door (the CLI's request, a sample, a server job, a diffusers call's `CosmosActionCondition`) gives
the mode, the embodiment, the chunk, the tier, the view point, the conditioning frames and, for
forward dynamics, the action rows. The path then does what `Cosmos3OmniPipeline.__call__` does with
an `action`: the conditioning frames are scaled (down only) and padded into the tier's canvas nearest
their aspect ratio and encoded; the video latents keep the content's size; the prompt is diffusers'
action caption at the canvas size; an action token per transition joins the generator's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..model.actions import ACTION_TIERS, ACTION_WIDTHS, DOMAIN_IDS, action_frames, canvas_aspect, content_size
from ..model.geometry import latent_frames


@dataclass(frozen=True)
class ActionInput:
    """One action run: `mode` (forward_dynamics, inverse_dynamics, policy), `domain` (the embodiment),
    `chunk` transitions (chunk + 1 video frames), the canvas `tier`, the caption's `view`, the conditioning
    `clip` (a list of frames, or what diffusers' video processor takes: only the first frame is used
    unless the mode is inverse_dynamics) and, for forward_dynamics, `raw_actions` [T, width of the domain]
    (shorter: the last row repeats; longer: cut to the chunk)."""

    mode: str
    domain: str
    chunk: int
    tier: int
    view: str
    clip: Any
    raw_actions: np.ndarray | torch.Tensor | None = None

    @property
    def domain_id(self) -> int:
        return DOMAIN_IDS[self.domain]

    @property
    def width(self) -> int:
        """Numbers per action row of the embodiment (the predicted actions' width)."""
        return ACTION_WIDTHS[self.domain]

    @property
    def frames(self) -> int:
        return action_frames(self.chunk)

    @property
    def predicts_actions(self) -> bool:
        return self.mode != "forward_dynamics"

    @property
    def clean_actions(self) -> tuple[int, ...]:
        """Action tokens given clean: all of them in forward dynamics, none otherwise."""
        return tuple(range(self.chunk)) if self.mode == "forward_dynamics" else ()

    def clean_frames(self, latent_count: int) -> tuple[int, ...]:
        """Latent video frames given clean: every one in inverse dynamics, the first otherwise."""
        return tuple(range(latent_count)) if self.mode == "inverse_dynamics" else (0,)

    def pixel_frames(self) -> int:
        """Conditioning frames the VAE must encode: the whole clip in inverse dynamics; else the first
        (the encoder is causal in time, so latent frame 0 depends on pixel frame 0 alone)."""
        return self.frames if self.mode == "inverse_dynamics" else 1


@dataclass(frozen=True)
class ActionGeometry:
    """Where an action run's conditioning frames go: the padded `canvas` (height, width) the caption and
    the encoder see, and the `content` (height, width) they are scaled to, which the video keeps."""

    canvas: tuple[int, int]
    content: tuple[int, int]


def action_geometry(pipe: Cosmos3OmniPipeline, action: ActionInput) -> ActionGeometry:
    """The canvas and content size of `action`'s clip, as `Cosmos3OmniPipeline.__call__` resolves them
    (its video processor floors the frame to the VAE's stride first)."""
    source = pipe.video_processor.preprocess_video(action.clip)
    height, width = int(source.shape[-2]), int(source.shape[-1])
    canvas = ACTION_TIERS[action.tier][canvas_aspect(height, width, action.tier)]
    return ActionGeometry(canvas, content_size(height, width, canvas))


def action_latent_shape(pipe: Cosmos3OmniPipeline, action: ActionInput, geometry: ActionGeometry) -> tuple[int, ...]:
    """[1, C, T, h, w]: the video latents of an action run, cropped to the content as diffusers crops them."""
    vae = pipe.vae.config
    stride = vae.scale_factor_spatial
    height, width = (max(side // stride, 1) for side in geometry.content)
    return (1, vae.z_dim, latent_frames(action.frames, vae.scale_factor_temporal), height, width)


def initial_action_latents(
    pipe: Cosmos3OmniPipeline, action: ActionInput, generator, device: torch.device
) -> torch.Tensor:
    """[chunk, action_dim] float32: noise drawn after the video's (and the sound's) as `prepare_latents`
    draws it (in every mode, so the seed's stream is diffusers'), the given rows put in clean for
    forward dynamics, and the columns past the embodiment's width zero."""
    action_dim = pipe.transformer.config.action_dim
    noise = randn_tensor((action.chunk, action_dim), generator=generator, device=device, dtype=torch.float32)
    clean = torch.zeros_like(noise)
    if action.raw_actions is not None and action.mode == "forward_dynamics":
        rows = torch.as_tensor(action.raw_actions).to(device=device, dtype=torch.float32)
        if rows.shape[0] < action.chunk:  # the last action repeats
            rows = torch.cat([rows, rows[-1:].expand(action.chunk - rows.shape[0], -1)])
        rows = rows[: action.chunk]
        clean[:, : rows.shape[1]] = rows
    mask = torch.zeros(action.chunk, 1, device=device, dtype=torch.float32)
    mask[list(action.clean_actions)] = 1.0
    latents = mask * clean + (1.0 - mask) * noise
    latents[:, action.width :] = 0
    return latents
