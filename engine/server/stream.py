"""Server-sent events: the encoding, and a streaming response that notices a client leaving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.server.worker import Job


def sse(obj: dict[str, Any] | str) -> bytes:
    """One SSE event: `data: <compact JSON or [DONE]>` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def with_usage_null(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """OpenAI sends `"usage": null` on every chunk but the last when usage was asked for."""
    return {**chunk, "usage": None} if include_usage else chunk


async def watch_disconnect(receive: Receive, job: Job) -> None:
    """Cancel `job` when the client goes away (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class SSEResponse(StreamingResponse):
    """Server-sent events that cancel their job when the client disconnects, whatever the ASGI
    spec version (Starlette's StreamingResponse stops listening for disconnects at 2.4)."""

    def __init__(self, body: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    tg.cancel_scope.cancel()

                async def listen() -> None:
                    await watch_disconnect(receive, self.job)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(listen)
        except* OSError:
            pass  # the client went away mid-send (how ASGI 2.4 servers report it)
        finally:
            self.job.cancel.set()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
