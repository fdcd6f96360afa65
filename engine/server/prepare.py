"""From a validated request body to what the worker runs: prompt ids, sampling, stops, logprobs.

The checks the schema cannot state live here: bounds known once the engine is (context length,
vocabulary), which model names are served, and the cross-field rules (`top_logprobs` needs
`logprobs`; no prompt logprobs for `echo`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.chat import ChatTemplate, Message, encode_text
from engine.runtime import SamplingParams
from engine.server.errors import ApiError
from engine.server.schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
)

DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "the rest of the context"; too slow here
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MIN_TOP_P = 1e-6  # smaller top_p means greedy
SEED_RANGE = 2**53  # drawn seeds stay exact as JSON numbers


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    session: str | None
    model: str  # the name the reply carries
    echo: str = ""  # completions: text shown before the reply
    logprobs: int | None = None  # None: not asked; else alternatives per token


class ModelNames:
    """The names the loaded model answers to: its own, then `--served-model-name` aliases."""

    def __init__(self, name: str, aliases: Sequence[str] = ()) -> None:
        self.primary = name
        self.all = list(dict.fromkeys([name, *aliases]))

    def resolve(self, requested: str | None) -> str:
        """The name a reply carries: the requested one when served (none: the primary);
        404 model_not_found otherwise."""
        if requested is None:
            return self.primary
        if requested in self.all:
            return requested
        raise ApiError(
            404,
            f"the model {requested!r} does not exist (served: {', '.join(self.all)})",
            param="model",
            code="model_not_found",
        )


class Preparer:
    """Turns requests into `Prepared` jobs for one engine (its tokenizer, template and bounds)."""

    def __init__(self, *, tokenizer: Any, template: ChatTemplate, context: int, vocab: int,
                 default_max_tokens: int, names: ModelNames, logprobs: bool) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.context, self.vocab = context, vocab
        self.default_max_tokens = default_max_tokens
        self.names = names
        self.logprobs_available = logprobs

    def chat(self, req: ChatCompletionRequest) -> Prepared:
        model = self.names.resolve(req.model)
        self._check_max(req.max_tokens, "max_tokens")
        self._check_max(req.max_completion_tokens, "max_completion_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self._check_logprobs(logprobs, "logprobs")
        messages = [Message(m.role, _message_text(m)) for m in req.messages]
        prompt_ids = self.template.render(messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self._sampling(req, len(prompt_ids), max_tokens, self.default_max_tokens,
                                "messages")
        return Prepared(prompt_ids, params, _stop_list(req.stop), req.user, model,
                        logprobs=logprobs)

    def completion(self, req: CompletionRequest) -> Prepared:
        model = self.names.resolve(req.model)
        self._check_max(req.max_tokens, "max_tokens")
        if req.logprobs is not None and req.echo:
            raise ApiError(400, "logprobs with echo would need the prompt's logprobs, which this "
                           "server does not compute", param="echo")
        self._check_logprobs(req.logprobs, "logprobs")
        prompt: Any = req.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one (the schema allows no more)
        if isinstance(prompt, str):
            prompt_ids = encode_text(self.tokenizer, prompt)
        else:
            prompt_ids = [int(t) for t in prompt]
            if any(not 0 <= t < self.vocab for t in prompt_ids):
                raise ApiError(400, f"prompt token ids must lie in [0, {self.vocab})",
                               param="prompt")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        params = self._sampling(
            req,
            len(prompt_ids),
            req.max_tokens,
            min(DEFAULT_COMPLETION_MAX_TOKENS, self.default_max_tokens),
            "prompt",
        )
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        return Prepared(prompt_ids, params, _stop_list(req.stop), req.user, model, echo,
                        req.logprobs)

    def _check_max(self, n: int | None, param: str) -> None:
        # the schema's maximum (filled in from the context length), whichever field wins
        if n is not None and n > self.context:
            raise ApiError(400, f"{param} must be <= {self.context} (the context length), "
                           f"got {n}", param=param, code="invalid_value")

    def _check_logprobs(self, logprobs: int | None, param: str) -> None:
        if logprobs is not None and not self.logprobs_available:
            raise ApiError(400, "this engine does not report logprobs", param=param)

    def _sampling(self, req: SamplingRequest, prompt_len: int, max_tokens: int | None,
                  default: int, param: str) -> SamplingParams:
        context = self.context
        room = context - prompt_len
        if max_tokens is None:
            if room < 1:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {context} tokens; "
                    f"the prompt has {prompt_len}",
                    param=param,
                    code="context_length_exceeded",
                )
            max_tokens = min(default, room)
        elif prompt_len + max_tokens > context:
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the prompt has "
                f"{prompt_len} and max_tokens is {max_tokens} ({prompt_len + max_tokens} total)",
                param=param,
                code="context_length_exceeded",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p < MIN_TOP_P:  # keeps the top token only; below float32 resolution it keeps none
            temperature, top_p = 0.0, 1.0
        # unseeded requests differ from each other, and `sbr.seed` says how to repeat one
        seed = req.seed if req.seed is not None else secrets.randbelow(SEED_RANGE)
        return SamplingParams(
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_tokens=max_tokens,
            ignore_eos=req.ignore_eos,
        )


def _message_text(m: ChatMessage) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    return "".join(part.text for part in m.content)


def _stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    return tuple(s for s in stops if s)
