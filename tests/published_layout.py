"""A tiny Cosmos3 checkpoint in the layout of the published Hub repos (nvidia/Cosmos3-Nano, ...).

Besides what `Cosmos3OmniPipeline.save_pretrained` writes (model_index.json, transformer/ in
several shards with an index, vae/, text_tokenizer/, scheduler/, sound_tokenizer/), a published
repo carries what video generation must not read: `vision_encoder/` (the reasoner's vision
tower), root-level transformers files (config, tokenizer, processor, chat template, a
`model.safetensors.index.json` pointing into transformer/ and vision_encoder/ shards), `assets/`
(example clips, negative prompts) and, in some repos, pickles. `NEVER_READ` lists the files of
the second kind; the pickles here would leave a marker file behind if anything unpickled them.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from diffusers import Cosmos3OmniPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.autoencoder_cosmos3_audio import Cosmos3AVAEAudioTokenizer
from safetensors.torch import save_file
from tiny_models import flow_unipc, tiny_transformer, tiny_vae

from cosmos3_offload.loading.random_weights import fill_random_
from cosmos3_offload.model.tiny_tokenizer import build_tiny_tokenizer
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan

# A sound tokenizer with the shipped structure at toy width: 25 latent frames a second, stereo.
TINY_SOUND_TOKENIZER = {
    "sampling_rate": 200,
    "vocoder_input_dim": 8,  # the tiny transformer's sound_dim
    "dec_dim": 4,
    "dec_c_mults": [1, 2],
    "dec_strides": [2, 4],
    "enc_dim": 4,
    "enc_c_mults": [1, 2],
    "enc_strides": [2, 4],
    "enc_latent_dim": 16,
    "enc_n_fft": 16,
    "enc_hop_length": 4,
    "enc_num_blocks": 1,
}
NEGATIVE_PROMPT = {"negative": "blurry, low quality, static", "style": ["cartoon"]}
NEGATIVE_PROMPT_I2V = {"negative": "jitter, morphing, first frame ignored"}
DISTILLED_SIGMAS = [1.0, 0.9375, 0.8333, 0.625]  # the shape of a 4-step student's schedule
# One plan of each kind a published folder is checked under: every one must give the resident result.
PLANS = {
    "resident": Plan(),
    "staged": Plan.from_offload(["reasoner", "generator", "vae"]),
    "streamed": Plan(
        reasoner=GroupPlan(mode=Mode.STREAMED, resident_layers=(1,)),
        generator=GroupPlan(mode=Mode.STREAMED),
        vae=GroupPlan(mode=Mode.STAGED),
    ),
}
SHARD_SIZE = "200KB"  # splits the tiny transformer into several shards, as 5GB splits Nano's


class _Marker:
    """Unpickling this creates `path`: proof that something read a pickle it should have left alone."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def tiny_sound_tokenizer(seed: int = 0) -> Cosmos3AVAEAudioTokenizer:
    return fill_random_(Cosmos3AVAEAudioTokenizer(**TINY_SOUND_TOKENIZER), seed).eval()


def published_pipeline(shift: float = 3.0, *, sound: bool = True, distilled: bool = False) -> Cosmos3OmniPipeline:
    """The tiny pipeline the folder holds (sound and action heads, and a sound tokenizer with `sound`);
    a distilled student ships the stochastic Euler scheduler instead of UniPC."""
    return Cosmos3OmniPipeline(
        transformer=tiny_transformer("sound_action"),
        text_tokenizer=build_tiny_tokenizer(),
        vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) if distilled else flow_unipc(shift),
        sound_tokenizer=tiny_sound_tokenizer() if sound else None,
        enable_safety_checker=False,
    )


def write_published_checkpoint(root: Path, *, sound: bool = True, shift: float = 3.0, distilled: bool = False) -> Path:
    """Write the tiny published-layout folder at `root` and return it. The pickle marker is
    `root.parent / (root.name + ".unpickled")`. `distilled`: a 4-step student's folder, with its
    `modular_model_index.json` holding the fixed sigmas."""
    pipe = published_pipeline(shift, sound=sound, distilled=distilled)
    pipe.save_pretrained(root)
    # Only the transformer is sharded (Nano's in 5 GB shards); the VAE and sound tokenizer are one file each.
    for file in (root / "transformer").glob("*.safetensors"):
        file.unlink()
    pipe.transformer.save_pretrained(root / "transformer", max_shard_size=SHARD_SIZE)
    if distilled:
        modular = {"_class_name": "Cosmos3DistilledModularPipeline", "_diffusers_version": "0.42.1",
                   "is_distilled": True, "distilled_sigmas": DISTILLED_SIGMAS}  # fmt: skip
        (root / "modular_model_index.json").write_text(json.dumps(modular, indent=2))
    _vision_encoder(root)
    _root_transformers_files(root)
    assets = root / "assets"
    assets.mkdir()
    (assets / "negative_prompt.json").write_text(json.dumps(NEGATIVE_PROMPT, indent=2))
    (assets / "negative_prompt_i2v.json").write_text(json.dumps(NEGATIVE_PROMPT_I2V, indent=2))
    (assets / "example_t2v_prompt.json").write_text(json.dumps({"scene": "a red fox in snow"}))
    (assets / "robot_pouring.mp4").write_bytes(os.urandom(256))  # an example clip: never opened by generation
    marker = pickle_marker(root)
    for pickle_file in (root / "vision_encoder" / "pytorch_model.bin", root / "transformer" / "legacy_weights.pth"):
        pickle_file.write_bytes(pickle.dumps(_Marker(marker)))
    return root


def pickle_marker(root: Path) -> Path:
    return root.parent / (root.name + ".unpickled")


def _vision_encoder(root: Path) -> None:
    folder = root / "vision_encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_vision", "hidden_size": 16, "depth": 1}))
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(48, 16)}, folder / "model.safetensors")


def _root_transformers_files(root: Path) -> None:
    """What transformers' Qwen3-VL classes read from the repo root; video generation reads none of it."""
    (root / "config.json").write_text(json.dumps({"architectures": ["Cosmos3ForConditionalGeneration"]}))
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (root / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))
    tokenizer_files = sorted((root / "text_tokenizer").glob("*.json"))
    for file in tokenizer_files:
        (root / file.name).write_bytes(file.read_bytes())
    shards = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = {f"model.{k}": f"transformer/{v}" for k, v in shards["weight_map"].items()}
    weight_map["visual.blocks.0.attn.qkv.weight"] = "vision_encoder/model.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def never_read_files(root: Path) -> list[Path]:
    """Every file of the folder video generation must leave unopened."""
    keep = {"model_index.json", "transformer", "vae", "text_tokenizer", "scheduler", "sound_tokenizer"}
    files = [f for f in root.rglob("*") if f.is_file() and f.relative_to(root).parts[0] not in keep]
    files += [f for f in root.rglob("*.pth")] + [f for f in root.rglob("*.bin")]
    negatives = {root / "assets" / "negative_prompt.json", root / "assets" / "negative_prompt_i2v.json"}
    return sorted(set(files) - negatives)


def corrupt(files: list[Path]) -> None:
    """Overwrite `files` with bytes no reader accepts, and take every permission away."""
    for file in files:
        if file.suffix not in (".pth", ".bin"):  # the pickles stay: unpickling them leaves the marker
            file.write_bytes(b"\x00not what it claims to be")
        file.chmod(0)


__all__ = [
    "DISTILLED_SIGMAS",
    "NEGATIVE_PROMPT",
    "NEGATIVE_PROMPT_I2V",
    "TINY_SOUND_TOKENIZER",
    "corrupt",
    "never_read_files",
    "pickle_marker",
    "published_pipeline",
    "tiny_sound_tokenizer",
    "write_published_checkpoint",
]
