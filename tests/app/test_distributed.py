"""A generation over two CPU processes (gloo) equals the single-process one; bad layouts are refused
before any rank joins; a rank that fails mid-run ends the group instead of hanging it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from ranks import run_ranks

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.distributed import parallel_layout, start_mesh
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import model_configs
from cosmos3_offload.planning.parallel import ParallelLayout
from cosmos3_offload.planning.plan import Plan
from cosmos3_offload.planning.tiles import TileGrid

TOLERANCE = 1e-5  # float32, relative to the latents' largest magnitude


def _config(tmp_path, guidance: float = 6.0) -> GenerationConfig:
    return GenerationConfig(
        prompt="a red fox in the snow",
        frames=9,
        resolution=256,
        steps=3,
        guidance=guidance,
        seed=5,
        output=tmp_path / "out.mp4",
    )


class _Failure(RuntimeError):
    pass


def _generate(config: GenerationConfig, cfg_parallel: str = "auto", plan: Plan | None = None, fail_at=None) -> dict:
    """What generate_video gives this process (one of a group when launched with RANK/WORLD_SIZE)."""
    loaded = LoadedModel.open(device="cpu", dtype="float32", plan=plan)
    config = loaded.check(config)
    layout = parallel_layout(config, model_configs(None)[0], cfg_parallel)
    mesh = start_mesh(layout, loaded.device)
    try:
        loaded.mesh = mesh
        timer = PhaseTimer(loaded.device)
        components = loaded.load(timer)

        def on_step(index: int) -> None:
            if fail_at is not None and mesh.rank == 1 and index == fail_at:
                raise _Failure(f"rank 1 fails at step {index}")

        video = generate_video(
            config, components, timer, progress=False, kernels=loaded.kernels, mesh=mesh, on_step=on_step
        )
        return {"latents": video.latents, "frames": video.frames, "layout": layout}
    finally:
        if mesh is not None:
            mesh.close()


@pytest.mark.parametrize(
    "cfg_parallel, guidance, layout",
    [("auto", 6.0, ParallelLayout(cfg=2)), ("off", 6.0, ParallelLayout(sequence=2)), ("auto", 1.0, None)],
    ids=["cfg-parallel", "ulysses", "ulysses-no-guidance"],
)
def test_two_processes_equal_one(tmp_path, cfg_parallel, guidance, layout):
    """CFG-parallel or Ulysses degree 2: every rank's latents equal the single process's within 1e-5, and
    rank 0's frames, decoded half by each rank, equal a single process's decode of the same tiles."""
    config = _config(tmp_path, guidance)
    expected = _generate(config, plan=Plan(decode_grid=TileGrid(rows=2)))
    outcomes = run_ranks(_generate, 2, tmp_path, config, cfg_parallel)
    scale = expected["latents"].abs().max().item()
    for rank, outcome in enumerate(outcomes):
        assert outcome["exitcode"] == 0, outcome.get("trace")
        result = outcome["result"]
        assert result["layout"] == (layout or ParallelLayout(sequence=2))
        assert (result["latents"] - expected["latents"]).abs().max().item() <= TOLERANCE * scale
        if rank == 0:
            assert np.array_equal(result["frames"], expected["frames"])
        else:
            assert result["frames"] is None


def test_a_rank_failing_mid_run_ends_the_group(tmp_path):
    """Rank 1 raising after step 1 makes rank 0's next exchange fail: both end, neither hangs."""
    outcomes = run_ranks(_generate, 2, tmp_path, _config(tmp_path), "auto", None, 1, timeout=120)
    assert "rank 1 fails at step 1" in outcomes[1]["error"]
    assert outcomes[0]["exitcode"] != 0 and "error" in outcomes[0]


def test_layouts_the_model_or_request_cannot_take_are_refused(monkeypatch, tmp_path):
    """Before any rank joins: a WORLD_SIZE no launcher set, heads that do not divide, CFG-parallel on an odd
    count or without guidance, CFG-parallel asked of one process, and launcher variables that describe no group."""
    transformer = model_configs(None)[0]  # tiny: 4 query heads, 2 key/value heads
    config = _config(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(InputError, match="no launcher started these processes"):
        parallel_layout(config, transformer)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(InputError, match="divides 2"):
        parallel_layout(config, transformer, "off")
    with pytest.raises(InputError, match="even number"):
        parallel_layout(config, transformer, "on")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="guidance > 1"):
        parallel_layout(_config(tmp_path, guidance=1.0), transformer, "on")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="do not describe a process group"):
        parallel_layout(config, transformer)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="not a whole number"):
        parallel_layout(config, transformer)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(InputError, match="two or more processes"):
        parallel_layout(config, transformer, "on")


def test_a_degree_that_does_not_divide_the_tokens_is_refused():
    """Ulysses needs equal row blocks: 3 ranks cannot split 100 tokens."""
    with pytest.raises(InputError, match="does not divide 100"):
        ParallelLayout(sequence=3).check_tokens(100)
    ParallelLayout(sequence=4).check_tokens(100)


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cosmos3_offload", "generate", "--prompt", "a red fox", "--device", "cpu"]
    return subprocess.run([*command, "--no-progress", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_generate_on_two_processes_writes_one_video_and_one_report(tmp_path):
    """`generate --gpus 2 --device cpu`: two gloo workers, rank 0 writes the file and prints the report once."""
    done = _cli(tmp_path, "--gpus", "2", "--steps", "2", "--frames", "9", "--output", "fox.mp4")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fox.mp4").stat().st_size > 0
    assert done.stdout.count("wrote fox.mp4") == 1
    assert "parallel: 2 GPUs: CFG-parallel 2" in done.stdout


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--gpus", "2", "--cfg-parallel", "on", "--guidance", "1"], "needs guidance > 1"),
        (["--gpus", "3", "--cfg-parallel", "off"], "4 query and 2 key/value heads"),
        (["--gpus", "3", "--cfg-parallel", "on"], "even number of GPUs"),
        (["--cfg-parallel", "on"], "add --gpus N"),
        (["--gpus", "0"], "--gpus must be 1 to 64"),
    ],
    ids=["cfg-without-guidance", "heads", "odd-for-cfg", "cfg-without-gpus", "zero"],
)
def test_layouts_are_refused_once_before_any_worker_starts(tmp_path, args, phrase):
    """A layout the request cannot take ends in one line and exit status 2, with nothing written."""
    done = _cli(tmp_path, *args, "--output", "fox.mp4")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and phrase in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
