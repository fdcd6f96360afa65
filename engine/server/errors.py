"""Errors as OpenAI answers them: `ApiError` and its `{"error": {...}}` body, compact ASCII JSON."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


class AsciiJSONResponse(JSONResponse):
    """Compact JSON with non-ASCII escaped, like the SSE chunks: encoding never fails, whatever
    text a reply or an echoed `user`/prompt holds."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def error_body(err: ApiError) -> dict[str, Any]:
    return {
        "error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    }


def error_response(err: ApiError) -> JSONResponse:
    return AsciiJSONResponse(error_body(err), status_code=err.status, headers=err.headers)
