"""`--quantize fp8`: bf16 weights rounded to FP8 as they load, run in every plan, switched per step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import load_components
from cosmos3_offload.loading.quantization import Fp8Options
from cosmos3_offload.loading.random_weights import random_value
from cosmos3_offload.model.quantized import is_quantized_linear
from cosmos3_offload.planning.plan import GroupPlan, Mode, Plan
from cosmos3_offload.quant.fp8 import FP8, quantize, weight_scales
from cosmos3_offload.quant.linear import Fp8Linear, Precision

CPU = torch.device("cpu")
STEPS = 8
W8A16, W8A8 = Precision.W8A16, Precision.W8A8
PLANS = {
    "staged": Plan.from_offload(frozenset({"reasoner", "generator", "vae"})),
    "streamed": Plan(
        reasoner=GroupPlan(mode=Mode.STREAMED, ring=2, prefetch=1),
        generator=GroupPlan(mode=Mode.STREAMED, resident_layers=(0,), ring=2, prefetch=1),
    ),
    "streamed-and-staged": Plan(reasoner=GroupPlan(mode=Mode.STAGED), generator=GroupPlan(mode=Mode.STREAMED)),
}


def generate(tmp_path, *, plan: Plan | None = None, **fp8):
    options = Fp8Options(quantize="fp8", **fp8) if fp8 else Fp8Options()
    components = load_components(None, CPU, torch.bfloat16, plan, fp8=options)
    config = GenerationConfig(prompt="a fox", frames=5, resolution=256, steps=STEPS, output=tmp_path / "o.mp4")
    return generate_video(config, components, PhaseTimer(CPU), progress=False).latents, components


@pytest.fixture(scope="module")
def resident_run(tmp_path_factory):
    """The all-resident FP8 run under the default step policy (both precisions used): (latents, components);
    no test runs its components again, so their switches keep this run's trace."""
    return generate(tmp_path_factory.mktemp("resident"), mode="policy")


@pytest.fixture(scope="module")
def resident(resident_run):
    return resident_run[0]


@pytest.fixture(scope="module")
def w8a16_run(tmp_path_factory):
    """The all-resident FP8 run with W8A16 at every step: (latents, components)."""
    return generate(tmp_path_factory.mktemp("w8a16"), mode="w8a16")


@pytest.mark.parametrize("scales", ["channel", "tensor"])
def test_weights_are_the_bf16_values_rounded_to_fp8(scales):
    """Each decoder-layer linear holds exactly quantize(value, amax/448) and its scale (those the split
    reads: the last layer's reasoner output path stays on meta); every other linear stays bf16."""
    fp8 = Fp8Options(quantize="fp8", scales=scales)
    transformer = load_components(None, CPU, torch.bfloat16, fp8=fp8).transformer
    quantized = 0
    for path, module in transformer.named_modules():
        if isinstance(module, Fp8Linear) and not module.weight.is_meta:
            value = random_value(f"{path}.weight", module.weight.shape, 0)
            scale = weight_scales(value, per_channel=scales == "channel")
            assert module.weight.dtype == FP8 and torch.equal(
                module.weight.view(torch.uint8), quantize(value, scale).view(torch.uint8)
            )
            assert torch.equal(module.weight_scale, scale) and module.input_scale is None
            quantized += 1
        elif isinstance(module, nn.Linear) and not module.weight.is_meta:
            assert not is_quantized_linear(path) and module.weight.dtype != FP8, path  # time embedder: fp32
    assert quantized == 14 * transformer.config.num_hidden_layers - 4  # to_out, gate/up/down of the last layer


@pytest.mark.parametrize("name", PLANS)
def test_every_plan_is_bit_identical_to_the_resident_fp8_run(tmp_path, resident, name):
    """FP8 weights and scales staged or streamed through the arena give the resident FP8 latents bit for bit."""
    latents, components = generate(tmp_path, plan=PLANS[name], mode="policy")
    assert components.engine.placements["generator"].where != "device"
    assert torch.equal(latents, resident)


def test_the_step_policy_switches_precision_at_the_steps_it_names(resident_run, w8a16_run):
    """W8A16 for the first and last three steps, W8A8 between; the W8A8 steps really change the result."""
    resident, components = resident_run
    assert components.switches.trace == [W8A16] * 3 + [W8A8] * 2 + [W8A16] * 3
    assert components.switches.reasoner.precision is W8A16
    assert components.switches.describe() == "reasoner W8A16; generator W8A16 x6, W8A8 x2"
    everywhere_a16, forced = w8a16_run
    assert forced.switches.trace == [W8A16] * STEPS and not torch.equal(everywhere_a16, resident)


def test_fp8_latents_stay_close_to_bf16(tmp_path, resident, w8a16_run):
    """FP8 moves the tiny model's latents by little: cosine against the bf16 run above 0.99, both ways."""
    bf16, components = generate(tmp_path)
    assert not components.quantization.quantized and not components.switches.trace
    w8a16 = w8a16_run[0]
    for latents in (resident, w8a16):
        assert F.cosine_similarity(latents.flatten().float(), bf16.flatten().float(), dim=0) > 0.99


def test_quantize_cannot_map_the_reasoner_from_files():
    """A mapped reasoner reads its weights from the files as stored; --quantize has no FP8 copy there."""
    mapped = Plan(reasoner=GroupPlan(mode=Mode.MAPPED))
    with pytest.raises(InputError, match="--quantize"):
        LoadedModel.open(device="cpu", plan=mapped, fp8=Fp8Options(quantize="fp8"))


@pytest.mark.parametrize(
    "options, message",
    [({"quantize": "int4"}, "--quantize"), ({"mode": "fast"}, "--fp8-mode"), ({"scales": "block"}, "--fp8-scales")],
)
def test_unknown_fp8_options_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        Fp8Options(**options)


def test_fp8_flags_without_fp8_weights_are_refused():
    """--fp8-mode on a bf16 model without --quantize would do nothing: refused rather than ignored."""
    with pytest.raises(InputError, match="--quantize fp8"):
        load_components(None, CPU, torch.float32, fp8=Fp8Options(mode="w8a8"))
