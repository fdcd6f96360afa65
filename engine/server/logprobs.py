"""Log-probabilities of generated tokens, read from the logits each token was sampled from.

The engine reports the ids it samples, not their distributions, so the tap reads the logits
where the engine leaves them: the first token's from the language-model head's output (a
forward hook that keeps a reference, nothing more, so that it is safe while CUDA graphs are
captured), a decode token's from the head's output too, or, when decode runs through captured
CUDA graphs (which never call Python hooks), from the graphs' static logits buffer. Both hold the
very tensor `engine.runtime` sampled from until the next token, which is when `on_token` asks.
The values are `log_softmax` of the raw logits (before temperature and top-p), as vLLM reports
them by default.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from engine.tokenizer import ByteTokenizer

# JSON has no -inf; vLLM reports this value for impossible tokens
MIN_LOGPROB = -9999.0


class TokenChoice(NamedTuple):
    """One generated token: its log-probability and the `top` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogitsTap:
    """Where the logits of the token just sampled are; `available` is False for an engine
    without a `model.lm_head` module (then logprobs are refused)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        head = getattr(getattr(engine, "model", None), "lm_head", None)
        self.available = isinstance(head, torch.nn.Module)
        self._last: torch.Tensor | None = None
        self._fresh = False  # the head ran since the last token was read
        if self.available:
            assert isinstance(head, torch.nn.Module)
            head.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self._last, self._fresh = output, True

    def _logits(self, index: int) -> torch.Tensor:
        graphs = getattr(self.engine, "_graphs", None) if index > 0 else None
        if graphs is not None and getattr(self.engine, "cuda_graphs", False):
            return graphs.logits.reshape(-1)
        if self._last is None or not self._fresh:
            # the head did not run for this token: never report another token's numbers
            raise RuntimeError("the language-model head did not run for this token")
        self._fresh = False
        return self._last.reshape(-1, self._last.shape[-1])[-1]

    def choice(self, index: int, token_id: int, top: int) -> TokenChoice:
        """Token `index` of the reply (0 = the first) was `token_id`: its log-probability and
        the `top` most likely alternatives."""
        lp = torch.log_softmax(self._logits(index).float(), dim=-1)
        chosen = max(float(lp[token_id].item()), MIN_LOGPROB)
        alts: tuple[tuple[int, float], ...] = ()
        if top > 0:
            vals, ids = torch.topk(lp, min(top, lp.shape[-1]))
            alts = tuple((int(i), max(float(v), MIN_LOGPROB))
                         for i, v in zip(ids.tolist(), vals.tolist(), strict=True))
        return TokenChoice(int(token_id), chosen, alts)


def token_text(tokenizer: Any, token_id: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text and its exact bytes (a byte-level token that is part
    of a multi-byte character shows U+FFFD; its bytes let a client rebuild the text)."""
    if isinstance(tokenizer, ByteTokenizer) and 0 <= token_id < 256:
        raw = bytes([token_id])
        return raw.decode("utf-8", errors="replace"), list(raw)
    text = str(tokenizer.decode([token_id]))
    return text, list(text.encode("utf-8", errors="replace"))


def chat_entries(tokenizer: Any, choices: list[TokenChoice]) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` of a chat completion (or of one streamed chunk)."""
    out = []
    for c in choices:
        text, raw = token_text(tokenizer, c.token_id)
        top = []
        for tid, lp in c.top:
            t, b = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": c.logprob, "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(tokenizer: Any, choices: list[TokenChoice], offset: int
                        ) -> dict[str, Any]:
    """`choices[0].logprobs` of a text completion: tokens, token_logprobs, top_logprobs (per
    token a map text -> logprob of the most likely alternatives and of the sampled token, as
    OpenAI documents: up to logprobs + 1 entries; alternatives with one text keep the likelier)
    and text_offset (characters before each token, counting from `offset`)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for c in choices:
        text, _ = token_text(tokenizer, c.token_id)
        tokens.append(text)
        lps.append(c.logprob)
        offsets.append(pos)
        pos += len(text)
        top: dict[str, float] = {}
        for tid, lp in c.top:
            top.setdefault(token_text(tokenizer, tid)[0], lp)
        top.setdefault(text, c.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}
