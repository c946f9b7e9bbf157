"""The web page, as a person uses it, in Debian's headless Chromium (driven by Playwright, which is told
to use that browser and never downloads its own), against the server's app running the tiny model, served
over loopback HTTP by uvicorn from a thread of the test process (server_process.InProcessServer)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request

import pytest
from fake_previews import ColourPreviews, colour_of
from PIL import Image
from server_process import InProcessServer

from cosmos3_offload.model.tiers import RESOLUTION_TIERS

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
JOB_MS = 120_000  # one tiny job, with the page polling every 500 ms, on a slow 2-core machine
PROMPT = "a red fox running through fresh snow"
KEY = "page-key-123"

# [ (progress value, status text) ] each time the page rewrites the status, from before the submit on.
WATCH_PROGRESS = """() => {
    window.seen = [];
    const status = document.querySelector('#status'), bar = document.querySelector('#progress');
    new MutationObserver(() => window.seen.push([bar.value, status.textContent]))
        .observe(status, {childList: true, characterData: true, subtree: true});
}"""
# Play the shown video for a moment and report what the browser decoded and played.
PLAY_VIDEO = """async () => {
    const v = document.querySelector('#player');
    await v.play();
    await new Promise((resolve) => setTimeout(resolve, 300));
    return {width: v.videoWidth, height: v.videoHeight, duration: v.duration, paused: v.paused,
            played: v.played.length ? v.played.end(0) : 0, error: v.error && v.error.code};
}"""
# Every text the run line shows (phase, time left) and the colour of each live preview the page loads.
WATCH_RUN = """() => {
    window.run = {phases: [], etas: [], colours: []};
    const phase = document.querySelector('#phase'), eta = document.querySelector('#eta');
    const preview = document.querySelector('#preview');
    new MutationObserver(() => { window.run.phases.push(phase.textContent); window.run.etas.push(eta.textContent); })
        .observe(document.querySelector('#run'), {childList: true, characterData: true, subtree: true});
    preview.addEventListener('load', () => {
        const canvas = document.createElement('canvas');
        canvas.width = canvas.height = 4;
        canvas.getContext('2d').drawImage(preview, 0, 0, 4, 4);
        window.run.colours.push(Array.from(canvas.getContext('2d').getImageData(1, 1, 1, 1).data.slice(0, 3)));
    });
}"""
# The job followed by the page has ended: completed, failed, or refused (the error area shows why).
JOB_ENDED = """() => /^(completed|failed)/.test(document.querySelector('#status').textContent)
    || !document.querySelector('#error').hidden"""


def _playwright_or_skip():
    """CI must run these (.ci/run installs Chromium; the test extra has Playwright); elsewhere they skip."""
    missing = None
    if shutil.which(CHROMIUM) is None:
        missing = f"{CHROMIUM} is missing (Debian's chromium package)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "playwright is not installed (pip install -e '.[test]')"
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright_or_skip()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(tmp_path_factory.mktemp("storage"), "--steps", "2", "--frames", "5", listen=True) as running:
        yield running


@pytest.fixture
def previews(server):
    """The module server's previewer for one test: a stand-in writing a solid colour per step, slow enough
    (0.3 s a preview) for the page to show each; the server's own is put back after."""
    queue = server.http.app.state.service.queue
    default, queue.previews = queue.previews, ColourPreviews(seconds=0.3)
    yield queue.previews
    queue.previews.start.set()
    queue.previews = default


@contextlib.contextmanager
def opened(browser, server: InProcessServer):
    """The page in a fresh browser context (its own localStorage), once it has read the server's defaults."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    try:
        page = context.new_page()
        page.goto(server.url)
        wait_for(page, "document.querySelector('#size').options.length > 0")
        yield page
    finally:
        context.close()


def api(server: InProcessServer, method: str, path: str, payload: dict | None = None, key: str | None = None):
    """(status, JSON body) of a call made without the page, to compare the page with the server."""
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
    body = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def submit_and_finish(page) -> str:
    """Click Generate, wait for the bar to reach 100%, and return the id of the job the player shows."""
    page.click("#submit")
    wait_for(page, JOB_ENDED, timeout=JOB_MS)
    assert page.locator("#status").inner_text() == "completed 100%", page.locator("#error").inner_text()
    wait_for(page, "document.querySelector('#player').dataset.job", timeout=JOB_MS)
    return page.locator("#player").get_attribute("data-job")


def test_the_size_presets_are_cosmos3s_frame_sizes_and_the_servers_defaults_are_filled_in(browser, server):
    """The size select offers exactly the registered tiers' sizes, preselects the server's default tier and
    aspect ratio (--resolution 256, 16:9), and the number fields start at the server's --frames and --steps."""
    with opened(browser, server) as page:
        offered = page.eval_on_selector_all("#size option", "options => options.map((o) => o.value)")
        registered = [f"{w}x{h}" for sizes in RESOLUTION_TIERS.values() for w, h in sizes.values()]
        assert sorted(offered) == sorted(registered)
        assert page.locator("#size").input_value() == "320x192"
        assert (page.input_value("#frames"), page.input_value("#steps")) == ("5", "2")


def test_a_prompt_becomes_a_video_that_plays(browser, server, tmp_path):
    """Type a prompt and submit: the bar climbs to 100% and says completed, the browser decodes the server's
    H.264 mp4 at 320x192 and plays it, the history lists the job, and the server got what was typed."""
    with opened(browser, server) as page:
        page.fill("#prompt", PROMPT)
        page.fill("#negative", "blurry, dark")
        page.fill("#seed", "11")
        page.evaluate(WATCH_PROGRESS)
        job_id = submit_and_finish(page)

        seen = page.evaluate("window.seen")
        values = [value for value, _ in seen]
        assert values == sorted(values) and seen[-1] == [100, "completed 100%"]
        assert seen[0][1] == "queued 0%" or seen[0][1].startswith("in_progress"), seen  # shown while it ran

        wait_for(page, "document.querySelector('#player').readyState >= 2", timeout=JOB_MS)
        video = page.evaluate(PLAY_VIDEO)
        assert video["error"] is None and (video["width"], video["height"]) == (320, 192), video
        assert video["duration"] > 0 and video["played"] > 0 and not video["paused"], video

        row = page.locator(f"#history tr[data-job='{job_id}']")
        row.locator("td.state", has_text="completed").wait_for()
        cells = {name: row.locator(f"td.{name}").inner_text() for name in ("prompt", "size", "frames", "steps", "seed")}
        assert cells == {"prompt": PROMPT, "size": "320x192", "frames": "5", "steps": "2", "seed": "11"}
        assert row.locator("button.play").count() == 1
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    status, video = api(server, "GET", f"/v1/videos/{job_id}")
    assert status == 200
    asked = {name: video["parameters"][name] for name in ("prompt", "negative_prompt", "size", "guidance", "seed")}
    assert asked == {
        "prompt": PROMPT,
        "negative_prompt": "blurry, dark",
        "size": "320x192",
        "guidance": 6.0,
        "seed": 11,
    }


def test_a_chosen_image_is_sent_as_input_reference(browser, server, tmp_path):
    """The image chooser's file reaches the server as the multipart part input_reference (image-to-video)."""
    picture = tmp_path / "frame.png"
    Image.new("RGB", (320, 192), (200, 80, 20)).save(picture)
    with opened(browser, server) as page:
        page.fill("#prompt", "a fox that starts from this picture")
        page.set_input_files("#image", str(picture))
        job_id = submit_and_finish(page)
    status, video = api(server, "GET", f"/v1/videos/{job_id}")
    assert status == 200 and video["parameters"]["input_reference"] is True


def test_the_action_panel_runs_a_policy_and_plots_its_predicted_actions(browser, server, tmp_path):
    """Choose the policy mode, an embodiment and a chunk, pick a first frame, submit: the size and frame fields
    step aside, the job runs as an action run, and under the video a plot draws one line per number of the
    predicted rows, over the chunk, each point placed by its value (as GET .../actions gives them)."""
    picture = tmp_path / "frame.png"
    Image.new("RGB", (320, 192), (40, 120, 200)).save(picture)
    with opened(browser, server) as page:
        domains = page.eval_on_selector_all("#action-domain option", "options => options.map((o) => o.value)")
        assert domains == api(server, "GET", "/health")[1]["actions"]["domains"] and "hand_pose" not in domains
        page.fill("#prompt", "the gripper picks up the cup")
        page.select_option("#action-mode", "policy")
        assert page.locator("#size").is_disabled() and page.locator("#frames").is_disabled()
        assert page.locator("#action-file").is_disabled()  # rows go with forward dynamics only
        page.select_option("#action-domain", "pusht")
        page.fill("#action-chunk", "4")
        page.set_input_files("#image", str(picture))
        job_id = submit_and_finish(page)
        wait_for(page, "!document.querySelector('#actions-figure').hidden", timeout=JOB_MS)
        assert page.get_attribute("#actions-plot", "data-job") == job_id
        lines = page.eval_on_selector_all(
            "#actions-plot g.dimension polyline",
            "lines => lines.map((l) => l.getAttribute('points').split(' ').map((p) => p.split(',').map(Number)))",
        )
        assert "4 predicted actions of pusht" in page.locator("#actions-caption").inner_text()
        page.screenshot(path=str(tmp_path / "actions.png"), full_page=True)

    status, video = api(server, "GET", f"/v1/videos/{job_id}")
    assert status == 200 and video["parameters"]["action"]["mode"] == "policy"
    assert video["parameters"]["action"]["domain"] == "pusht" and video["parameters"]["action"]["chunk_size"] == 4
    status, predicted = api(server, "GET", f"/v1/videos/{job_id}/actions")
    rows = predicted["actions"]
    assert status == 200 and len(lines) == len(rows[0]) == 2 and all(len(line) == 4 for line in lines)
    assert all([x for x, _ in line] == sorted(x for x, _ in line) for line in lines)  # the steps, left to right
    placed = sorted((rows[step][column], y) for column, line in enumerate(lines) for step, (_, y) in enumerate(line))
    heights = [y for _, y in placed]
    assert heights == sorted(heights, reverse=True) and heights[0] > heights[-1]  # a larger value is drawn higher


def test_a_bad_frame_count_shows_the_servers_message(browser, server):
    """Frames 6 typed into the free entry: the error area shows the server's own 400 message, and no job starts."""
    status, body = api(server, "POST", "/v1/videos", {"prompt": "a fox", "frames": 6})
    assert status == 400
    with opened(browser, server) as page:
        page.fill("#prompt", "a fox")
        page.fill("#frames", "6")
        page.click("#submit")
        page.wait_for_selector("#error:not([hidden])")
        assert page.locator("#error").inner_text() == body["error"]["message"]
        assert page.locator("#job").is_hidden()


def test_the_delete_button_removes_the_job_and_its_row(browser, server):
    """A finished job's delete button deletes it on the server and takes its row out of the history."""
    with opened(browser, server) as page:
        page.fill("#prompt", "a fox to delete")
        job_id = submit_and_finish(page)
        row = page.locator(f"#history tr[data-job='{job_id}']")
        row.locator("td.state", has_text="completed").wait_for()
        row.locator("button.delete").click()
        row.wait_for(state="detached")
        assert page.locator("#player").is_hidden() and page.locator("#error").is_hidden()
    assert api(server, "GET", f"/v1/videos/{job_id}")[0] == 404


def test_the_page_shows_the_phase_the_time_left_and_a_preview_that_changes_as_it_renders(browser, server, previews):
    """An 8-step job followed through its event stream: the run line says the denoising steps (step k of 8) and
    the decode, a time left ("about N s left"), and the preview image shows several steps' colours in turn
    while it runs; at the end the video replaces it."""
    with opened(browser, server) as page:
        page.fill("#prompt", "a fox to watch")
        page.fill("#steps", "8")
        page.evaluate(WATCH_RUN)
        submit_and_finish(page)
        run = page.evaluate("window.run")
        assert page.locator("#preview").is_hidden() and page.locator("#player").is_visible()
    steps = {phase for phase in run["phases"] if phase.startswith("denoising: step ")}
    assert len(steps) >= 4 and all(re.fullmatch(r"denoising: step [1-8] of 8", step) for step in steps), steps
    assert any(phase.startswith("decoding") for phase in run["phases"]), run["phases"]
    assert any(re.fullmatch(r"· about \d+ s left", eta) for eta in run["etas"]), run["etas"]
    shown = {tuple(colour) for colour in run["colours"]}
    drawn = {colour_of(step) for step in range(1, 9)}
    assert len(shown) >= 3 and shown <= drawn, (shown, drawn)


def test_the_cancel_button_stops_the_running_job(browser, server, previews):
    """Cancel while a long job denoises: the page says cancelled, the server has no such job any more (the
    running job was stopped and removed) and the history has no row for it."""
    with opened(browser, server) as page:
        page.fill("#prompt", "a fox to cancel")
        page.fill("#steps", "200")
        page.click("#submit")
        wait_for(page, "/^denoising: step [2-9]/.test(document.querySelector('#phase').textContent)", timeout=JOB_MS)
        job_id = page.get_attribute("#cancel", "data-job")
        page.click("#cancel")
        wait_for(page, "document.querySelector('#status').textContent === 'cancelled'", timeout=JOB_MS)
        assert page.locator("#phase").inner_text() == "cancelled" and page.locator("#cancel").is_hidden()
        assert page.locator("#error").is_hidden()
        page.locator(f"#history tr[data-job='{job_id}']").wait_for(state="detached")
    assert api(server, "GET", f"/v1/videos/{job_id}")[0] == 404


def test_without_the_event_stream_the_page_polls(browser, server):
    """The events route unreachable (a proxy that drops it): the page follows the job by polling and shows its
    video all the same."""
    with opened(browser, server) as page:
        page.route("**/events", lambda route: route.abort())
        page.fill("#prompt", "a fox behind a proxy")
        page.evaluate(WATCH_PROGRESS)
        submit_and_finish(page)
        assert page.evaluate("window.seen")[-1] == [100, "completed 100%"]


def test_with_an_api_key_the_page_asks_for_it_then_works_and_remembers_it(browser, tmp_path):
    """Against --api-key the page shows the key field and the 401's message; typed in, the key makes a job
    run and play, followed through its event stream (the run line said its step) with its live preview (both
    read with the key); after a reload the key comes back from localStorage and the history loads."""
    with InProcessServer(tmp_path / "storage", "--steps", "1", "--frames", "5", "--api-key", KEY, listen=True) as keyed:
        with opened(browser, keyed) as page:
            page.wait_for_selector("#key-row:not([hidden])")
            page.wait_for_selector("#error:not([hidden])")  # the history could not be read without the key
            assert "API key" in page.locator("#error").inner_text()
            page.fill("#api-key", KEY)
            page.fill("#prompt", "a keyed fox")
            page.evaluate(WATCH_RUN)
            job_id = submit_and_finish(page)
            wait_for(page, "document.querySelector('#player').readyState >= 2", timeout=JOB_MS)
            assert page.locator("#error").is_hidden()
            wait_for(page, "window.run.colours.length > 0", timeout=JOB_MS)  # the server's own fast preview
            phases = page.evaluate("window.run.phases")  # a phase: only the event stream tells one
            assert any(phase.startswith(("denoising", "decoding", "writing")) for phase in phases), phases

            page.reload()
            page.locator(f"#history tr[data-job='{job_id}']").wait_for()
            assert page.input_value("#api-key") == KEY and page.locator("#error").is_hidden()


def wait_for(page, expression: str, timeout: float = 30_000) -> None:
    """Poll `expression` in the page until it is truthy. Not wait_for_function: that evaluates its string inside
    the page, which the page's Content-Security-Policy (no eval) refuses."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout / 1000:g} s: {expression}")
        page.wait_for_timeout(50)
