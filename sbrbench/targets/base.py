"""What a scenario sends and what a target answers: `Request`, `Response`, the `Target` protocol.

Every target implements `Target.send(Request) -> Response`. A failed request is a Response with
`error` set, never an exception, so one bad row does not end a run; only errors that make the
whole run meaningless (unreachable server at start, engine not built) raise UserError.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from engine.chat import ChatTemplate, Message
from engine.record import CACHE_FIELDS, RequestStats, time_per_output_token


class Request(NamedTuple):
    prompt_ids: tuple[int, ...]  # the conversation rendered by the target's chat template
    messages: tuple[Message, ...] = ()  # the same conversation as chat messages (HttpTarget)
    max_tokens: int = 16
    session: str | None = None
    ignore_eos: bool = True  # fixed output length keeps runs comparable


class Response(NamedTuple):
    """What one request measured. None means the target does not report that quantity.

    ``stats`` is the engine's own record where one exists (in-process engine, simulator, a
    server that sends the ``sbr`` object); ``ttft_s``/``e2e_s`` are as the client measured them
    (equal to the engine's for in-process targets); ``prompt_tokens``/``cached_tokens``/
    ``generated_tokens`` are the server's usage report where there is no ``stats``.

    ``itl_s``: the gaps between successive tokens as the client received them (a streamed
    chunk counts as one token, as vLLM's and SGLang's benchmarks count it); ``tpot_s``: the time
    from the first token to the last over the tokens after the first (vLLM's definition; None
    when unknown, e.g. a whole reply in one chunk). ``attempts``: requests sent for this row
    (retries included; the timings are the last attempt's), ``retry_wait_s``: the time spent
    waiting between them. ``warnings``: what makes this row's numbers less than they seem.
    """

    tokens: list[int] = []  # generated ids (HttpTarget: ids of the streamed text)
    text: str = ""
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generated_tokens: int | None = None
    stats: RequestStats | None = None
    itl_s: tuple[float, ...] | None = None
    tpot_s: float | None = None
    attempts: int = 1
    retry_wait_s: float = 0.0
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, stats: RequestStats, tokens: list[int], text: str,
           token_times: list[float] | None = None) -> Response:
        """An in-process target's answer: the engine's record and its reply; `token_times`
        (perf_counter when each token was sampled), where known, give the ITL."""
        t = stats.timing
        itl = None
        tpot = stats.tpot_s
        if token_times is not None and len(token_times) == stats.generated_tokens:
            itl = tuple(b - a for a, b in zip(token_times, token_times[1:], strict=False))
            tpot = time_per_output_token(token_times[-1] - token_times[0], len(token_times))
        return cls(tokens=tokens, text=text, ttft_s=t.ttft_s, e2e_s=t.e2e_s,
                   prompt_tokens=stats.cache.prompt_tokens,
                   cached_tokens=stats.cache.cached_tokens,
                   generated_tokens=stats.generated_tokens, stats=stats, itl_s=itl, tpot_s=tpot)

    def row(self) -> dict[str, Any]:
        """The measured fields of a result row (engine/record.py names them)."""
        if self.stats is not None:
            out = self.stats.row()
            if (self.ttft_s, self.e2e_s) != (out["ttft_s"], out["e2e_s"]):
                # a server's own record beside the client's measurement (the difference is
                # the network, the queue, and text the server held back)
                out["timings"].update(server_ttft_s=out["ttft_s"], server_e2e_s=out["e2e_s"])
        else:
            out = {k: None for k in CACHE_FIELDS}
            out["logits_sha256"] = None
        out.update(ttft_s=self.ttft_s, e2e_s=self.e2e_s, tpot_s=self.tpot_s,
                   itl_s=None if self.itl_s is None else list(self.itl_s))
        for k in ("prompt_tokens", "cached_tokens"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        out["generated_tokens"] = (self.generated_tokens if self.generated_tokens is not None
                                   else len(self.tokens))
        out["tokens"] = list(self.tokens)
        out["error"] = self.error
        out["attempts"] = self.attempts
        out["retry_wait_s"] = self.retry_wait_s
        out["warnings"] = list(self.warnings)
        if not out.get("timings"):
            out.pop("timings", None)
        return out


@runtime_checkable
class Target(Protocol):
    """What a scenario runner needs from a target.

    kind: "engine" | "http" | "sim".  max_concurrency: how many `send` calls may overlap.
    template: the chat template that renders a conversation's messages into prompt ids (the
    engine's own, so that every target sends the same ids for the same scenario).
    describe(): the result file's "target" object.  engine_info(): its "engine" object (policy,
    budgets, preset; {} when unknown).  close(): release resources (end of the run).
    Optional: warmup() -> seconds | None (an unrecorded request before the run that leaves the
    cache untouched), cache_stats() -> dict (stored in the result at the end), vocab_size.
    """

    kind: str
    template: ChatTemplate

    @property
    def max_concurrency(self) -> int: ...

    def send(self, req: Request) -> Response: ...
    def describe(self) -> dict[str, Any]: ...
    def engine_info(self) -> dict[str, Any]: ...
    def close(self) -> None: ...
