"""Checkpoint folders are validated up front, and a saved diffusers pipeline loads unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_pipeline

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import run
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.files import check_checkpoint


def write_index(folder, class_name="Cosmos3OmniPipeline"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "is not a folder"),
        (lambda d: d.mkdir(), "no model_index.json"),
        (lambda d: write_index(d, "WanPipeline"), "not a Cosmos3OmniPipeline"),
        (lambda d: (d.mkdir(), (d / "model_index.json").write_text("{oops")), "cannot be read as JSON"),
        (lambda d: write_index(d), "lacks the folder"),
    ],
    ids=["missing", "no-index", "other-pipeline", "bad-json", "no-parts"],
)
def test_non_cosmos3_folders_are_refused(tmp_path, setup, message):
    """Each kind of wrong folder gets its own message."""
    folder = tmp_path / "ckpt"
    setup(folder)
    with pytest.raises(InputError, match=message):
        check_checkpoint(folder)


def test_tiny_components_are_seeded_and_keep_time_embedder_in_fp32():
    """Two loads give identical weights; bf16 leaves the time embedder in float32 as from_pretrained does."""
    a = load_components(None, torch.device("cpu"), torch.bfloat16)
    b = load_components(None, torch.device("cpu"), torch.bfloat16)
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters(), strict=True):
        assert p.is_meta or torch.equal(p, q), name
    assert a.transformer.proj_in.weight.dtype == torch.bfloat16
    assert a.transformer.time_embedder.linear_1.weight.dtype == torch.float32
    assert a.random_weights and a.vae.dtype == torch.bfloat16


def test_weights_the_split_never_reads_are_never_materialized():
    """lm_head, the final norm, the last layer's reasoner output path and (without actions) the action heads
    stay on meta; the rest is real."""
    transformer = load_components(None, torch.device("cpu"), torch.float32).transformer
    last = transformer.config.num_hidden_layers - 1
    meta = {name for name, p in transformer.named_parameters() if p.is_meta}
    assert "lm_head.weight" in meta and "norm.weight" in meta
    assert f"layers.{last}.mlp.up_proj.weight" in meta and f"layers.{last}.self_attn.to_out.weight" in meta
    assert f"layers.{last}.self_attn.to_k.weight" not in meta and "layers.0.mlp.up_proj.weight" not in meta
    assert all(name.startswith(("lm_head", "norm.", f"layers.{last}.", "action_")) for name in meta)
    assert "action_proj_in.fc.weight" in meta


def test_saved_pipeline_loads_as_a_checkpoint(tmp_path):
    """A tiny pipeline saved by diffusers loads through --checkpoint and gives the embedded model's image."""
    tiny_pipeline().save_pretrained(tmp_path / "ckpt")  # built the ordinary way, on the CPU
    outputs = []
    for checkpoint in (None, tmp_path / "ckpt"):
        out = tmp_path / f"{'tiny' if checkpoint is None else 'ckpt'}.png"
        config = GenerationConfig(prompt="a fox", frames=1, resolution=256, steps=3, output=out)
        report = run(config, checkpoint=checkpoint, device="cpu", progress=False)
        assert report.components.random_weights == (checkpoint is None)
        outputs.append(np.asarray(Image.open(out)))
    assert outputs[0].shape == (192, 320, 3)
    assert np.array_equal(outputs[0], outputs[1])
