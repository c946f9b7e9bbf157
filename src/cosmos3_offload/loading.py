"""Load the model components: a diffusers-layout Cosmos3 checkpoint, or the embedded tiny model.

A checkpoint is the folder `Cosmos3OmniPipeline.save_pretrained` writes (model_index.json,
transformer/, vae/, text_tokenizer/, scheduler/). Without one, the tiny model from
`model_specs` is built with seeded random weights and the byte-level tokenizer: it runs
anywhere in seconds and produces noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, Cosmos3OmniTransformer
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InputError
from .model_specs import model_spec
from .random_weights import fill_random_
from .tiny_tokenizer import build_tiny_tokenizer

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "Cosmos3OmniPipeline"
REQUIRED_PARTS = ("transformer", "vae", "text_tokenizer")
TINY_WEIGHT_SEED = 0


@dataclass
class Components:
    """The loaded parts of one model; `random_weights` is true for the embedded tiny model."""

    transformer: Cosmos3OmniTransformer
    vae: AutoencoderKLWan
    tokenizer: PreTrainedTokenizerBase
    scheduler_config: dict[str, Any]
    source: str
    random_weights: bool


def check_checkpoint(path: Path) -> None:
    """Raise a ValueError saying what is missing unless `path` is a Cosmos3 diffusers folder."""
    index = path / "model_index.json"
    if not path.is_dir():
        raise InputError(f"checkpoint {str(path)!r} is not a folder; pass a diffusers-layout Cosmos3 folder")
    if not index.is_file():
        raise InputError(f"checkpoint {str(path)!r} has no model_index.json; it is not a diffusers pipeline folder")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise InputError(f"checkpoint {str(path)!r} has an unreadable model_index.json") from None
    if class_name != PIPELINE_CLASS:
        raise InputError(f"checkpoint {str(path)!r} holds a {class_name!r}, not a {PIPELINE_CLASS}")
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise InputError(f"checkpoint {str(path)!r} lacks the folder(s) {', '.join(missing)}")


def load_components(checkpoint: Path | None, device: torch.device, dtype: torch.dtype) -> Components:
    """Load every component onto `device` in `dtype` (the time embedder stays float32)."""
    if checkpoint is None:
        components = _tiny_components(dtype)
    else:
        check_checkpoint(checkpoint)
        components = _checkpoint_components(checkpoint, dtype)
    components.transformer.to(device).eval()
    components.vae.to(device).eval()
    return components


def _tiny_components(dtype: torch.dtype) -> Components:
    spec = model_spec("tiny")
    transformer = fill_random_(Cosmos3OmniTransformer(**spec.transformer), TINY_WEIGHT_SEED)
    vae = fill_random_(AutoencoderKLWan(**spec.vae), TINY_WEIGHT_SEED)
    return Components(
        transformer=_cast_like_pretrained(transformer, dtype),
        vae=nn.Module.to(vae, dtype),
        tokenizer=build_tiny_tokenizer(),
        scheduler_config={},
        source="embedded tiny model (random weights)",
        random_weights=True,
    )


def _cast_like_pretrained(transformer: Cosmos3OmniTransformer, dtype: torch.dtype) -> Cosmos3OmniTransformer:
    """Cast as `from_pretrained(torch_dtype=...)` does: modules listed in `_keep_in_fp32_modules` stay float32.

    `nn.Module.to` is called directly because `ModelMixin.to` warns about exactly the modules
    this function keeps in float32.
    """
    nn.Module.to(transformer, dtype)
    for name in transformer._keep_in_fp32_modules:
        getattr(transformer, name).to(torch.float32)
    return transformer


def _checkpoint_components(path: Path, dtype: torch.dtype) -> Components:
    logger.info("loading checkpoint %s", path)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    return Components(
        transformer=Cosmos3OmniTransformer.from_pretrained(path, subfolder="transformer", torch_dtype=dtype),
        vae=AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="text_tokenizer"),
        scheduler_config=json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {},
        source=str(path),
        random_weights=False,
    )
