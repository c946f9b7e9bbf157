"""`generate --gpus N`: start N worker processes, torchrun-style, and watch them until all have ended.

A worker is what `torchrun --nproc-per-node N -m cosmos3_offload generate ...` would start: the same
command line without `--gpus N`, run as `python -m cosmos3_offload`, with RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free port) set, plus
COSMOS3_OFFLOAD_LAUNCHER=1 (this launcher words a failure) and, unless already set, OMP_NUM_THREADS
(the host's cores shared out: torchrun's 1 would starve CPU workers). One host only.

What the user sees:

- Rank 0's stdout is ours (the report). Its stderr is copied to ours as it arrives (progress bars),
  except the program's own lines (`cosmos3-offload: ...`), each held until more output follows it:
  its last one may be its failure, which the launcher prints, once. The other ranks' output goes to
  temporary files, read only when one fails (logged whole at INFO, `--verbose`).
- Every worker exits 0: status 0.
- A worker fails first (a non-zero status, or a signal): the others get SIGTERM, and SIGKILL after
  GRACE_SECONDS; rank 0's stderr is no longer copied; one line goes to stderr and the status is 2.
  The line is the failing worker's own last line when it is the program's (`cosmos3-offload:
  error: ...`, printed as is, with no rank added: every rank checks the same request), else
  `cosmos3-offload: error: worker K of N died (signal S | exit status X[: its last line]); nothing was
  written`.
- Ctrl-C or SIGTERM to the launcher: SIGTERM to every worker, the same grace, then one line as
  cli.py words it (`interrupted` / `terminated; nothing was written`) and status 130 / 143. A second
  one skips the grace (SIGKILL at once).

Nothing waits unbounded except the run itself: stopping takes at most GRACE_SECONDS plus a few
seconds, and no pipe that a worker's own children keep open holds the launcher.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from ..errors import InputError
from .console import PROG, printable

logger = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # after SIGTERM, before SIGKILL
POLL_SECONDS = 0.05  # how often the workers' states are read
DRAIN_SECONDS = 2.0  # for a dead worker's stderr to reach its end (its children may hold the pipe)
REAP_SECONDS = 5.0  # for a SIGKILLed worker to be gone
TAIL_BYTES = 64 << 10  # of a worker's stderr, kept for the failure message
MARK = f"{PROG}: ".encode()  # how the program's own lines begin: errors and notices, one line each


def strip_gpus_flag(argv: list[str]) -> tuple[list[str], int | None]:
    """`argv` without `--gpus N` / `--gpus=N` (anywhere before `--`), and N (the last one given)."""
    rest: list[str] = []
    count = None
    args = iter(argv)
    for arg in args:
        if arg == "--":
            rest += [arg, *args]
            break
        if arg == "--gpus":
            value = next(args, None)
            if value is None:
                raise InputError("--gpus needs a number of GPUs, e.g. --gpus 2")
        elif arg.startswith("--gpus="):
            value = arg.removeprefix("--gpus=")
        else:
            rest.append(arg)
            continue
        try:
            count = int(value)
        except ValueError:
            raise InputError(f"--gpus takes a whole number of GPUs, e.g. --gpus 2; got {value!r}") from None
    return rest, count


def gpu_count_problem(count: int, device: str | None) -> str | None:
    """Why `--gpus count` cannot run on `device` here (None: it can). A CUDA run needs a GPU per
    worker; `--device cpu`, asked for by name, runs `count` CPU workers over gloo, however many. No
    --device on a machine without CUDA is refused: `--gpus` asks for GPUs, and CPU workers in their
    place would be a quiet change of what was asked (and hours slower)."""
    from .config import resolve_device  # torch: the launcher itself and its tests need none

    resolved = resolve_device(device)  # an InputError for a device that does not exist
    if count < 1:
        return f"--gpus must be 1 or more, got {count}"
    if resolved.type != "cuda":
        if device is not None:
            return None
        return (
            f"--gpus {count}, but this machine has no CUDA GPU (or this torch cannot use one); "
            f"add --device cpu to run {count} CPU processes instead"
        )
    if resolved.index is not None and count > 1:
        return f"with --gpus {count} worker K drives cuda:K; drop --device {device} (or pass --device cuda)"
    import torch

    available = torch.cuda.device_count()
    if count > available:
        gpus = f"{available} GPU{'s' if available != 1 else ''}"
        return f"--gpus {count}, but this machine has {gpus}; pass --gpus {available} or fewer, or --device cpu"
    return None


def check_gpu_count(count: int, device: str | None) -> None:
    """`gpu_count_problem` as an InputError."""
    problem = gpu_count_problem(count, device)
    if problem is not None:
        raise InputError(problem)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another program may take it first, as
    with torchrun's own choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment(rank: int, count: int, port: int) -> dict[str, str]:
    """Our environment plus what torchrun tells rank `rank` of `count` on one host."""
    environment = dict(os.environ)
    environment.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(count),
        LOCAL_WORLD_SIZE=str(count),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        COSMOS3_OFFLOAD_LAUNCHER="1",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    environment.setdefault("OMP_NUM_THREADS", str(max(1, cores // count)))
    return environment


def launch_workers(
    args: list[str], count: int, *, command: list[str] | None = None, grace: float = GRACE_SECONDS
) -> int:
    """Run `count` workers of `python -m cosmos3_offload *args` (or of `command`) until all end; the exit
    status: 0, 2 (a worker failed), 130 or 143 (Ctrl-C or SIGTERM here). Prints at most one line."""
    if count < 1:
        raise InputError(f"--gpus must be 1 or more, got {count}")
    command = [sys.executable, "-m", "cosmos3_offload", *args] if command is None else list(command)
    port = free_port()
    sys.stdout.flush()  # what we printed comes before the workers' output
    sys.stderr.flush()
    workers: list[_Worker] = []
    with _Signals() as signals, contextlib.ExitStack() as files:
        try:
            for rank in range(count):
                workers.append(_Worker.start(rank, count, command, port, files))
            with signals.raising():
                failed = _wait_for_first_failure(workers)
        except _Interrupted:
            _stop(workers, grace, signals)
            words = "interrupted" if signals.received == signal.SIGINT else "terminated"
            _say(f"{PROG}: {words}; nothing was written", workers[0].relay if workers else None)
            return 128 + signals.received
        except BaseException:
            _stop(workers, grace, signals)
            raise
        if failed is None:
            workers[0].relay.finish(DRAIN_SECONDS)
            return 0
        if failed.rank == 0:
            workers[0].relay.drain(DRAIN_SECONDS)  # its last words, the failure among them
        _stop(workers, grace, signals)
        _log_output(failed)
        _say(_failure_line(failed, workers), workers[0].relay)
        return 2


def _wait_for_first_failure(workers: list[_Worker]) -> _Worker | None:
    """Block until every worker has exited 0 (None) or one has failed (that one). Blocks the host."""
    while True:
        running = False
        for worker in workers:
            status = worker.process.poll()
            if status is None:
                running = True
            elif status != 0:
                return worker
        if not running:
            return None
        time.sleep(POLL_SECONDS)


def _stop(workers: list[_Worker], grace: float, signals: _Signals) -> None:
    """SIGTERM to every worker still running, SIGKILL to those left after `grace` (at once after a
    second Ctrl-C); rank 0's stderr is no longer copied. Blocks the host, boundedly."""
    signals.stopping = True
    if workers:
        workers[0].relay.mute()
    running = [worker.process for worker in workers if worker.process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline and not signals.hurry:
        time.sleep(POLL_SECONDS)
    for process in running:
        if process.poll() is None:
            process.kill()
            try:
                process.wait(REAP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("worker %d did not end after SIGKILL", process.pid)


def _failure_line(failed: _Worker, workers: list[_Worker]) -> str:
    """The one line that says why the run failed."""
    status = failed.process.returncode
    last = last_line(failed.stderr_tail())
    if status > 0 and last is not None and last.startswith(MARK.decode()):
        return last
    if status < 0:
        cause = f"signal {signal.Signals(-status).name}"
    else:
        cause = f"exit status {status}" + (f": {last[:200]}" if last else "")
    leader_done = failed.rank != 0 and workers[0].process.returncode == 0
    outcome = "after worker 0 had finished" if leader_done else "nothing was written"
    return f"{PROG}: error: worker {failed.rank} of {len(workers)} died ({cause}); {outcome}"


def last_line(output: bytes) -> str | None:
    """The last non-blank line of a worker's output; of a progress bar (redrawn after `\\r`), its last
    drawing."""
    for line in reversed(output.decode(errors="replace").split("\n")):
        drawings = [part.strip() for part in line.split("\r") if part.strip()]
        if drawings:
            return drawings[-1]
    return None


def _say(line: str, relay: _Relay | None) -> None:
    """Our one line on stderr, on a line of its own after whatever rank 0 left unfinished."""
    start = "" if relay is None or relay.ends_line else "\n"
    print(start + printable(line, sys.stderr, one_line=True), file=sys.stderr, flush=True)


def _log_output(failed: _Worker) -> None:
    """The failing worker's captured output, for --verbose."""
    logger.info("worker %d's stderr (the end):\n%s", failed.rank, failed.stderr_tail().decode(errors="replace"))
    if failed.stdout is not None:
        stdout = _file_tail(failed.stdout).decode(errors="replace")
        logger.info("worker %d's stdout (the end):\n%s", failed.rank, stdout)


@dataclass
class _Worker:
    """One worker process and where its output goes."""

    rank: int
    process: subprocess.Popen
    relay: _Relay | None = None  # rank 0: its stderr, copied to ours
    stderr: IO[bytes] | None = None  # ranks > 0: kept in files, read on a failure
    stdout: IO[bytes] | None = None

    @classmethod
    def start(cls, rank: int, count: int, command: list[str], port: int, files: contextlib.ExitStack) -> _Worker:
        environment = worker_environment(rank, count, port)
        if rank == 0:  # stdin and stdout are ours, as with torchrun
            process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE)
            return cls(rank, process, relay=_Relay(process.stderr))
        stdout = files.enter_context(tempfile.TemporaryFile())
        stderr = files.enter_context(tempfile.TemporaryFile())
        process = subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        return cls(rank, process, stderr=stderr, stdout=stdout)

    def stderr_tail(self) -> bytes:
        return self.relay.tail() if self.relay is not None else _file_tail(self.stderr)


def _file_tail(file: IO[bytes]) -> bytes:
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - TAIL_BYTES))
    return file.read()


@dataclass
class _Relay:
    """Rank 0's stderr, copied to ours by a thread as it arrives, except each of the program's own
    lines, held until more output follows it (or rank 0 succeeds): the last may be the failure."""

    source: IO[bytes]
    ends_line: bool = True  # what was copied so far ends with a newline
    _muted: bool = False
    _copying: bool = False  # inside a line that is not the program's own, copied as it comes
    _line: bytes = b""  # the start of a line that may be the program's own, not yet copied
    _held: bytes = b""  # a whole line of the program's own, not yet copied
    _tail: bytearray = field(default_factory=bytearray)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._copy, name="rank-0-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        while chunk := os.read(self.source.fileno(), TAIL_BYTES):
            with self._lock:
                self._tail += chunk
                del self._tail[:-TAIL_BYTES]
                if not self._muted:
                    self._write(self._pass(chunk))
        self.source.close()

    def _pass(self, chunk: bytes) -> bytes:
        """What of `chunk` (and of what was held) may be copied now."""
        out = bytearray()
        for piece in re.findall(rb"[^\n]*\n|[^\n]+", chunk):
            out += self._held
            self._held = b""
            if self._copying:
                out += piece
                self._copying = not piece.endswith(b"\n")
                continue
            line = self._line + piece
            whole = line.endswith(b"\n")
            if line.startswith(MARK):
                self._line, self._held = (b"", line) if whole else (line, b"")
            elif MARK.startswith(line) and not whole:
                self._line = line  # too short to tell yet
            else:
                out += line
                self._line = b""
                self._copying = not whole
        return bytes(out)

    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            buffer = getattr(sys.stderr, "buffer", None)
            sys.stderr.flush()
            if buffer is not None:
                buffer.write(data)
                buffer.flush()
            else:
                sys.stderr.write(data.decode(errors="replace"))
                sys.stderr.flush()
        except (OSError, ValueError):  # our stderr is gone: nothing more to show
            self._muted = True
            return
        self.ends_line = data.endswith(b"\n")

    def drain(self, timeout: float) -> None:
        """Wait (blocking, at most `timeout`) for rank 0's stderr to end; it has exited."""
        self._thread.join(timeout)

    def finish(self, timeout: float) -> None:
        """Rank 0 succeeded: copy what was held, then nothing more."""
        self.drain(timeout)
        with self._lock:
            if not self._muted:
                self._write(self._held + self._line)
            self._muted = True

    def mute(self) -> None:
        """Copy nothing more (what rank 0 says while it is stopped is noise)."""
        with self._lock:
            self._muted = True

    def tail(self) -> bytes:
        with self._lock:
            return bytes(self._tail)


class _Interrupted(BaseException):
    """Ctrl-C or SIGTERM to the launcher while the workers run."""


class _Signals:
    """SIGINT and SIGTERM while workers exist. The first is recorded, and raises `_Interrupted` inside
    `raising()` (one that came before raises on entering it); one during a stop, or any later one,
    asks the stop to skip the grace."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.stopping = False
        self.hurry = False
        self._raise = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
            if self._raise:
                self._raise = False
                raise _Interrupted
            if not self.stopping:
                return
        self.hurry = True

    @contextlib.contextmanager
    def raising(self):
        if self.received is not None:
            raise _Interrupted
        self._raise = True
        try:
            yield
        finally:
            self._raise = False
