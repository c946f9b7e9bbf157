"""Cosmos3's action modes through the server: `POST /v1/videos` with an `action` object (JSON, or a form with its
clip and rows as file parts) runs what `cosmos3_offload.run` runs, `GET /v1/videos/{id}/actions` serves the actions
it predicted, and every request the server cannot run is a one-line 400 naming the field, before anything queues.
The app is `serve`'s, in this process, on the embedded tiny model (which has action heads): tier 256, 2 steps,
chunk 4."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image
from server_process import InProcessServer

import cosmos3_offload
from cosmos3_offload.app.config import GenerationConfig
from cosmos3_offload.request.checks import FieldError
from cosmos3_offload.request.spec import FIELDS_BY_NAME

PROMPT = "the gripper picks up the red cup"
SEED = 3
CHUNK = 4
SLOW = {"frames": 17, "steps": 200}  # a plain job that runs until it is stopped
JOB_SECONDS = 120
ROWS = [[0.25, -0.5], [0.1, 0.3], [-0.2, 0.05]]  # forward dynamics' rows for pusht (2 numbers a row)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(tmp_path_factory.mktemp("storage"), "--steps", "2") as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A 320x192 image and a 5-frame 320x192 clip (the conditioning), and ROWS as a .npy."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (192, 320, 3), dtype=np.uint8)).save(folder / "frame.png")
    frames = [rng.integers(0, 255, (192, 320, 3), dtype=np.uint8) for _ in range(CHUNK + 1)]
    imageio.mimwrite(folder / "clip.mp4", frames, fps=24, codec="libx264", quality=10, macro_block_size=16)
    np.save(folder / "rows.npy", np.array(ROWS, dtype=np.float32))
    return folder


def data_url(path: Path, media: str) -> str:
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def create(server: InProcessServer, body: dict) -> tuple[int, dict]:
    payload = json.dumps(body).encode()  # NaN and Infinity as Python writes them (httpx refuses to)
    response = server.http.post("/v1/videos", content=payload, headers={"content-type": "application/json"})
    return response.status_code, response.json()


def finished(server: InProcessServer, video_id: str) -> dict:
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        video = server.http.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} did not finish")


def library_run(tmp_path: Path, **fields) -> Path:
    """`cosmos3_offload.run` of the same request (tier 256, 2 steps, SEED, guidance 6): its output's path."""
    output = tmp_path / "out.mp4"
    config = GenerationConfig(prompt=PROMPT, resolution=256, steps=2, seed=SEED, output=output, **fields)
    cosmos3_offload.run(config)
    return output


def test_a_policy_job_serves_the_actions_and_video_the_library_writes(server, inputs, tmp_path):
    """A JSON policy request completes; GET .../actions is the out.actions.json `cosmos3_offload.run` writes for the
    same request and seed (every number, byte for byte), /content its mp4; the job reports its action and size."""
    action = {"mode": "policy", "domain": "pusht", "chunk_size": CHUNK}
    image = data_url(inputs / "frame.png", "image/png")
    status, created = create(server, {"prompt": PROMPT, "seed": SEED, "input_reference": image, "action": action})
    assert status == 200, created
    video = finished(server, created["id"])
    assert video["status"] == "completed", video["error"]
    served = server.http.get(f"/v1/videos/{video['id']}/actions")
    assert served.status_code == 200 and served.headers["content-type"] == "application/json"

    output = library_run(tmp_path, action="policy", domain="pusht", chunk_size=CHUNK, image=inputs / "frame.png")
    expected = output.with_name("out.actions.json").read_text()
    assert served.json()["actions"] == json.loads(expected)["actions"] and served.text == expected
    assert server.http.get(f"/v1/videos/{video['id']}/content").content == output.read_bytes()
    reported = {"mode": "policy", "domain": "pusht", "chunk_size": CHUNK, "view": "ego_view", "tier": 256}
    assert video["parameters"]["action"] == reported | {"actions": False}
    height, width = imageio.get_reader(output).get_data(0).shape[:2]
    assert video["size"] == f"{width}x{height}" and video["parameters"]["input_video"] is False


def test_an_inverse_dynamics_form_takes_its_clip_as_input_video(server, inputs, tmp_path):
    """A multipart form: `action` as JSON text, the clip as the file part input_video; the actions served are the
    library's for the same clip."""
    action = json.dumps({"mode": "inverse_dynamics", "domain": "bridge_orig_lerobot", "chunk_size": CHUNK})
    response = server.http.post(
        "/v1/videos",
        data={"prompt": PROMPT, "seed": str(SEED), "action": action},
        files={"input_video": ("clip.mp4", (inputs / "clip.mp4").read_bytes(), "video/mp4")},
    )
    assert response.status_code == 200, response.json()
    video = finished(server, response.json()["id"])
    assert video["status"] == "completed", video["error"]
    assert video["parameters"]["input_video"] is True and video["parameters"]["input_reference"] is False
    served = server.http.get(f"/v1/videos/{video['id']}/actions").json()
    output = library_run(
        tmp_path, action="inverse_dynamics", domain="bridge_orig_lerobot", chunk_size=CHUNK, video=inputs / "clip.mp4"
    )
    assert served == json.loads(output.with_name("out.actions.json").read_text())
    assert np.array(served["actions"]).shape == (CHUNK, 10)


def test_forward_dynamics_rows_inline_or_as_a_file_part_drive_the_video(server, inputs, tmp_path):
    """Forward dynamics: rows inline in action.actions (JSON) and the same rows as an `actions` CSV file part give
    the library's video for those rows; the job predicts no actions, so GET .../actions is a 404."""
    image = data_url(inputs / "frame.png", "image/png")
    action = {"mode": "forward_dynamics", "domain": "pusht", "chunk_size": CHUNK}
    status, inline = create(
        server, {"prompt": PROMPT, "seed": SEED, "input_reference": image, "action": action | {"actions": ROWS}}
    )
    assert status == 200, inline
    csv = "x,y\n" + "\n".join(",".join(map(str, row)) for row in ROWS) + "\n"
    response = server.http.post(
        "/v1/videos",
        data={"prompt": PROMPT, "seed": str(SEED), "action": json.dumps(action)},
        files={
            "input_reference": ("frame.png", (inputs / "frame.png").read_bytes(), "image/png"),
            "actions": ("rows.csv", csv.encode(), "text/csv"),
        },
    )
    assert response.status_code == 200, response.json()
    output = library_run(
        tmp_path, action="forward_dynamics", domain="pusht", chunk_size=CHUNK, image=inputs / "frame.png",
        actions=inputs / "rows.npy",
    )  # fmt: skip
    for video_id in (inline["id"], response.json()["id"]):
        video = finished(server, video_id)
        assert video["status"] == "completed", video["error"]
        assert video["parameters"]["action"]["actions"] is True
        assert server.http.get(f"/v1/videos/{video_id}/content").content == output.read_bytes()
        missing = server.http.get(f"/v1/videos/{video_id}/actions")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_actions_are_409_until_completed_404_without_them_and_go_with_the_job(server, inputs):
    """A queued policy job's actions are a 409 (as /content is); a plain job's and an unknown id's a 404 in
    OpenAI's body; deleting a completed action job removes its actions files with it."""
    image = data_url(inputs / "frame.png", "image/png")
    status, running = create(server, {"prompt": "a fox", **SLOW})
    assert status == 200
    action = {"mode": "policy", "domain": "pusht", "chunk_size": CHUNK}
    status, waiting = create(server, {"prompt": PROMPT, "input_reference": image, "action": action})
    assert status == 200
    early = server.http.get(f"/v1/videos/{waiting['id']}/actions")
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready"
    plain = server.http.get(f"/v1/videos/{running['id']}/actions")
    assert plain.status_code == 404 and "no action run" in plain.json()["error"]["message"]
    unknown = server.http.get("/v1/videos/video_0123/actions")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert server.http.delete(f"/v1/videos/{running['id']}").status_code == 200

    assert finished(server, waiting["id"])["status"] == "completed"
    folder = server.storage / "jobs" / waiting["id"]
    assert {"video.actions.json", "video.actions.npy"} <= {p.name for p in folder.iterdir()}
    assert server.http.delete(f"/v1/videos/{waiting['id']}").status_code == 200
    assert not folder.exists()
    assert server.http.get(f"/v1/videos/{waiting['id']}/actions").status_code == 404


def problem(field: str, value) -> str:
    """The declaration's words for a value `field` refuses."""
    with pytest.raises(FieldError) as refused:
        FIELDS_BY_NAME[field].check(value)
    return refused.value.problem


POLICY = {"mode": "policy", "domain": "pusht"}
FORWARD = {"mode": "forward_dynamics", "domain": "pusht"}
IMAGE = "image"  # replaced by the image's data: URL
CLIP = "clip"  # replaced by the clip's data: URL


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"action": POLICY | {"speed": 2}}, "action.speed", "unknown parameter 'action.speed'"),
        ({"action": {"domain": "pusht"}}, "action.mode", "action.mode is required"),
        ({"action": {"mode": "policy"}}, "action.domain", "action.domain is required"),
        ({"action": POLICY | {"mode": "dance"}}, "action.mode", "action.mode " + problem("action", "dance")),
        (
            {"action": POLICY | {"domain": "unicycle"}},
            "action.domain",
            "action.domain " + problem("domain", "unicycle"),
        ),
        ({"action": POLICY | {"domain": "libero"}}, "action.domain", "has no fixed action width"),
        ({"action": POLICY | {"domain": "hand_pose"}}, "action.domain", "more than the 32 this server's action heads"),
        ({"action": POLICY | {"chunk_size": 0}}, "action.chunk_size", "action.chunk_size " + problem("chunk_size", 0)),
        ({"action": POLICY | {"view": "top_view"}}, "action.view", "action.view " + problem("view", "top_view")),
        ({"action": POLICY | {"tier": 768}}, "action.tier", "action.tier must be one of 256, 480, 704, 720"),
        ({"action": POLICY | {"tier": [480]}}, "action.tier", "action.tier must be one of 256, 480, 704, 720"),
        ({"action": POLICY | {"tier": 480.0}}, "action.tier", "action.tier must be one of 256, 480, 704, 720"),
        ({"action": "policy"}, "action", "action must be a JSON object"),
        ({"action": FORWARD}, "action.actions", "forward_dynamics rolls the video out of given actions"),
        ({"action": POLICY | {"actions": [[0.0, 0.0]]}}, "action.actions", "action.mode policy predicts them"),
        ({"action": FORWARD | {"actions": [[0.5, float("nan")]]}}, "action.actions", "row 1, column 2 is nan"),
        ({"action": FORWARD | {"actions": [[float("inf"), 0.5]]}}, "action.actions", "row 1, column 1 is inf"),
        ({"action": FORWARD | {"actions": [[0.5, 1e9]]}}, "action.actions", "is 1e+09, past ±10000"),
        ({"action": FORWARD | {"actions": [[0.5, 0.5, 0.5]]}}, "action.actions", "takes 2 numbers per row"),
        ({"action": FORWARD | {"actions": [[0.5, 0.5]] * 1025}}, "action.actions", "more than 1024 rows"),
        ({"action": FORWARD | {"actions": []}}, "action.actions", "holds no rows of actions"),
        ({"action": FORWARD | {"actions": [["up", 0.5]]}}, "action.actions", 'row 1, column 1 is "up"'),
        ({"action": POLICY, "frames": 9}, "frames", "frames does not go with an action"),
        ({"action": POLICY, "seconds": "1"}, "seconds", "seconds does not go with an action"),
        ({"action": POLICY, "size": "320x192"}, "size", "size does not go with an action"),
        ({"action": POLICY, "cache": "seacache"}, "cache", "cache does not go with an action"),
        ({"action": {"mode": "inverse_dynamics", "domain": "pusht"}}, "input_video", "send input_video"),
        ({"action": POLICY, "input_reference": None}, "input_reference", "send input_reference (an image)"),
        ({"action": POLICY, "input_video": CLIP}, "input_video", "not both"),
        ({"input_video": CLIP}, "input_video", "input_video conditions an action run"),
    ],
)
def test_a_request_the_server_cannot_run_is_a_one_line_400_naming_the_field(server, inputs, body, param, words):
    """Each refusal is a 400 in OpenAI's body, `param` naming the field (inside the action object: action.KEY),
    one line, and leaves no job and no folder behind."""
    body = {"prompt": PROMPT, "input_reference": IMAGE} | body
    urls = {IMAGE: data_url(inputs / "frame.png", "image/png"), CLIP: data_url(inputs / "clip.mp4", "video/mp4")}
    body = {name: urls.get(value, value) if isinstance(value, str) else value for name, value in body.items()}
    before = set((server.storage / "jobs").iterdir())
    status, answer = create(server, body)
    error = answer["error"]
    assert status == 400 and error["type"] == "invalid_request_error", answer
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error
    assert str(server.storage) not in error["message"]
    assert set((server.storage / "jobs").iterdir()) == before


@pytest.mark.parametrize(
    "form, files, param, words",
    [
        ({"action": "{not json"}, {}, "action", "action must be a JSON object"),
        ({"action": json.dumps(FORWARD)}, {"actions": ("rows.txt", b"1,2\n")}, "actions", "named .npy, .json or .csv"),
        ({"action": json.dumps(FORWARD)}, {"actions": ("rows.npy", b"\x93NUMPY junk")}, "actions", "cannot be read"),
        ({"action": json.dumps(FORWARD)}, {"actions": ("rows.csv", b"1,nan\n")}, "actions", "is nan, not a finite"),
        ({}, {"actions": ("rows.csv", b"1,2\n")}, "actions", "goes with an action object"),
        ({"action": json.dumps(POLICY)}, {"input_video": ("c.mp4", b"not a video")}, "input_video", "cannot be read"),
    ],
)
def test_a_form_refused_names_the_part(server, inputs, form, files, param, words):
    """In a multipart form the action's JSON text, its rows' file part and its clip are refused by name; a file
    that cannot be read is named by its part, never by the server's path."""
    parts = {"input_reference": ("frame.png", (inputs / "frame.png").read_bytes())} | files
    if "input_video" in files:
        del parts["input_reference"]
    response = server.http.post("/v1/videos", data={"prompt": PROMPT, **form}, files=parts)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param and words in error["message"], error
    assert "\n" not in error["message"] and str(server.storage) not in error["message"]


def test_a_budgeted_server_refuses_action_runs_past_its_planned_request(tmp_path, inputs):
    """With --vram-budget the plan fits 5 frames of 320x192: a chunk of 8 (9 frames) is a 400 naming
    action.chunk_size, tier 480's 832x480 canvas one naming action.tier; chunk 4 at tier 256 is taken."""
    flags = ("--vram-budget", "1GiB", "--frames", "5", "--resolution", "256", "--steps", "1")
    limit = "this server planned its memory for at most 5 frames of 320x192"
    image = data_url(inputs / "frame.png", "image/png")
    with InProcessServer(tmp_path / "storage", *flags) as budgeted:
        asked = {"action.chunk_size": {"chunk_size": 8}, "action.tier": {"chunk_size": 4, "tier": 480}}
        for param, extra in asked.items():
            status, answer = create(budgeted, {"prompt": PROMPT, "input_reference": image, "action": POLICY | extra})
            assert status == 400 and answer["error"]["param"] == param, answer
            assert answer["error"]["message"].startswith(limit)
        action = POLICY | {"chunk_size": 4}
        status, taken = create(budgeted, {"prompt": PROMPT, "input_reference": image, "action": action})
        assert status == 200, taken
        assert budgeted.http.delete(f"/v1/videos/{taken['id']}").status_code == 200


def test_a_model_without_action_heads_refuses_action_runs_before_queueing(tmp_path, published_checkpoint, inputs):
    """A checkpoint whose transformer has no action heads serves plain requests; an action request is a 400
    saying so (param `action`), and /health offers no action choices."""
    folder = tmp_path / "Cosmos3-Nano"
    shutil.copytree(published_checkpoint, folder)
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.unlink()  # the fixture's files are read-only
    config_file.write_text(json.dumps(config | {"action_gen": False}))
    with InProcessServer(tmp_path / "storage", "--checkpoint", str(folder), "--steps", "1") as headless:
        assert headless.http.get("/health").json()["actions"] is None
        image = data_url(inputs / "frame.png", "image/png")
        status, answer = create(headless, {"prompt": PROMPT, "input_reference": image, "action": POLICY})
        assert status == 400 and answer["error"]["param"] == "action", answer
        assert answer["error"]["message"].startswith("this server's model has no action heads")
        assert list((tmp_path / "storage" / "jobs").iterdir()) == []


def test_health_offers_the_domains_the_model_s_action_heads_take(server):
    """/health's `actions` lists the modes, the domains whose rows fit the 32-wide heads (not hand_pose's 57),
    the views and tiers, and the tier an action request gets by default (the tiny model's: 256)."""
    choices = server.http.get("/health").json()["actions"]
    assert choices["modes"] == ["forward_dynamics", "inverse_dynamics", "policy"]
    assert "pusht" in choices["domains"] and "galbot" in choices["domains"] and "hand_pose" not in choices["domains"]
    assert choices["tiers"] == [256, 480, 704, 720] and choices["tier"] == 256 and choices["chunk_size"] == 16
