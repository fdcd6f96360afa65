"""The official `openai` SDK against our server: keys, logprobs, models, seeds, streaming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

KEY = "sk-sdk-key"
MSGS = [{"role": "user", "content": "Hello there."}]


def _client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def keyed(start_server: Any) -> Iterator[str]:
    with start_server(api_keys=[KEY]) as url:
        yield url


def test_key_on_and_off(keyed: str, server: str) -> None:
    ok = _client(keyed, KEY).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.AuthenticationError) as err:
        _client(keyed, "sk-wrong").chat.completions.create(model="tiny", messages=MSGS,
                                                           max_tokens=2)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    # no key configured: whatever key the SDK sends is fine
    out = _client(server).chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert out.usage is not None and out.usage.completion_tokens == 2


def test_models_list_and_retrieve(server: str) -> None:
    c = _client(server)
    assert [m.id for m in c.models.list()] == ["tiny", "tiny-alias"]
    assert c.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=1)


def test_logprobs_on_chat_and_completions(server: str) -> None:
    c = _client(server)
    chat = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0,
                                     logprobs=True, top_logprobs=2,
                                     extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.bytes for t in content)
    comp = c.completions.create(model="tiny", prompt="Once upon", max_tokens=3, temperature=0,
                                logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 3
    assert all(lp.top_logprobs[k][t] == lp.token_logprobs[k] for k, t in enumerate(lp.tokens))
    stream = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0,
                                       logprobs=True, stream=True,
                                       extra_body={"ignore_eos": True})
    got = [t.logprob for ch in stream for choice in ch.choices
           if choice.logprobs and choice.logprobs.content for t in choice.logprobs.content]
    assert got == [t.logprob for t in content]


def test_unseeded_requests_differ_and_seeded_ones_repeat(server: str) -> None:
    c = _client(server)
    kw: dict[str, Any] = dict(model="tiny", messages=MSGS, max_tokens=8, temperature=1.0,
                              extra_body={"ignore_eos": True})
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert a.choices[0].message.content != b.choices[0].message.content
    seed_a = a.model_extra["sbr"]["seed"]
    assert seed_a != b.model_extra["sbr"]["seed"]
    s1, s2 = (c.chat.completions.create(**kw, seed=11) for _ in range(2))
    assert s1.choices[0].message.content == s2.choices[0].message.content
    assert s1.model_extra["sbr"]["seed"] == 11
    replay = c.chat.completions.create(**kw, seed=seed_a)
    assert replay.choices[0].message.content == a.choices[0].message.content


def test_streaming_with_usage(server: str) -> None:
    stream = _client(server).chat.completions.create(
        model="tiny", messages=MSGS, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    assert any(ch.choices and ch.choices[0].finish_reason == "length" for ch in chunks)
