"""Inputs packed the way `Cosmos3OmniPipeline.__call__` packs them, and the joint forward on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Cosmos3OmniPipeline

from cosmos3_offload.split.denoise import GeneratorInputs, GeneratorLayout

LONG_PROMPT = " ".join(["A slow aerial shot over a misty pine forest at dawn, with a river winding below."] * 12)


@dataclass
class JointCase:
    packed: dict[str, Any]
    inputs: GeneratorInputs

    @property
    def layout(self) -> GeneratorLayout:
        return GeneratorLayout.from_packed(self.packed)


def joint_case(
    pipe: Cosmos3OmniPipeline,
    prompt: str,
    frames: int,
    *,
    height: int = 192,
    width: int = 320,
    condition_frames: tuple[int, ...] = (),
    sound_action: bool = False,
    timestep: float = 700.0,
) -> JointCase:
    """A packed joint sequence with random latents (and sound/action tokens when asked)."""
    ids, _ = pipe.tokenize_prompt(prompt, num_frames=frames, height=height, width=width)
    text = pipe._prepare_text_segment(ids, device="cpu")
    offset = text["vision_start_temporal_offset"]
    generator = torch.Generator().manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    vision = torch.randn(1, 48, latent_frames, height // 16, width // 16, generator=generator)
    segments = [
        text,
        pipe._prepare_vision_segment(
            vision, bool(condition_frames), offset, 24.0, text["und_len"], "cpu", list(condition_frames)
        ),
    ]
    length = text["und_len"] + segments[1]["num_vision_tokens"]
    sound = action = domain = None
    if sound_action:
        sound = torch.randn(pipe.transformer.config.sound_dim, 7, generator=generator)
        segments.append(pipe._prepare_sound_segment(sound, offset, 25.0, length, "cpu"))
        length += segments[-1]["sound_len"]
        action = torch.randn(4, pipe.transformer.config.action_dim, generator=generator)
        segments.append(pipe._prepare_action_segment(action, [0], offset, 24.0, length, "cpu"))
        length += segments[-1]["action_len"]
        domain = torch.tensor([3])
    mrope_keys = ("text_mrope_ids", "vision_mrope_ids", "sound_mrope_ids", "action_mrope_ids")
    mrope = [s[key] for s in segments for key in mrope_keys if key in s]
    packed = {k: v for s in segments for k, v in s.items()}
    packed.update(position_ids=torch.cat(mrope, dim=1), sequence_length=length)
    inputs = GeneratorInputs(vision=vision, timestep=timestep, sound=sound, action=action, action_domain_id=domain)
    return JointCase(packed, inputs)


@torch.no_grad()
def joint_forward(pipe: Cosmos3OmniPipeline, case: JointCase) -> tuple:
    """(vision, sound, action) predictions of diffusers' joint forward for `case`."""
    p, x = case.packed, case.inputs

    def steps(name: str, count_key: str) -> torch.Tensor | None:
        return torch.full((p[count_key],), x.timestep) if count_key in p else None

    vision, sound, action = pipe.transformer(
        input_ids=p["input_ids"],
        text_indexes=p["text_indexes"],
        position_ids=p["position_ids"],
        und_len=p["und_len"],
        sequence_length=p["sequence_length"],
        vision_tokens=[x.vision],
        vision_token_shapes=p["vision_token_shapes"],
        vision_sequence_indexes=p["vision_sequence_indexes"],
        vision_mse_loss_indexes=p["vision_mse_loss_indexes"],
        vision_timesteps=steps("vision", "num_noisy_vision_tokens"),
        vision_noisy_frame_indexes=p["vision_noisy_frame_indexes"],
        sound_tokens=[x.sound] if x.sound is not None else None,
        sound_token_shapes=p.get("sound_token_shapes"),
        sound_sequence_indexes=p.get("sound_sequence_indexes"),
        sound_mse_loss_indexes=p.get("sound_mse_loss_indexes"),
        sound_timesteps=steps("sound", "sound_len"),
        sound_noisy_frame_indexes=p.get("sound_noisy_frame_indexes"),
        action_tokens=[x.action] if x.action is not None else None,
        action_token_shapes=p.get("action_token_shapes"),
        action_sequence_indexes=p.get("action_sequence_indexes"),
        action_mse_loss_indexes=p.get("action_mse_loss_indexes"),
        action_timesteps=steps("action", "num_noisy_action_tokens"),
        action_noisy_frame_indexes=p.get("action_noisy_frame_indexes"),
        action_domain_ids=[x.action_domain_id] if x.action_domain_id is not None else None,
        return_dict=False,
    )
    return vision[0], sound[0] if sound else None, action[0] if action else None
