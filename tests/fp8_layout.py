"""A tiny Cosmos3 checkpoint in the layout of NVIDIA's FP8 release (Hub repos nvidia/Cosmos3-*, revision `fp8`),
and diffusers' own FP8 pipeline on it.

The folder is `published_layout.write_published_checkpoint`'s with `transformer/` replaced by a ModelOpt
static per-tensor FP8 (W8A8) export of the same tiny transformer, made by nvidia-modelopt itself:
`mtq.quantize` (ModelOpt's FP8 recipe: per-tensor E4M3 weights and static per-tensor E4M3 inputs, `max`
calibration over a real two-step CFG run of the pipeline, the release's bf16 modules disabled),
`mtq.compress` (real FP8 weights), modelopt's unified-export step `_process_quantized_modules` (the
`weight_scale` / `input_scale` sidecars) and diffusers' `save_pretrained`. No single modelopt entry point
writes the release: the unified HF export (`export_hf_checkpoint`) hides the quantizers (no ModelOpt
buffers), saves no real-quantize state and a `quantization_config` diffusers cannot parse (no
`quant_type`); `save_pretrained` under `enable_huggingface_checkpointing` writes the tensors and the
state but no `quantization_config`. NVIDIA's exporter (NVIDIA/cosmos `cookbooks/cosmos3/quantization`)
combines the same steps and stamps the config by hand, as this does.

transformer/ holds:

- `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index, sharded like the bf16 fixture. Each of the
  14 linears of every decoder layer (`QUANTIZED_LINEARS`) stores `QUANTIZED_KEYS`: `weight` (F8_E4M3,
  round-to-nearest of weight / scale, saturated at ±448), `weight_scale` (F32 scalar, max|weight| / 448),
  `input_scale` (F32 scalar, calibrated max|input| / 448) and ModelOpt's own buffers
  `weight_quantizer._amax` (max|weight|), `weight_quantizer._scale` (= weight_scale) and
  `input_quantizer._amax` (= 448 * input_scale), all F32 scalars. Every other tensor (proj_in/proj_out,
  time embedder, sound and action projections, lm_head, norms, embeddings) is the bf16 fixture's, as is.
- `config.json` with a `quantization_config` (`quantization_config()`); with `policy`, its
  `runtime.diffusion_step_policy` is diffusers' `FIRST_LAST_N_FP8_POLICY`: W8A16 for the first and
  last 3 denoising steps, native W8A8 between (the distilled releases omit it and run W8A8 throughout).
- `modelopt_state.pth`, the ModelOpt graph state (a pickle, taken after `compress`) from which diffusers
  rebuilds the quantized linears before it loads the weights, and the bf16 fixture's marker pickle
  `legacy_weights.pth`. No `hf_quant_config.json`: the release keeps that at the root.

At the root, as in the release: `hf_quant_config.json` (the `quantization_config` without `runtime`),
`model.safetensors.index.json` pointing into the new shards, and `modelopt_state.pth` (the release's
Transformers-side ModelOpt state; here the fixture's marker pickle, which nothing may unpickle).

`diffusers_fp8_pipeline` loads the folder the way the release is loaded and makes ModelOpt's native
W8A8 forward run on a CPU (see there for the math of each linear).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import warnings
from pathlib import Path

import torch
from diffusers import Cosmos3OmniPipeline
from diffusers.pipelines.cosmos.mixed_precision import FIRST_LAST_N_FP8_POLICY
from published_layout import SHARD_SIZE, published_pipeline, write_published_checkpoint

from cosmos3_offload.model.quantized import QUANTIZED_LINEARS

FP8_MAX = 448.0  # the largest float8_e4m3fn: scale = amax / FP8_MAX
# The release's two spellings of the modules kept in bf16: `ignore` (Hugging Face wildcards, read by vLLM
# and TensorRT-LLM) and `modules_to_not_convert` (diffusers' names, also ModelOpt's disable patterns).
IGNORE = ["proj_in", "proj_out", "time_embedder*", "audio_proj_in", "audio_proj_out", "action_proj_in",
          "action_proj_out", "lm_head", "model.visual*", "visual*"]  # fmt: skip
NOT_CONVERTED = ["proj_in", "proj_out", "time_embedder", "audio_proj_in", "audio_proj_out", "action_proj_in",
                 "action_proj_out", "lm_head", "visual"]  # fmt: skip
# Calibration: one seeded two-step CFG run of the tiny pipeline (with sound when the folder has it).
CALIBRATION = {"prompt": "a red fox runs through fresh snow", "negative_prompt": "blurry, static",
               "num_frames": 5, "height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 5.0}  # fmt: skip
CALIBRATION_SEED = 0
# What the shards store for each quantized linear: safetensors dtype and shape (None: the bf16 weight's).
QUANTIZED_KEYS = {
    "weight": ("F8_E4M3", None),
    "weight_scale": ("F32", []),
    "input_scale": ("F32", []),
    "weight_quantizer._amax": ("F32", []),
    "weight_quantizer._scale": ("F32", []),
    "input_quantizer._amax": ("F32", []),
}
# Warnings ModelOpt raises on the way, all expected here.
EXPECTED_WARNINGS = (
    r"transformers .* is not tested with current version of modelopt",  # importing modelopt
    r"Real quantization has been applied to the model",  # mtq.compress: "experimental"
    r"To copy construct from a tensor",  # _process_quantized_modules: torch.tensor(amax / maxbound)
    r"Accessing the 'model_fields' attribute on the instance is deprecated",  # pydantic, in mtq.quantize
    r"`torch\.jit\.script(_method)?` is deprecated",  # torch.utils.mkldnn, which importing modelopt loads
)


def write_fp8_checkpoint(root: Path, *, sound: bool = True, policy: bool = True) -> Path:
    """Write the tiny FP8-release folder at `root` and return it: the published layout whose transformer is
    the bf16 fixture's, quantized, calibrated and exported by ModelOpt. `policy=False` writes no
    diffusion-step policy (as the distilled releases), so diffusers runs W8A8 at every step."""
    write_published_checkpoint(root, sound=sound)
    pipe = published_pipeline(sound=sound)  # the same seeded weights as the folder's bf16 transformer
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    config = quantization_config()

    def calibrate(_model) -> None:
        generator = torch.Generator("cpu").manual_seed(CALIBRATION_SEED)
        pipe(**CALIBRATION, generator=generator, output_type="latent", enable_safety_check=False, enable_sound=sound)

    with _expected_warnings():
        mto, mtq = _modelopt()
        from modelopt.torch.export.unified_export_hf import _process_quantized_modules

        with torch.no_grad():
            mtq.quantize(transformer, _quant_recipe(mtq.FP8_DEFAULT_CFG), forward_loop=calibrate)
        _check_calibrated(transformer)
        mtq.compress(transformer)  # RealQuantLinear: FP8 weights and weight_quantizer._scale
        # The graph state diffusers restores, taken (as NVIDIA's exporter does) before the export step.
        state = copy.deepcopy(mto.modelopt_state(transformer))
        _process_quantized_modules(transformer, transformer.dtype)  # registers weight_scale and input_scale

    folder = root / "transformer"
    for file in folder.glob("diffusion_pytorch_model*"):
        file.unlink()
    transformer.save_pretrained(folder, max_shard_size=SHARD_SIZE)  # weights, sidecars and ModelOpt buffers
    torch.save(state, folder / "modelopt_state.pth")
    stored = json.loads((folder / "config.json").read_text())
    stored["quantization_config"] = copy.deepcopy(config)
    if policy:
        stored["quantization_config"]["runtime"] = {"diffusion_step_policy": copy.deepcopy(FIRST_LAST_N_FP8_POLICY)}
    (folder / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")

    (root / "hf_quant_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _point_root_index_at_shards(root)
    shutil.copyfile(root / "vision_encoder" / "pytorch_model.bin", root / "modelopt_state.pth")  # a marker pickle
    return root


def quantization_config() -> dict:
    """`transformer/config.json`'s `quantization_config`, `runtime` aside: the Hugging Face fields of modelopt's
    unified export plus those of diffusers' `NVIDIAModelOptConfig`, which loads it (and needs `quant_type`)."""
    _, mtq = _modelopt()
    modelopt_config = _quant_recipe(mtq.FP8_DEFAULT_CFG)
    for entry in modelopt_config["quant_cfg"]:
        entry.setdefault("cfg", None)
        entry.setdefault("enable", True)
        if entry["quantizer_name"] == "*weight_quantizer":
            entry["cfg"]["fake_quant"] = False  # real FP8 weights, as after mtq.compress
    config = {
        "quant_method": "modelopt",
        "quant_algo": "FP8",
        "quant_type": "FP8_FP8",
        "producer": {"name": "modelopt", "version": _modelopt_version()},
        "config_groups": {
            "group_0": {
                "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                "targets": ["Linear"],
            }
        },
        "ignore": IGNORE,
        "modules_to_not_convert": NOT_CONVERTED,
        "weight_only": False,
        "calib_cfg": {"method": "max"},
        "modelopt_config": modelopt_config,
        "channel_quantize": None,
        "block_quantize": None,
        "scale_channel_quantize": None,
        "scale_block_quantize": None,
        "disable_conv_quantization": False,
        "forward_loop": None,
    }
    return json.loads(json.dumps(config))  # as read back from JSON: tuples become lists


def diffusers_fp8_pipeline(root: Path) -> Cosmos3OmniPipeline:
    """`Cosmos3OmniPipeline.from_pretrained(root)` as the FP8 release is loaded, in float32 like the bf16
    fixture's tests (no torch_dtype). ModelOpt's Hugging Face checkpointing is switched on (process-wide
    and for good), so diffusers restores `transformer/modelopt_state.pth` before it loads the FP8 weights.

    Each call of the pipeline then resolves the checkpoint's policy and runs each of the 28 FP8 linears
    (x: float32 activations, w8: the stored E4M3 weight, s_w = weight_quantizer._scale = weight_scale):

    - W8A16 (diffusers' `_w8a16_linear`): `F.linear(x, w8.to(float32) * s_w, bias)`; `input_scale` unused.
    - W8A8, ModelOpt's native forward (`RealQuantLinear` -> `fp8_per_tensor_gemm`): with
      s_x = input_quantizer._amax / 448 and s_w' = weight_quantizer._amax / 448 (= s_w), x8 =
      `(x / s_x).clamp(-448, 448).to(float8_e4m3fn)` (in float32, round to nearest, saturating), then
      `torch._scaled_mm(x8, w8.T, s_x, s_w', out_dtype=float32, use_fast_accum=True)` (bias added after),
      which on the CPU is `F.linear(x8.float() * s_x, w8.float() * s_w')` up to float32 summation order.

    Under the release's policy (`reasoner: a16`) the 12 reasoner linears (`add_*_proj`, `to_add_out`,
    `mlp.*`) run W8A16 at every step and the 16 generation linears (`to_q/k/v/out`, `mlp_moe_gen.*`) follow
    the step schedule; without a policy all 28 run W8A8 at every step. The bf16 modules are ModelOpt
    `RealQuantLinear`s with disabled quantizers: a plain `F.linear`.

    On a CUDA machine with FP8 (sm89+) that is all ModelOpt's own code. A CPU has neither its FP8 GEMM
    (found only when CUDA is) nor NVTX (a CPU-only torch raises on `torch.cuda.nvtx.range`, which
    `RealQuantLinear.forward` opens around the GEMM), and ModelOpt's fallback, the fake-quant
    `QuantLinear` forward, fails on diffusers' load: it dequantizes only a `QTensorWrapper` weight,
    diffusers stores a plain float8 parameter ("self._dequantize is True and self.fake_quant is False").
    So on a CPU each FP8 linear is given ModelOpt's FP8 GEMM (`Fp8PerTensorLinear.apply`, run eagerly:
    its torch.compile takes ~30 s) where ModelOpt caches its match, and a torch without NVTX gets a no-op
    `torch.cuda.nvtx.range` (process-wide)."""
    mto, _ = _modelopt()
    mto.enable_huggingface_checkpointing()
    pipe = Cosmos3OmniPipeline.from_pretrained(root, enable_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if not torch.cuda.is_available():
        _native_w8a8_on_cpu(pipe.transformer)
    return pipe


def _native_w8a8_on_cpu(transformer: torch.nn.Module) -> None:
    from modelopt.torch.quantization.backends.fp8_per_tensor_gemm import Fp8PerTensorLinear
    from modelopt.torch.quantization.nn.modules.quant_linear import RealQuantLinear

    def eager_fp8_gemm(module, inputs, weight, bias=None, *args):
        with torch.compiler.set_stance("force_eager"):
            return Fp8PerTensorLinear.apply(module, inputs, weight, bias, *args)

    for module in transformer.modules():
        if isinstance(module, RealQuantLinear) and module.weight.dtype == torch.float8_e4m3fn:
            module._real_quant_gemm_impl = eager_fp8_gemm  # where RealQuantLinear caches its registry match
    try:
        with torch.cuda.nvtx.range("probe"):
            pass
    except RuntimeError:  # a torch built without CUDA
        torch.cuda.nvtx.range = contextlib.nullcontext


def _quant_recipe(default: dict) -> dict:
    """ModelOpt's FP8 recipe with the release's bf16 modules disabled: only decoder-layer linears quantize."""
    recipe = copy.deepcopy(default)
    recipe["algorithm"] = "max"
    recipe["quant_cfg"] += [{"quantizer_name": f"*{name}*", "enable": False} for name in NOT_CONVERTED]
    return recipe


def _check_calibrated(transformer: torch.nn.Module) -> None:
    """Exactly the 14 linears of every decoder layer are quantized, and calibration reached each of them."""
    quantized = {
        name
        for name, module in transformer.named_modules()
        if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.is_enabled
    }
    layers = range(transformer.config.num_hidden_layers)
    expected = {f"layers.{i}.{kind}" for i in layers for kind in QUANTIZED_LINEARS}
    if quantized != expected:
        raise AssertionError(f"ModelOpt quantized {sorted(quantized ^ expected)} unexpectedly")
    uncalibrated = sorted(name for name in quantized if transformer.get_submodule(name).input_quantizer.amax is None)
    if uncalibrated:
        raise AssertionError(f"calibration never reached {uncalibrated}")


def _point_root_index_at_shards(root: Path) -> None:
    """The root `model.safetensors.index.json` maps `model.*` into transformer/: point it at the FP8 shards."""
    index_path = root / "model.safetensors.index.json"
    old_map = json.loads(index_path.read_text())["weight_map"]
    weight_map = {k: v for k, v in old_map.items() if not k.startswith("model.")}  # the vision encoder's
    shards = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map |= {f"model.{k}": f"transformer/{v}" for k, v in shards["weight_map"].items()}
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@contextlib.contextmanager
def _expected_warnings():
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def _modelopt():
    """`modelopt.torch.opt` and `modelopt.torch.quantization`, imported on first use (it takes seconds)."""
    with _expected_warnings():
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
    return mto, mtq


def _modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


__all__ = [
    "CALIBRATION",
    "EXPECTED_WARNINGS",
    "FP8_MAX",
    "IGNORE",
    "NOT_CONVERTED",
    "QUANTIZED_KEYS",
    "diffusers_fp8_pipeline",
    "quantization_config",
    "write_fp8_checkpoint",
]
