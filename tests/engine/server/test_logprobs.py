"""logprobs / top_logprobs: read from the very logits the engine sampled from, shaped as OpenAI
shapes them on chat and on completions, streamed or not."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import httpx
import pytest

from engine.runtime import Engine, SamplingParams
from engine.server.logprobs import LogitsTap, TokenChoice, token_text
from engine.tokenizer import ByteTokenizer


def test_tap_reads_the_logits_each_token_was_sampled_from() -> None:
    eng = Engine.from_preset("tiny")
    tap = LogitsTap(eng)
    assert tap.available
    vocab = eng.config.vocab_size
    seen: list[TokenChoice] = []
    digests: list[str] = []

    def on_token(tok: int) -> bool:
        if not seen:  # the first token's logits are the ones the engine digests
            digests.append(hashlib.sha256(tap._last.float().cpu().numpy().tobytes())
                           .hexdigest())
        seen.append(tap.choice(len(seen), tok, vocab))
        return True

    res = eng.generate(list(b"Tap the logits"), SamplingParams(max_tokens=6, ignore_eos=True),
                       on_token=on_token)
    assert [c.token_id for c in seen] == res.tokens
    assert digests == [res.stats.logits_sha256]
    for c in seen:  # greedy: the sampled token is the most likely one; a full distribution
        assert c.top[0] == (c.token_id, c.logprob) and c.logprob <= 0
        assert math.fsum(math.exp(lp) for _, lp in c.top) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RuntimeError, match="did not run for this token"):
        tap.choice(len(seen), 0, 1)  # no new logits since the last token: refuse, never reuse


def test_token_text_gives_bytes_of_partial_characters() -> None:
    tok = ByteTokenizer()
    assert token_text(tok, ord("a")) == ("a", [97])
    assert token_text(tok, 0xE2) == ("\ufffd", [0xE2])  # first byte of a 3-byte character
    assert token_text(tok, 257) == ("<|im_end|>", list(b"<|im_end|>"))


CHAT = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True}


def test_chat_logprobs_shape_and_greedy_consistency(client: httpx.Client, sse: Any) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 5 and choice["logprobs"]["refusal"] is None
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(e["top_logprobs"]) == 3 and e["logprob"] <= 0
        assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy picks the likeliest
        assert e["top_logprobs"][0]["bytes"] == e["bytes"]
    assert bytes(b for e in content for b in e["bytes"]).decode("utf-8", errors="replace") \
        == choice["message"]["content"]

    with client.stream("POST", "/v1/chat/completions",
                       json={**CHAT, "logprobs": True, "top_logprobs": 3, "stream": True}) as s:
        events = sse(s.iter_lines())
    streamed = [e for ev in events[:-1] for ch in ev["choices"]
                if ch["logprobs"] for e in ch["logprobs"]["content"]]
    assert streamed == content

    plain = client.post("/v1/chat/completions", json={**CHAT, "logprobs": False}).json()
    assert plain["choices"][0]["logprobs"] is None
    only = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}).json()
    entries = only["choices"][0]["logprobs"]["content"]
    assert [e["top_logprobs"] for e in entries] == [[]] * 5
    assert [e["logprob"] for e in entries] == [e["logprob"] for e in content]


def test_completions_logprobs_shape(client: httpx.Client, sse: Any) -> None:
    body = {"prompt": "Once", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": 2}
    out = client.post("/v1/completions", json=body).json()
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    offsets = [0]
    for t in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp["text_offset"] == offsets
    for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[t] == v and max(top.values()) == v and len(top) <= 3  # 2 + the sampled one
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        events = sse(s.iter_lines())
    parts = [ch["logprobs"] for ev in events[:-1] for ch in ev["choices"] if ch["logprobs"]]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == lp["text_offset"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": 1, "echo": True}, "echo"),
    ],
    ids=["top-without-logprobs", "top-over-20", "completions-over-5", "echo-with-logprobs"],
)
def test_logprobs_refusals(client: httpx.Client, api_error: Any, path: str, extra: dict,
                           param: str) -> None:
    base = CHAT if path.endswith("chat/completions") else {"prompt": "x", "max_tokens": 1}
    err = api_error(client.post(path, json={**base, **extra}), 400)
    assert err["param"] == param
