"""The HTTP boundary of `cosmos3-offload serve` (serve/guard.py, serve/server.py): who may call a server without
a key, the key as bytes, bodies counted as read, the security headers, and connections that cannot be held for
ever. The app is the one `serve` builds (the real CLI, in this process); the connection limits are tested over
real sockets against it served by uvicorn as `serve` configures it, from a thread, with short patched limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from html.parser import HTMLParser

import httpx2
import pytest
from server_process import cli_serve_arguments
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from cosmos3_offload.app.serve_settings import ServeSettings
from cosmos3_offload.serve import guard, server

ALLOWED = "http://studio.example:3000"  # the module's server runs with --allow-origin ALLOWED
KEY = "clé-secrète-ключ"  # not ASCII, and not even Latin-1
PATCHED_SECONDS = 1  # the limits the socket tests patch in; a connection must be closed within CLOSED_SECONDS
CLOSED_SECONDS = 4


@contextlib.contextmanager
def _app(storage, *flags):
    """The app `serve --storage storage *flags` runs, with its worker started."""
    with server.in_process(*cli_serve_arguments(storage, *flags)) as running:
        yield running.app


@pytest.fixture(scope="module")
def open_app(tmp_path_factory):
    """The app with no key (the default) and ALLOWED as an allowed origin."""
    with _app(tmp_path_factory.mktemp("storage"), "--allow-origin", ALLOWED) as app:
        yield app


@pytest.fixture(scope="module")
def http(open_app):
    with TestClient(open_app, base_url="http://testserver") as client:
        yield client


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A TestClient on the app with the non-ASCII --api-key KEY."""
    with _app(tmp_path_factory.mktemp("storage"), "--api-key", KEY) as app:
        with TestClient(app, base_url="http://testserver") as client:
            yield client


def _refused(response, status: int = 403) -> str:
    """The message of a refusal in OpenAI's error body, once its status and shape are checked."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error["message"]


def test_a_forged_host_is_refused_without_a_key(http):
    """DNS rebinding: a request for Host attacker.example (a name that resolves to this machine) gets 403, not
    the job list; so does localhost at another port. localhost at the server's port and the host of an allowed
    origin (a proxy in front) pass."""
    for host in ("attacker.example", "attacker.example:80", "localhost:8001", "127.0.0.1.attacker.example"):
        assert "is not this server's address" in _refused(http.get("/v1/videos", headers={"host": host}))
        _refused(http.get("/", headers={"host": host}))
    assert http.get("/v1/videos", headers={"host": "localhost"}).status_code == 200  # the TestClient's port: 80
    assert http.get("/v1/videos", headers={"host": "[::1]:80"}).status_code == 200
    assert http.get("/health", headers={"host": "studio.example"}).status_code == 200


def test_a_foreign_page_cannot_post_a_form_and_the_own_page_can(http):
    """A multipart form posted by another site's page (a no-cors POST: Origin and Sec-Fetch-Site tell it) is
    refused 403 and creates no job; a sandboxed page (Origin null) too; the same form from the server's own
    page reaches the route (a 400 for its unknown field, not the guard's 403)."""
    form = {"prompt": (None, "a fox"), "size": (None, "320x192"), "frames": (None, "5"), "steps": (None, "1")}
    for origin in ("http://evil.example", "null", "http://testserver:8080"):
        headers = {"origin": origin, "sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
        assert "may not call this server" in _refused(http.post("/v1/videos", files=form, headers=headers))
    assert http.get("/v1/videos").json()["data"] == []
    own = {"origin": "http://testserver", "sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"}
    answer = http.post("/v1/videos", files={**form, "colour": (None, "red")}, headers=own)
    assert answer.status_code == 400 and "colour" in answer.json()["error"]["message"]


def test_a_browsers_cross_site_request_without_origin_is_refused_but_a_link_is_followed(http):
    """Sec-Fetch-Site: another site's <video src> (no Origin header) is refused; a link followed to the page
    (a navigation) and a request typed by the user pass."""
    embed = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "video"}
    assert "another site" in _refused(http.get("/v1/videos", headers=embed))
    link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert http.get("/", headers=link).status_code == 200
    assert http.get("/v1/videos", headers={"sec-fetch-site": "none", "sec-fetch-mode": "navigate"}).status_code == 200


def test_an_allowed_origin_passes_and_gets_cors_headers(http):
    """--allow-origin's page may call the server: its preflight is answered, its requests reach the routes and
    every answer (an error too) carries Access-Control-Allow-Origin for it, so its fetch can read it."""
    preflight = {"origin": ALLOWED, "access-control-request-method": "POST", "access-control-request-headers": "x"}
    answer = http.options("/v1/videos", headers=preflight)
    assert answer.status_code == 204 and answer.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in answer.headers["access-control-allow-methods"]
    cors = {"origin": ALLOWED, "sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}
    answer = http.post("/v1/videos", json={"prompt": "   "}, headers=cors)
    assert answer.status_code == 400 and answer.headers["access-control-allow-origin"] == ALLOWED
    assert http.get("/v1/videos", headers=cors).status_code == 200
    refused = http.get("/v1/videos", headers={**cors, "origin": "http://evil.example"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_a_chunked_body_over_the_limit_is_413_and_read_no_further(open_app):
    """A 150 MiB chunked JSON body (no Content-Length): answered 413 with the error body once MAX_BODY_BYTES
    are read, and not a chunk more is pulled from the client (before: all of it was read, then parsed)."""
    chunk, chunks = b" " * 2**20, 150
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield chunk

    async def post() -> httpx2.Response:
        transport = httpx2.ASGITransport(app=open_app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            return await client.post("/v1/videos", content=body(), headers={"content-type": "application/json"})

    answer = asyncio.run(post())
    assert "larger than" in _refused(answer, 413)
    assert answer.headers["connection"] == "close"
    assert pulled == guard.MAX_BODY_BYTES // len(chunk) + 1


class _Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))


def test_every_response_has_the_security_headers_and_the_page_needs_nothing_inline(http):
    """The page, its script and style, the API, a 404 and a refusal all carry the CSP (self only, no frames),
    nosniff, DENY and no-referrer; the page has no inline script, style or handler the CSP would block."""
    for path, headers in (
        ("/", {}),
        ("/static/app.js", {}),
        ("/static/style.css", {}),
        ("/health", {}),
        ("/v1/videos/video_missing", {}),
        ("/", {"host": "attacker.example"}),
    ):
        answer = http.get(path, headers=headers)
        assert answer.headers["x-content-type-options"] == "nosniff", path
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["referrer-policy"] == "no-referrer"
        policy = dict(part.strip().split(" ", 1) for part in answer.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
        sources = " ".join(policy.values())
        assert not any(word in sources for word in ("http", "*", "unsafe")), sources
    page = _Tags()
    page.feed(http.get("/").text)
    for tag, attrs in page.tags:
        assert tag != "style" and "style" not in attrs and not any(name.startswith("on") for name in attrs), tag
        assert tag != "script" or attrs.get("src", "").startswith("/static/")
        for link in (attrs.get("src"), attrs.get("href")):
            assert link is None or link.startswith("/") or link.startswith("data:"), link


def test_a_non_ascii_api_key_is_compared_as_utf8_bytes(keyed):
    """`--api-key` with non-ASCII characters: the key's UTF-8 bytes in the header are accepted (before, the
    header was compared Latin-1-decoded and such a key locked everyone out); a wrong key is still a 401."""
    assert keyed.get("/v1/videos", headers={"authorization": b"Bearer " + KEY.encode()}).status_code == 200
    assert keyed.get("/metrics", headers={"authorization": b"Bearer " + KEY.encode()}).status_code == 200
    wrong = b"Bearer " + KEY[:-1].encode()
    assert _refused(keyed.get("/v1/videos", headers={"authorization": wrong}), 401)
    assert _refused(keyed.get("/v1/videos"), 401)


def _statuses(settings: ServeSettings, url: str, headers: list[dict]) -> list[int]:
    """The status of GET `url` with each of `headers`, through the guard alone (on an app that answers 200),
    called as uvicorn calls it for a connection to `url`'s address and port."""

    async def ok(scope, receive, send) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    async def get_all() -> list[int]:
        transport = httpx2.ASGITransport(app=guard.Guard(ok, settings))
        async with httpx2.AsyncClient(transport=transport) as client:
            return [(await client.get(url, headers=each)).status_code for each in headers]

    return asyncio.run(get_all())


def test_a_latin1_key_is_accepted_as_a_browser_sends_it(tmp_path):
    """A key of Latin-1 characters arrives from the page's fetch one byte a character (a browser cannot send
    UTF-8 in a header): that form passes, as does its UTF-8; the key without its accents does not."""
    key = "clé-secrète"
    forms = (key.encode("latin-1"), key.encode(), b"cle-secrete")
    headers = [{"authorization": b"Bearer " + form} for form in forms]
    statuses = _statuses(ServeSettings(api_key=key, storage=tmp_path), "http://127.0.0.1:8000/v1/videos", headers)
    assert statuses == [200, 200, 401]


def test_a_wildcard_bind_answers_the_address_a_client_used_and_no_other_name(tmp_path):
    """--host 0.0.0.0 without a key: a client of the machine's address 192.168.1.5 (the connection's own
    address, which uvicorn reports) and one on localhost pass; a name (the machine's, or a rebinding one) is
    refused, as is the address at another port."""
    settings = ServeSettings(host="0.0.0.0", storage=tmp_path)
    hosts = ["192.168.1.5:8000", "localhost:8000", "gpu-box.lan:8000", "rebind.attacker.example:8000", "192.168.1.5"]
    statuses = _statuses(settings, "http://192.168.1.5:8000/v1/videos", [{"host": host} for host in hosts])
    assert statuses == [200, 200, 403, 403, 403]


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_the_api_docs_are_not_served(http, keyed, path):
    """/docs and /openapi.json answer 404 with or without a key: the server does not publish its schema."""
    assert http.get(path).status_code == 404
    assert keyed.get(path).status_code == 404
    assert keyed.get(path, headers={"authorization": b"Bearer " + KEY.encode()}).status_code == 404


@contextlib.contextmanager
def _served(app):
    """`app` served by uvicorn as `serve` runs it, on a free loopback port, from a thread; yields the address."""
    listener = server.bind("127.0.0.1", 0)
    running = server.uvicorn_server(app)
    thread = threading.Thread(target=running.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not running.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield listener.getsockname()[:2]
    finally:
        running.should_exit = True
        thread.join(30)
        listener.close()


@pytest.fixture
def address(open_app, monkeypatch):
    """(host, port) of the app served by uvicorn, its head deadline, keep-alive and body pause PATCHED_SECONDS."""
    monkeypatch.setattr(server, "REQUEST_HEAD_SECONDS", PATCHED_SECONDS)
    monkeypatch.setattr(server, "KEEP_ALIVE_SECONDS", PATCHED_SECONDS)
    monkeypatch.setattr(guard, "BODY_IDLE_SECONDS", PATCHED_SECONDS)
    with _served(open_app) as served:
        yield served


def _until_closed(connection: socket.socket, send: bytes = b"", *, byte_every: float = 0.0) -> tuple[bytes, float]:
    """(what the server sent, seconds after `send` began) once it closes the connection, sending `send` whole
    or a byte every `byte_every` seconds meanwhile; fails if it is still open after CLOSED_SECONDS."""
    start = time.monotonic()
    received = b""
    pending = send
    while time.monotonic() - start < CLOSED_SECONDS:
        if pending:
            step = 1 if byte_every else len(pending)
            try:
                connection.sendall(pending[:step])
            except (BrokenPipeError, ConnectionResetError):
                return received, time.monotonic() - start
            pending = pending[step:]
        readable, _, _ = select.select([connection], [], [], byte_every or 0.1)
        if readable:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return received, time.monotonic() - start
            received += data
    raise AssertionError(f"the connection is still open after {CLOSED_SECONDS} s (received {received[:80]!r})")


def test_an_idle_connection_is_closed(address):
    """A connection that sends nothing is closed after REQUEST_HEAD_SECONDS (before: held for ever)."""
    with socket.create_connection(address) as connection:
        received, seconds = _until_closed(connection)
    assert received == b"" and PATCHED_SECONDS - 0.2 < seconds


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(address):
    """Slowloris: a head trickled a byte every 50 ms (7 s in all) is cut off after REQUEST_HEAD_SECONDS,
    unanswered; a head sent at once is answered, and the connection kept until it idles."""
    head = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nX-Padding: {'a' * 100}\r\n\r\n".encode()
    with socket.create_connection(address) as connection:
        received, seconds = _until_closed(connection, head, byte_every=0.05)
    assert received == b"" and seconds < len(head) * 0.05
    with socket.create_connection(address) as connection:
        received, _ = _until_closed(connection, head)
    assert received.startswith(b"HTTP/1.1 200 ")


def test_a_chunked_body_that_stops_is_answered_408_and_closed(address):
    """A chunked body that stops arriving after its first chunk is answered 408 (OpenAI's error body) and its
    connection closed after BODY_IDLE_SECONDS (before: the route waited for the rest for ever)."""
    head = (
        f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Type: application/json\r\n"
        'Transfer-Encoding: chunked\r\n\r\n5\r\n{"pro\r\n'
    ).encode()
    with socket.create_connection(address) as connection:
        received, seconds = _until_closed(connection, head)
    status, _, rest = received.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408 ") and PATCHED_SECONDS - 0.2 < seconds
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert "stopped arriving" in error["message"]


def test_a_slow_but_steady_body_is_read_whole(address):
    """The limits cut off silence, not slowness: a chunked body sent in four parts 0.4 s apart (longer in all
    than the patched head deadline and body pause) reaches the route, which answers its blank prompt 400."""
    body = json.dumps({"prompt": "   "}).encode()
    parts = [body[i : i + 5] for i in range(0, len(body), 5)][:3] + [body[15:]]
    with socket.create_connection(address) as connection:
        connection.sendall(
            f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        for part in parts:
            time.sleep(0.4)
            connection.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        received, _ = _until_closed(connection, b"0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 "), received[:200]


def test_a_request_without_exactly_one_host_is_refused_without_a_key(address):
    """HTTP/1.0 lets a client leave out Host, which skipped the rebinding check (200 and the job list); two
    Host headers are refused too (by the server's HTTP layer or the guard: never answered 200)."""
    with socket.create_connection(address) as connection:
        received, _ = _until_closed(connection, b"GET /v1/videos HTTP/1.0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 403") and b"exactly one Host" in received
    twice = f"GET /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nHost: 127.0.0.1:{address[1]}\r\n\r\n"
    with socket.create_connection(address) as connection:
        received, _ = _until_closed(connection, twice.encode())
    assert received.split(b" ")[1] in (b"400", b"403")


def test_a_client_that_leaves_mid_body_is_no_server_error(address, caplog):
    """A client that sends 5 of its 100 announced bytes and hangs up was logged as an unexpected server
    failure with its traceback (any client could flood the log); it is a line at INFO now."""
    head = f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Type: application/json\r\n"
    with caplog.at_level("INFO"):
        with socket.create_connection(address) as connection:
            connection.sendall(f'{head}Content-Length: 100\r\n\r\n{{"pr'.encode())
        time.sleep(1.0)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
