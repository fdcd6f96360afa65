"""Running the app: in the foreground (`sbrbench serve`) or on a background thread of this
process (tests, notebooks: the engine is built once and shared)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI

from engine.server.app import create_app
from engine.server.worker import EngineLike


def serve(engine: EngineLike, *, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", **app_options: Any) -> None:
    """Run the server in the foreground until interrupted (`app_options`: create_app's)."""
    import uvicorn

    app = create_app(engine, model_name=model_name, **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                        start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a thread of this process; yields its base URL
    (`http://host:port`, port 0 = a free one) and stops the server on exit."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} did not start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start in {start_timeout_s} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
