"""A job followed as it renders: `GET /v1/videos/{id}/events` (Server-Sent Events) read by an HTTP client over a
real connection to the app `serve` builds (uvicorn on loopback, server_process.InProcessServer), the live preview
at `GET /v1/videos/{id}/preview`, and a job deleted while it decodes. The previews here are written by a stand-in
previewer (a solid colour per step), so these tests are about the server, not the preview's pictures."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time

import httpx2
import pytest
from fake_previews import ColourPreviews, colour_of
from PIL import Image
from server_process import InProcessServer, cli_serve_arguments

from cosmos3_offload.app import events as run_events
from cosmos3_offload.app import runner
from cosmos3_offload.serve.job_previews import PREVIEW_FILE

PROMPT = "a red fox running through fresh snow"
JOB_SECONDS = 120
KEY = "events-key-123"


class Listener:
    """A client of a job's events, reading them on its own thread as they come: `events` is a list of
    (kind, id or None, data, seconds since the connection was asked for)."""

    def __init__(self, url: str, headers: dict | None = None) -> None:
        self.events: list[tuple[str, int | None, dict, float]] = []
        self.status: int | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _read(self, url: str, headers: dict) -> None:
        asked = time.monotonic()
        with httpx2.stream("GET", url, headers=headers, timeout=JOB_SECONDS) as response:
            self.status = response.status_code
            assert response.headers["content-type"].startswith("text/event-stream"), response.headers
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                    continue
                number = int(fields["id"]) if "id" in fields else None
                event = (fields["event"], number, json.loads(fields["data"]), time.monotonic() - asked)
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
                fields = {}
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, kind: str, count: int = 1) -> tuple[str, int | None, dict, float]:
        """The `count`-th event of `kind`, once it has come."""
        deadline = time.monotonic() + JOB_SECONDS
        with self._changed:
            while True:
                found = [event for event in self.events if event[0] == kind]
                if len(found) >= count:
                    return found[count - 1]
                assert self._thread.is_alive(), f"the stream ended without {count} {kind} event(s): {self.events}"
                assert time.monotonic() < deadline, f"no {kind} event came: {self.events}"
                self._changed.wait(0.5)

    def finished(self) -> list[tuple[str, int | None, dict, float]]:
        """Every event, once the stream has closed."""
        self._thread.join(JOB_SECONDS)
        assert not self._thread.is_alive(), "the stream did not close"
        return self.events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(tmp_path_factory.mktemp("storage"), "--steps", "3", "--frames", "5", listen=True) as running:
        yield running


@pytest.fixture
def queue(server):
    """The server's job queue; each test sets its previewer (the default one is put back after)."""
    queue = server.http.app.state.service.queue
    default = queue.previews
    yield queue
    if isinstance(queue.previews, ColourPreviews):  # a test that failed must not leave the worker waiting
        queue.previews.start.set()
        queue.previews.release.set()
    queue.previews = default


def create(server: InProcessServer, headers: dict | None = None, **fields) -> str:
    response = server.http.post("/v1/videos", json={"prompt": PROMPT, **fields}, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def status_of(server: InProcessServer, video_id: str) -> dict:
    return server.http.get(f"/v1/videos/{video_id}").json()


def wait_until(server: InProcessServer, video_id: str, status: str) -> None:
    deadline = time.monotonic() + JOB_SECONDS
    while status_of(server, video_id).get("status") != status:
        assert time.monotonic() < deadline, f"{video_id} never became {status}"
        time.sleep(0.02)


def named(event: tuple) -> str:
    """An event as the sequence test compares it: kind, and its phase or its step/piece number."""
    kind, _, data, _ = event
    if kind in ("phase_started", "phase_ended"):
        return f"{kind}:{data['phase']}"
    if kind in ("step", "piece", "preview"):
        return f"{kind}:{data['index']}"
    return f"{kind}:{data.get('status', data.get('object'))}"


def test_a_client_follows_a_queued_job_through_every_event_in_order(server, queue):
    """A client of a queued job gets its state at once (queued, no preview yet: 404), then, once it runs: the
    state in progress, prefill, the denoise with a preview and a step event for each step 1..3 (the time left of
    each, the last counting the decode at the previous job's pace), every decode piece 1..n, the write, and
    `done` with the completed job; the events are numbered 1, 2, 3... and the stream closes. The preview then
    served is the last step's, whole, never cached."""
    previews = queue.previews = ColourPreviews()
    previews.start.clear()  # the first job waits: the second stays queued while its client connects
    first = create(server)
    wait_until(server, first, "in_progress")
    second = create(server)
    listener = Listener(f"{server.url}/v1/videos/{second}/events")
    _, number, state, arrived = listener.wait_for("state")
    assert state["id"] == second and state["status"] == "queued" and state["run"] == {"progress": 0} and number is None
    assert arrived < 5, "the state is the first thing a client gets"
    assert server.http.get(f"/v1/videos/{second}/preview").status_code == 404
    previews.start.set()

    events = listener.finished()
    assert listener.status == 200
    pieces = next(data["total"] for kind, _, data, _ in events if kind == "piece")
    expected = ["state:queued", "state:in_progress", "phase_started:prefill", "phase_ended:prefill"]
    expected += ["phase_started:denoise", *[f"{kind}:{i}" for i in (1, 2, 3) for kind in ("preview", "step")]]
    expected += ["phase_ended:denoise", "phase_started:decode", *[f"piece:{i}" for i in range(1, pieces + 1)]]
    expected += ["phase_ended:decode", "phase_started:write", "phase_ended:write", "done:completed"]
    assert [named(event) for event in events] == expected
    assert [number for _, number, _, _ in events[1:-1]] == list(range(1, len(events) - 1))  # state and done: none
    steps = [data for kind, _, data, _ in events if kind == "step"]
    assert all(data["total"] == 3 and data["seconds"] >= 0 and data["eta"] is not None for data in steps)
    assert steps[-1]["eta"] > 0  # no step left: the decode, at the first job's pace
    assert [data["progress"] for data in steps] == sorted(data["progress"] for data in steps)
    previews_sent = [data for kind, _, data, _ in events if kind == "preview"]
    assert all(data["url"] == f"/v1/videos/{second}/preview" and data["preview"] == "fast" for data in previews_sent)
    assert events[-1][2]["status"] == "completed" and events[-1][2]["progress"] == 100

    served = server.http.get(f"/v1/videos/{second}/preview")
    assert served.status_code == 200 and served.headers["content-type"] == "image/webp"
    assert served.headers["cache-control"] == "no-store"
    assert Image.open(io.BytesIO(served.content)).convert("RGB").getpixel((5, 5)) == colour_of(3)


def test_a_late_client_gets_the_current_state_and_last_event_id_replays_what_it_missed(server, queue):
    """A client that connects while step 2 is previewed gets the state first: in progress, denoise step 1 of 4,
    a time left and the preview's URL, then the events from there on, numbered on from the last it could have
    seen; a client reconnecting with Last-Event-ID: 2 is replayed events 3 onwards first; both end with done."""
    previews = queue.previews = ColourPreviews(hold_at=2)
    video = create(server, steps=4)
    assert previews.held.wait(JOB_SECONDS)
    late = Listener(f"{server.url}/v1/videos/{video}/events")
    _, _, state, _ = late.wait_for("state")
    run = state["run"]
    assert state["status"] == "in_progress" and (run["phase"], run["step"], run["steps"]) == ("denoise", 1, 4)
    assert run["eta"] >= 0 and run["preview"] == f"/v1/videos/{video}/preview" and 0.05 < run["progress"] < 0.9
    again = Listener(f"{server.url}/v1/videos/{video}/events", headers={"Last-Event-ID": "2"})
    again.wait_for("state")
    previews.release.set()

    late_events, again_events = late.finished(), again.finished()
    late_numbers = [number for _, number, _, _ in late_events[1:-1]]
    again_numbers = [number for _, number, _, _ in again_events[1:-1]]
    assert again_numbers == list(range(3, again_numbers[-1] + 1))  # 1 (state) and 2 (prefill started) not again
    assert late_numbers == again_numbers[again_numbers.index(late_numbers[0]) :]  # nothing missed, none twice
    assert named(late_events[1]) == "preview:2" and late_events[1][1] > 3  # what came next, and no replay
    assert named(late_events[-1]) == named(again_events[-1]) == "done:completed"


def test_deleting_a_job_while_it_decodes_stops_it_and_ends_its_stream(server, queue, monkeypatch):
    """A job deleted while its first decode piece runs: its stream ends at once with `done` saying it was deleted,
    the job stops before the next piece, nothing is written, its folder (preview included) goes. Meanwhile its
    polled progress had moved past the denoise (90%)."""
    queue.previews = ColourPreviews()
    in_decode, go_on, written = threading.Event(), threading.Event(), []
    piece = run_events.RunEvents.piece

    def held_piece(self, index: int, total: int) -> None:
        piece(self, index, total)
        if index == 0:
            in_decode.set()
            assert go_on.wait(JOB_SECONDS)

    monkeypatch.setattr(run_events.RunEvents, "piece", held_piece)
    monkeypatch.setattr(runner, "write_output", lambda *args, **kwargs: written.append(args))
    monkeypatch.setattr(runner.StreamedOutput, "finish", lambda self, *args, **kwargs: written.append(args))
    video = create(server)
    listener = Listener(f"{server.url}/v1/videos/{video}/events")
    assert in_decode.wait(JOB_SECONDS)
    assert 90 <= status_of(server, video)["progress"] < 100
    assert (server.storage / "jobs" / video / PREVIEW_FILE).is_file()
    assert server.http.delete(f"/v1/videos/{video}").status_code == 200
    events = listener.finished()  # before the worker goes on: the delete told the clients
    go_on.set()
    assert events[-1][0] == "done" and events[-1][2] == {"id": video, "object": "video.deleted", "deleted": True}
    deadline = time.monotonic() + JOB_SECONDS
    while (server.storage / "jobs" / video).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (server.storage / "jobs" / video).exists() and written == []
    assert not queue.feeds.is_open(video)


def test_a_failing_preview_ends_the_previews_not_the_job(server, queue):
    """A previewer that raises: the job completes all the same (its video is what was asked for), no preview is
    served (404)."""
    queue.previews = ColourPreviews(fail=True)
    video = create(server)
    wait_until(server, video, "completed")
    assert server.http.get(f"/v1/videos/{video}/content").status_code == 200
    assert server.http.get(f"/v1/videos/{video}/preview").status_code == 404


def test_unknown_ids_are_404_and_the_key_is_needed(tmp_path):
    """With --api-key the events and the preview need the key (401 without); an unknown id is a 404 in OpenAI's
    body; a client of a finished job gets its state (with its preview's URL) and `done` at once."""
    with InProcessServer(tmp_path / "storage", "--steps", "1", "--frames", "5", "--api-key", KEY) as keyed:
        keyed.http.app.state.service.queue.previews = ColourPreviews()
        key = {"authorization": f"Bearer {KEY}"}
        for route in ("events", "preview"):
            assert keyed.http.get(f"/v1/videos/video_00/{route}").status_code == 401
            missing = keyed.http.get(f"/v1/videos/video_00/{route}", headers=key)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        video = create(keyed, headers=key)
        wait_until_keyed = time.monotonic() + JOB_SECONDS
        while keyed.http.get(f"/v1/videos/{video}", headers=key).json()["status"] != "completed":
            assert time.monotonic() < wait_until_keyed
            time.sleep(0.02)
        assert keyed.http.get(f"/v1/videos/{video}/events").status_code == 401
        body = keyed.http.get(f"/v1/videos/{video}/events", headers=key).text
        blocks = [block for block in body.split("\n\n") if block]
        assert [block.splitlines()[0] for block in blocks] == ["event: state", "event: done"]
        assert f'"run":{{"preview":"/v1/videos/{video}/preview"}}' in blocks[0] and '"status":"completed"' in blocks[1]


def test_with_previews_off_a_job_sends_no_preview_and_serves_none(tmp_path, monkeypatch):
    """`serve` with preview kind none: a job's events have every step and no preview, and it has no preview file
    (404), while the events still end with the completed job."""
    from starlette.testclient import TestClient

    from cosmos3_offload.serve import queue as job_queue
    from cosmos3_offload.serve import server

    loaded, settings = cli_serve_arguments(tmp_path / "storage", "--steps", "2", "--frames", "5")
    settings = dataclasses.replace(settings, preview_kind="none")
    hold, read = threading.Event(), job_queue.read_conditioning
    monkeypatch.setattr(job_queue, "read_conditioning", lambda config: hold.wait(JOB_SECONDS) and read(config))
    with server.in_process(loaded, settings) as running, TestClient(running.app) as http:
        assert running.queue.previews is None
        video = http.post("/v1/videos", json={"prompt": PROMPT}).json()["id"]
        body: list[str] = []
        reader = threading.Thread(target=lambda: body.append(http.get(f"/v1/videos/{video}/events").text))
        reader.start()
        while not running.queue.feeds._feeds[video].clients:  # the client is following it: let the job run
            time.sleep(0.01)
        hold.set()
        reader.join(JOB_SECONDS)
        kinds = [line.removeprefix("event: ") for line in body[0].splitlines() if line.startswith("event: ")]
        assert kinds.count("step") == 2 and "preview" not in kinds and kinds[-1] == "done"
        assert http.get(f"/v1/videos/{video}/preview").status_code == 404
        assert not (tmp_path / "storage" / "jobs" / video / PREVIEW_FILE).exists()


def test_a_quiet_stream_gets_heartbeats_and_a_client_that_left_is_forgotten(server, queue, monkeypatch):
    """While nothing happens (the job is held before its run) the stream sends comment lines, so no proxy closes
    it; a client that disconnects is dropped from the job's feed at once, not at the job's end."""
    from cosmos3_offload.serve import event_stream

    monkeypatch.setattr(event_stream, "HEARTBEAT_SECONDS", 0.05)
    previews = queue.previews = ColourPreviews()
    previews.start.clear()
    video = create(server)
    wait_until(server, video, "in_progress")
    with httpx2.stream("GET", f"{server.url}/v1/videos/{video}/events", timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: state"
        assert ": keep-alive" in [next(lines) for _ in range(6)]
        assert len(queue.feeds._feeds[video].clients) == 1
    deadline = time.monotonic() + 10
    while queue.feeds._feeds[video].clients:
        assert time.monotonic() < deadline, "the client that left is still fed"
        time.sleep(0.02)
    previews.start.set()
    wait_until(server, video, "completed")


def test_the_servers_own_fast_preview_is_served_as_an_animated_webp(server, queue):
    """The previewer `serve` makes by default (fast, every step): a job's preview events name its URL, which
    serves the preview file the previewer wrote, an animated WebP of the video's frames."""
    from cosmos3_offload.serve.job_previews import JobPreviews

    assert isinstance(queue.previews, JobPreviews) and queue.previews.kind == "fast"
    video = create(server, steps=2)
    events = Listener(f"{server.url}/v1/videos/{video}/events", headers={"Last-Event-ID": "0"}).finished()
    assert [data["index"] for kind, _, data, _ in events if kind == "preview"][-1] == 2  # the last step's too
    served = server.http.get(f"/v1/videos/{video}/preview")
    image = Image.open(io.BytesIO(served.content))
    assert served.status_code == 200 and image.format == "WEBP" and image.n_frames > 1
    assert served.content == (server.storage / "jobs" / video / PREVIEW_FILE).read_bytes()
