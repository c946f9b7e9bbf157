"""Sample files (`generate -i FILE... -o DIR`): cosmos-framework's fields, one load, bad samples skipped."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from cosmos3_offload.app import generation_path, runner
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.sample_files import read_samples

TINY = ["--steps", "2", "--device", "cpu", "--no-progress"]  # the embedded tiny model: 256 tier


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_lines(path: Path, samples: list) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def generate(capsys, files: list[Path], out: Path, *flags: str) -> tuple[int, str, str]:
    """`main` with sample files; returns the exit status, stdout and stderr."""
    argv = ["generate", "-i", *map(str, files), "-o", str(out), *TINY, *flags]
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def args_of(out: Path, name: str) -> dict:
    return json.loads((out / name / "sample_args.json").read_text())


def outputs_of(out: Path, name: str) -> dict:
    return json.loads((out / name / "sample_outputs.json").read_text())


def test_good_samples_write_vision_args_and_outputs(capsys, tmp_path):
    """Each sample gets DIR/<name>/vision.mp4 (or .jpg for one frame), its resolved args and its phase record."""
    sample = {"name": "fox", "prompt": "a fox", "num_frames": 5, "seed": 7, "aspect_ratio": "1,1"}
    still = {"name": "still", "prompt": "a cat", "model_mode": "text2image", "resolution": "256"}
    code, out, err = generate(capsys, [write(tmp_path / "a.json", [sample, still])], tmp_path / "out")
    assert code == 0 and err == ""
    assert iio.imread(tmp_path / "out" / "fox" / "vision.mp4").shape == (5, 256, 256, 3)
    assert iio.imread(tmp_path / "out" / "still" / "vision.jpg").shape == (192, 320, 3)
    args = args_of(tmp_path / "out", "fox")
    assert (args["num_frames"], args["num_steps"], args["seed"], args["width"], args["height"]) == (5, 2, 7, 256, 256)
    assert args["model_mode"] == "text2video" and args["shift"] == 3.0 and args["negative_prompt"] == ""
    assert args["model"] == "tiny" and args["checkpoint"] is None and "resident" in args["plan"]
    assert args_of(tmp_path / "out", "still")["model_mode"] == "text2image"
    record = outputs_of(tmp_path / "out", "fox")
    assert record["status"] == "success" and record["files"] == ["vision.mp4"]
    assert list(record["phases"]) == ["prefill", "denoise", "decode", "write"]
    assert record["phases"]["denoise"]["host_peak_bytes"] > 0
    assert "[1/2] fox: wrote" in out and "[2/2] still: wrote" in out and "samples: 2 written" in out


def test_the_model_is_loaded_once_for_all_samples(capsys, tmp_path, monkeypatch):
    """Several samples share one load."""
    loads = []
    original = runner.load_components
    monkeypatch.setattr(runner, "load_components", lambda *a, **k: loads.append(1) or original(*a, **k))
    samples = [{"prompt": f"a fox {i}", "num_frames": 1} for i in range(3)]
    code, _, _ = generate(capsys, [write_lines(tmp_path / "b.jsonl", samples)], tmp_path / "out")
    assert code == 0 and len(loads) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b_0", "b_1", "b_2"]


def test_bad_samples_are_refused_before_loading_and_the_others_run(capsys, tmp_path):
    """An invalid value, an unknown field, an unsupported mode: one line each on stderr, no folder; exit 2."""
    samples = [
        {"name": "good", "prompt": "a fox", "num_frames": 5},
        {"name": "frames", "prompt": "a fox", "num_frames": 8},
        {"name": "typo", "prompt": "a fox", "num_frame": 5},
        {"name": "action", "prompt": "a fox", "model_mode": "policy"},
        {"name": "noprompt", "num_frames": 5},
    ]
    code, out, err = generate(capsys, [write(tmp_path / "a.json", samples)], tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 4
    assert "(frames): refused: frame count must be 1 or 4k+1, got 8" in lines[0]
    assert "unknown field 'num_frame'; did you mean 'num_frames'?" in lines[1]
    assert "model_mode 'policy' needs domain_name, the embodiment" in lines[2]
    assert "has no prompt" in lines[3]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good"]
    assert "samples: 1 written, 0 failed, 4 refused" in out


def test_all_samples_refused_loads_nothing_and_leaves_no_folder(capsys, tmp_path, monkeypatch):
    """With no good sample nothing is loaded and the output folder is not left behind."""
    monkeypatch.setattr(runner, "load_components", lambda *a, **k: pytest.fail("loaded"))
    code, _, err = generate(capsys, [write(tmp_path / "a.json", {"prompt": "x", "seed": -1})], tmp_path / "out")
    assert code == 2 and "a.json (a): refused: seed must be a whole number" in err
    assert not (tmp_path / "out").exists()


def test_a_sample_failing_at_run_time_is_recorded_and_the_rest_continue(capsys, tmp_path, monkeypatch):
    """NaN latents in one sample fail it (record status "failed", no video); later samples run; exit 1."""
    original = generation_path.denoise_latents

    def poisoned(pipe, config, *args, **kwargs):
        latents = original(pipe, config, *args, **kwargs)
        return latents._replace(vision=latents.vision * float("nan")) if config.prompt == "poison" else latents

    monkeypatch.setattr(generation_path, "denoise_latents", poisoned)
    samples = [{"prompt": p, "num_frames": 1} for p in ("a fox", "poison", "a cat")]
    code, out, err = generate(capsys, [write_lines(tmp_path / "s.jsonl", samples)], tmp_path / "out")
    assert code == 1
    assert "[2/3] s_1: failed: the denoised latents are not finite" in err and len(err.strip().splitlines()) == 1
    failed = outputs_of(tmp_path / "out", "s_1")
    assert failed["status"] == "failed" and "not finite" in failed["message"] and failed["files"] == []
    assert not (tmp_path / "out" / "s_1" / "vision.jpg").exists()
    assert (tmp_path / "out" / "s_2" / "vision.jpg").is_file() and "[3/3] s_2: wrote" in out


def test_an_interrupt_stops_every_sample(capsys, tmp_path, monkeypatch):
    """Ctrl-C during a sample ends the whole run with status 130; the samples before it stay written."""
    original = generation_path.denoise_latents

    def interrupted(pipe, config, *args, **kwargs):
        if config.prompt == "stop":
            raise KeyboardInterrupt
        return original(pipe, config, *args, **kwargs)

    monkeypatch.setattr(generation_path, "denoise_latents", interrupted)
    samples = [{"prompt": p, "num_frames": 1} for p in ("a fox", "stop", "a cat")]
    code, _, err = generate(capsys, [write_lines(tmp_path / "s.jsonl", samples)], tmp_path / "out")
    assert code == 130 and "stopped at sample s_1 (2 of 3)" in err
    assert (tmp_path / "out" / "s_0" / "vision.jpg").is_file() and not (tmp_path / "out" / "s_2").exists()


def test_typed_flags_override_file_values_and_defaults_do_not(capsys, tmp_path):
    """A flag on the command line beats the file; a flag left at its default does not."""
    sample = {"name": "x", "prompt": "a fox", "num_frames": 5, "seed": 3, "guidance": 2.0, "fps": 12}
    code, _, _ = generate(
        capsys, [write(tmp_path / "a.json", sample)], tmp_path / "out", "--seed", "0", "--frames", "1"
    )
    assert code == 0
    args = args_of(tmp_path / "out", "x")
    assert (args["seed"], args["num_frames"], args["guidance"], args["fps"]) == (0, 1, 2.0, 12)
    assert args["num_steps"] == 2  # --steps typed by TINY
    assert (tmp_path / "out" / "x" / "vision.jpg").is_file()


def test_json_list_and_jsonl_names(tmp_path):
    """A .json object is named for its file; list items and .jsonl lines for file and index (blank lines skipped)."""
    write(tmp_path / "one.json", {"prompt": "a"})
    write(tmp_path / "many.json", [{"prompt": "a"}, {"prompt": "b", "name": "named"}])
    (tmp_path / "lines.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    samples = read_samples([tmp_path / "one.json", tmp_path / "many.json", tmp_path / "lines.jsonl"])
    assert [s.name for s in samples] == ["one", "many_0", "named", "lines_0", "lines_1"]
    assert all(s.error is None for s in samples)


def test_duplicate_and_unsafe_names_are_refused(tmp_path):
    """Two samples of one name are both refused; a name that is not one safe folder name is refused."""
    write(tmp_path / "a.json", [{"prompt": "a", "name": "x"}, {"prompt": "b", "name": "../up"}])
    write_lines(tmp_path / "b.jsonl", [{"prompt": "c", "name": "X"}, {"prompt": "d", "name": "ok"}])
    samples = read_samples([tmp_path / "a.json", tmp_path / "b.jsonl"])
    errors = {s.source.split("/")[-1]: s.error for s in samples}
    assert "is used by 2 samples" in errors["a.json sample 0"] and "is used by 2 samples" in errors["b.jsonl line 1"]
    assert "not a usable folder name" in errors["a.json sample 1"]
    assert errors["b.jsonl line 2"] is None


def test_a_bad_line_refuses_only_itself(capsys, tmp_path):
    """Invalid JSON on one .jsonl line refuses that sample; the file's other samples run."""
    (tmp_path / "s.jsonl").write_text('{"prompt": "a", "num_frames": 1}\n{"prompt": \n')
    code, _, err = generate(capsys, [tmp_path / "s.jsonl"], tmp_path / "out")
    assert code == 2 and "s.jsonl line 2: refused: not valid JSON" in err
    assert (tmp_path / "out" / "s_0" / "vision.jpg").is_file()


def test_prompt_object_is_passed_as_its_json_dumps(tmp_path):
    """An upsampled prompt given as a JSON object becomes the text json.dumps makes of it."""
    prompt = {"temporal_caption": "a fox", "resolution": {"H": 720, "W": 1280}}
    (sample,) = read_samples([write(tmp_path / "a.json", {"prompt": prompt})])
    assert sample.fields["prompt"] == json.dumps(prompt)


def test_vision_path_is_relative_to_the_file_and_picks_the_mode(capsys, tmp_path):
    """An image vision_path (relative to the sample file) conditions frame 0: image2video."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(np.full((64, 96, 3), 128, np.uint8)).save(folder / "start.png")
    sample = {"name": "i2v", "prompt": "a fox", "vision_path": "start.png", "num_frames": 5}
    code, _, err = generate(capsys, [write(folder / "a.json", sample)], tmp_path / "out")
    assert code == 0, err
    args = args_of(tmp_path / "out", "i2v")
    assert args["model_mode"] == "image2video" and args["vision_path"] == str(folder / "start.png")
    assert args["condition_frame_indexes_vision"] == [0]


@pytest.mark.parametrize(
    "sample, message",
    [
        ({"prompt": "a", "vision_path": "https://x.org/a.jpg"}, "is a URL"),
        ({"prompt": "a", "vision_path": "a.gif"}, "neither an image nor a video"),
        ({"prompt": "a", "model_mode": "image2video"}, "takes a vision_path image"),
        ({"prompt": "a", "model_mode": "text2image", "num_frames": 5}, "makes one frame"),
        ({"prompt": "a", "sound_path": "a.wav"}, "audio conditioning"),
        ({"prompt": "a", "edge": {"control_path": "e.mp4"}}, "transfer"),
        ({"prompt": "a", "enable_sound": "yes"}, "enable_sound must be true or false"),
        ({"prompt": "a", "prompt_path": "p.txt"}, "either `prompt` or `prompt_path`"),
    ],
)
def test_unsupported_and_inconsistent_fields_are_refused(tmp_path, sample, message):
    """Documented cosmos-framework fields this tool does not run, and contradictions, refuse the sample by name."""
    (result,) = read_samples([write(tmp_path / "a.json", sample)])
    assert result.error is not None and message in result.error


def test_neutral_and_null_unsupported_fields_are_accepted(tmp_path):
    """`prompt_upsampling: false`, `num_outputs: 1` and null values ask nothing this tool lacks."""
    sample = {"prompt": "a", "prompt_upsampling": False, "num_outputs": 1, "action_path": None, "seed": None}
    (result,) = read_samples([write(tmp_path / "a.json", sample)])
    assert result.error is None and "seed" not in result.fields


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-i", "a.json"], "need both -i FILE... and -o DIR"),
        (["generate", "-o", "out"], "need both -i FILE... and -o DIR"),
        (["generate", "-i", "a.json", "-o", "out", "--prompt", "x"], "either --prompt or -i"),
        (["generate", "-i", "a.json", "-o", "out", "--output", "x.mp4"], "drop --output"),
        (["generate", "-i", "a.json", "-o", "out", "--vram-budget", "8GiB"], "--vram-budget plans one request"),
        (["generate"], "generate needs --prompt"),
    ],
)
def test_conflicting_flags_are_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    """-i and -o go together, exclude --prompt and --output; nothing is written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
