"""Self-test of the FP8-release fixture: its files are the release's layout, made by ModelOpt, and diffusers'
own FP8 pipeline runs on them with the release's mixed W8A16/W8A8 schedule."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.mixed_precision import (
    FIRST_LAST_N_FP8_POLICY,
    Cosmos3MixedPrecisionConfig,
    apply_cosmos3_mixed_precision_step,
    reset_cosmos3_mixed_precision,
)
from fp8_layout import FP8_MAX, QUANTIZED_KEYS, diffusers_fp8_pipeline, quantization_config, write_fp8_checkpoint
from safetensors import safe_open
from tiny_models import diffusers_latents, relative_error

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.model.quantized import QUANTIZED_LINEARS

FP8 = torch.float8_e4m3fn
STEPS = 8
MIXED_TRACE = ["W8A16"] * 3 + ["W8A8"] * 2 + ["W8A16"] * 3  # the release policy: first and last 3 steps A16
# diffusers' mixed-precision code reads `transformer.quantization_config` through a deprecated config alias.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing config attribute `quantization_config`:FutureWarning")


@pytest.fixture(scope="module")
def hub(published_checkpoint, fp8_checkpoint):
    """The session's bf16 published folder and the FP8 release written from it (conftest.py); read-only."""
    return {"bf16": published_checkpoint, "fp8": fp8_checkpoint}


@pytest.fixture(scope="module")
def fp8_pipe(hub):
    return diffusers_fp8_pipeline(hub["fp8"])


def request(tmp_path) -> GenerationConfig:
    return GenerationConfig(prompt="a red fox runs through fresh snow", frames=5, resolution=256, steps=STEPS,
                            guidance=5.0, seed=11, output=tmp_path / "o.mp4")  # fmt: skip


def stored(folder) -> dict[str, tuple[str, list[int], torch.Tensor]]:
    """Every tensor of the transformer's shards: safetensors dtype, shape and value."""
    tensors = {}
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(str(shard), "pt") as file:
            for key in file.keys():
                meta = file.get_slice(key)
                tensors[key] = (meta.get_dtype(), meta.get_shape(), file.get_tensor(key))
    return tensors


def quantized_modules(layers: int = 2) -> set[str]:
    return {f"layers.{i}.{kind}" for i in range(layers) for kind in QUANTIZED_LINEARS}


def test_fp8_tensors_are_exactly_the_decoder_linears_with_modelopt_scales(hub):
    """F8_E4M3 weights exactly for the 14 linear kinds of each layer, each with its scalar float32 scales and
    ModelOpt buffers: weight_scale = weight_quantizer._scale = max|w| / 448, input_scale =
    input_quantizer._amax / 448, the weight `w / weight_scale` rounded to E4M3. Every other tensor is the
    bf16 fixture's, unchanged."""
    fp8, bf16 = stored(hub["fp8"]), stored(hub["bf16"])
    modules = quantized_modules()
    assert {key for key, (dtype, _, _) in fp8.items() if dtype == "F8_E4M3"} == {f"{m}.weight" for m in modules}
    sidecars = {f"{m}.{suffix}" for m in modules for suffix in QUANTIZED_KEYS if suffix != "weight"}
    assert set(fp8) == set(bf16) | sidecars
    for module in sorted(modules):
        original = bf16[f"{module}.weight"][2]
        for suffix, (dtype, shape) in QUANTIZED_KEYS.items():
            assert fp8[f"{module}.{suffix}"][:2] == (dtype, list(original.shape) if shape is None else shape)
        value = {suffix: fp8[f"{module}.{suffix}"][2] for suffix in QUANTIZED_KEYS}
        amax = original.abs().max()
        assert torch.equal(value["weight_quantizer._amax"], amax)
        assert torch.equal(value["weight_scale"], amax / FP8_MAX)
        assert torch.equal(value["weight_quantizer._scale"], value["weight_scale"])
        assert torch.equal(value["input_scale"], value["input_quantizer._amax"] / FP8_MAX)
        assert value["input_scale"] > 0  # calibrated
        rounded = (original / value["weight_scale"]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        assert torch.equal(value["weight"].view(torch.uint8), rounded.view(torch.uint8)), module
    for key in set(bf16) - sidecars - {f"{m}.weight" for m in modules}:
        assert fp8[key][0] == bf16[key][0] and torch.equal(fp8[key][2], bf16[key][2]), key


def test_config_files_and_index_follow_the_release(hub):
    """transformer/config.json carries the ModelOpt FP8 quantization_config and the release's step policy;
    the root holds hf_quant_config.json (without runtime) and an index into the FP8 shards."""
    root = hub["fp8"]
    folder = root / "transformer"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == "FP8" and config["quant_type"] == "FP8_FP8"
    assert config["runtime"] == {"diffusion_step_policy": FIRST_LAST_N_FP8_POLICY}
    assert {k: v for k, v in config.items() if k != "runtime"} == quantization_config()
    assert json.loads((root / "hf_quant_config.json").read_text()) == quantization_config()
    assert "lm_head" in config["ignore"] and "time_embedder" in config["modules_to_not_convert"]
    files = {f.name for f in folder.iterdir()}
    shards = {f for f in files if f.startswith("diffusion_pytorch_model-")}
    assert files - shards == {
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "modelopt_state.pth",
        "legacy_weights.pth",
    }
    assert len(shards) > 1
    weight_map = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    transformer_map = {k: v for k, v in weight_map.items() if k.startswith("model.")}
    assert set(transformer_map) == {f"model.{key}" for key in stored(root)}
    assert {v.removeprefix("transformer/") for v in transformer_map.values()} == shards
    resolved = Cosmos3MixedPrecisionConfig.resolve(quantization_config=config)
    assert (resolved.format, resolved.first_steps, resolved.last_steps) == ("fp8", 3, 3)


def test_writing_is_deterministic(tmp_path):
    """Two writes give byte-identical shards, config and ModelOpt state (here without sound or policy)."""
    first = write_fp8_checkpoint(tmp_path / "a", sound=False, policy=False)
    second = write_fp8_checkpoint(tmp_path / "b", sound=False, policy=False)
    assert not (first / "sound_tokenizer").exists()
    assert "runtime" not in json.loads((first / "transformer" / "config.json").read_text())["quantization_config"]
    names = sorted(f.name for f in (first / "transformer").iterdir() if f.name != "legacy_weights.pth")
    for name in names:
        assert (first / "transformer" / name).read_bytes() == (second / "transformer" / name).read_bytes(), name


def test_diffusers_runs_the_mixed_policy_close_to_bf16(hub, fp8_pipe, tmp_path):
    """diffusers' FP8 pipeline records W8A16 x3, W8A8 x2, W8A16 x3 for 8 steps; its latents are near the
    bf16 folder's, but not equal, and nearer than W8A8 at every step."""
    config = request(tmp_path)
    mixed = diffusers_latents(fp8_pipe, config)
    assert fp8_pipe._mixed_precision_trace == MIXED_TRACE
    native = diffusers_latents(fp8_pipe, config, mixed_precision_format="none")
    assert fp8_pipe._mixed_precision_trace == ["base"] * STEPS
    bf16_pipe = Cosmos3OmniPipeline.from_pretrained(hub["bf16"], enable_safety_checker=False)
    bf16_pipe.set_progress_bar_config(disable=True)
    reference = diffusers_latents(bf16_pipe, config)
    assert torch.isfinite(mixed).all() and mixed.shape == reference.shape
    assert 1e-5 < relative_error(mixed, reference) < 0.1
    assert relative_error(mixed, reference) < relative_error(native, reference) < 0.2


def test_a_folder_without_policy_runs_w8a8_at_every_step(tmp_path, hub, fp8_pipe):
    """Without `runtime.diffusion_step_policy` diffusers runs native W8A8 throughout: the same latents as the
    policy folder run with mixed precision off."""
    plain = diffusers_fp8_pipeline(write_fp8_checkpoint(tmp_path / "distilled", policy=False))
    config = request(tmp_path)
    latents = diffusers_latents(plain, config)
    assert plain._mixed_precision_trace == ["base"] * STEPS
    assert torch.equal(latents, diffusers_latents(fp8_pipe, config, mixed_precision_format="none"))


@pytest.mark.parametrize("path", ["layers.0.self_attn.to_q", "layers.1.mlp.up_proj"], ids=["generation", "reasoner"])
def test_each_linear_does_the_documented_math(fp8_pipe, tmp_path, path):
    """W8A8 (ModelOpt's forward): the input rounded to E4M3 with the static input scale, times the FP8 weight,
    both dequantized; W8A16 (diffusers): the input times the dequantized weight. The reasoner stays W8A16
    in the policy's W8A8 steps."""
    diffusers_latents(fp8_pipe, request(tmp_path))  # installs diffusers' per-step switch
    transformer = fp8_pipe.transformer
    layer = transformer.get_submodule(path)
    weight = layer.weight.float() * layer.weight_quantizer._scale
    x = torch.randn(16, layer.in_features, generator=torch.Generator().manual_seed(0))
    input_scale = layer.input_quantizer.amax / FP8_MAX
    rounded = (x / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * input_scale
    w8a8, w8a16 = F.linear(rounded, weight), F.linear(x, weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), w8a8, rtol=1e-5, atol=1e-6)  # the runtime is off between calls
        policy = fp8_pipe._mixed_precision_config
        try:
            for step, precision in enumerate(MIXED_TRACE):
                apply_cosmos3_mixed_precision_step(transformer, policy, step, STEPS)
                if precision == "W8A16" or path.startswith("layers.1.mlp."):
                    assert torch.equal(layer(x), w8a16), step
                else:
                    torch.testing.assert_close(layer(x), w8a8, rtol=1e-5, atol=1e-6)
        finally:
            reset_cosmos3_mixed_precision(transformer, policy)
    assert not torch.equal(w8a8, w8a16)
