"""schemathesis against the running server: positive and negative cases of every operation,
every default check (no server error, responses as documented, valid data accepted, invalid
data refused).

Strategies are drawn through schemathesis' library API (`APIOperation.as_strategy`) under plain
Hypothesis, not its pytest plugin (which depends on pytest internals); examples per operation
and mode are few and derandomized, so the test is bounded and repeatable. Its coverage phase
(hundreds of boundary cases per operation, each a CPU generation) is left to manual runs; its
finds live on as explicit tests in test_app.py (tiny top_p, seeds, max_tokens bounds, ...).
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 8  # per operation and mode


def bounded(case: Any) -> Any:
    """A valid case as the CPU can serve it quickly, and satisfying the cross-field rules the
    schema cannot state: at most 2 generated tokens, `logprobs: true` wherever `top_logprobs`
    is set, no `echo` beside completion logprobs."""
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int | float):
                body[key] = min(body[key], 2)
        body.setdefault("max_tokens", 2)
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
        if "prompt" in body and body.get("logprobs") is not None:
            body["echo"] = False
    return case


def test_schemathesis_finds_no_schema_violation(server: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    tried: set[tuple[str, GenerationMode]] = set()
    assert {op.label for op in ops} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                        "GET /v1/models/{model_id}", "GET /metrics"}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                strategy = strategy.map(bounded)

            @given(case=strategy)
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                case.call_and_validate(timeout=120)

            try:
                check()
            except Unsatisfiable:
                # no invalid input exists (no parameters, or only a free-form path string)
                assert mode is GenerationMode.NEGATIVE and not op.body, op.label
                continue
            tried.add((op.label, mode))
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert {(label, GenerationMode.POSITIVE), (label, GenerationMode.NEGATIVE)} <= tried
    assert httpx.get(f"{server}/health").status_code == 200
