"""`cosmos3-offload serve` for the serve tests: a real server in its own process (`ServerProcess`, for what
only a process shows: its signals, its exit, its restart), or the same app built in the test process
(`InProcessServer`, for the HTTP contract: no interpreter to start, no import of torch and diffusers again).

`InProcessServer` goes through the real CLI: `main(["serve", "--storage", S, *flags])` parses and checks
the flags, makes the plan and opens the model exactly as the command does, and only the last call, which
would bind the port and run uvicorn, is replaced by `serve.server.in_process` (the same app, store, queue and
worker). The app is driven through Starlette's ASGI test transport, or, with `listen=True` (a browser, real
HTTP connections under load), served by uvicorn on a loopback port from a thread of this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

START_SECONDS = 120  # importing torch and diffusers and loading the tiny model on a slow 2-core machine
STOP_SECONDS = 60
ADDRESS = re.compile(r"serving \S+ on (http://127\.0\.0\.1:\d+) ")


class ServerProcess:
    """`with ServerProcess(storage, *flags) as server:` ... `server.url`; the exit stops it with SIGINT."""

    def __init__(self, storage: Path, *flags: str) -> None:
        self.storage, self.flags = Path(storage), flags
        self.url: str | None = None
        self.lines: list[str] = []
        self.returncode: int | None = None

    def __enter__(self) -> ServerProcess:
        command = [sys.executable, "-m", "cosmos3_offload", "serve", "--port", "0", "--storage", str(self.storage)]
        self.process = subprocess.Popen(
            [*command, "--no-progress", *self.flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        found = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(found,), daemon=True)
        self._reader.start()
        if not found.wait(START_SECONDS) or self.url is None:
            self.stop(signal.SIGKILL)
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        return self

    def _read(self, found: threading.Event) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            match = ADDRESS.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                found.set()
        found.set()

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.returncode = self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.returncode = self.process.wait()
        self._reader.join(5)
        return self.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InProcessServer:
    """`with InProcessServer(storage, *flags) as server:` the app `cosmos3-offload serve --storage storage
    *flags` serves, in this process; `server.http` is an httpx client on it (Starlette's TestClient, which
    the openai client takes as its `http_client`) and `server.url` its base URL. The exit stops it as a
    server stops (waiting jobs failed, the running one ended at its next step, the storage released)."""

    def __init__(self, storage: Path, *flags: str, listen: bool = False) -> None:
        self.storage, self.flags, self.listen = Path(storage), flags, listen
        self.url: str | None = None

    def __enter__(self) -> InProcessServer:
        from starlette.testclient import TestClient

        from cosmos3_offload.serve import server

        loaded, settings = cli_serve_arguments(self.storage, *self.flags)
        with contextlib.ExitStack() as stack:
            app = stack.enter_context(server.in_process(loaded, settings)).app
            # One event loop for every request, as uvicorn has (a handler that blocked it would stall them all).
            self.http = stack.enter_context(TestClient(app, base_url="http://testserver"))
            self.url = "http://testserver"
            if self.listen:
                self.url = stack.enter_context(_uvicorn_thread(app))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def cli_serve_arguments(storage: Path, *flags: str):
    """(the opened model, the ServeSettings) that `cosmos3-offload serve --storage storage *flags` hands to
    the server, from the real CLI; a flag it refuses raises SystemExit(2) as the command exits."""
    import pytest

    from cosmos3_offload.main import main
    from cosmos3_offload.serve import server

    handed: list = []

    def capture(loaded, settings) -> int:
        handed.append((loaded, settings))
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server, "serve", capture)  # cosmos3_offload.main imports it at the call
        status = main(["serve", "--port", "0", "--storage", str(storage), "--no-progress", *flags])
    assert status == 0 and len(handed) == 1, f"serve exited {status} without handing over the model"
    return handed[0]


@contextlib.contextmanager
def _uvicorn_thread(app):
    """`app` served by uvicorn (the server's settings) on a free loopback port, from a thread; yields its URL."""
    from cosmos3_offload.serve import server

    listener = server.bind("127.0.0.1", 0)
    running = server.uvicorn_server(app)  # off the main thread it installs no signal handlers
    thread = threading.Thread(target=running.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        while not running.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            threading.Event().wait(0.01)
        host, port = listener.getsockname()[:2]
        yield f"http://{host}:{port}"
    finally:
        running.should_exit = True
        thread.join(STOP_SECONDS)
        listener.close()


def wait_for_video(client, video_id: str, seconds: float, *, until=("completed", "failed")):
    """The openai `client`'s video `video_id` once its status is one of `until`; an AssertionError after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in until:
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not reach {until}")
