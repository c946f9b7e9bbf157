"""A real `cosmos3-offload serve` on a loopback port, in its own process, for the serve tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
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
