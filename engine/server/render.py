"""The OpenAI response objects of one request: stream chunks, the final object, usage, `sbr`."""

from __future__ import annotations

import time
from typing import Any, Literal

from engine.server.logprobs import TokenChoice, chat_entries, completion_logprobs
from engine.server.worker import Outcome, Piece


def usage(out: Outcome) -> dict[str, Any]:
    st = out.result.stats
    n = st.cache.prompt_tokens
    return {
        "prompt_tokens": n,
        "completion_tokens": st.generated_tokens,
        "total_tokens": n + st.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": st.cache.cached_tokens},
    }


def sbr(out: Outcome, session: str | None) -> dict[str, Any]:
    """The `sbr` object: the engine's record (engine/record.py), the session, the sampling seed,
    the queue wait."""
    st = out.result.stats
    return {
        **st.cache._asdict(),
        "generated_tokens": st.generated_tokens,
        "logits_sha256": st.logits_sha256,
        "session": session,
        "seed": out.seed,
        "timing": {"queue_s": out.queue_s, **st.timing._asdict()},
    }


class Renderer:
    """Builds the response objects of one chat or text completion.

    logprobs: None (not asked), else for chat the `top_logprobs` count, for completions the
    `logprobs` count; `tokenizer` turns ids into the token texts and bytes they report.
    """

    def __init__(
        self,
        kind: Literal["chat.completion", "text_completion"],
        rid: str,
        model: str,
        *,
        echo: str = "",
        logprobs: int | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.kind, self.rid, self.model, self.echo = kind, rid, model, echo
        self.created = int(time.time())
        self.chat = kind == "chat.completion"
        self.logprobs, self.tokenizer = logprobs, tokenizer
        self._offset = len(echo)  # completions: text_offset of the next token

    def base(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, tokens: list[TokenChoice]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": chat_entries(self.tokenizer, tokens), "refusal": None}
        out = completion_logprobs(self.tokenizer, tokens, self._offset)
        if out["text_offset"]:
            last = out["tokens"][-1]
            self._offset = out["text_offset"][-1] + len(last)
        return out

    def head(self) -> dict[str, Any] | None:
        if not self.chat:
            return self.delta(Piece(self.echo, [])) if self.echo else None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return {**self.base(), "choices": [choice]}

    def delta(self, piece: Piece) -> dict[str, Any]:
        lp = self._logprobs(piece.tokens) if piece.tokens else None
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": piece.text},
                "logprobs": lp,
                "finish_reason": None,
            }
        else:
            choice = {"index": 0, "text": piece.text, "logprobs": lp, "finish_reason": None}
        return {**self.base(), "choices": [choice]}

    def finish(self, out: Outcome, session: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": out.finish_reason}
        return {**self.base(), "choices": [choice], "sbr": sbr(out, session)}

    def final(self, pieces: list[Piece], out: Outcome, session: str | None) -> dict[str, Any]:
        text = "".join(p.text for p in pieces)
        lp = self._logprobs([t for p in pieces for t in p.tokens])
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": lp,
                "finish_reason": out.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.echo + text,
                "logprobs": lp,
                "finish_reason": out.finish_reason,
            }
        return {
            "id": self.rid,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(out),
            "sbr": sbr(out, session),
        }
