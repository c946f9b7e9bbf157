"""`generate --gpus N` starts its workers, torchrun-style, and ends every one of them, in bounded time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cosmos3_offload.app import workers
from cosmos3_offload.app.workers import gpu_count_problem, last_line, launch_workers, strip_gpus_flag
from cosmos3_offload.errors import InputError

SRC = Path(__file__).resolve().parents[2] / "src"


# Defined in every fake worker: `rank` (from RANK), `folder` (the test's tmp_path), and `slow_leader`,
# rank 0 of the failure tests, which says on SIGTERM that it got one (as the real CLI does) and would
# otherwise leave `finished` after a minute.
PRELUDE = """
import os, signal, sys, time
from pathlib import Path
rank = int(os.environ["RANK"])
folder = Path({folder!r})

def slow_leader():
    def on_term(signum, frame):
        (folder / "terminated").write_text("")
        print("cosmos3-offload: terminated; nothing was written", file=sys.stderr, flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    (folder / "ready-0").write_text("")
    time.sleep(60)
    (folder / "finished").write_text("")
"""


def worker(body: str, tmp_path: Path) -> list[str]:
    """A fake worker: python running `body` after PRELUDE."""
    return [sys.executable, "-c", PRELUDE.format(folder=str(tmp_path)) + textwrap.dedent(body)]


def test_all_workers_succeed_and_rank_0_stdout_is_ours(tmp_path, capfd):
    """Every worker exits 0: status 0, rank 0's report on our stdout, the other ranks' output kept out."""
    body = """
        print(f"report of rank {rank}")
        print(f"progress of rank {rank}", file=sys.stderr)
    """
    assert launch_workers([], 3, command=worker(body, tmp_path)) == 0
    out, err = capfd.readouterr()
    assert out == "report of rank 0\n"
    assert err == "progress of rank 0\n"


def test_workers_get_torchrun_environment(tmp_path):
    """Each worker sees distinct RANK/LOCAL_RANK, the same WORLD_SIZE, MASTER_ADDR/PORT, and the launcher flag."""
    body = """
        names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "COSMOS3_OFFLOAD_LAUNCHER"]
        (folder / f"{rank}.json").write_text(__import__("json").dumps({n: os.environ.get(n) for n in names}))
    """
    assert launch_workers([], 3, command=worker(body, tmp_path)) == 0
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"] == [s["LOCAL_RANK"] for s in seen]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"} == {s["LOCAL_WORLD_SIZE"] for s in seen}
    assert {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert len({s["MASTER_PORT"] for s in seen}) == 1 and 0 < int(seen[0]["MASTER_PORT"]) < 65536
    assert {s["COSMOS3_OFFLOAD_LAUNCHER"] for s in seen} == {"1"}


def test_a_failing_worker_stops_the_others_and_its_line_is_said_once(tmp_path, capfd):
    """Rank 1 fails while rank 0 has a minute to go: status 2 within seconds, rank 1's own line and nothing
    else on stderr (not rank 0's 'terminated'), and rank 0 was terminated before it could finish."""
    body = """
        if rank == 0:
            slow_leader()
        while not (folder / "ready-0").exists():
            time.sleep(0.01)
        print("loading the weights", file=sys.stderr)
        print("cosmos3-offload: error: --frames 18 is not 4k+1", file=sys.stderr)
        sys.exit(2)
    """
    started = time.monotonic()
    status = launch_workers([], 2, command=worker(body, tmp_path))
    assert status == 2 and time.monotonic() - started < 15
    out, err = capfd.readouterr()
    assert err == "cosmos3-offload: error: --frames 18 is not 4k+1\n" and out == ""
    assert (tmp_path / "terminated").exists() and not (tmp_path / "finished").exists()


def test_rank_0_failure_is_said_once_after_its_progress(tmp_path, capfd):
    """Rank 0's own error line is printed once (by the launcher), after the progress it copied live."""
    body = """
        if rank == 0:
            print("step 1 of 2", file=sys.stderr, flush=True)
            print("cosmos3-offload: error: out of memory on cuda:0", file=sys.stderr)
            sys.exit(2)
        time.sleep(60)
    """
    assert launch_workers([], 2, command=worker(body, tmp_path)) == 2
    assert capfd.readouterr().err == "step 1 of 2\ncosmos3-offload: error: out of memory on cuda:0\n"


def test_a_worker_killed_by_a_signal_is_named(tmp_path, capfd):
    """A worker that dies by SIGKILL (the OOM killer, say) ends the run with the 'died' line."""
    body = """
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    """
    assert launch_workers([], 2, command=worker(body, tmp_path)) == 2
    err = capfd.readouterr().err
    assert err == "cosmos3-offload: error: worker 1 of 2 died (signal SIGKILL); nothing was written\n"


def test_a_traceback_gives_its_last_line(tmp_path, capfd):
    """A worker that crashes with a traceback: the 'died' line quotes the exception."""
    body = """
        if rank == 1:
            raise RuntimeError("boom")
        time.sleep(60)
    """
    assert launch_workers([], 2, command=worker(body, tmp_path)) == 2
    err = capfd.readouterr().err
    assert (
        err == "cosmos3-offload: error: worker 1 of 2 died (exit status 1: RuntimeError: boom); nothing was written\n"
    )


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, capfd):
    """A worker deaf to SIGTERM does not hold the launcher: SIGKILL after the grace."""
    body = """
        if rank == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            (folder / "ready-0").write_text("")
            time.sleep(60)
            (folder / "finished").write_text("")
        while not (folder / "ready-0").exists():
            time.sleep(0.01)
        sys.exit(3)
    """
    started = time.monotonic()
    assert launch_workers([], 2, command=worker(body, tmp_path), grace=1.0) == 2
    assert time.monotonic() - started < 10
    err = capfd.readouterr().err
    assert err == "cosmos3-offload: error: worker 1 of 2 died (exit status 3); nothing was written\n"
    assert not (tmp_path / "finished").exists()


def test_rank_0_notices_reach_stderr_on_success(tmp_path, capfd):
    """A line of the program's own that rank 0 prints is held only until rank 0 succeeds, then copied once."""
    body = """
        if rank == 0:
            print("cosmos3-offload: note: one", file=sys.stderr, flush=True)
            print("progress", file=sys.stderr, flush=True)
            print("cosmos3-offload: note: two", file=sys.stderr, end="", flush=True)
    """
    assert launch_workers([], 2, command=worker(body, tmp_path)) == 0
    assert capfd.readouterr().err == "cosmos3-offload: note: one\nprogress\ncosmos3-offload: note: two"


LAUNCHER = """
import sys
sys.path.insert(0, {src!r})
from cosmos3_offload.app.workers import launch_workers
sys.exit(launch_workers([], 2, command={command!r}, grace=5.0))
"""


@pytest.mark.parametrize(
    "signum, status, words", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_an_interrupted_launcher_terminates_its_workers(tmp_path, signum, status, words):
    """Ctrl-C or SIGTERM to the launcher: SIGTERM to every worker, status 130/143, one line on stderr."""
    body = """
        def on_term(signum, frame):
            (folder / f"terminated-{rank}").write_text("")
            print("cosmos3-offload: terminated; nothing was written", file=sys.stderr, flush=True)
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        (folder / f"ready-{rank}").write_text("")
        time.sleep(60)
        (folder / "finished").write_text("")
    """
    code = LAUNCHER.format(src=str(SRC), command=worker(body, tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not all((tmp_path / f"ready-{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.02)
        launcher.send_signal(signum)
        out, err = launcher.communicate(timeout=15)
    finally:
        launcher.kill()
    assert launcher.returncode == status
    assert err == f"cosmos3-offload: {words}; nothing was written\n" and out == ""
    assert all((tmp_path / f"terminated-{r}").exists() for r in range(2)) and not (tmp_path / "finished").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--gpus", "2", "--prompt", "a fox"], (["generate", "--prompt", "a fox"], 2)),
        (["generate", "--prompt", "a fox", "--gpus=4"], (["generate", "--prompt", "a fox"], 4)),
        (["generate", "--prompt", "a fox"], (["generate", "--prompt", "a fox"], None)),
        (["generate", "--gpus", "2", "--gpus=3"], (["generate"], 3)),
        (["generate", "--prompt=--gpus 2"], (["generate", "--prompt=--gpus 2"], None)),
    ],
)
def test_strip_gpus_flag(argv, expected):
    """`--gpus N` and `--gpus=N` come out of the workers' command line (the last one counts); nothing else does."""
    assert strip_gpus_flag(argv) == expected


@pytest.mark.parametrize("argv", [["generate", "--gpus", "two"], ["generate", "--gpus=2.5"], ["generate", "--gpus"]])
def test_strip_gpus_flag_refuses_a_non_number(argv):
    """A --gpus that is not a whole number is one line of InputError."""
    with pytest.raises(InputError, match="--gpus") as raised:
        strip_gpus_flag(argv)
    assert "\n" not in str(raised.value)


def test_no_workers_is_refused(tmp_path):
    """--gpus 0 starts nothing."""
    with pytest.raises(InputError, match="1 or more"):
        launch_workers([], 0, command=worker("", tmp_path))


def test_more_gpus_than_the_machine_has_is_refused(monkeypatch):
    """On CUDA each worker needs its own GPU; on the CPU any count of workers runs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (
        gpu_count_problem(4, None) == "--gpus 4, but this machine has 2 GPUs; pass --gpus 2 or fewer, or --device cpu"
    )
    assert gpu_count_problem(4, "cuda") is not None
    assert gpu_count_problem(2, "cuda") is None
    assert "drop --device cuda:1" in gpu_count_problem(2, "cuda:1")
    assert gpu_count_problem(1, "cuda:1") is None
    assert gpu_count_problem(8, "cpu") is None


def test_without_cuda_gpus_are_refused_unless_the_cpu_is_asked_for(monkeypatch):
    """If this fails, `--gpus 2` on a machine without GPUs quietly runs two CPU processes and reports 2 GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpu_count_problem(2, None) == (
        "--gpus 2, but this machine has no CUDA GPU (or this torch cannot use one); "
        "add --device cpu to run 2 CPU processes instead"
    )
    assert gpu_count_problem(4, "cpu") is None  # asked for by name: N CPU workers over gloo
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        gpu_count_problem(2, "cuda")


def test_gpus_without_cuda_is_one_line_from_the_command_line(monkeypatch, capsys):
    """If this fails, `generate --gpus 2` without GPUs starts workers instead of saying what is missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(workers, "launch_workers", lambda *args, **kwargs: pytest.fail("workers were started"))
    from cosmos3_offload.app.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a fox", "--gpus", "2", "--output", "never.mp4"])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "add --device cpu" in lines[0], lines


def test_last_line_takes_a_progress_bars_last_drawing():
    """The failure line is a worker's last words, not an earlier line or a half-drawn bar."""
    assert last_line(b"a\nerror: x\n\n") == "error: x"
    assert last_line(b"step\r 10%\r 20%\r") == "20%"
    assert last_line(b"") is None


def test_free_port_can_be_bound():
    """The port picked for MASTER_PORT is one the workers can listen on."""
    import socket

    port = workers.free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


def test_python_m_runs_the_command_line():
    """`python -m cosmos3_offload --help` (what torchrun -m and --gpus run) is the console script."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    result = subprocess.run(
        [sys.executable, "-m", "cosmos3_offload", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "generate" in result.stdout and result.stderr == ""
