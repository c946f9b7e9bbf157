"""The web page, as a person uses it, in Debian's headless Chromium (driven by Playwright, which is told
to use that browser and never downloads its own)."""

from __future__ import annotations

import os
import shutil

import pytest
from server_process import ServerProcess

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
JOB_MS = 120_000


def _browser_or_skip():
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
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("storage"), "--steps", "2", "--frames", "5") as running:
        yield running


def test_a_prompt_becomes_a_video_that_plays(browser, server, tmp_path):
    """Type a prompt, submit: the progress bar reaches 100%, the video plays, the history lists the job."""
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#size').options.length > 0")
    assert page.locator("#size").input_value() == "320x192"  # the server's default tier and aspect ratio
    page.fill("#prompt", "a red fox running through fresh snow")
    page.fill("#seed", "11")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#progress').value === 100", timeout=JOB_MS)
    assert page.locator("#status").inner_text() == "completed 100%"
    page.wait_for_function("document.querySelector('#player').readyState >= 2", timeout=JOB_MS)
    video = page.evaluate(
        """async () => {
            const v = document.querySelector('#player');
            await v.play();
            await new Promise((resolve) => setTimeout(resolve, 300));
            return {width: v.videoWidth, height: v.videoHeight, duration: v.duration, time: v.currentTime,
                    paused: v.paused, error: v.error && v.error.code};
        }"""
    )
    assert video["error"] is None and (video["width"], video["height"]) == (320, 192)
    assert video["duration"] > 0 and video["time"] > 0 and not video["paused"]
    row = page.locator("#history tbody tr").first
    assert "a red fox running through fresh snow" in row.inner_text() and "11" in row.inner_text()
    assert "completed" in row.locator("td.state").inner_text()
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    page.close()


def test_a_bad_request_shows_the_servers_message(browser, server):
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#size').options.length > 0")
    page.fill("#prompt", "a fox")
    page.fill("#frames", "6")
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "frame count must be 1 or 4k+1" in page.locator("#error").inner_text()
    assert page.locator("#job").is_hidden()
    page.close()


def test_the_delete_button_removes_a_job(browser, server):
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("document.querySelector('#size').options.length > 0")
    page.fill("#prompt", "a fox to delete")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#progress').value === 100", timeout=JOB_MS)
    rows = page.locator("#history tbody tr")
    page.wait_for_function("document.querySelector('#history tbody tr td.prompt')?.textContent === 'a fox to delete'")
    before = rows.count()
    rows.first.locator("button.delete").click()
    page.wait_for_function(f"document.querySelectorAll('#history tbody tr').length === {before - 1}")
    assert "a fox to delete" not in page.locator("#history").inner_text()
    page.close()


def test_with_an_api_key_the_page_asks_for_it_then_works(browser, tmp_path):
    with ServerProcess(tmp_path / "storage", "--steps", "1", "--frames", "5", "--api-key", "page-key-123") as keyed:
        page = browser.new_page()
        page.goto(keyed.url)
        page.wait_for_selector("#key-row:not([hidden])")
        page.wait_for_selector("#error:not([hidden])")  # the history could not be read without the key
        assert "API key" in page.locator("#error").inner_text()
        page.fill("#api-key", "page-key-123")
        page.dispatch_event("#api-key", "change")
        page.fill("#prompt", "a keyed fox")
        page.click("#submit")
        page.wait_for_function("document.querySelector('#progress').value === 100", timeout=JOB_MS)
        page.wait_for_function("document.querySelector('#player').readyState >= 2", timeout=JOB_MS)
        assert page.locator("#error").is_hidden()
        page.close()
