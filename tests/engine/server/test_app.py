"""The server's routes end to end over loopback: chat and completions (streamed and not),
stops, refusals with OpenAI-style errors, model names, disconnects, the queue, /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.record import TIMING_FIELDS

ALIAS = "tiny-alias"  # conftest: the module server's alias

SBR_KEYS = {
    "prompt_tokens",
    "cached_tokens",
    "snapshot_pos",
    "replay_tokens",
    "new_tokens",
    "generated_tokens",
    "logits_sha256",
    "session",
    "seed",
    "timing",
}
TIMING_KEYS = {"queue_s", *TIMING_FIELDS}
SYSTEM = "You are a terse assistant. Answer in one short line."


def test_models_aliases_and_health(client: httpx.Client, api_error: Any) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny", ALIAS]
    assert all(m["root"] == "tiny" and m["max_model_len"] > 0 for m in models["data"])
    assert client.get(f"/v1/models/{ALIAS}").json()["id"] == ALIAS
    api_error(client.get("/v1/models/gpt-4o"), 404, "model_not_found")
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": "tiny", "queue_depth": 0, "busy": False}


def test_requests_name_a_served_model_or_get_404(client: httpx.Client, api_error: Any) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    r = client.post("/v1/chat/completions", json={**body, "model": ALIAS})
    assert r.status_code == 200 and r.json()["model"] == ALIAS
    assert client.post("/v1/chat/completions", json=body).json()["model"] == "tiny"
    err = api_error(client.post("/v1/chat/completions", json={**body, "model": "other"}), 404,
                    "model_not_found")
    assert err["param"] == "model" and "other" in err["message"]
    api_error(client.post("/v1/completions", json={"prompt": "x", "model": "other"}), 404,
              "model_not_found")


def test_unseeded_sampling_draws_a_seed_that_replays_the_reply(client: httpx.Client) -> None:
    body = {"prompt": "Sample me", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    a, b = (client.post("/v1/completions", json=body).json() for _ in range(2))
    assert a["sbr"]["seed"] != b["sbr"]["seed"]
    assert a["choices"][0]["text"] != b["choices"][0]["text"]
    again = client.post("/v1/completions", json={**body, "seed": a["sbr"]["seed"]}).json()
    assert again["choices"][0]["text"] == a["choices"][0]["text"]
    assert again["sbr"]["seed"] == a["sbr"]["seed"]


def test_streamed_turn_then_second_turn_hits_the_cache(client: httpx.Client, sse: Any) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    body = {
        "messages": messages,
        "max_tokens": 20,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "conv-a",
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_chunk, finish_chunk, deltas = chunks[-1], chunks[-2], chunks[1:-2]
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in deltas)
    text = "".join(c["choices"][0]["delta"]["content"] for c in deltas)
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert (
        set(finish_chunk["sbr"]) == SBR_KEYS and set(finish_chunk["sbr"]["timing"]) == TIMING_KEYS
    )
    assert usage_chunk["choices"] == [] and usage_chunk["sbr"] == finish_chunk["sbr"]
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + 20
    first_prompt = usage["prompt_tokens"]

    # Turn 2 resends the reply as text: a byte-level model's reply is not valid UTF-8 in general,
    # yet the prompt must extend turn 1's prompt + reply ids so the cache matches into the reply.
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "More."}]
    r = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > first_prompt, "turn 2 did not match into turn 1's reply"
    sbr = out["sbr"]
    assert set(sbr) == SBR_KEYS and sbr["cached_tokens"] == cached and sbr["session"] == "conv-a"
    assert sbr["snapshot_pos"] + sbr["replay_tokens"] == cached
    assert sbr["new_tokens"] == out["usage"]["prompt_tokens"] - cached


def test_completions_text_token_ids_echo_and_stream(client: httpx.Client, sse: Any) -> None:
    r = client.post(
        "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 3, "ignore_eos": True, "echo": True},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 3
    assert out["choices"][0]["text"].startswith("Once upon a time")
    assert set(out["sbr"]) == SBR_KEYS

    body = {"prompt": [79, 110, 99, 101], "max_tokens": 3, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["sbr"]["prompt_tokens"] == 4 and "usage" not in events[-2]


def test_stop_string_ends_the_reply_before_it(client: httpx.Client) -> None:
    body = {"prompt": "The stop test: ", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) >= 6
    stop = full[3:5]
    want = full[: full.find(stop)]
    out = client.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert out["choices"][0]["text"] == want
    assert out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"', None),
        ("/v1/chat/completions", b"[]", None),
        ("/v1/chat/completions", {"messages": "hello"}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ("/v1/completions", {"prompt": ""}, None),
        ("/v1/completions", {"prompt": [1, -2]}, None),
        ("/v1/completions", {"prompt": ["a", "b"]}, None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ],
    ids=[
        "malformed-json",
        "json-array",
        "messages-str",
        "messages-empty",
        "bad-role",
        "content-int",
        "max-tokens-str",
        "max-tokens-negative",
        "temperature-str",
        "stream-str",
        "n-3",
        "prompt-empty",
        "token-negative",
        "prompt-batch",
        "max-tokens-0",
        "top-p-0",
        "seed-huge",
    ],
)
def test_bad_requests_get_an_openai_error(
    client: httpx.Client, api_error: Any, path: str, payload: dict | bytes, param: str | None
) -> None:
    if isinstance(payload, bytes):
        r = client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=payload)
    err = api_error(r, 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_semantic_rejections_name_the_reason(client: httpx.Client, api_error: Any) -> None:
    err = api_error(client.post("/v1/completions", json={"prompt": [1, 10**6]}), 400)
    assert "vocabulary" in err["message"] or "token ids" in err["message"]
    err = api_error(client.get("/v1/nothing"), 404)
    assert err["type"] == "invalid_request_error"
    api_error(client.get("/v1/chat/completions"), 405)


def test_prompt_over_the_context_is_rejected_with_the_reason(
    client: httpx.Client, api_error: Any
) -> None:
    max_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    huge = "a" * (max_len + 1)
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": huge}], "max_tokens": 1},
    )
    err = api_error(r, 400, "context_length_exceeded")
    assert "context length" in err["message"]
    r = client.post("/v1/completions", json={"prompt": huge, "stream": True})
    api_error(r, 400, "context_length_exceeded")
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": max_len})
    api_error(r, 400, "context_length_exceeded")


@pytest.mark.parametrize(
    "extra",
    [
        {"top_p": 5e-324},
        {"top_p": 5e-324, "temperature": 2.0},
        {"seed": -(2**53)},
        {"seed": 2**53},
        {"seed": 3.0},
        {"stop": ""},
        {"stop": ["", "x"]},
        {"prompt": [[1]]},
        {"prompt": ["a"]},
        {"stream_options": {}},
        {"max_tokens": 1.0},
        {"n": 1},
    ],
    ids=[
        "top-p-tiny",
        "top-p-tiny-hot",
        "seed-min",
        "seed-max",
        "seed-float",
        "stop-empty",
        "stop-list-with-empty",
        "batch-of-one-ids",
        "batch-of-one-text",
        "stream-options-empty",
        "max-tokens-float",
        "n-1",
    ],
)
def test_edge_values_are_served(client: httpx.Client, extra: dict) -> None:
    # Boundary values found by schemathesis' coverage phase (tiny top_p once reached the engine
    # as a zero distribution and answered 500).
    r = client.post("/v1/completions", json={"prompt": "edge", "max_tokens": 1, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def test_max_tokens_over_the_context_is_refused_whichever_field_wins(
    client: httpx.Client, api_error: Any
) -> None:
    # max_completion_tokens takes precedence, but max_tokens must still obey its schema maximum
    max_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1}
    err = api_error(client.post("/v1/chat/completions", json={**body, "max_tokens": max_len + 1}),
                    400, "invalid_value")
    assert err["param"] == "max_tokens"
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_lone_surrogates_read_as_replacement_characters_on_both_paths(
    client: httpx.Client,
) -> None:
    # Valid JSON escapes, but not Unicode text: every text field reads them as U+FFFD, so chat
    # content, completion prompts and the `user` hint are treated alike (never a 500).
    headers = {"content-type": "application/json"}
    body = b'{"prompt": "a\\ud800b", "max_tokens": 1, "echo": true, "user": "\\udfff"}'
    r = client.post("/v1/completions", content=body, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["text"].startswith("a\ufffdb") and out["sbr"]["session"] == "\ufffd"
    clean = client.post("/v1/completions", json={"prompt": "a\ufffdb", "max_tokens": 1}).json()
    assert out["usage"]["prompt_tokens"] == clean["usage"]["prompt_tokens"]
    chat = b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 1}'
    r = client.post("/v1/chat/completions", content=chat, headers=headers)
    assert r.status_code == 200, r.text
    same = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "a\ufffdb"}], "max_tokens": 1}).json()
    assert r.json()["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"]


def test_oversized_body_gets_413_or_400_not_a_crash(api_error: Any) -> None:
    # In process (same app, real engine) with a small limit: the server's is 64 MiB.
    from fastapi.testclient import TestClient

    from engine.runtime import Engine
    from engine.server import create_app

    app = create_app(Engine.from_preset("tiny"), model_name="tiny", max_body_bytes=1000)
    with TestClient(app) as c:
        err = api_error(c.post("/v1/completions", json={"prompt": "x" * 5000}), 413)
        assert err["code"] == "body_too_large"

        def chunked() -> Iterator[bytes]:  # no Content-Length: caught while reading
            yield from (b"x" * 500 for _ in range(10))

        r = c.post(
            "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
        )
        api_error(r, 400)
        assert c.get("/health").status_code == 200


def _long_stream_body(max_tokens: int = 4000) -> dict:
    return {
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }


def _wait_for(pred: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_disconnect_mid_stream_cancels_the_generation(client: httpx.Client, metrics: Any) -> None:
    key = ("sbr_requests_total", (("endpoint", "chat"), ("outcome", "cancelled")))
    gen_key = ("sbr_tokens_total", (("kind", "generated"),))
    before = metrics(client)
    with httpx.Client(base_url=str(client.base_url), timeout=300) as own:
        with own.stream("POST", "/v1/chat/completions", json=_long_stream_body()) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if '"content"' in line:
                    seen += 1
                if seen >= 3:
                    break  # leaving both blocks closes the connection mid-stream
    _wait_for(lambda: metrics(client).get(key, 0) > before.get(key, 0))
    _wait_for(lambda: not client.get("/health").json()["busy"])
    generated = metrics(client)[gen_key] - before.get(gen_key, 0)
    assert generated < 4000, "the engine kept generating after the client left"
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2},
    )
    assert r.status_code == 200


def test_full_queue_answers_503_with_retry_after(client: httpx.Client, api_error: Any) -> None:
    base = str(client.base_url)
    small = {"messages": [{"role": "user", "content": "queued"}], "max_tokens": 2}
    second: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=base, timeout=300) as a:
        with a.stream("POST", "/v1/chat/completions", json=_long_stream_body()) as r:
            lines = r.iter_lines()
            next(lines)  # the role chunk: the long request holds the engine now

            def send_second() -> None:
                second["r"] = httpx.post(f"{base}/v1/chat/completions", json=small, timeout=300)

            t = threading.Thread(target=send_second)
            t.start()
            _wait_for(lambda: client.get("/health").json()["queue_depth"] == 1, 30)
            third = client.post("/v1/chat/completions", json=small)
            err = api_error(third, 503, "queue_full")
            assert err["type"] == "server_overloaded"
            assert int(third.headers["retry-after"]) >= 1
    t.join(timeout=300)
    assert second["r"].status_code == 200, second["r"].text


def test_metrics_exposes_requests_latency_queue_and_cache(
    client: httpx.Client, metrics: Any
) -> None:
    body = {"messages": [{"role": "user", "content": "metrics please"}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    m = metrics(client)
    names = {name for name, _ in m}
    for want in (
        "sbr_requests_total",
        "sbr_ttft_seconds_bucket",
        "sbr_ttft_seconds_count",
        "sbr_queue_seconds_bucket",
        "sbr_replay_tokens_bucket",
        "sbr_cache_hits_total",
        "sbr_cache_misses_total",
        "sbr_cache_snapshot_pool_bytes",
        "sbr_cache_kv_pool_bytes",
        "sbr_queue_depth",
        "sbr_busy",
        "sbr_concurrency_limit",
        "sbr_max_queue",
    ):
        assert want in names, want
    assert m[("sbr_tokens_total", (("kind", "replay"),))] >= 0
    reasons = {
        dict(labels)["reason"] for name, labels in m if name == "sbr_snapshot_evictions_total"
    }
    assert {"policy", "kv"} <= reasons
    assert m[("sbr_ttft_seconds_count", ())] >= 1
    assert m[("sbr_concurrency_limit", ())] == 1 and m[("sbr_max_queue", ())] == 1


def test_openapi_documents_openai_errors(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat and {"200", "400", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
