"""Sample files in the action modes: cosmos-framework's action fields (`model_mode` forward_dynamics /
inverse_dynamics / wam, `domain_name`, `action_chunk_size`, `action_path`, `view_point`, `image_size`,
`raw_action_dim`), mixed with video samples in one batch, writing `actions.npy` and `actions.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import cosmos3_offload
from cosmos3_offload.app import runner
from cosmos3_offload.app.action_files import actions_from_json
from cosmos3_offload.app.cli import main
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.app.sample_files import read_samples, sample_fields
from cosmos3_offload.model import specs

TINY = ["--steps", "2", "--device", "cpu", "--no-progress"]  # the embedded tiny model: its action tier is 256
PROMPT = "the gripper picks up the red cup"
POLICY = {"name": "policy", "prompt": PROMPT, "model_mode": "wam", "domain_name": "pusht", "vision_path": "frame.png",
          "action_chunk_size": 4, "seed": 3}  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A 64x96 image, a 5-frame 64x96 clip and 3 rows of bridge_orig_lerobot actions (10 numbers) as JSON."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / "frame.png")
    iio.imwrite(folder / "clip.mp4", rng.integers(0, 255, (5, 64, 96, 3), dtype=np.uint8), fps=24)
    (folder / "rows.json").write_text(json.dumps(rng.uniform(-1, 1, (3, 10)).round(3).tolist()))
    return folder


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def generate(capsys, files: list[Path], out: Path, *flags: str) -> tuple[int, str, str]:
    try:
        code = main(["generate", "-i", *map(str, files), "-o", str(out), *TINY, *flags])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_action_samples_run_beside_a_video_sample_and_write_their_actions(capsys, inputs, tmp_path):
    """A policy (`wam`), a forward_dynamics (action_path .json) and an inverse_dynamics (a clip) sample run
    in one batch with a video sample, each with its own defaults; the predicting modes write actions.*."""
    samples = [
        POLICY,
        {"name": "fd", "prompt": PROMPT, "model_mode": "forward_dynamics", "domain_name": "bridge_orig_lerobot",
         "vision_path": "frame.png", "action_path": "rows.json", "action_chunk_size": 4, "image_size": 256},
        {"name": "id", "prompt": PROMPT, "model_mode": "inverse_dynamics", "domain_name": "av",
         "vision_path": "clip.mp4", "action_chunk_size": 4, "view_point": "third_person_view", "raw_action_dim": 9},
        {"name": "video", "prompt": "a fox", "num_frames": 5},
    ]  # fmt: skip
    code, out, err = generate(capsys, [write(inputs / "batch.json", samples)], tmp_path / "out")
    assert code == 0 and err == "", err
    folders = {name: tmp_path / "out" / name for name in ("policy", "fd", "id", "video")}
    written = {name: sorted(p.name for p in folder.iterdir()) for name, folder in folders.items()}
    records = ["sample_args.json", "sample_outputs.json", "vision.mp4"]
    assert written["policy"] == written["id"] == sorted(records + ["actions.json", "actions.npy"])
    assert written["fd"] == written["video"] == records
    for name, width in (("policy", 2), ("id", 9)):
        saved = np.load(folders[name] / "actions.npy")
        assert saved.shape == (4, width) and np.array_equal(saved, actions_from_json(
            (folders[name] / "actions.json").read_text()))  # fmt: skip
        outputs = json.loads((folders[name] / "sample_outputs.json").read_text())
        assert outputs["files"] == ["vision.mp4", "actions.npy", "actions.json"]
    assert iio.imread(folders["policy"] / "vision.mp4").shape == (5, 64, 96, 3)  # chunk 4: 5 frames, the input's size
    assert iio.imread(folders["video"] / "vision.mp4").shape == (5, 192, 320, 3)  # the tiny model's 256 tier, 16,9
    args = {name: json.loads((folders[name] / "sample_args.json").read_text()) for name in folders}
    assert {k: args["id"][k] for k in ("model_mode", "domain_name", "action_chunk_size", "view_point")} == {
        "model_mode": "inverse_dynamics", "domain_name": "av", "action_chunk_size": 4, "view_point": "third_person_view"
    }  # fmt: skip
    assert (args["id"]["raw_action_dim"], args["id"]["image_size"], args["id"]["num_frames"]) == (9, 256, 5)
    assert args["policy"]["model_mode"] == "policy" and args["policy"]["view_point"] == "ego_view"
    assert args["fd"]["action_path"] == str(inputs / "rows.json") and args["policy"]["action_path"] is None
    assert args["video"]["model_mode"] == "text2video" and args["video"]["domain_name"] is None
    assert "policy: wrote" in out and "policy, pusht, chunk 4: 5 frames, 96x64, 2 steps) and actions.npy" in out
    assert "samples: 4 written" in out


def test_a_policy_sample_writes_the_actions_the_library_writes(capsys, inputs, tmp_path):
    """`wam` is policy: the sample's actions.json holds the numbers `cosmos3_offload.run` writes for the
    same request and seed (out.actions.json)."""
    code, _, err = generate(capsys, [write(inputs / "policy.json", POLICY)], tmp_path / "out")
    assert code == 0, err
    config = GenerationConfig(prompt=PROMPT, action="policy", domain="pusht", image=inputs / "frame.png",
                              chunk_size=4, resolution=256, steps=2, seed=3, output=tmp_path / "out.mp4")  # fmt: skip
    report = cosmos3_offload.run(config, device="cpu", progress=False)
    ours = actions_from_json((tmp_path / "out" / "policy" / "actions.json").read_text())
    library = actions_from_json((tmp_path / "out.actions.json").read_text())
    assert ours.shape == (4, 2) and np.array_equal(ours, library) and np.array_equal(ours, report.actions)


def test_bad_action_samples_are_refused_one_line_each_and_the_rest_run(capsys, inputs, tmp_path):
    """An unknown domain, a raw_action_dim that is not the domain's width and inverse_dynamics from an image
    refuse their own sample, one line each, before anything loads; the good sample runs; exit 2."""
    samples = [
        POLICY | {"name": "domain", "domain_name": "unicycle"},
        POLICY | {"name": "width", "raw_action_dim": 7},
        POLICY | {"name": "image", "model_mode": "inverse_dynamics"},
        {"name": "still", "prompt": "a cat", "num_frames": 1},
    ]
    code, out, err = generate(capsys, [write(inputs / "bad.json", samples)], tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3, err
    assert "(domain): refused: domain_name must be one of no_action, av," in lines[0] and "got 'unicycle'" in lines[0]
    assert "(width): refused: raw_action_dim 7 does not match domain_name 'pusht', whose actions have 2" in lines[1]
    assert "(image): refused: model_mode 'inverse_dynamics' infers the actions of a clip: vision_path must be a video" \
        in lines[2]  # fmt: skip
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["still"] and "1 written, 0 failed, 3 refused" in out


def test_a_model_without_action_heads_refuses_the_action_samples_and_runs_the_others(
    capsys, inputs, tmp_path, monkeypatch
):
    """Opened once without heads, the model refuses each action sample (one line) and writes the video ones."""
    tiny = specs.MODEL_SPECS["tiny"]
    headless = dataclasses.replace(tiny, transformer={**tiny.transformer, "action_gen": False})
    monkeypatch.setitem(specs.MODEL_SPECS, "tiny", headless)
    opened = []
    original = runner.LoadedModel.open.__func__
    monkeypatch.setattr(
        runner.LoadedModel, "open", classmethod(lambda cls, **k: opened.append(k) or original(cls, **k))
    )
    samples = [POLICY, {"name": "still", "prompt": "a cat", "num_frames": 1}]
    code, out, err = generate(capsys, [write(inputs / "mixed.json", samples)], tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "(policy): refused: --action needs a transformer with action heads" in err and "has none" in err
    assert [k["actions"] for k in opened] == [False]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["still"] and "1 written, 0 failed, 1 refused" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"domain_name": None}, "model_mode 'wam' needs domain_name, the embodiment: one of av,"),
        ({"domain_name": "libero"}, "domain_name 'libero' has no fixed action width"),
        ({"raw_action_dim": "2"}, "raw_action_dim '2' does not match"),
        ({"vision_path": None}, "model_mode 'wam' starts from a frame: set vision_path"),
        ({"action_path": "rows.json"}, "action_path drives forward_dynamics; model_mode 'wam' predicts the actions"),
        ({"model_mode": "forward_dynamics"}, "rolls the video out of given actions: set action_path"),
        ({"num_frames": 5}, "num_frames does not go with model_mode 'wam': action_chunk_size fixes the video"),
        ({"aspect_ratio": "1,1"}, "aspect_ratio does not go with model_mode 'wam'"),
        ({"image_size": 768}, "image_size 768 is no action tier; with model_mode 'wam' use one of 256, 480, 704, 720"),
        ({"resolution": "480", "image_size": 256}, "resolution 480 and image_size 256 disagree"),
        ({"action_chunk_size": 0}, "action_chunk_size must be a whole number from 1 to 1024, got 0"),
        ({"view_point": "top_view"}, "view_point must be one of ego_view,"),
        ({"model_mode": "dance"}, "model_mode must be one of text2image, text2video, image2video, video2video, "
                                  "forward_dynamics, inverse_dynamics, policy, wam, got 'dance'"),
        ({"model_mode": None}, "domain_name goes with an action model_mode"),
        ({"model_mode": "image2video", "domain_name": None, "action_chunk_size": None, "image_size": 256},
         "image_size goes with an action"),
    ],
)  # fmt: skip
def test_action_fields_are_checked_in_the_files_words(tmp_path, extra, message):
    """Each contradiction of an action sample refuses it naming the fields as the sample file spells them."""
    (sample,) = read_samples([write(tmp_path / "a.json", {k: v for k, v in (POLICY | extra).items() if v is not None})])
    assert sample.error is not None and message in sample.error, sample.error


def test_image_size_is_the_action_tier_and_wam_is_policy(tmp_path):
    """cosmos-framework's inference passes `image_size` as the action resolution; `wam` is its name of policy."""
    fields = sample_fields(POLICY | {"image_size": "480", "raw_action_dim": 2}, tmp_path)
    assert (fields["action"], fields["resolution"], fields["domain"], fields["chunk_size"]) == (
        "policy",
        480,
        "pusht",
        4,
    )
    assert sample_fields(POLICY | {"resolution": 704, "image_size": 704}, tmp_path)["resolution"] == 704
    fd = POLICY | {"model_mode": "forward_dynamics", "action_path": "in/rows.npy"}
    assert (
        sample_fields(fd, tmp_path)["actions"] == tmp_path / "in" / "rows.npy"
    )  # relative to the file, as vision_path
