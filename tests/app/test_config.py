"""GenerationConfig and the device/dtype/output checks refuse bad input with a fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cosmos3_offload.app.config import GenerationConfig, resolve_device, resolve_dtype
from cosmos3_offload.app.outputs import check_output
from cosmos3_offload.errors import InputError


def make(tmp_path, **overrides):
    return GenerationConfig(**{"prompt": "a fox", "output": tmp_path / "out.mp4", **overrides})


def test_defaults_follow_cosmos3(tmp_path):
    """189 frames at 1280x720, 35 steps, guidance 6, shift 10, 24 fps."""
    c = make(tmp_path)
    values = (c.frames, c.width, c.height, c.steps, c.guidance, c.flow_shift, c.fps)
    assert values == (189, 1280, 720, 35, 6.0, 10.0, 24)


@pytest.mark.parametrize("tier, shift", [(256, 3.0), (480, 5.0), (720, 10.0), (768, 10.0)])
def test_shift_defaults_by_tier_and_can_be_overridden(tmp_path, tier, shift):
    """The tier picks the shift unless one is given."""
    assert make(tmp_path, resolution=tier).flow_shift == shift
    assert make(tmp_path, resolution=tier, shift=7.5).flow_shift == 7.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"frames": 20}, "4k\\+1"),
        ({"resolution": 1080}, "resolution must be one of 256, 480, 704, 720, 768, got 1080"),
        ({"aspect_ratio": "21,9"}, "aspect ratio must be one of"),
        ({"steps": 0}, "steps must be a whole number from 1"),
        ({"guidance": -1.0}, "guidance must be a finite number in \\[0"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"shift": 0.0}, "shift must be a finite number in \\[0.01, 1000\\], got 0.0"),
        ({"fps": 0.0}, "fps must be a finite number"),
        ({"seed": -1}, "seed must be a whole number from 0"),
    ],
)
def test_bad_values_are_refused(tmp_path, overrides, message):
    """Each bad field raises InputError naming the problem."""
    with pytest.raises(InputError, match=message):
        make(tmp_path, **overrides)


def test_output_suffix_must_match_video_or_image(tmp_path):
    """A video needs .mp4; one frame needs .jpg/.jpeg/.png."""
    with pytest.raises(InputError, match="video"):
        make(tmp_path, output=tmp_path / "out.jpg")
    with pytest.raises(InputError, match="image"):
        make(tmp_path, frames=1, output=tmp_path / "out.mp4")
    assert make(tmp_path, frames=1, output=tmp_path / "out.png").output.suffix == ".png"


def test_output_folder_must_exist(tmp_path):
    """A missing folder is refused, and nothing is created."""
    with pytest.raises(InputError, match="does not exist"):
        check_output(tmp_path / "missing" / "out.mp4", frames=5)
    assert not (tmp_path / "missing").exists()


def test_output_folder_must_be_writable(tmp_path):
    """A folder that refuses new files is refused and left unchanged."""
    if os.geteuid() == 0:
        folder = Path("/sys")  # root ignores mode bits; sysfs still refuses new files
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    before = sorted(os.listdir(folder))
    with pytest.raises(InputError, match="not writable"):
        check_output(folder / "out.mp4", frames=5)
    assert sorted(os.listdir(folder)) == before


def test_output_that_is_a_folder_is_refused(tmp_path):
    """An existing folder named like a video is not overwritten."""
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_output(tmp_path / "clip.mp4", frames=5)


def test_device_and_dtype_resolution():
    """Default dtype is float32 on the CPU; names and aliases map to torch dtypes; bad names are refused."""
    cpu = resolve_device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", cpu) == torch.bfloat16
    for bad_device in ("tpu", "banana"):
        with pytest.raises(InputError, match="device"):
            resolve_device(bad_device)
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", cpu)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    """Asking for CUDA where there is none says to use the CPU."""
    with pytest.raises(InputError, match="--device cpu"):
        resolve_device("cuda")
