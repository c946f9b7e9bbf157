"""Requests the machine cannot hold are refused before loading; non-finite latents are never decoded."""

from __future__ import annotations

import pytest
import torch

from cosmos3_offload.app import feasibility, generation_path, runner
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.errors import InputError
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.units import GIB

CHEAP = ["--frames", "5", "--steps", "1", "--resolution", "256", "--no-progress"]


def config(tmp_path, **overrides):
    return GenerationConfig(**{"prompt": "a fox", "output": tmp_path / "o.mp4", **overrides})


@pytest.mark.parametrize(
    "plan, free_gib, fits",
    [
        (Plan(), 80, True),
        (Plan(), 24, False),  # all resident, 720p x 189f: about 39 GiB
        (Plan.from_offload(["reasoner", "generator", "vae"]), 24, True),
        (Plan.from_offload(["reasoner", "generator", "vae"]), 8, False),
    ],
)
def test_a_gpu_request_must_fit_the_free_device_memory(monkeypatch, tmp_path, plan, free_gib, fits):
    """Without a budget, Nano at 720p x 189f is refused when its plan's predicted peak exceeds the free memory."""
    monkeypatch.setattr(feasibility, "device_free_bytes", lambda device: free_gib * GIB)
    monkeypatch.setattr(feasibility, "host_available_bytes", lambda: 1024 * GIB)
    request = config(tmp_path, frames=189, resolution=720)
    check = lambda: feasibility.check_fits(  # noqa: E731
        request, plan, checkpoint=None, model="nano", device=torch.device("cuda"), dtype=torch.bfloat16
    )
    if fits:
        check()
    else:
        with pytest.raises(InputError, match=r"needs about \d+\.\d GiB on cuda.*--vram-budget"):
            check()


def test_offloaded_weights_must_fit_the_host(monkeypatch, tmp_path):
    """Staged weights live in host memory: a host with less available than the slabs refuses the request."""
    monkeypatch.setattr(feasibility, "device_free_bytes", lambda device: 80 * GIB)
    plan = Plan.from_offload(["reasoner", "generator", "vae"])
    request = config(tmp_path, frames=93, resolution=480)
    args = dict(checkpoint=None, model="nano", device=torch.device("cuda"), dtype=torch.bfloat16)
    monkeypatch.setattr(feasibility, "host_available_bytes", lambda: 64 * GIB)
    feasibility.check_fits(request, plan, **args)
    monkeypatch.setattr(feasibility, "host_available_bytes", lambda: 16 * GIB)  # Nano's towers are about 26 GiB
    with pytest.raises(InputError, match="of host memory"):
        feasibility.check_fits(request, plan, **args)


def test_the_cli_refuses_what_does_not_fit_before_loading(monkeypatch, capsys, tmp_path):
    """On the CPU the host is the device: too little memory ends in one line, exit 2, nothing loaded or written."""
    monkeypatch.setattr(feasibility, "host_available_bytes", lambda: 1024)
    loaded = []
    monkeypatch.setattr(runner, "load_components", lambda *a, **k: loaded.append(1))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--output", str(tmp_path / "o.mp4"), *CHEAP])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "host memory" in err
    assert not loaded and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_latents_are_not_decoded(monkeypatch, capsys, tmp_path, bad):
    """Latents with a NaN or an infinity stop the run before the decode: one line, exit 2, no video."""
    real = generation_path.denoise_latents

    def poisoned(*args, **kwargs):
        latents = real(*args, **kwargs)
        latents.vision[0, 0, 0, 0, 0] = bad
        return latents

    decoded = []
    monkeypatch.setattr(generation_path, "denoise_latents", poisoned)
    monkeypatch.setattr(generation_path, "decode_frames", lambda *a, **k: decoded.append(1))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", "--output", str(tmp_path / "o.mp4"), *CHEAP])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "not finite" in err and len(err.strip().splitlines()) == 1
    assert not decoded and list(tmp_path.iterdir()) == []
