"""Targets a scenario drives: the in-process engine (`engine.py`), any OpenAI-compatible HTTP
server (`http.py`) and the simulator (`sbrbench.sim.target`); the shared shapes in `base.py`."""

from sbrbench.targets.base import Request, Response, Target

__all__ = ["Request", "Response", "Target"]
