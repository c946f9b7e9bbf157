"""The command line: bad input is one line on stderr, exit 2, no output; the installed script works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from cosmos3_offload.app.cli import main

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "cosmos3_offload"


@pytest.fixture(scope="module")
def script() -> Path:
    """The console script of the environment running the tests, checked to import this tree's package."""
    folder = Path(sys.executable).parent
    path = folder / "cosmos3-offload"
    assert path.is_file(), f"{path} is missing: install this tree with pip install -e ."
    # pip names the interpreter on the first line, or (long paths) in a /bin/sh trampoline on the second.
    head = "\n".join(path.read_text(encoding="utf-8").splitlines()[:2])
    assert head.startswith("#!") and str(folder) in head, f"{path} runs another interpreter: {head!r}"
    # The import the script makes, by this environment's interpreter, from the script's folder (sys.path[0]).
    found = subprocess.run(
        [str(folder / "python"), "-c", "import cosmos3_offload; print(cosmos3_offload.__file__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == PACKAGE / "__init__.py", (
        f"{path} imports {found.stdout.strip()}, not this tree's {PACKAGE}: reinstall with pip install -e ."
    )
    return path


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "a fox", "--no-progress", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "20"], "use 17 or 21"),
        (["--frames", "0"], "frames must be a whole number from 1"),
        (["--resolution", "1080"], "--resolution must be one of 256, 480, 704, 720, 768, got 1080"),
        (["--aspect-ratio", "2,1"], "--aspect-ratio must be one of"),
        (["--steps", "0"], "steps must be a whole number from 1"),
        (["--guidance", "-2"], "guidance must be a finite number"),
        (["--dtype", "int8"], "unknown dtype"),
        (["--device", "tpu"], "device"),
        (["--frames", "abc"], "argument --frames: must be a whole number, got 'abc'"),
        (["--frames", "1", "--output", "{tmp}/still.mp4"], "suffixes .jpg"),
        (["--output", "{tmp}/missing/out.mp4"], "does not exist"),
        (["--checkpoint", "{tmp}"], "no model_index.json"),
        (["--checkpoint", "{tmp}/nowhere"], "is not a folder"),
        (["--quantize", "int4"], "invalid choice"),
        (["--fp8-mode", "fast"], "invalid choice"),
        (["--quantize", "fp8", "--fp8-scales", "block"], "invalid choice"),
        (["--cache", "teacache"], "--cache must be one of none, seacache, got 'teacache'"),
        (["--attention", "fastest"], "invalid choice"),
        (["--attention", "flash-attn-4"], "cannot run here"),
        (["--compile", "maybe"], "invalid choice"),
        (["--cache-threshold", "0.3"], "pass --cache seacache too"),
        (["--cache", "seacache", "--cache-threshold", "nan"], "--cache-threshold must be a finite number"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(capsys, tmp_path, monkeypatch, args, message):
    """Each bad flag ends with a single error line naming the problem, status 2, and an untouched folder."""
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_folder(capsys, tmp_path):
    """An output folder that refuses new files is refused before anything runs."""
    code, _, err = run_cli(capsys, "--output", "/sys/out.mp4")
    assert code == 2 and "not writable" in err


def test_checkpoint_of_another_pipeline(capsys, tmp_path):
    """A diffusers folder of another model is refused by name."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    code, _, err = run_cli(capsys, "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o.mp4"))
    assert code == 2 and "'WanPipeline', not a Cosmos3OmniPipeline" in err


def test_missing_prompt_is_a_usage_error(capsys):
    """--prompt is required."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate"])
    assert exit_info.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_text_to_image_writes_a_jpg(capsys, tmp_path):
    """--frames 1 writes one image of the tier's size and reports the stages."""
    out = tmp_path / "still.jpg"
    assert main(["generate", "--prompt", "a fox", "--frames", "1", "--steps", "2", "--output", str(out)]) == 0
    assert iio.imread(out).shape == (192, 320, 3)
    report = capsys.readouterr().out
    for stage in ("load", "prefill", "denoise", "decode", "write"):
        assert f"\n{stage} " in report
    assert "random weights produce noise" in report


def test_installed_script_writes_the_default_mp4(tmp_path, script):
    """Fails when this tree's console script, run as the README says, does not write the 17-frame 320x192 mp4."""
    result = subprocess.run(
        [script, "generate", "--prompt", "a red fox in the snow", "--steps", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote output.mp4 (17 frames, 320x192" in result.stdout
    assert iio.imread(tmp_path / "output.mp4").shape == (17, 192, 320, 3)


def test_installed_script_refuses_bad_input(tmp_path, script):
    """Fails when this tree's real script refuses bad input otherwise than exit 2, one line, nothing written."""
    result = subprocess.run(
        [script, "generate", "--prompt", "x", "--frames", "8"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "use 5 or 9" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_prints_the_choice_and_predictions(capsys):
    """`plan` prints the request, the chosen placement and predicted peaks and times, and runs nothing."""
    assert main(["plan", "--vram-budget", "8GiB", "--model", "nano", "--resolution", "720", "--frames", "189"]) == 0
    out = capsys.readouterr().out
    assert "1280x720, 189 frames" in out and "generator streamed" in out
    assert "predicted peak:" in out and "s per step" in out
    assert "encode" not in out  # text to video encodes nothing


def test_plan_counts_the_step_cache_memory(capsys):
    """Under the same budget, --cache seacache plans for its residuals: fewer resident generator layers
    or a higher denoise peak, never the same plan and peak."""
    args = ["plan", "--vram-budget", "8GiB", "--model", "nano", "--resolution", "720", "--frames", "189"]
    plans = []
    for extra in ([], ["--cache", "seacache"]):
        assert main([*args, *extra]) == 0
        out = capsys.readouterr().out.splitlines()
        plans.append((next(x for x in out if x.startswith("plan for")), next(x for x in out if "peak:" in x)))
    assert plans[0] != plans[1]


def test_generate_with_seacache_reports_computed_and_reused_steps(capsys, tmp_path):
    """The summary says how many steps ran the generator and how many reused its residual."""
    args = [
        "--steps",
        "8",
        "--frames",
        "9",
        "--cache",
        "seacache",
        "--no-progress",
        "--output",
        str(tmp_path / "f.mp4"),
    ]
    assert main(["generate", "--prompt", "a fox", *args]) == 0
    out = capsys.readouterr().out
    assert "seacache (threshold 0.25): " in out and " of 8 steps computed, " in out
    assert "kernels: attention diffusers' dispatcher; eager norms and rotary" in out  # the CPU's choice


def test_plan_prints_host_memory_under_a_host_budget(capsys):
    """With --host-budget the plan names both budgets and the weights' pinned, page-cache and private bytes."""
    args = ["plan", "--vram-budget", "8GiB", "--host-budget", "40GiB", "--model", "nano", "--frames", "93"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "plan for a 8.0 GiB budget and a 40.0 GiB host budget" in out
    assert "host memory for weights: pinned " in out and "page cache 0.00 GiB" in out  # no checkpoint to map


def test_plan_counts_the_encode_of_conditioning_frames(capsys, tmp_path):
    """With --video (`plan` checks that the file exists, reads none of it) the encode of its first 5
    frames is planned for too."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"never decoded by plan")
    args = ["plan", "--vram-budget", "8GiB", "--model", "nano", "--resolution", "720", "--frames", "189"]
    assert main([*args, "--video", str(clip)]) == 0
    assert "predicted peak: encode " in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--model", "nano"], "needs --vram-budget"),
        (["plan", "--vram-budget", "2GiB", "--model", "nano"], "needs at least"),
        (["plan", "--vram-budget", "lots", "--model", "nano"], "write it like 8GiB"),
        (["plan", "--vram-budget", "8GiB", "--model", "giant"], "unknown model 'giant'"),
        (["plan", "--vram-budget", "8GiB", "--model", "nano", "--h2d-gbps", "-5"], "h2d-gbps must be a finite number"),
        (["generate", "--prompt", "x", "--vram-budget", "8GiB", "--offload-stages", "vae"], "not both"),
        (["plan", "--vram-budget", "8GiB", "--host-budget", "lots", "--model", "nano"], "write it like 8GiB"),
        (["generate", "--prompt", "x", "--host-budget", "16GiB"], "pass --vram-budget too"),
        (["plan", "--vram-budget", "8GiB", "--host-budget", "8GiB", "--model", "nano"], "GiB of host memory"),
    ],
)
def test_plan_and_budget_errors(capsys, tmp_path, monkeypatch, args, message):
    """Planner refusals and conflicting flags are one-line errors with exit status 2."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_generate_with_a_budget_follows_the_plan(capsys, tmp_path):
    """--vram-budget prints the chosen plan, runs it, and reports it in the summary."""
    out = tmp_path / "o.mp4"
    args = ["generate", "--prompt", "a fox", "--steps", "2", "--frames", "5", "--vram-budget", "1GiB"]
    assert main([*args, "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("plan for a 1.0 GiB budget") == 1 and "\nplan: " in printed and out.is_file()


def test_plan_with_fp8_counts_one_byte_a_weight(capsys):
    """`plan --quantize fp8` says what is quantized and what it saves, and fits Nano 720p x 189f in 4 GiB
    with about half the pinned host memory of bf16."""
    args = ["plan", "--vram-budget", "4GiB", "--model", "nano", "--h2d-gbps", "50"]
    assert main([*args, "--quantize", "fp8"]) == 0
    fp8 = capsys.readouterr().out
    assert "504 linears in FP8" in fp8 and "12.93 GiB saved" in fp8 and "plan for a 4.0 GiB budget" in fp8
    assert main(args) == 0
    bf16 = capsys.readouterr().out
    assert "bf16 as stored" in bf16

    def pinned(out: str) -> float:
        return float(out.split("pinned ")[1].split(" GiB")[0])

    assert pinned(fp8) < 0.55 * pinned(bf16)


def test_generate_with_fp8_reports_each_steps_precision(capsys, tmp_path):
    """The summary names the FP8 precisions the request ran: the policy's W8A16 ends, W8A8 between."""
    out = tmp_path / "o.mp4"
    args = ["generate", "--prompt", "a fox", "--steps", "8", "--frames", "5", "--quantize", "fp8", "--fp8-mode"]
    assert main([*args, "policy", "--no-progress", "--output", str(out)]) == 0
    assert "fp8: reasoner W8A16; generator W8A16 x6, W8A8 x2" in capsys.readouterr().out and out.is_file()
