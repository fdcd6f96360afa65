"""`--api-key`: a bearer key on /v1 (401 with an OpenAI-style body otherwise), /health and
/metrics open or not as configured, the OpenAPI document saying which operations need it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from engine.errors import UserError

KEY = "sk-test-key"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def test_key_required_on_v1_health_and_metrics_open_by_default(
    start_server: Any, api_error: Any
) -> None:
    with start_server(api_keys=[KEY]) as url, httpx.Client(base_url=url, timeout=60) as c:
        for headers, msg in (({}, "no API key"), ({"Authorization": "Bearer nope"}, "incorrect"),
                             ({"Authorization": KEY}, "no API key")):
            r = c.post("/v1/chat/completions", json=BODY, headers=headers)
            err = api_error(r, 401, "invalid_api_key")
            assert msg in err["message"] and r.headers["www-authenticate"] == "Bearer"
        api_error(c.get("/v1/models"), 401, "invalid_api_key")
        api_error(c.get("/v1/models/tiny"), 401, "invalid_api_key")
        auth = {"Authorization": f"Bearer {KEY}"}
        assert c.post("/v1/chat/completions", json=BODY, headers=auth).status_code == 200
        assert c.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        schema = c.get("/openapi.json").json()  # documentation stays readable
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        chat = schema["paths"]["/v1/chat/completions"]["post"]
        assert chat["security"] == [{"bearer": []}] and "401" in chat["responses"]
        assert "security" not in schema["paths"]["/health"]["get"]


def test_health_and_metrics_can_need_the_key_too(start_server: Any, api_error: Any) -> None:
    with start_server(api_keys=[KEY], key_exempt=["health"]) as url, \
            httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        api_error(c.get("/metrics"), 401, "invalid_api_key")
        r = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "sbr_queue_depth" in r.text
        schema = c.get("/openapi.json").json()
        assert schema["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


def test_no_key_configured_means_no_key_needed(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer x"})
    assert r.status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").json()["components"]


def test_unknown_exempt_endpoint_is_a_user_error() -> None:
    from engine.runtime import Engine
    from engine.server import create_app

    with pytest.raises(UserError, match="unknown endpoint 'docs'"):
        create_app(Engine.from_preset("tiny"), model_name="tiny", api_keys=[KEY],
                   key_exempt=["docs"])
