"""A generation over two CPU processes (gloo) equals the single-process one; bad layouts are refused
before any rank joins; a rank that fails mid-run ends the group instead of hanging it."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ranks import run_ranks, start_method

from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.distributed import parallel_layout, start_mesh
from cosmos3_offload.app.inputs import read_conditioning
from cosmos3_offload.app.runner import LoadedModel, generate_video
from cosmos3_offload.app.timer import PhaseTimer
from cosmos3_offload.app.workers import free_port, worker_environment
from cosmos3_offload.errors import InputError
from cosmos3_offload.loading.components import model_configs
from cosmos3_offload.parallel import mesh
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


def _actions(config: GenerationConfig, cfg_parallel: str) -> dict:
    """An action run's latents and predicted actions on this process (one of a group, or alone)."""
    loaded = LoadedModel.open(device="cpu", dtype="float32", actions=True)
    config = loaded.check(config)
    mesh = start_mesh(parallel_layout(config, model_configs(None)[0], cfg_parallel), loaded.device)
    try:
        loaded.mesh = mesh
        components = loaded.load(PhaseTimer(loaded.device))
        conditioning = read_conditioning(config)
        video = generate_video(config, components, PhaseTimer(loaded.device), progress=False, mesh=mesh,
                               conditioning=conditioning)  # fmt: skip
        return {"latents": video.latents, "actions": video.actions}
    finally:
        if mesh is not None:
            mesh.close()


@pytest.mark.parametrize("cfg_parallel", ["auto", "off"], ids=["cfg-parallel", "ulysses"])
def test_two_processes_run_a_policy_as_one(tmp_path, cfg_parallel):
    """The action tokens split over ranks (Ulysses) or travel with their branch (CFG-parallel): every rank's
    latents and the leader's predicted actions equal one process's."""
    image = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(image)
    config = GenerationConfig(prompt="pick up the cup", action="policy", domain="bridge_orig_lerobot", chunk_size=4,
                              steps=2, resolution=256, image=image, output=tmp_path / "out.mp4")  # fmt: skip
    expected = _actions(config, cfg_parallel)
    outcomes = run_ranks(_actions, 2, tmp_path, config, cfg_parallel)
    scale = expected["latents"].abs().max().item()
    for outcome in outcomes:
        assert outcome["exitcode"] == 0, outcome.get("trace")
        result = outcome["result"]
        assert (result["latents"] - expected["latents"]).abs().max().item() <= TOLERANCE * scale
        assert np.abs(result["actions"] - expected["actions"]).max() <= TOLERANCE * np.abs(expected["actions"]).max()


def test_a_rank_failing_mid_run_ends_the_group(tmp_path):
    """Rank 1 raising after step 1 makes rank 0's next exchange fail: both end, neither hangs."""
    outcomes = run_ranks(_generate, 2, tmp_path, _config(tmp_path), "auto", None, 1, timeout=120)
    assert "rank 1 fails at step 1" in outcomes[1]["error"]
    assert outcomes[0]["exitcode"] != 0 and "error" in outcomes[0]


def _join_alone(folder: Path) -> None:
    """Rank 1 of 2 joining a group whose rank 0 never starts: the message it ends with, in `folder`/said."""
    os.environ.update(worker_environment(1, 2, free_port()))
    try:
        start_mesh(ParallelLayout(cfg=2), torch.device("cpu"))
        (folder / "said").write_text("joined")
    except InputError as error:
        (folder / "said").write_text(str(error))


def test_a_rank_whose_peer_never_starts_gives_up_after_the_rendezvous_timeout(tmp_path, monkeypatch):
    """If this fails, a rank whose peer never starts waits for it (30 minutes, or forever) instead of saying so."""
    monkeypatch.setattr(mesh, "RENDEZVOUS_TIMEOUT", timedelta(seconds=2))
    child = multiprocessing.get_context(start_method()).Process(target=_join_alone, args=(tmp_path,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive, "still waiting after 60 s"
    said = (tmp_path / "said").read_text()
    assert said.startswith("rank 1 of 2 waited 2 s at 127.0.0.1:") and "MASTER_ADDR:MASTER_PORT" in said, said
    assert "\n" not in said


@pytest.mark.parametrize(
    "rank, signum, status, words", [(1, "SIGINT", 130, "interrupted"), (0, "SIGTERM", 143, "terminated")]
)
def test_a_rank_waiting_at_the_rendezvous_honours_sigint_and_sigterm(tmp_path, rank, signum, status, words):
    """If this fails, a rank waiting for a peer that never starts ignores Ctrl-C and SIGTERM (only SIGKILL ends it)."""
    command = [sys.executable, "-m", "cosmos3_offload", "generate", "--prompt", "a red fox", "--device", "cpu"]
    command += ["--no-progress", "--verbose", "--frames", "9", "--steps", "2", "--output", "fox.mp4"]
    environment = worker_environment(rank, 2, free_port())
    process = subprocess.Popen(command, cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put(None)], daemon=True)
    reader.start()
    try:
        said = []  # the rank says where it waits (INFO, --verbose) once it is there
        while not said or "waiting at 127.0.0.1" not in said[-1]:
            said.append(lines.get(timeout=120))
            assert said[-1] is not None, "".join(said[:-1])
        time.sleep(1)  # well inside the blocking rendezvous call
        process.send_signal(getattr(signal, signum))
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signum} left the waiting rank running for 30 s")
        reader.join(10)
        after = [line.rstrip("\n") for line in iter(lines.get_nowait, None)]
    finally:
        process.kill()
        process.wait()
    assert code == status and after == [f"cosmos3-offload: {words}; nothing was written"], after
    assert list(tmp_path.iterdir()) == []


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
    assert "parallel: 2 CPU processes: CFG-parallel 2" in done.stdout


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
