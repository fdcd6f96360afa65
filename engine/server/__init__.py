"""OpenAI-compatible HTTP server over one `Engine` (FastAPI + uvicorn).

schema.py (request and response shapes), prepare.py (requests to jobs), worker.py (the engine's
thread and its queue), logprobs.py, render.py (response objects), stream.py (SSE),
middleware.py (body limit, API key), errors.py, metrics.py (Prometheus), app.py (routes),
run.py (foreground or background serving).
"""

from engine.server.app import create_app
from engine.server.run import serve, serve_in_background

__all__ = ["create_app", "serve", "serve_in_background"]
