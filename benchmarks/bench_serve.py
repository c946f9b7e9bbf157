"""`serve` against `generate` on one GPU: time per request and memory over many requests.

Two fresh processes, one after the other, with the same flags (`--model nano --vram-budget 8GiB
--resolution 480 --frames 93 ...`), so the same plan:

1. generate: what `cosmos3-offload generate` does per request once loaded (`LoadedModel.write` of an
   mp4, under its output lock), `--baseline` requests back to back after one warm-up request;
2. serve: the real `cosmos3-offload serve` on a loopback port; one warm-up request, then `--requests`
   requests back to back over HTTP, each POSTed when the previous completed, its time taken by the
   client from the POST to the poll that saw it completed (polled every 20 ms). Each job's own
   figures (device peak, device memory allocated after it, host resident memory) give the series.

Writes benchmarks/results/serve-<gpu>-<date>.json with both, the overhead and the memory series.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLL_SECONDS = 0.02
PROMPT = "A red fox trots through fresh snow at the edge of a pine forest at dawn, steam rising from its breath."


def model_flags(args) -> list[str]:
    flags = ["--model", args.model, "--resolution", str(args.resolution), "--frames", str(args.frames)]
    flags += ["--steps", str(args.steps)]
    if args.vram_budget:
        flags += ["--vram-budget", args.vram_budget]
    return flags


def role_generate(args) -> None:
    """The per-request cost of `generate` once loaded, as one JSON line on stdout."""
    import torch

    from cosmos3_offload.app import cli
    from cosmos3_offload.app.cli.translate import check_flags, kernel_options
    from cosmos3_offload.app.config import GenerationConfig
    from cosmos3_offload.app.outputs import OutputLock
    from cosmos3_offload.app.runner import LoadedModel
    from cosmos3_offload.app.timer import PhaseTimer

    parsed = cli.build_parser().parse_args(["serve", *model_flags(args)])
    check_flags(parsed)
    plan, _ = cli.serve_plan(parsed, say=lambda line: print(line, file=sys.stderr))
    loaded = LoadedModel.open(model=args.model, plan=plan, kernel_options=kernel_options(parsed))
    loaded.load(PhaseTimer(loaded.device), progress=False)
    folder = Path(tempfile.mkdtemp())
    seconds, peaks, phases = [], [], []
    for index in range(args.baseline + 1):
        config = GenerationConfig(
            prompt=PROMPT,
            frames=args.frames,
            resolution=args.resolution,
            steps=args.steps,
            seed=index,
            output=folder / f"{index}.mp4",
        )
        config = loaded.check(config, budgeted=bool(args.vram_budget))
        timer = PhaseTimer(loaded.device)
        sync = torch.cuda.synchronize if loaded.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        with OutputLock(config.output):
            loaded.write(config, timer, progress=False)
        sync()
        if index:  # the first request compiles the fused kernels
            seconds.append(time.perf_counter() - start)
            peaks.append(max(p.device_peak_bytes or 0 for p in timer.phases))
            phases.append({p.name: round(p.seconds, 4) for p in timer.phases})
        print(f"generate {index}: {time.perf_counter() - start:.2f}s {phases[-1] if index else ''}", file=sys.stderr)
    result = {"plan": plan.describe(), "seconds": seconds, "device_peak_bytes": peaks, "phases": phases}
    print(json.dumps(result), flush=True)


def role_serve(args) -> dict:
    """The real server, driven over HTTP; returns its figures."""
    storage = Path(tempfile.mkdtemp()) / "storage"
    command = [sys.executable, "-m", "cosmos3_offload", "serve", *model_flags(args), "--port", "0"]
    command += ["--storage", str(storage), "--no-progress", "--queue-size", str(args.requests + 1)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    url = None
    for line in server.stdout:
        lines.append(line)
        print("serve:", line.rstrip(), file=sys.stderr, flush=True)
        match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
        if match:
            url = match.group(1)
            break
    if url is None:
        raise SystemExit("the server did not start:\n" + "".join(lines))
    drain = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)  # a full pipe would block it
    drain.start()
    latencies, jobs = [], []
    try:
        for index in range(args.requests + 1):
            body = {"prompt": PROMPT, "frames": args.frames, "steps": args.steps, "seed": index}
            start = time.perf_counter()
            job = _call(url, "POST", "/v1/videos", body)
            while job["status"] not in ("completed", "failed"):
                time.sleep(POLL_SECONDS)
                job = _call(url, "GET", f"/v1/videos/{job['id']}")
            elapsed = time.perf_counter() - start
            if job["status"] != "completed":
                raise SystemExit(f"request {index} failed: {job['error']}")
            if index:
                latencies.append(elapsed)
                jobs.append(job["stats"])
            stats = job["stats"]
            print(
                f"serve {index}: {elapsed:.2f}s job {stats['seconds']}s peak {stats['device_peak_bytes']} "
                f"allocated {stats['device_allocated_bytes']} host {stats['host_resident_bytes']} {stats['phases']}",
                file=sys.stderr,
                flush=True,
            )
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)
        drain.join(10)
    return {
        "latency_seconds": latencies,
        "job_seconds": [j["seconds"] for j in jobs],
        "job_phases": [j["phases"] for j in jobs],
        "device_peak_bytes": [j["device_peak_bytes"] for j in jobs],
        "device_allocated_bytes": [j["device_allocated_bytes"] for j in jobs],
        "host_resident_bytes": [j["host_resident_bytes"] for j in jobs],
        "metrics": [m for m in metrics.splitlines() if not m.startswith("#")],
        "exit_status": server.returncode,
        "output": "".join(lines)[-3000:],
    }


def _call(url: str, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _before_write(phases: dict[str, float]) -> float:
    return sum(seconds for name, seconds in phases.items() if name != "write")


def _growth(series: list[int | None]) -> int | None:
    """Last minus first of a memory series (None where not measured, e.g. device memory on the CPU)."""
    return None if None in series else series[-1] - series[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("driver", "generate"), default="driver")
    parser.add_argument("--model", default="nano")
    parser.add_argument("--vram-budget", default="8GiB", help="'' for none (everything resident)")
    parser.add_argument("--resolution", type=int, default=480)
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--baseline", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.role == "generate":
        role_generate(args)
        return
    sys.path.insert(0, str(HERE))
    from bench_common import ResultsFile

    results = ResultsFile(args.out, "serve", request=f"{args.resolution}p x {args.frames}f, {args.steps} steps")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("role", "out")]
    started = time.perf_counter()
    baseline = subprocess.run(
        [sys.executable, __file__, "--role", "generate", *flags], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    if baseline.returncode:
        raise SystemExit("generate failed (its errors are above)")
    generate = json.loads(baseline.stdout.strip().splitlines()[-1])
    print(f"generate done in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    results.add({"part": "generate", **generate})  # kept if the serve part is cut short
    served = role_serve(args)
    base = statistics.median(generate["seconds"])
    results.add(
        {
            "part": "serve",
            "generate": generate,
            "serve": served,
            "generate_median_seconds": base,
            "serve_median_latency_seconds": statistics.median(served["latency_seconds"]),
            "serve_median_job_seconds": statistics.median(served["job_seconds"]),
            "overhead": statistics.median(served["latency_seconds"]) / base - 1,
            # The server's own cost: what the client waited beyond the job's run (HTTP, queue, polling).
            "server_seconds_median": statistics.median(
                latency - job for latency, job in zip(served["latency_seconds"], served["job_seconds"])
            ),
            # Generation without the mp4 encode, whose time on random weights' noise varies by seconds.
            "generate_median_before_write": statistics.median(_before_write(p) for p in generate["phases"]),
            "serve_median_before_write": statistics.median(_before_write(p) for p in served["job_phases"]),
            "device_allocated_growth_bytes": _growth(served["device_allocated_bytes"]),
            "host_resident_growth_bytes": _growth(served["host_resident_bytes"]),
        }
    )


if __name__ == "__main__":
    main()
