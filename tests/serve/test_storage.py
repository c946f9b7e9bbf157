"""The job side of `serve` on failing disks: a real full disk (a small tmpfs, tests/small_disk.py) during a job,
at a request and at a delete; a dead worker; read-only and corrupt databases at the start; job folders without a
job; a delete cut off half-way; and the retention of finished jobs (--keep-videos, --keep-images)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from server_process import InProcessServer
from small_disk import fill, free, small_disk
from test_api import JOB_SECONDS, PROMPT, SHORT, client_for, http, post_json, wait

from cosmos3_offload.app import runner
from cosmos3_offload.app.serve_settings import Retention
from cosmos3_offload.serve import store as store_module
from cosmos3_offload.serve.store import COMPLETED, DATABASE, JobStore

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks its video API deprecated

QUICK = {**SHORT, "steps": 1}


def service_of(server: InProcessServer):
    return server.http.app.state.service


def truncate_log(storage: Path) -> None:
    """Move the database's write-ahead log into it and empty it, so the next write must grow a file (on a full
    disk, sqlite's "database or disk is full" at once, not after the log's free pages)."""
    with contextlib.closing(sqlite3.connect(storage / DATABASE, timeout=30)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def finished(server: InProcessServer, video_id: str) -> dict:
    """The video object once it has completed or failed (read over raw HTTP: it may be only in memory)."""
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        status, video = http(server, "GET", f"/v1/videos/{video_id}")
        assert status == 200, video
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"{video_id} is still {video['status']}: the worker stopped?")


def folders(storage: Path) -> set[str]:
    return {path.name for path in (storage / "jobs").iterdir()}


def around_writes(monkeypatch, *, before=lambda: None, after=lambda: None):
    """`before()` and `after()` around each job's output write, whether the mp4 is encoded after the decode
    (`write_output`) or while it runs (`StreamedOutput.finish` puts it in place); returns what puts both back."""
    write, finish = runner.write_output, runner.StreamedOutput.finish

    def written(*args, **kwargs):
        before()
        write(*args, **kwargs)
        after()

    def finished(self, *args, **kwargs):
        before()
        finish(self, *args, **kwargs)
        after()

    monkeypatch.setattr(runner, "write_output", written)
    monkeypatch.setattr(runner.StreamedOutput, "finish", finished)

    def restore() -> None:
        monkeypatch.setattr(runner, "write_output", write)
        monkeypatch.setattr(runner.StreamedOutput, "finish", finish)

    return restore


def test_a_full_disk_fails_the_job_not_the_worker_and_health_says_so(tmp_path, monkeypatch):
    """The disk fills as a job's file is written (its record refused: sqlite's "database or disk is full"),
    then before a job writes (ffmpeg's ENOSPC): each job fails with storage_full and leaves no file, the worker
    lives on; /health answers 503 with the reason while the disk is full; a request with or without an upload
    is a 507 storage_full with no folder or job left; a delete is no 500; once space is freed /health is 200
    again and the next job completes."""
    with small_disk(tmp_path / "disk", size="16M") as disk, InProcessServer(disk / "storage") as server:
        storage, client = server.storage, client_for(server)
        kept = wait(client, client.videos.create(prompt=PROMPT, extra_body=QUICK).id)
        assert kept.status == "completed"
        full = threading.Event()

        def fill_after() -> None:  # the file is whole, then nothing more fits: its record is refused
            truncate_log(storage)
            fill(disk)
            full.set()

        around_writes(monkeypatch, after=fill_after)
        recorded = client.videos.create(prompt=PROMPT, extra_body=QUICK).id
        assert full.wait(JOB_SECONDS)
        failed = finished(server, recorded)
        assert failed["status"] == "failed" and failed["error"]["code"] == "storage_full", failed
        assert list((storage / "jobs" / recorded).iterdir()) == []  # its file, never recorded, is gone

        truncate_log(storage)
        fill(disk, leave=16 * 2**10)  # room for a probe, not for a 64 KiB upload: it fails as it is saved
        before = folders(storage)
        status, answer = post_json(server, "/v1/videos", {"prompt": PROMPT, **QUICK, **png_url()})
        assert status == 507 and answer["error"]["code"] == "storage_full", answer
        fill(disk)
        status, health = http(server, "GET", "/health")
        assert status == 503 and health["status"] == "unavailable" and "full" in health["reason"], health
        status, answer = post_json(server, "/v1/videos", {"prompt": PROMPT, **QUICK})
        assert status == 507 and answer["error"]["code"] == "storage_full", answer
        assert folders(storage) == before and len(client.videos.list().data) == 2  # no folder, no job left
        status, answer = http(server, "DELETE", f"/v1/videos/{kept.id}")
        assert status == 200 or (status == 507 and answer["error"]["code"] == "storage_full"), answer

        free(disk)
        around_writes(monkeypatch, before=lambda: fill(disk))
        written = client.videos.create(prompt=PROMPT, extra_body=QUICK).id
        failed = finished(server, written)
        assert failed["status"] == "failed" and failed["error"]["code"] == "storage_full", failed
        assert list((storage / "jobs" / written).iterdir()) == []  # no partial file

        free(disk)
        monkeypatch.undo()
        status, health = http(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok", health
        assert wait(client, client.videos.create(prompt=PROMPT, extra_body=QUICK).id).status == "completed"
        with contextlib.closing(sqlite3.connect(storage / DATABASE)) as db:  # written down once it could be
            rows = db.execute("SELECT id, error FROM jobs WHERE id IN (?, ?)", (recorded, written)).fetchall()
        assert {job_id: json.loads(error)["code"] for job_id, error in rows} == dict.fromkeys(
            (recorded, written), "storage_full"
        )


def test_health_is_503_while_the_job_worker_is_dead(tmp_path):
    """/health says the worker has stopped (503, with the reason) when its thread is gone."""
    with InProcessServer(tmp_path / "storage") as server:
        assert http(server, "GET", "/health")[0] == 200
        service_of(server).queue.stop()
        status, health = http(server, "GET", "/health")
        assert status == 503 and "worker" in health["reason"], health


def test_health_is_503_while_job_folders_cannot_be_made(tmp_path):
    """/health probed the storage folder only: with jobs/ unusable (a file in its place) every POST failed
    with storage_error while /health said ok."""
    with InProcessServer(tmp_path / "storage") as server:
        jobs = tmp_path / "storage" / "jobs"
        shutil.rmtree(jobs)
        jobs.write_text("not a folder")
        status, health = http(server, "GET", "/health")
        assert status == 503 and health["status"] == "unavailable", health
        jobs.unlink()
        jobs.mkdir()
        assert http(server, "GET", "/health")[0] == 200


def test_a_worker_survives_a_database_that_refuses_every_write(tmp_path, monkeypatch):
    """While every write to the job database raises sqlite's "database or disk is full", a job fails with
    storage_full (kept in memory, reported by GET), the worker lives, and once writes succeed again the failure
    is written and the next job completes."""
    with InProcessServer(tmp_path / "storage") as server:
        store = service_of(server).store
        refusing = threading.Event()
        database = store._db

        class Refusing:  # the connection, as a full disk makes it
            def __getattr__(self, name):
                return getattr(database, name)

            def execute(self, sql, *args):
                if refusing.is_set() and not sql.lstrip().upper().startswith("SELECT"):
                    raise sqlite3.OperationalError("database or disk is full")
                return database.execute(sql, *args)

            def executemany(self, sql, *args):
                return self.execute(sql) if refusing.is_set() else database.executemany(sql, *args)

        monkeypatch.setattr(store, "_db", Refusing())
        restore = around_writes(monkeypatch, after=refusing.set)
        client = client_for(server)
        video_id = client.videos.create(prompt=PROMPT, extra_body=QUICK).id
        failed = finished(server, video_id)
        assert failed["error"]["code"] == "storage_full" and failed["progress"] < 100, failed
        assert http(server, "GET", "/health")[0] == 503
        refusing.clear()
        restore()
        assert wait(client, client.videos.create(prompt=PROMPT, extra_body=QUICK).id).status == "completed"
        with contextlib.closing(sqlite3.connect(server.storage / DATABASE)) as db:
            (error,) = db.execute("SELECT error FROM jobs WHERE id = ?", (video_id,)).fetchone()
        assert json.loads(error)["code"] == "storage_full"


def test_a_corrupt_or_read_only_database_is_one_line_and_exit_2(tmp_path, capsys):
    """`serve` on a database with a damaged table page, or a database file mounted read-only: one line, exit
    status 2, not a traceback and not a server that says ok and fails every write."""
    from cosmos3_offload.main import main

    storage = tmp_path / "storage"
    store = JobStore.open(storage)
    store.insert([(store.reserve("video"), "video", {"prompt": "x" * 3000}) for _ in range(20)])
    store.close()
    database = storage / DATABASE
    pages = database.read_bytes()
    read_only = subprocess.run(["mount", "--bind", str(database), str(database)], capture_output=True)
    if read_only.returncode != 0:
        pytest.skip(f"cannot bind-mount the database read-only: {read_only.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(database)], check=True)
        with pytest.raises(SystemExit) as raised:
            main(["serve", "--port", "0", "--storage", str(storage), "--no-progress"])
        error = capsys.readouterr().err
        assert raised.value.code == 2 and error.count("\n") == 1 and "readonly" in error, error
    finally:
        subprocess.run(["umount", str(database)], check=False)
    page = 4096
    database.write_bytes(pages[: 10 * page] + b"\xa5" * page + pages[11 * page :])  # a page of the jobs table
    with pytest.raises(SystemExit) as raised:
        main(["serve", "--port", "0", "--storage", str(storage), "--no-progress"])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.count("\n") == 1 and "damaged" in error, error


def test_a_storage_of_the_first_schema_keeps_its_jobs_in_their_order(tmp_path):
    """A database written before ids carried their place (no `position` column) opens with its jobs listed
    in the order they were made, and new jobs come after them."""
    with contextlib.closing(sqlite3.connect(tmp_path / DATABASE, isolation_level=None)) as db:
        db.execute(store_module.SCHEMA.replace(",\n    position INTEGER", ""))
        for job_id in ("video_ffff00000000000000000000", "video_000000000000000000000000"):
            db.execute(
                "INSERT INTO jobs (id, kind, status, progress, created_at, request) VALUES (?, 'video', ?, 0, 1, '{}')",
                (job_id, COMPLETED),
            )
    store = JobStore.open(tmp_path)
    new = store.reserve("video")
    store.insert([(new, "video", {})])
    listed = [job.id for job in store.list("video", newest_first=False)]
    assert listed == ["video_ffff00000000000000000000", "video_000000000000000000000000", new]
    place = store.cursor("video", "video_ffff00000000000000000000")
    assert [job.id for job in store.list("video", after=place, newest_first=False)] == listed[1:]
    store.close()


def test_job_folders_without_a_job_are_removed_at_the_start(tmp_path):
    """A job folder whose job is not in the database (a stop during a request or a delete) is removed when the
    storage is opened; anything else in jobs/ is left alone."""
    store = JobStore.open(tmp_path)
    job_id = store.reserve("video")
    store.insert([(job_id, "video", {})])
    orphan = store.reserve("image")
    (store.folder_of(orphan) / "image.png").write_bytes(b"png")
    (tmp_path / "jobs" / "notes").mkdir()
    store.close()
    JobStore.open(tmp_path).close()
    assert folders(tmp_path) == {job_id, "notes"}


def test_a_delete_cut_off_leaves_no_folder_without_its_job(tmp_path, monkeypatch):
    """A stop during a delete (here as its files are about to go) leaves the job with its files, never a folder
    no job has: the files go before the row."""
    store = JobStore.open(tmp_path)
    job_id = store.reserve("video")
    store.insert([(job_id, "video", {})])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        store.delete(job_id)
    assert store.get(job_id) is not None and store.folder_of(job_id).is_dir()
    store.close()


def test_the_retention_names_finished_jobs_past_the_count_or_the_age(tmp_path):
    """Retention(count, seconds): the finished jobs beyond the newest `count`, or ended more than `seconds`
    ago, of that kind only; waiting and running jobs, and held ones, never."""
    store = JobStore.open(tmp_path)
    ids = [store.reserve("video") for _ in range(5)]
    store.insert([(job_id, "video", {}) for job_id in ids])
    ended = {ids[0]: 100, ids[1]: 200, ids[2]: 300}
    for job_id, at in ended.items():
        store.update(job_id, status=COMPLETED, completed_at=at)
    store.fail(ids[3], "generation_failed", "no")
    store.update(ids[3], completed_at=400)  # ids[4] is still queued
    assert store.expired("image", Retention(count=1), now=500) == []
    assert store.expired("video", Retention(), now=500) == []
    assert store.expired("video", Retention(count=2), now=500) == [ids[1], ids[0]]
    assert store.expired("video", Retention(seconds=250), now=500) == [ids[1], ids[0]]
    assert store.expired("video", Retention(count=3, seconds=350), now=500) == [ids[0]]
    assert store.expired("video", Retention(count=1), now=500, keep={ids[0]}) == [ids[2], ids[1]]
    store.close()


def test_finished_jobs_past_the_retention_are_deleted_with_their_files(tmp_path):
    """--keep-videos 2: the third finished video removes the first (job and folder); --keep-images 1: an images
    request for two still returns both, then only the newest is kept; a restart with --keep-videos 1 keeps one."""
    storage = tmp_path / "storage"
    with InProcessServer(storage, "--keep-videos", "2", "--keep-images", "1") as server:
        client = client_for(server)
        ids = [client.videos.create(prompt=PROMPT, extra_body=QUICK).id for _ in range(3)]
        for video_id in ids:
            wait(client, video_id)
        deadline = time.monotonic() + JOB_SECONDS
        while ids[0] in folders(storage) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [v.id for v in client.videos.list().data] == ids[:0:-1] and folders(storage) == set(ids[1:])
        images = client.images.generate(prompt=PROMPT, n=2, extra_body={"steps": 1}).data
        assert len(images) == 2 and all(base64.b64decode(image.b64_json) for image in images)
        image_ids = [image.model_extra["id"] for image in images]
        while image_ids[0] in folders(storage) and time.monotonic() < deadline:
            time.sleep(0.05)  # released once read: the worker deletes it next
        assert folders(storage) == {*ids[1:], image_ids[1]}
        assert http(server, "DELETE", f"/v1/images/{image_ids[0]}")[0] == 404
    with InProcessServer(storage, "--keep-videos", "1") as server:
        assert [v.id for v in client_for(server).videos.list().data] == [ids[2]]
        assert folders(storage) == {ids[2], image_ids[1]}


def png_url() -> dict:
    """input_reference as a data: URL of a 64 KiB PNG (noise does not compress)."""
    import io

    import numpy as np
    from PIL import Image

    picture = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(picture, format="PNG")
    return {"input_reference": "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()}
