"""benchmarks/bench_request.py on the tiny model on the CPU: a variant in its own process gives the whole
request's time with the phase split and the composed 35-step figures; diffusers' child times the same phases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PHASES = {"load", "prefill", "denoise", "decode", "write"}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_request

    return bench_request


def test_a_variant_records_the_whole_request(bench, tmp_path):
    """One variant, one fresh process: wall and to-file times, every phase, each step, the 35-step composition."""
    args = ["--model", "tiny", "--shapes", "256x5", "--steps", "2", "--variants", "ours-resident"]
    assert bench.main([*args, "--out", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]) == 0
    (path,) = (tmp_path / "results").glob("request-*.json")
    data = json.loads(path.read_text())
    assert {"gpu", "torch", "diffusers", "date", "command"} <= data.keys()
    (run,) = data["runs"]
    assert "failed" not in run, run.get("stderr_tail")
    assert run["name"] == "ours-resident" and run["shape"] == "256p x 5f"
    assert PHASES <= run["phases"].keys()
    assert len(run["step_s"]) == 2 and run["output_bytes"] > 0
    assert 0 < sum(p["s"] for p in run["phases"].values()) < run["to_file_s"] <= run["wall_s"]
    assert run["phases"]["decode"]["s"] <= run["after_last_step_s"] < run["to_file_s"]
    composed = run["composed_35_steps"]
    assert composed["to_file_s"] > run["to_file_s"] and "measured at 2 steps" in composed["how"]


def test_the_diffusers_child_times_its_phases(bench, tmp_path):
    """diffusers' pipeline in the child: load, denoise, its decode and its export, and each step."""
    result = tmp_path / "diffusers.json"
    assert bench.child_diffusers(result, "tiny", 256, 5, 2, tmp_path / "out.mp4", tiled=False) == 0
    child = json.loads(result.read_text())
    assert list(child["phases"]) == ["load", "denoise", "decode", "write"]
    assert len(child["step_s"]) == 2 and (tmp_path / "out.mp4").stat().st_size > 0


def test_seacache_is_not_composed_from_fewer_steps(bench):
    """SeaCache's skips depend on the step count: no 35-step figure from a 3-step run; others get one."""
    child = {"finished": 10.0, "started": 0.5, "last_step_end": 7.0, "gpu": "cpu", "step_s": [2.0, 1.0, 1.0]}
    child |= {"compile_s": 0.0}
    child |= {"compile_count": 0, "inductor_cache": {}, "phases": {"denoise": {"s": 4.0}, "write": {"s": 1.0}}}
    assert bench.summarize(child, 0.0, 3, 35, seacache=True)["composed_35_steps"] is None
    plain = bench.summarize(child, 0.0, 3, 35, seacache=False)
    assert plain["composed_35_steps"]["to_file_s"] == 10.0 - 4.0 + 2.0 + 34 * 1.0
    assert plain["startup_s"] == 5.0 and plain["after_last_step_s"] == 3.0


def test_no_ffmpeg_stops_before_any_run(bench, tmp_path, monkeypatch, capsys):
    """Without an ffmpeg the request cannot end in a file: the script says so and runs nothing."""
    monkeypatch.setattr(bench, "find_ffmpeg", lambda: None)
    assert bench.main(["--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "no ffmpeg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
