"""The FP8 step policy: parsing NVIDIA's diffusion_step_policy, and the precision of every step."""

from __future__ import annotations

import copy

import pytest

from cosmos3_offload.errors import InputError
from cosmos3_offload.quant.linear import Precision
from cosmos3_offload.quant.policy import NATIVE, StepPolicy, Uniform, parse_step_policy, step_schedule

W8A16, W8A8 = Precision.W8A16, Precision.W8A8
OFFICIAL = {
    "schema_version": 1,
    "type": "first_last_n",
    "index_space": "denoising_loop_iteration",
    "scope": ["transformer"],
    "default_mode": "native",
    "first_steps": {"count": 3, "mode": "a16"},
    "last_steps": {"count": 3, "mode": "a16"},
    "overlap": "a16",
    "reasoner": "a16",
}


def test_the_official_policy_runs_w8a16_at_the_first_and_last_three_steps():
    """35 steps: W8A16 at 0-2 and 32-34, W8A8 between; the reasoner W8A16."""
    policy = parse_step_policy(OFFICIAL)
    modes = [policy.generator_precision(i, 35) for i in range(35)]
    assert modes == [W8A16] * 3 + [W8A8] * 29 + [W8A16] * 3 and policy.reasoner is W8A16


def test_overlapping_windows_and_one_step():
    """Four steps: steps 1 and 2 are in both windows (overlap decides); one step runs W8A8, as diffusers does."""
    policy = parse_step_policy(OFFICIAL | {"overlap": "native"})
    assert [policy.generator_precision(i, 4) for i in range(4)] == [W8A16, W8A8, W8A8, W8A16]
    assert [StepPolicy().generator_precision(i, 4) for i in range(4)] == [W8A16] * 4
    assert StepPolicy().generator_precision(0, 1) is W8A8


def test_a_native_window_counts_no_steps_and_a_native_reasoner_runs_w8a8():
    policy = parse_step_policy(OFFICIAL | {"first_steps": {"count": 5, "mode": "native"}, "reasoner": "native"})
    assert policy.first_steps == 0 and policy.reasoner is W8A8
    assert [policy.generator_precision(i, 8) for i in range(8)] == [W8A8] * 5 + [W8A16] * 3


@pytest.mark.parametrize(
    "change",
    [
        {"schema_version": 2},
        {"type": "every_other"},
        {"index_space": "sigma"},
        {"default_mode": "a16"},
        {"scope": ["transformer", "vae"]},
        {"first_steps": {"count": -1, "mode": "a16"}},
        {"first_steps": {"count": True, "mode": "a16"}},
        {"last_steps": {"count": 3, "mode": "fp4"}},
        {"last_steps": 3},
        {"overlap": "bf16"},
        {"reasoner": "fp8"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_policy_we_would_run_differently_is_refused(change):
    """Unknown versions, types, modes and malformed windows fail closed, naming the field."""
    with pytest.raises(InputError) as refused:
        parse_step_policy(OFFICIAL | change)
    assert next(iter(change)) in str(refused.value)


def test_a_policy_missing_a_field_is_refused():
    policy = copy.deepcopy(OFFICIAL)
    del policy["reasoner"]
    with pytest.raises(InputError, match="reasoner"):
        parse_step_policy(policy)


def test_modes():
    """auto: the policy with FP8 tensor cores, W8A16 without; policy: always; w8a8/w8a16 forced; no policy: W8A8."""
    policy = parse_step_policy(OFFICIAL)
    assert step_schedule("auto", policy, fp8_cores=True) is policy
    assert step_schedule("auto", policy, fp8_cores=False) == Uniform(W8A16)
    assert step_schedule("policy", policy, fp8_cores=False) is policy
    assert step_schedule("policy", None, fp8_cores=False) is NATIVE
    assert step_schedule("w8a8", policy, fp8_cores=False) == Uniform(W8A8)
    assert step_schedule("w8a16", policy, fp8_cores=True).reasoner is W8A16
    with pytest.raises(InputError, match="w8a8"):
        step_schedule("fp4", policy, fp8_cores=True)
