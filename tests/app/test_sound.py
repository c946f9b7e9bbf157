"""`generate --sound`: the audio track is generated, decoded and muxed into the mp4."""

from __future__ import annotations

import json
import shutil
import subprocess
import wave

import imageio_ffmpeg
import numpy as np
import pytest
from published_layout import write_published_checkpoint

from cosmos3_offload.app.cli import main
from cosmos3_offload.app.video_io import write_wav


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published_checkpoint(tmp_path_factory.mktemp("hub") / "Cosmos3-Nano")


def streams(path) -> str:
    """ffmpeg's description of a media file's streams (it prints them on stderr)."""
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    return probe.stderr


def generate(capsys, *args) -> tuple[int, str, str]:
    try:
        status = main(
            [
                "generate",
                "--prompt",
                "a fox",
                "--resolution",
                "256",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--no-progress",
                *args,
            ]
        )
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_sound_is_muxed_into_the_mp4(capsys, tmp_path, published):
    """--sound writes an mp4 with an H.264 video stream and a stereo AAC audio stream (AAC resamples the toy 200 Hz)."""
    output = tmp_path / "fox.mp4"
    status, out, _ = generate(
        capsys, "--checkpoint", str(published), "--frames", "9", "--sound", "--output", str(output)
    )
    assert status == 0 and "with sound" in out
    description = streams(output)
    assert "Video: h264" in description and "Audio: aac" in description and "stereo" in description


def test_without_sound_the_mp4_is_silent(capsys, tmp_path, published):
    output = tmp_path / "fox.mp4"
    status, _, _ = generate(capsys, "--checkpoint", str(published), "--frames", "5", "--output", str(output))
    assert status == 0 and "Audio:" not in streams(output)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sound", "--frames", "5"], "sound_tokenizer"),  # the embedded model has no sound branch
        (["--sound", "--frames", "1", "--output", "x.jpg"], "--sound goes with a video"),
    ],
)
def test_sound_errors_are_one_line_exit_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    status, _, err = generate(capsys, *args)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_wav_holds_the_waveform_as_16_bit_pcm(tmp_path):
    """Channels, rate and samples survive: interleaved int16 of the clipped waveform."""
    waveform = np.stack([np.linspace(-1.5, 1.5, 50), np.zeros(50)]).astype(np.float32)
    write_wav(waveform, 200, tmp_path / "s.wav")
    with wave.open(str(tmp_path / "s.wav")) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getnframes(), wav.getsampwidth()) == (2, 200, 50, 2)
        pcm = np.frombuffer(wav.readframes(50), dtype="<i2").reshape(50, 2)
    assert pcm[0, 0] == -32767 and pcm[-1, 0] == 32767 and not pcm[:, 1].any()


def test_plan_counts_the_sound_decoder(capsys, published):
    """`plan --sound` plans the sound decoder with the VAE; without a sound tokenizer it is refused."""
    base = ["plan", "--vram-budget", "1GiB", "--resolution", "256", "--frames", "9", "--h2d-gbps", "55"]
    statuses = []
    for extra in (["--checkpoint", str(published)], ["--checkpoint", str(published), "--sound"], ["--sound"]):
        try:
            statuses.append(main([*base, *extra]))
        except SystemExit as exit_:
            statuses.append(exit_.code)
    out, err = capsys.readouterr()
    assert statuses == [0, 0, 2] and "request: 320x192, 9 frames" in out
    assert "--sound needs a --checkpoint with a sound_tokenizer/" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "other"}, "cannot build a Cosmos3AVAEAudioTokenizer"),
        ({"sampling_rate": 1e300}, "sampling_rate"),
        ({"sampling_rate": 0}, "sampling_rate"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "plan"])
def test_a_sound_tokenizer_config_that_cannot_run_is_refused(capsys, tmp_path, published, change, message, command):
    """A sound config the class rejects or with a sampling rate no audio has: one line, exit 2, nothing written."""
    folder = tmp_path / "ckpt"
    shutil.copytree(published, folder)
    config_file = folder / "sound_tokenizer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    output = tmp_path / "o.mp4"
    args = ["--checkpoint", str(folder), "--sound", "--frames", "5", "--resolution", "256"]
    if command == "plan":
        argv = ["plan", "--vram-budget", "1GiB", *args]
    else:
        argv = ["generate", "--prompt", "a fox", "--device", "cpu", "--no-progress", "--output", str(output), *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0]
    assert not output.exists()
