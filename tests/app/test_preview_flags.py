"""`generate --preview PATH [--preview-kind fast|exact] [--preview-every K]` from the command line."""

from __future__ import annotations

import pytest
from in_process_cli import cli
from PIL import Image

TINY = ["generate", "--prompt", "a fox", "--frames", "9", "--steps", "3", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("kind", ["fast", "exact"])
def test_the_cli_keeps_the_preview_and_writes_the_same_video(tmp_path, capsys, kind):
    """Fails when --preview (either kind) leaves no whole animated image, or changes the video's bytes."""
    plain, previewed, preview = tmp_path / "plain.mp4", tmp_path / "previewed.mp4", tmp_path / "p.webp"
    assert cli(capsys, *TINY, "--output", str(plain))[0] == 0
    flags = ["--preview", str(preview), "--preview-kind", kind, "--preview-every", "2"]
    assert cli(capsys, *TINY, "--output", str(previewed), *flags)[0] == 0
    assert previewed.read_bytes() == plain.read_bytes()
    with Image.open(preview) as image:
        assert image.format == "WEBP" and getattr(image, "n_frames", 1) == 3  # three latent frames


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--preview-every", "2"], "--preview-every goes with --preview PATH"),
        (["--preview-kind", "exact"], "--preview-kind goes with --preview PATH"),
        (["--preview", "{tmp}/p.webp", "--preview-kind", "slow"], "--preview-kind must be one of fast, exact"),
        (["--preview", "{tmp}/p.webp", "--preview-kind", ""], "--preview-kind must be one of fast, exact"),
        (["--preview", "{tmp}/p.webp", "--preview-every", "0"], "--preview-every must be a whole number of steps"),
        (["--preview", "{tmp}/p.webp", "--preview-every", "x"], "got 'x'"),
        (["--preview", "{tmp}/p.jpg"], "must end in .png"),
        (["--preview", "{tmp}/missing/p.webp"], "{tmp}/missing"),
        (["--preview", "{tmp}/out.png", "--frames", "1", "--output", "{tmp}/out.png"], "is the output itself"),
        (["--preview", "{tmp}/p.webp", "--preview-kind", "exact", "--offload-stages", "vae"], "VAE must stay"),
        (["--image", "{tmp}/in.png", "--preview", "{tmp}/in.png"], "preview '{tmp}/in.png' is the image"),
    ],
)
def test_bad_preview_flags_are_one_line_before_loading(tmp_path, capsys, monkeypatch, flags, words):
    """Fails when a preview flag that cannot work is not refused in one line, exit status 2, before the model
    loads and with nothing written."""
    from cosmos3_offload.app import runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_components", no_load)
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
    before = picture.read_bytes()
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    output = [] if "--output" in flags else ["--output", str(tmp_path / "out.mp4")]
    code, _, err = cli(capsys, *TINY, *output, *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert words.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"] and picture.read_bytes() == before
