"""ASGI middleware in front of the routes: the request-body limit and the optional API key."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from engine.server.errors import ApiError, error_response

# Paths `--api-key` may leave open (the rest of /v1 always needs the key; the OpenAPI document
# and its viewers stay open so that clients can be generated against a protected server).
EXEMPTABLE = ("health", "metrics")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `max_bytes`: 413 when Content-Length says so up front; a
    streamed body that runs past the limit fails its parse (400). Both with OpenAI-style bodies
    (FastAPI's own limit answers the first case in plain text)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = ApiError(
                413, f"the request body is over {self.max_bytes} bytes", code="body_too_large"
            )
            await error_response(err)(scope, receive, send)
            return
        seen = 0

        async def limited() -> AsgiMessage:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


class ApiKeyAuth:
    """`Authorization: Bearer KEY` on /v1 (and on /health and /metrics unless exempt); 401 with
    an OpenAI-style body otherwise. Keys are compared in constant time."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], exempt: Iterable[str] = EXEMPTABLE
                 ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]
        if not self.keys:
            raise ValueError("ApiKeyAuth needs at least one non-empty key")
        self.protected = {f"/{p}" for p in EXEMPTABLE if p not in set(exempt)}

    def _needs_key(self, path: str) -> bool:
        return path == "/v1" or path.startswith("/v1/") or path in self.protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _bearer(dict(scope["headers"]).get(b"authorization", b""))
        if given is not None and any(hmac.compare_digest(given, k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "no API key provided: send 'Authorization: Bearer KEY'"
            if given is None
            else "incorrect API key provided"
        )
        err = ApiError(401, message, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        await error_response(err)(scope, receive, send)


def _bearer(header: bytes) -> bytes | None:
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()
