"""The server driven by the official `openai` client (and raw HTTP where the client cannot say it): jobs,
files, errors, paging, the key, the queue bound, health and metrics on the app `serve` builds, in this
process (`InProcessServer`: the real CLI and app, through an ASGI transport); a real server process where
the process is what is tested: a stop by SIGTERM, a SIGKILL, the restart after each, a second `serve` on
the storage it holds."""

from __future__ import annotations

import base64
import io
import json
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from server_process import InProcessServer, ServerProcess, wait_for_video

from cosmos3_offload.app import cli, runner
from cosmos3_offload.serve import service

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

PROMPT = "a red fox running through fresh snow"
SHORT = {"frames": 5, "steps": 2}  # the tiny model's quickest video
SLOW = {"frames": 17, "steps": 200}  # a job that runs until it is stopped
JOB_SECONDS = 120


def client_for(server: InProcessServer | ServerProcess, key: str = "unused") -> openai.OpenAI:
    """The openai client on `server`: through its ASGI transport in this process, over loopback to a process."""
    http_client = getattr(server, "http", None)  # None: openai's own, on the network
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60, http_client=http_client)


def wait(client: openai.OpenAI, video_id: str, *, until=("completed", "failed")):
    return wait_for_video(client, video_id, JOB_SECONDS, until=until)


def http(server: InProcessServer, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, parsed JSON or text) of a raw request."""
    response = server.http.request(method, path, content=body, headers=headers or {})
    kind = response.headers.get("content-type", "")
    return response.status_code, response.json() if kind.startswith("application/json") else response.text


def post_json(server: InProcessServer, path: str, payload: dict, headers=None):
    return http(
        server, "POST", path, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})}
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's app: `serve` with its default flags, built once in this process."""
    with InProcessServer(tmp_path_factory.mktemp("storage")) as running:
        yield running


def test_a_video_job_returns_what_generate_writes(server, tmp_path):
    """create -> retrieve until completed -> download_content: the same mp4 bytes as `generate` with the
    same prompt, size, frames, steps and seed; the job reports its resolved parameters and progress 100."""
    client = client_for(server)
    created = client.videos.create(prompt=PROMPT, size="320x192", extra_body={**SHORT, "seed": 7})
    assert created.status in ("queued", "in_progress") and created.object == "video" and created.size == "320x192"
    video = wait(client, created.id)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.model_extra["parameters"]["seed"] == 7 and video.model_extra["parameters"]["frames"] == 5
    content = client.videos.download_content(created.id).read()
    expected = tmp_path / "generate.mp4"
    args = ["generate", "--prompt", PROMPT, "--frames", "5", "--steps", "2", "--seed", "7", "--output", str(expected)]
    assert cli.main([*args, "--no-progress"]) == 0
    assert content == expected.read_bytes()


def test_an_image_equals_generate_with_one_frame(server, tmp_path):
    """images.generate returns the PNG that `generate --frames 1` writes for the same seed and size."""
    client = client_for(server)
    result = client.images.generate(prompt=PROMPT, size="256x256", extra_body={"steps": 2, "seed": 5})
    assert len(result.data) == 1
    served = np.asarray(Image.open(_png(result.data[0].b64_json, tmp_path / "served.png")))
    expected = tmp_path / "generate.png"
    args = ["generate", "--prompt", PROMPT, "--frames", "1", "--resolution", "256", "--aspect-ratio", "1,1"]
    assert cli.main([*args, "--steps", "2", "--seed", "5", "--output", str(expected), "--no-progress"]) == 0
    assert served.shape == (256, 256, 3)
    assert np.array_equal(served, np.asarray(Image.open(expected)))


def test_several_images_take_consecutive_seeds(server, tmp_path):
    """images.generate with n=2 runs seeds 40 and 41 and returns two different images."""
    client = client_for(server)
    result = client.images.generate(prompt=PROMPT, n=2, extra_body={"steps": 1, "seed": 40})
    assert [item.model_extra["seed"] for item in result.data] == [40, 41]
    first, second = (
        np.asarray(Image.open(_png(item.b64_json, tmp_path / f"{i}.png"))) for i, item in enumerate(result.data)
    )
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"size": "100x100"}, "size"),
        ({"frames": 6}, None),
        ({"frames": 1}, "frames"),
        ({"seconds": "0"}, "seconds"),
        ({"seconds": "2", "frames": 9}, "seconds"),
        ({"steps": "many"}, "steps"),
        ({"guidance": "nan"}, "guidance"),
        ({"colour": "red"}, None),
        ({"input_reference": "https://example.com/cat.png"}, "input_reference"),
    ],
)
def test_bad_requests_are_400_with_the_openai_error_shape(server, fields, param):
    """A field the model cannot take is a 400 in OpenAI's error shape, naming the field (param) it can."""
    client = client_for(server)
    with pytest.raises(openai.BadRequestError) as raised:
        client.videos.create(prompt=PROMPT, extra_body=fields)
    error = raised.value.body
    assert raised.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_seconds_are_taken_and_numbers_past_reason_are_400(server):
    """OpenAI's `seconds` was refused as "not both" whenever the server had a default frame count (always); a
    400-digit `n` or an id past SQLite's integers as `after` were 500s."""
    created = server.http.post("/v1/videos", json={"prompt": "a fox", "seconds": "0.2", "steps": 1})
    assert created.status_code == 200, created.text
    assert created.json()["parameters"]["frames"] == 5 and created.json()["seconds"] == "0.2"
    also = server.http.post("/v1/videos", json={"prompt": "a fox", "seconds": 0.2, "frames": None, "steps": 1})
    assert also.status_code == 200, also.text
    huge = server.http.post("/v1/images/generations", json={"prompt": "a", "n": int("9" * 400)})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "n"
    listed = server.http.get("/v1/videos", params={"after": "video_8" + "0" * 15 + "a" * 16})
    assert listed.status_code == 400 and listed.json()["error"]["param"] == "after"
    for job in (created, also):
        server.http.delete(f"/v1/videos/{job.json()['id']}")


def test_bad_bodies_and_prompts_are_400_never_500(server):
    """Bodies that are no JSON object, bad or missing prompts, n too large, a bad limit: 400; a missing video: 404."""
    for body, kind in (
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"prompt=x", "text/plain"),
        (json.dumps({"prompt": "   "}).encode(), "application/json"),
        (json.dumps({"prompt": 5}).encode(), "application/json"),
        (json.dumps({"size": "320x192"}).encode(), "application/json"),
        (json.dumps({"prompt": "x" * 20_001}).encode(), "application/json"),
    ):
        status, answer = http(server, "POST", "/v1/videos", body, {"content-type": kind})
        assert status == 400, (body[:40], answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    status, answer = post_json(server, "/v1/images/generations", {"prompt": PROMPT, "n": 9})
    assert status == 400 and answer["error"]["param"] == "n"
    status, answer = http(server, "GET", "/v1/videos/video_missing")
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer = http(server, "GET", "/v1/videos?limit=0")
    assert status == 400 and answer["error"]["param"] == "limit"


def test_an_image_to_video_job_takes_an_uploaded_image(server, tmp_path):
    """input_reference as a multipart file: the job conditions on it; a file that is no image is a 400."""
    picture = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(picture)
    client = client_for(server)
    video = client.videos.create(prompt=PROMPT, input_reference=picture.open("rb"), extra_body=SHORT)
    assert wait(client, video.id).status == "completed"
    assert client.videos.retrieve(video.id).model_extra["parameters"]["input_reference"] is True
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(openai.BadRequestError):
        client.videos.create(prompt=PROMPT, input_reference=broken.open("rb"), extra_body=SHORT)


def test_list_pages_and_delete(server):
    """The list is newest first and pages with `after`; delete removes a finished job and its file."""
    client = client_for(server)
    ids = [client.videos.create(prompt=f"{PROMPT} {i}", extra_body={**SHORT, "steps": 1}).id for i in range(3)]
    for video_id in ids:
        wait(client, video_id)
    page = client.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    rest = client.videos.list(limit=2, after=ids[1])
    assert rest.data[0].id == ids[0]
    assert [v.id for v in client.videos.list(order="asc", after=ids[0], limit=2).data] == ids[1:]
    deleted = client.videos.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(ids[0])


def test_health_and_metrics(server):
    """/health says ok on the CPU; /metrics counts the completed jobs and steps (a 2-step job runs here first,
    so the test needs no other) and reports the queue length and the memory gauges."""
    client = client_for(server)
    assert wait(client, client.videos.create(prompt=PROMPT, extra_body=SHORT).id).status == "completed"
    status, health = http(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["device"] == "cpu"
    status, text = http(server, "GET", "/metrics")
    assert status == 200
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values['cosmos3_jobs{state="completed"}'] >= 1 and values["cosmos3_step_seconds_count"] >= 2
    assert {"cosmos3_queue_length", "cosmos3_device_peak_bytes", "cosmos3_host_resident_bytes"} <= set(values)


def test_a_full_queue_answers_429_and_deleting_cancels(tmp_path):
    """One job runs, one waits (--queue-size 1), the next is refused with 429; deleting the waiting job
    frees its place, deleting the running one stops it; both are gone afterwards."""
    with InProcessServer(tmp_path / "storage", "--queue-size", "1") as server:
        client = client_for(server)
        running = client.videos.create(prompt=PROMPT, extra_body=SLOW)
        wait(client, running.id, until=("in_progress",))
        waiting = client.videos.create(prompt=PROMPT, extra_body=SLOW)
        with pytest.raises(openai.RateLimitError) as raised:
            client.videos.create(prompt=PROMPT, extra_body=SLOW)
        assert raised.value.status_code == 429 and raised.value.body["code"] == "rate_limit_exceeded"
        assert client.videos.delete(waiting.id).deleted
        again = client.videos.create(prompt=PROMPT, extra_body=SHORT)  # room again
        assert client.videos.delete(running.id).deleted
        assert wait(client, again.id).status == "completed"  # the stopped job let it run
        assert {v.id for v in client.videos.list().data} == {again.id}
        folders = {p.name for p in (tmp_path / "storage" / "jobs").iterdir()}
        assert folders == {again.id}  # the deleted jobs' files are gone


def test_the_api_key_is_required(tmp_path):
    """With --api-key, /v1 and /metrics answer 401 to a wrong or missing key, /health needs none, the key works."""
    key = "s3cret-key-123"
    with InProcessServer(tmp_path / "storage", "--api-key", key) as server:
        with pytest.raises(openai.AuthenticationError) as raised:
            client_for(server, "wrong-key").videos.list()
        assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
        assert http(server, "GET", "/v1/videos")[0] == 401
        assert http(server, "GET", "/metrics")[0] == 401
        assert http(server, "GET", "/health")[0] == 200  # probes need no key
        assert client_for(server, key).videos.list().data == []


def test_a_restart_keeps_finished_jobs_and_fails_interrupted_ones(tmp_path, capsys):
    """A server process holds its storage: a second `serve` on it exits 2 before loading. SIGTERM stops it with
    exit 0 and fails the jobs running or waiting; an images request waiting then is answered 503 server_stopped
    in OpenAI's body (it was cancelled into a plain-text 500); after a restart the completed job and its file
    are kept and the two others read failed (server_stopped)."""
    from cosmos3_offload.main import main

    storage = tmp_path / "storage"
    with ServerProcess(storage) as server:
        client = client_for(server)
        done = client.videos.create(prompt=PROMPT, extra_body=SHORT)
        wait(client, done.id)
        content = client.videos.download_content(done.id).read()
        running = client.videos.create(prompt=PROMPT, extra_body=SLOW)
        wait(client, running.id, until=("in_progress",))
        waiting = client.videos.create(prompt=PROMPT, extra_body=SHORT)
        with pytest.raises(SystemExit) as refused:  # the real `serve` command, from this process
            main(["serve", "--port", "0", "--storage", str(storage), "--no-progress"])
        assert refused.value.code == 2 and "in use by another server" in capsys.readouterr().err
        answered: list[tuple[int, dict]] = []
        image = threading.Thread(target=lambda: answered.append(_post(server.url, "/v1/images/generations")))
        image.start()
        while client.videos.retrieve(running.id).status != "in_progress" or _queue_length(server.url) < 2:
            time.sleep(0.05)
        assert server.stop(signal.SIGTERM) == 0
        image.join(30)
        assert answered and answered[0][0] == 503 and answered[0][1]["error"]["code"] == "server_stopped", answered
    assert "3 unfinished job(s) marked failed" in server.output  # the image too
    with InProcessServer(storage) as restarted:
        client = client_for(restarted)
        kept = client.videos.retrieve(done.id)
        assert kept.status == "completed" and client.videos.download_content(done.id).read() == content
        for video_id in (running.id, waiting.id):
            failed = client.videos.retrieve(video_id)
            assert failed.status == "failed" and failed.error.code == "server_stopped"


def _post(url: str, path: str) -> tuple[int, dict]:
    """(status, JSON body) of a POST of an image request to a server over HTTP."""
    body = json.dumps({"prompt": PROMPT, "steps": 1}).encode()
    request = urllib.request.Request(url + path, body, {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _queue_length(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.loads(response.read())["queue_length"]


def test_a_killed_server_marks_its_running_job_failed_at_restart(tmp_path):
    """SIGKILL leaves a job in progress in the database; the next start marks it failed and removes its
    partial files, and the server takes new jobs."""
    storage = tmp_path / "storage"
    with ServerProcess(storage) as server:
        client = client_for(server)
        running = client.videos.create(prompt=PROMPT, extra_body=SLOW)
        wait(client, running.id, until=("in_progress",))
        server.stop(signal.SIGKILL)
    with InProcessServer(storage) as restarted:
        client = client_for(restarted)
        failed = client.videos.retrieve(running.id)
        assert failed.status == "failed" and failed.error.code == "server_restarted"
        assert list((storage / "jobs" / running.id).iterdir()) == []
        assert wait(client, client.videos.create(prompt=PROMPT, extra_body=SHORT).id).status == "completed"


def _png(b64: str, path: Path) -> Path:
    path.write_bytes(base64.b64decode(b64))
    return path


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port must be"),
        (["--api-key", "short"], "--api-key must be at least"),
        (["--queue-size", "0"], "--queue-size must be"),
        (["--host", "not a host"], "--host"),
        (["--gpus", "2"], "serve runs each job on one replica's GPUs"),
        (["--image", "x.png"], "--image belongs to a request"),
        (["--frames", "6"], "frame count"),
        (["--vram-budget", "8GiB", "--offload-stages", "vae"], "not both"),
        (["--replicas", "0"], "--replicas must be"),
        (["--replicas", "2", "--gpus-per-replica", "9"], "--gpus-per-replica must be a whole number from 1 to 8"),
        (["--gpus-per-replica", "3"], "sequence-parallel over 3"),  # the tiny model's 2 key/value heads
        (["--ray-address", " "], "--ray-address must name a cluster"),
        (["--preview-every", "0"], "--preview-every must be a whole number of steps"),
    ],
)
def test_bad_serve_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    """A serve flag it cannot take: one line on stderr, exit status 2, and no storage folder created."""
    from cosmos3_offload.main import main

    with pytest.raises(SystemExit) as raised:
        main(["serve", "--storage", str(tmp_path / "storage"), *flags])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "storage").exists()


def test_a_port_in_use_and_a_storage_file_are_refused_before_loading(tmp_path, capsys):
    """A port another socket holds, and a --storage that is a file: exit 2 with the reason, before loading."""
    import socket

    from cosmos3_offload.main import main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(SystemExit) as raised:
            main(["serve", "--port", str(taken.getsockname()[1]), "--storage", str(tmp_path / "s")])
        assert raised.value.code == 2 and "is in use" in capsys.readouterr().err
    finally:
        taken.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as raised:
        main(["serve", "--port", "0", "--storage", str(tmp_path / "file")])
    assert raised.value.code == 2 and "is a file" in capsys.readouterr().err


# Hostile requests (issue 23): each answered with OpenAI's error body, never a 500.


def test_json_nested_too_deep_and_lists_where_text_belongs_are_400_naming_the_field(server):
    """A body nested 100,000 deep (Python's parser raises RecursionError), and a list or object given for
    text fields (output_format, size, model, an ignored OpenAI field): 400, with `param` naming the field."""
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = http(server, "POST", "/v1/videos", deep, {"content-type": "application/json"})
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    for path, field, value in (
        ("/v1/images/generations", "output_format", ["png"]),
        ("/v1/images/generations", "output_format", {"png": 1}),
        ("/v1/images/generations", "size", ["256x256"]),
        ("/v1/images/generations", "quality", {"high": True}),
        ("/v1/images/generations", "response_format", ["b64_json"]),
        ("/v1/videos", "size", {"w": 320}),
        ("/v1/videos", "model", ["cosmos3"]),
        ("/v1/videos", "prompt", ["a fox"]),
    ):
        status, answer = post_json(server, path, {"prompt": PROMPT, field: value})
        assert status == 400 and answer["error"]["param"] == field, (path, field, answer)


def test_a_form_keeps_non_ascii_text_as_the_client_sent_it(server):
    """A urlencoded form with raw UTF-8 bytes (curl -d), one percent-escaped, and a multipart form: the job's
    prompt is the text sent, not its bytes read as Latin-1; a form that is not UTF-8 is a 400."""
    prompt = "un renard roux dans la neige, été 狐"
    bodies = (
        (f"prompt={prompt}&frames=5".encode(), "application/x-www-form-urlencoded"),
        (urllib.parse.urlencode({"prompt": prompt, "frames": 5}).encode(), "application/x-www-form-urlencoded"),
    )
    created = [http(server, "POST", "/v1/videos", body, {"content-type": kind}) for body, kind in bodies]
    created.append(_multipart(server, {"prompt": prompt, "frames": "5"}))
    for status, video in created:
        assert status == 200, video
        assert video["prompt"] == prompt and video["parameters"]["prompt"] == prompt
        assert http(server, "DELETE", f"/v1/videos/{video['id']}")[0] == 200
    status, answer = http(
        server, "POST", "/v1/videos", b"prompt=caf%E9", {"content-type": "application/x-www-form-urlencoded"}
    )
    assert status == 400 and "UTF-8" in answer["error"]["message"]


def test_a_missing_job_is_404_without_echoing_a_huge_id(server):
    """A 10,000-character id (and one with an escape sequence) is named in the 404 cut short and escaped."""
    for video_id in ("v" * 10_000, "video_\x1b[31mred"):
        status, answer = http(server, "GET", f"/v1/videos/{urllib.parse.quote(video_id)}")
        message = answer["error"]["message"]
        assert status == 404 and len(message) < 120 and "\x1b" not in message, message
        assert http(server, "DELETE", f"/v1/images/{urllib.parse.quote(video_id)}")[0] == 404


def test_the_api_has_no_docs_pages(server):
    """/docs, /redoc and /openapi.json are not served (the API is OpenAI's; no schema of its internals)."""
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert http(server, "GET", path)[0] == 404, path


def test_content_answers_head_and_a_file_removed_behind_the_server_is_410(server):
    """HEAD on a completed video's content answers GET's status and headers without the body; once the mp4
    is removed behind the server's back, GET and HEAD answer 410 (GET with OpenAI's error body), not 500."""
    client = client_for(server)
    video = wait(client, client.videos.create(prompt=PROMPT, extra_body={**SHORT, "steps": 1}).id)
    path = f"/v1/videos/{video.id}/content"
    got, head = server.http.get(path), server.http.head(path)
    assert got.status_code == head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == "video/mp4"
    (server.storage / "jobs" / video.id / "video.mp4").unlink()
    status, answer = http(server, "GET", path)
    assert status == 410 and answer["error"]["code"] == "file_gone"
    assert server.http.head(path).status_code == 410


def test_paging_after_a_deleted_job_continues_where_it_was(server):
    """The job a client pages `after` may be deleted between two pages: the next page still starts after its
    place (ids carry their order), in both orders."""
    client = client_for(server)
    ids = [client.videos.create(prompt=f"{PROMPT} {i}", extra_body={**SHORT, "steps": 1}).id for i in range(3)]
    for video_id in ids:
        wait(client, video_id)
    first = client.videos.list(limit=2)
    assert [v.id for v in first.data] == [ids[2], ids[1]]
    client.videos.delete(ids[1])  # the cursor
    assert client.videos.list(limit=2, after=ids[1]).data[0].id == ids[0]
    assert [v.id for v in client.videos.list(order="asc", after=ids[1]).data] == [ids[2]]


def test_each_image_has_its_job_id_and_can_be_deleted(server):
    """An images response gives each image its job `id`; DELETE /v1/images/{id} removes the job and its file
    (then 404), and a video route does not take an image's id."""
    result = client_for(server).images.generate(prompt=PROMPT, n=2, extra_body={"steps": 1, "seed": 3})
    ids = [item.model_extra["id"] for item in result.data]
    assert len(set(ids)) == 2 and all(i.startswith("image_") for i in ids)
    assert all((server.storage / "jobs" / i).is_dir() for i in ids)
    assert http(server, "DELETE", f"/v1/videos/{ids[0]}")[0] == 404
    status, deleted = http(server, "DELETE", f"/v1/images/{ids[0]}")
    assert status == 200 and deleted == {"id": ids[0], "object": "image.deleted", "deleted": True}
    assert not (server.storage / "jobs" / ids[0]).exists()
    assert http(server, "DELETE", f"/v1/images/{ids[0]}")[0] == 404


def test_health_answers_while_an_upload_is_decoded(server, monkeypatch):
    """Checking an input image blocks (saving, decoding it): it runs off the event loop, so /health answers at
    once while an upload's decode is held."""
    entered, release = threading.Event(), threading.Event()
    decode = service.read_conditioning

    def held_decode(*args):
        entered.set()
        release.wait(JOB_SECONDS)
        return decode(*args)

    monkeypatch.setattr(service, "read_conditioning", held_decode)
    created = {}
    poster = threading.Thread(
        target=lambda: created.update(v=post_json(server, "/v1/videos", {"prompt": PROMPT, **SHORT, **_png_url()}))
    )
    poster.start()
    try:
        assert entered.wait(JOB_SECONDS)
        answered = []
        prober = threading.Thread(target=lambda: answered.append(http(server, "GET", "/health")[0]), daemon=True)
        prober.start()
        prober.join(5)
        assert answered == [200], "/health waited for the upload's decode"
    finally:
        release.set()
        poster.join(JOB_SECONDS)
    status, video = created["v"]
    assert status == 200 and http(server, "DELETE", f"/v1/videos/{video['id']}")[0] == 200


def test_deleting_a_job_during_the_decode_stops_it_at_the_next_tile(server, monkeypatch):
    """A job deleted while its VAE decodes stops before the next tile: no file is written, its folder goes,
    and the worker takes the next job."""
    write, written, stopped = runner.LoadedModel.write, [], []

    def deleting_at_first_tile(self, config, timer, *, on_decode_tile, **options):
        def tile():
            if not stopped:
                stopped.append(http(server, "DELETE", f"/v1/videos/{config.output.parent.name}")[0])
            on_decode_tile()  # must raise now: the job was deleted

        return write(self, config, timer, on_decode_tile=tile, **options)

    monkeypatch.setattr(runner.LoadedModel, "write", deleting_at_first_tile)
    monkeypatch.setattr(runner, "write_output", lambda *args, **kwargs: written.append(args))
    monkeypatch.setattr(runner.StreamedOutput, "finish", lambda self, *args, **kwargs: written.append(args))
    client = client_for(server)
    video = client.videos.create(prompt=PROMPT, extra_body=SHORT)
    with pytest.raises(openai.NotFoundError):  # deleted; had the decode not stopped, it would complete
        wait(client, video.id)
    deadline = time.monotonic() + JOB_SECONDS
    while (server.storage / "jobs" / video.id).exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker removes the folder of the job it stopped
    assert stopped == [200] and written == []
    assert not (server.storage / "jobs" / video.id).exists()
    monkeypatch.undo()
    assert wait(client, client.videos.create(prompt=PROMPT, extra_body=SHORT).id).status == "completed"


def _png_url() -> dict:
    """input_reference as a data: URL of a small PNG."""
    picture = io.BytesIO()
    Image.fromarray(np.zeros((96, 160, 3), dtype=np.uint8)).save(picture, format="PNG")
    return {"input_reference": "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()}


def _multipart(server: InProcessServer, fields: dict[str, str]):
    """(status, JSON) of a multipart form sent as a browser sends it (UTF-8, no charset named)."""
    parts = [
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields.items()
    ]
    body = ("".join(parts) + "--b--\r\n").encode()
    return http(server, "POST", "/v1/videos", body, {"content-type": "multipart/form-data; boundary=b"})


def test_serve_picks_its_kernels_at_the_served_request_s_attention(tmp_path):
    """The GPU's probe times attention at the request `serve` takes by default (--frames, --resolution), not
    at a fixed 32k, so the planner's rate and the kernel picked are the jobs' own."""
    from cosmos3_offload.app.cli.shell import main

    opened = []
    flags = ["--frames", "9", "--resolution", "256", "--storage", str(tmp_path / "storage")]
    assert main(["serve", *flags], serve=lambda loaded, settings: opened.append(loaded) or 0) == 0
    (loaded,) = opened
    request = loaded.probe_request
    assert (request.frames, request.height, request.width) == (9, 192, 320)  # 256p at the default 16:9
