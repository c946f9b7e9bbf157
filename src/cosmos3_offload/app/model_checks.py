"""What a model's files say a request may ask of it, checked before anything loads: a distilled
checkpoint's fixed schedule, sound (a sound tokenizer and a transformer trained with sound), action
runs (action heads wide enough for the domain; no distilled checkpoint)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..loading.components import model_configs
from ..loading.layout import has_sound_tokenizer, pipeline_options, sound_config
from ..model.actions import ACTION_WIDTHS
from .config import GenerationConfig


def check_distilled(config: GenerationConfig, checkpoint: Path | None) -> None:
    """A distilled checkpoint's step count is its schedule's and its guidance is baked in (scale 1)."""
    sigmas = pipeline_options(checkpoint).distilled_sigmas
    if sigmas is not None and (config.steps != len(sigmas) or config.guidance != 1.0):
        raise InputError(
            f"checkpoint {str(checkpoint)!r} is distilled: it samples in exactly {len(sigmas)} steps with guidance "
            f"baked in; use --steps {len(sigmas)} --guidance 1, or leave both out"
        )


def check_sound(config: GenerationConfig, checkpoint: Path | None) -> None:
    """Sound needs a checkpoint with a sound tokenizer whose transformer was trained with sound."""
    if not config.sound:
        return
    if not has_sound_tokenizer(checkpoint):
        where = "the embedded model" if checkpoint is None else f"checkpoint {str(checkpoint)!r}"
        raise InputError(f"--sound needs a checkpoint with a sound_tokenizer/ folder, and {where} has none")
    sound_config(checkpoint)  # builds, with a usable sampling rate
    transformer_config, _ = model_configs(checkpoint)
    if not transformer_config.get("sound_gen", False):
        raise InputError(
            f"--sound: the transformer of {str(checkpoint)!r} was not trained with sound (sound_gen is off)"
        )


def check_action_heads(checkpoint: Path | None, model: str, domain: str | None = None) -> None:
    """Action runs need a transformer with action heads (`action_gen`), and a domain whose rows fit them."""
    config, _ = model_configs(checkpoint, model)
    where = f"the embedded model {model!r}" if checkpoint is None else f"checkpoint {str(checkpoint)!r}"
    if not config.get("action_gen", False):
        raise InputError(f"--action needs a transformer with action heads (action_gen), and {where} has none")
    width = ACTION_WIDTHS.get(domain, 0)
    if pipeline_options(checkpoint).distilled_sigmas is not None:
        raise InputError(f"{where} is distilled for video: its few-step schedule has no action modes")
    if width > config.get("action_dim", 0):
        raise InputError(
            f"--domain {domain} takes {width} numbers per action, more than the {config.get('action_dim')} the "
            f"action heads of {where} take; choose another domain"
        )


def has_action_heads(checkpoint: Path | None, model: str) -> bool:
    """Whether action runs can run on this model (heads, not distilled): a server loads them and plans for them."""
    try:
        check_action_heads(checkpoint, model)
    except InputError:
        return False
    return True
