"""What every request passes before a route sees it: where it comes from, the API key, and its body.

- Without an API key (the default) only the server's own page and programs on the machine may call: a
  request for a host name that is not the server's (DNS rebinding), from another web origin (a form another
  page posts) or a browser's cross-site request is refused 403, unless `--allow-origin` names that origin.
  Without an Origin or Sec-Fetch-Site header (curl, the openai client) only the Host is checked.
- With a key every /v1 route and /metrics need `Authorization: Bearer KEY`, compared as bytes: the key's
  UTF-8 (what curl and most clients send) or, for a key a browser can send, its Latin-1.
- A body is counted as the route reads it, chunked or not: past MAX_BODY_BYTES it is answered 413 and no
  more is read; one that stops arriving for BODY_IDLE_SECONDS, or is not whole after BODY_SECONDS, is
  answered 408. Either answer closes the connection (the rest of the body is never read).
- Every response carries SECURITY_HEADERS, and CORS headers for an allowed origin (whose preflight is
  answered here).

`install_guard(app, settings)` adds it to the app; the routes never repeat these checks.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app.serve_settings import ServeSettings
from .api_errors import ApiError, unauthorized
from .requests import MAX_UPLOAD_BYTES

MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 2**20
BODY_IDLE_SECONDS = 15.0  # the longest pause in a body that arrives: one that stops is cut off this soon
BODY_SECONDS = 300.0  # a body must be whole this soon after its request's head (33 MiB at 115 kB/s)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"(\[[0-9a-z:.%]+\]|[^:\[\]/@\s]+)(?::([0-9]{1,5}))?")  # name or [IPv6], then :port
# The page is /, /static/app.js and /static/style.css, nothing inline; its player and its live preview show
# blob: URLs (fetched with the key, which an <img src> or <video src> cannot send).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",  # another site may not embed (img, video) what we serve
    "cross-origin-opener-policy": "same-origin",
}
CORS_PREFLIGHT_HEADERS = {
    "access-control-allow-methods": "GET, POST, DELETE",
    "access-control-allow-headers": "authorization, content-type",
    "access-control-max-age": "600",
}


def install_guard(app: FastAPI, settings: ServeSettings) -> None:
    app.add_middleware(Guard, settings=settings)


class Guard:
    """The ASGI middleware: checks a request's head, answers a refusal itself, and hands the route a body
    that is counted and timed as it is read."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings
        self.allowed_origins = frozenset(_canonical_origin(origin) for origin in settings.allow_origins)
        # A host named by an allowed origin may reach the server under its name (a proxy in front of it).
        self.allowed_hosts = frozenset(_address(urlsplit(origin).hostname or "") for origin in self.allowed_origins)
        self.keys = () if settings.api_key is None else _key_forms(settings.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _Headers(scope)
        origin = headers.one(b"origin")
        allowed = origin if origin is not None and _canonical_origin(origin) in self.allowed_origins else None
        send = _with_response_headers(send, allowed)
        if allowed is not None and scope["method"] == "OPTIONS" and headers.one(b"access-control-request-method"):
            return await Response(status_code=204, headers=CORS_PREFLIGHT_HEADERS)(scope, receive, send)
        refusal = self.refusal(scope, headers, allowed)
        if refusal is not None:
            return await _answer(refusal, scope, receive, send)
        await self._with_counted_body(scope, receive, send)

    def refusal(self, scope: Scope, headers: _Headers, allowed_origin: str | None) -> ApiError | None:
        """Why the request's head is refused (its origin, its key, its announced size), or None."""
        if self.settings.api_key is None:
            refusal = self.foreign(scope, headers, allowed_origin)
            if refusal is not None:
                return refusal
        path = scope["path"]
        if self.keys and (path.startswith("/v1/") or path == "/metrics") and not self.authorized(headers):
            return unauthorized()
        length = headers.one(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _too_large()
        return None

    def foreign(self, scope: Scope, headers: _Headers, allowed_origin: str | None) -> ApiError | None:
        """Why a request to a server without a key is refused as not the server's own, or None. The Host
        stops DNS rebinding (a name of the attacker's that resolves to this machine), the Origin a page of
        another site that posts a form or calls fetch, Sec-Fetch-Site what a browser sends elsewhere without
        an Origin (an img or video of another site); following a link to the server stays possible."""
        host = headers.one(b"host")
        if headers.count(b"host") != 1:  # HTTP/1.0 may leave it out; two are a smuggler's
            return _forbidden("send exactly one Host header: without an API key the server checks it")
        if not self.own_host(host, scope):
            return _forbidden(
                f"host {host!r} is not this server's address: without an API key it answers only "
                f"{', '.join(LOOPBACK_HOSTS)} or the address it listens on, at its port (--allow-origin adds a name)"
            )
        origin = headers.one(b"origin")
        own = host is not None and origin is not None and _canonical_origin(origin) == _own_origin(scope, host)
        if origin is not None and not own and allowed_origin is None:
            return _forbidden(
                f"the web page at {origin!r} may not call this server: without an API key only its own page "
                "may (--allow-origin allows another page's origin)"
            )
        site = headers.one(b"sec-fetch-site")
        navigation = scope["method"] in ("GET", "HEAD") and headers.one(b"sec-fetch-mode") == "navigate"
        if site in ("cross-site", "same-site") and allowed_origin is None and not own and not navigation:
            return _forbidden(
                "a browser's request from another site may not call this server: without an API key only its "
                "own page may (--allow-origin allows another page's origin)"
            )
        return None

    def own_host(self, host: str, scope: Scope) -> bool:
        """Whether the Host header names this server: localhost, the bound address or the address the
        connection came in on (a wildcard bind: the IP a client used), at the port it came in on; or the
        host of an allowed origin, at any port (a proxy forwards its own)."""
        match = _HOST.fullmatch(host.lower())
        if match is None:
            return False
        name = _address(match[1])
        if name in self.allowed_hosts:
            return True
        local_address, local_port = scope.get("server") or ("", None)
        port = int(match[2]) if match[2] else DEFAULT_PORTS.get(scope["scheme"])
        names = {*map(_address, LOOPBACK_HOSTS), _address(self.settings.host), _address(local_address)}
        return port == local_port and name in names

    def authorized(self, headers: _Headers) -> bool:
        scheme, _, token = (headers.raw(b"authorization") or b"").partition(b" ")
        token = token.strip()
        matches = [hmac.compare_digest(token, key) for key in self.keys]  # each compared, in constant time
        return scheme.lower() == b"bearer" and any(matches)

    async def _with_counted_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The route, on a counted body; when the body is refused, the refusal is the answer, whatever
        the route made of the error it got reading it."""
        body = _CountedBody(receive)
        started = False

        async def send_unless_refused(message: Message) -> None:
            nonlocal started
            if body.refusal is None:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, body.receive, send_unless_refused)
        except Exception:
            if body.refusal is None:
                raise
        if body.refusal is not None and not started:  # once started, uvicorn cuts the unfinished response
            await _answer(body.refusal, scope, receive, send)


class _BodyRefused(Exception):
    """Raised to the route that reads a refused body; the guard answers the refusal."""


class _CountedBody:
    """The request's body as the route reads it: counted, and timed while it arrives."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._read = 0
        self._whole = False
        self._deadline = asyncio.get_running_loop().time() + BODY_SECONDS
        self.refusal: ApiError | None = None

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise _BodyRefused(self.refusal.message)
        if self._whole:
            return await self._receive()  # only the client's disconnect is left to wait for
        left = self._deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, min(BODY_IDLE_SECONDS, left)))
        except asyncio.TimeoutError:
            if left <= BODY_IDLE_SECONDS:
                raise self._refuse(ApiError(408, f"the request body took longer than {BODY_SECONDS:g} s")) from None
            raise self._refuse(
                ApiError(408, f"the request body stopped arriving (nothing for {BODY_IDLE_SECONDS:g} s)")
            ) from None
        if message["type"] != "http.request":
            self._whole = True
            return message
        self._read += len(message.get("body", b""))
        self._whole = not message.get("more_body", False)
        if self._read > MAX_BODY_BYTES:
            raise self._refuse(_too_large())
        return message

    def _refuse(self, refusal: ApiError) -> _BodyRefused:
        self.refusal = refusal
        return _BodyRefused(refusal.message)


class _Headers:
    """A request's headers as they arrived (bytes), read by name."""

    def __init__(self, scope: Scope) -> None:
        self._raw: list[tuple[bytes, bytes]] = scope["headers"]

    def raw(self, name: bytes) -> bytes | None:
        return next((value for key, value in self._raw if key == name), None)

    def one(self, name: bytes) -> str | None:
        """The header's value as text (Latin-1: each byte a character, nothing lost), or None."""
        value = self.raw(name)
        return None if value is None else value.decode("latin-1").strip()

    def count(self, name: bytes) -> int:
        return sum(key == name for key, _ in self._raw)


def _with_response_headers(send: Send, allowed_origin: str | None) -> Send:
    """`send` that adds the security headers to the response (and CORS headers for an allowed origin)."""
    added = dict(SECURITY_HEADERS)
    if allowed_origin is not None:
        added |= {"access-control-allow-origin": allowed_origin, "vary": "Origin"}

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            headers = MutableHeaders(scope=message)
            for name, value in added.items():
                if name not in headers:
                    headers.append(name, value)
        await send(message)

    return send_with_headers


async def _answer(error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    """The refusal in OpenAI's error body; the connection closes after it (a body may still be on its way)."""
    response = JSONResponse(error.body(), status_code=error.status, headers={"connection": "close"})
    await response(scope, receive, send)


def _forbidden(message: str) -> ApiError:
    return ApiError(403, message, code="forbidden")


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")


def _key_forms(key: str) -> tuple[bytes, ...]:
    """The key as a client may send it: UTF-8, and Latin-1 where it has that form (a browser's fetch sends
    each character of a header as one byte and cannot send one past U+00FF)."""
    forms = [key.encode("utf-8")]
    try:
        forms.append(key.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return tuple(dict.fromkeys(forms))


def _address(host: str) -> str:
    """A host as compared: an IP address in its one form (brackets off, IPv4 inside IPv6 as IPv4), a name
    lower-cased."""
    text = host.lower().removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _canonical_origin(origin: str) -> str:
    """An origin as compared: lower-cased, without its scheme's default port."""
    origin = origin.strip().lower().rstrip("/")
    scheme = origin.partition("://")[0]
    port = DEFAULT_PORTS.get(scheme)
    return origin.removesuffix(f":{port}") if port is not None else origin


def _own_origin(scope: Scope, host: str) -> str:
    """The origin of the server's own page, as this request reached it."""
    return _canonical_origin(f"{scope['scheme']}://{host}")
