"""What a published Cosmos3 folder holds beside the weights, and what video generation reads of it.

A published repo (`nvidia/Cosmos3-Nano`, `-Super`, ...) is a diffusers pipeline folder with more
in it than `save_pretrained` writes. Generation reads:

- `model_index.json`: the pipeline's own options (`default_use_system_prompt`,
  `use_native_flow_schedule`), as `Cosmos3OmniPipeline.from_pretrained` passes them on;
- `modular_model_index.json` (the distilled repos): `distilled_sigmas`, the fixed few-step schedule;
- `transformer/`, `vae/`, `text_tokenizer/`, `scheduler/` (see checkpoint.py);
- `sound_tokenizer/`, only for a request with sound;
- `assets/negative_prompt.json` and `assets/negative_prompt_i2v.json`: the negative prompts the
  Cosmos3 docs pass (as JSON text) for text-to-video and for image/video-to-video.

It never opens `vision_encoder/` (the reasoner's vision tower, used for understanding only), the
root-level transformers files, or any pickle (`*.pth`, `*.bin`): only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .checkpoint import model_config
from .file_kinds import present
from .files import read_json
from .scheduler import scheduler_config

SOUND_TOKENIZER = "sound_tokenizer"
NEGATIVE_PROMPT_T2V = "negative_prompt.json"
NEGATIVE_PROMPT_CONDITIONED = "negative_prompt_i2v.json"
MAX_SAMPLING_RATE = 768_000


@dataclass(frozen=True)
class PipelineOptions:
    """The pipeline-level settings of a folder; the defaults are `Cosmos3OmniPipeline`'s."""

    use_system_prompt: bool = True
    native_flow_schedule: bool = False
    distilled_sigmas: tuple[float, ...] | None = None

    @property
    def distilled(self) -> bool:
        return self.distilled_sigmas is not None


def pipeline_options(checkpoint: Path | None) -> PipelineOptions:
    """The options of `checkpoint`'s pipeline index (and modular index); the defaults without one.

    Every door reads these before anything loads (`check` too), so the scheduler config they sample
    with is checked here as well (see scheduler.py): a run never meets a scheduler it cannot build."""
    if checkpoint is None:
        return PipelineOptions()
    index_file = checkpoint / "model_index.json"
    index = read_json(index_file, "pipeline index") if present(index_file) else {}
    options = {}
    keys = (("default_use_system_prompt", "use_system_prompt"), ("use_native_flow_schedule", "native_flow_schedule"))
    for key, name in keys:
        if key in index:
            if not isinstance(index[key], bool):
                raise InputError(f"{key} in {str(index_file)!r} must be true or false, got {index[key]!r}")
            options[name] = index[key]
    modular_file = checkpoint / "modular_model_index.json"
    if present(modular_file):
        sigmas = _find_key(read_json(modular_file, "modular pipeline index"), "distilled_sigmas")
        if sigmas is not None:
            options["distilled_sigmas"] = _check_sigmas(sigmas, modular_file)
    pipeline = PipelineOptions(**options)
    scheduler_config(checkpoint, pipeline.distilled_sigmas)  # samples with these options, or refused here
    return pipeline


def _find_key(node: object, key: str) -> object | None:
    """The value of the first `key` in a JSON tree (the modular index nests its config)."""
    if isinstance(node, dict):
        if key in node:
            return node[key]
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


def _check_sigmas(value: object, file: Path) -> tuple[float, ...]:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s <= 1 for s in value
        )
    )
    ok = ok and all(a > b for a, b in zip(value, value[1:]))
    if not ok:
        raise InputError(
            f"distilled_sigmas in {str(file)!r} must be a non-empty, strictly falling list of numbers in [0, 1]"
        )
    return tuple(float(s) for s in value)


def has_sound_tokenizer(checkpoint: Path | None) -> bool:
    return checkpoint is not None and present(checkpoint / SOUND_TOKENIZER / "config.json")


def sound_config(checkpoint: Path) -> dict:
    """The sound tokenizer's config, checked to build its class and to name a usable sampling rate,
    to be built without its encoder (generation only decodes audio)."""
    config = model_config(checkpoint, SOUND_TOKENIZER)
    rate = config.get("sampling_rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or not 1 <= rate <= MAX_SAMPLING_RATE:
        file = checkpoint / SOUND_TOKENIZER / "config.json"
        raise InputError(
            f"sound tokenizer config {str(file)!r} has sampling_rate {rate!r}; it must be a whole number of Hz "
            f"from 1 to {MAX_SAMPLING_RATE} (Cosmos3's is 48000)"
        )
    return {**config, "encoder_enabled": False}


def sound_samples(config: dict, frames: int, fps: float) -> int:
    """Audio samples per channel the sound decoder writes for a video of `frames` at `fps`: the
    pipeline's count (the video's duration at the tokenizer's rate) rounded up to whole latents."""
    rate = config.get("sampling_rate", 48000)
    hop = config.get("hop_size") or math.prod(config.get("dec_strides", (2, 4, 5, 6, 8)))
    samples = int(frames / fps * rate)
    return (samples + hop - 1) // hop * hop


def default_negative_prompt(checkpoint: Path | None, *, frames: int, conditioned: bool) -> str | None:
    """The negative prompt the Cosmos3 docs pass when the user gives none, as the JSON text they pass
    (`json.dumps` of the file); None where the folder ships none (the pipeline then uses "").

    Text-to-video takes `assets/negative_prompt.json`; image- and video-to-video
    `assets/negative_prompt_i2v.json` (falling back to the text-to-video one); text-to-image none,
    as in the docs' examples.
    """
    if checkpoint is None or frames == 1:
        return None
    names = (NEGATIVE_PROMPT_CONDITIONED, NEGATIVE_PROMPT_T2V) if conditioned else (NEGATIVE_PROMPT_T2V,)
    for name in names:
        file = checkpoint / "assets" / name
        if present(file):  # a link to nothing, a FIFO, a folder: refused by read_json, not skipped
            try:  # exactly what the docs pass: json.dumps(json.load(file))
                return json.dumps(read_json(file, "negative prompt", object_only=False))
            except InputError as error:
                raise InputError(f"{error}; repair it, or pass --negative-prompt to use your own") from None
    return None
