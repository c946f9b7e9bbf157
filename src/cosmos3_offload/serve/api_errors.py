"""Errors as the OpenAI API words them: `{"error": {"message", "type", "param", "code"}}`.

A request the server cannot take is an `ApiError` with its HTTP status; nothing a client sends
may end in a 500 (an unforeseen failure still gets this body, type "server_error").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..request.checks import shown


@dataclass(eq=False)  # not frozen: Starlette clears an exception's __traceback__ once it is handled
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def not_found(kind: str, job_id: str) -> ApiError:
    """No `kind` (video, image) `job_id`: the id quoted escaped and cut short, whatever the client sent."""
    return ApiError(404, f"no {kind} {shown(job_id)}", code="not_found")


def file_gone(kind: str, job_id: str) -> ApiError:
    """A completed job whose file is no longer in the storage (removed behind the server's back)."""
    return ApiError(
        410,
        f"the file of {kind} {shown(job_id)} is gone from the server's storage; create the job again",
        code="file_gone",
    )


def storage_full(message: str) -> ApiError:
    return ApiError(507, message, code="storage_full", type="server_error")


def storage_unavailable(message: str) -> ApiError:
    return ApiError(503, message, code="storage_error", type="server_error")


def queue_full(size: int) -> ApiError:
    return ApiError(
        429,
        f"the queue is full ({size} jobs waiting behind the running one); retry later",
        code="rate_limit_exceeded",
        type="requests",
    )


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or wrong API key: send 'Authorization: Bearer KEY' with the server's --api-key",
        code="invalid_api_key",
    )
