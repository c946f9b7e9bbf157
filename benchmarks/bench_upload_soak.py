"""A soak of large and hostile uploads against a real `cosmos3-offload serve`: does the server's memory come back?

Starts the server (the embedded tiny model, its own process), then sends REQUESTS requests round-robin of:
- an image-to-video job with a large multipart upload (a PNG padded to ~UPLOAD_MIB with a text chunk), refused
  or queued as the server decides;
- a chunked JSON body larger than the body limit (must be cut off at the limit: 413);
- a 30 MB `data:` URL in JSON (under the limit; the image is checked off the event loop);
- a small valid image job (runs on the model);
and reads the server's resident memory (VmRSS) after a warm-up and after the soak. Writes
benchmarks/results/upload-soak-<machine>-<date>.json with every status seen and the RSS figures.

    python benchmarks/bench_upload_soak.py [--requests 200]
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx2 as httpx
from PIL import Image

UPLOAD_MIB = 30
CHUNKED_MIB = 150
RESULTS = Path(__file__).parent / "results"
ADDRESS = re.compile(r"serving \S+ on (http://127\.0\.0\.1:\d+) ")


def padded_png(mib: int) -> bytes:
    """A valid 64x64 PNG carrying `mib` MiB of incompressible text chunk (decoders skip it)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(buffer, format="PNG")
    png = buffer.getvalue()
    payload = os.urandom(mib * 2**20)
    chunk = b"tEXt" + b"pad\0" + payload
    length = (len(chunk) - 4).to_bytes(4, "big")
    crc = zlib.crc32(chunk).to_bytes(4, "big")
    end = png.rindex(b"IEND") - 4
    return png[:end] + length + chunk + crc + png[end:]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(storage: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "cosmos3_offload", "serve", "--port", "0", "--storage", str(storage)]
    process = subprocess.Popen(
        [*command, "--no-progress", "--queue-size", "64"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in process.stdout:
        match = ADDRESS.search(line)
        if match:
            threading.Thread(target=lambda: collections.deque(process.stdout, maxlen=0), daemon=True).start()
            return process, match.group(1)
    raise RuntimeError("the server did not start")


def chunked_body(mib: int):
    block = b" " * 2**20
    yield b'{"prompt": "x", "pad": "'
    for _ in range(mib):
        yield block
    yield b'"}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    upload = padded_png(UPLOAD_MIB)
    data_url = "data:image/png;base64," + base64.b64encode(padded_png(22)).decode()
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(small, format="PNG")
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory() as scratch:
        process, url = start_server(Path(scratch) / "storage")
        try:
            client = httpx.Client(base_url=url, timeout=300)
            kinds = ["multipart", "chunked", "data_url", "small"]

            def send(kind: str) -> int:
                if kind == "multipart":
                    files = {"input_reference": ("big.png", upload, "image/png")}
                    return client.post(
                        "/v1/videos", data={"prompt": "a fox", "frames": "5", "steps": "1"}, files=files
                    ).status_code
                if kind == "chunked":
                    try:
                        return client.post(
                            "/v1/videos",
                            content=chunked_body(CHUNKED_MIB),
                            headers={"content-type": "application/json"},
                        ).status_code
                    except httpx.HTTPError as error:  # the server may close the connection at the limit
                        return f"closed: {type(error).__name__}"
                if kind == "data_url":
                    body = {"prompt": "a fox", "frames": 5, "steps": 1, "input_reference": data_url}
                    return client.post("/v1/videos", json=body).status_code
                body = {"prompt": "a fox", "n": 1, "size": "256x256", "steps": 1}
                return client.post("/v1/images/generations", json=body).status_code

            for kind in kinds:  # warm-up: every path once
                send(kind)
            time.sleep(2)
            start = rss_mib(process.pid)
            peak = start
            began = time.perf_counter()
            for index in range(args.requests):
                kind = kinds[index % len(kinds)]
                statuses[kind][str(send(kind))] += 1
                peak = max(peak, rss_mib(process.pid))
            seconds = time.perf_counter() - began
            while client.get("/health").json().get("queue_length", 0) > 0:
                time.sleep(1)
            time.sleep(2)
            end = rss_mib(process.pid)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
    result = {
        "benchmark": "upload-soak",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (CPU, the embedded tiny model)",
        "python": platform.python_version(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "requests": args.requests,
        "upload_mib": UPLOAD_MIB,
        "chunked_mib": CHUNKED_MIB,
        "statuses": {kind: dict(counter) for kind, counter in statuses.items()},
        "rss_mib": {"after_warmup": round(start, 1), "peak": round(peak, 1), "after_soak": round(end, 1)},
        "rss_growth": round(end / start - 1, 4),
        "seconds": round(seconds, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"upload-soak-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
