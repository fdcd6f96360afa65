"""Targets a scenario drives: the in-process engine, any OpenAI-compatible HTTP server, the sim.

Every target implements `Target`: `send(Request) -> Response`. A failed request is a Response
with `error` set, never an exception, so one bad row does not end a run; only errors that make
the whole run meaningless (unreachable server at start, engine not built) raise UserError.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from engine.errors import UserError


class Turn(NamedTuple):
    """One chat message at token level; `text` is kept when a server gave text, not ids."""

    role: str  # system | user | assistant | tool
    ids: tuple[int, ...]
    text: str | None = None


class Request(NamedTuple):
    prompt_ids: tuple[int, ...]  # the whole rendered prompt (what EngineTarget sends)
    messages: tuple[Turn, ...] = ()  # the same conversation as chat turns (HttpTarget)
    max_tokens: int = 16
    session: str | None = None
    ignore_eos: bool = True  # fixed output length keeps runs comparable


class Response(NamedTuple):
    """What one request measured. None means the target does not report that quantity."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    snapshot_pos: int | None = None
    replay_tokens: int | None = None
    new_tokens: int | None = None
    tokens: list[int] = []  # generated ids (HttpTarget: utf-8 bytes of the text)
    text: str = ""
    logits_sha256: str | None = None
    error: str | None = None
    generated_tokens: int | None = None
    timings: dict[str, float] | None = None  # engine phases: match_s, replay_s, prefill_s, ...


@runtime_checkable
class Target(Protocol):
    """What a scenario runner needs from a target.

    kind: "engine" | "http" | "sim".  max_concurrency: how many `send` calls may overlap.
    describe(): the result file's "target" object.  engine_info(): its "engine" object (policy,
    budgets, preset; {} when unknown).  close(): release resources (end of the run).
    Optional: warmup() -> seconds | None (an unrecorded request before the run that leaves the
    cache untouched), cache_stats() -> dict (stored in the result at the end), vocab_size.
    """

    kind: str

    @property
    def max_concurrency(self) -> int: ...

    def send(self, req: Request) -> Response: ...
    def describe(self) -> dict[str, Any]: ...
    def engine_info(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------- text helpers

_ROLE_HEADER = {r: f"<|{r}|>\n".encode() for r in ("system", "user", "assistant", "tool")}


def ids_to_text(ids: tuple[int, ...] | list[int]) -> str:
    """Byte-level decode: id i < 256 is byte i; other ids (specials) are dropped."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def render_turn(turn: Turn) -> list[int]:
    """A turn's token ids in the prompt: `<|role|>\\n` + content + `\\n` (byte-level)."""
    return [*_ROLE_HEADER.get(turn.role, f"<|{turn.role}|>\n".encode()), *turn.ids, 10]


def generation_header() -> list[int]:
    """Ids that open the assistant's reply at the end of a prompt."""
    return list(_ROLE_HEADER["assistant"])


def chat_messages(turns: tuple[Turn, ...]) -> list[dict[str, str]]:
    """OpenAI chat messages of a conversation (tool outputs sent as user content)."""
    out = []
    for t in turns:
        role = "user" if t.role == "tool" else t.role
        content = t.text if t.text is not None else ids_to_text(t.ids)
        if t.role == "tool":
            content = "[tool output]\n" + content
        out.append({"role": role, "content": content})
    return out


# ----------------------------------------------------------------------------- cache settings

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9', '4096' -> bytes; UserError on anything else."""
    m = _SIZE_RE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"cannot read size {text!r} (examples: 2GiB, 512MB, 1e9)")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(slots=True)
class CacheSpec:
    """Cache settings from the CLI and the scenario's [engine] table; 0/None = engine default."""

    policy: str = "adaptive"
    tail_pin_k: int = 8
    marconi_alpha: float | None = None
    snapshot_slots: int = 16
    snapshot_budget_bytes: int | None = None
    snapshot_interval: int = 0
    page_size: int = 0
    kv_budget_tokens: int = 0
    adaptive_opts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def policy_opts(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        # option names of engine.cache.policies: TailPin(k), Marconi(alpha), Adaptive(...)
        if self.policy == "tail-pin":
            opts["k"] = self.tail_pin_k
        if self.policy == "marconi" and self.marconi_alpha is not None:
            opts["alpha"] = self.marconi_alpha
        if self.policy == "adaptive":
            opts.update(self.adaptive_opts)
        return opts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_adaptive_opts(items: list[str]) -> dict[str, Any]:
    """--adaptive-opt KEY=VALUE items -> options of the adaptive policy (VALUE as JSON if it
    parses, else a string: duel=1000, hazard=empirical, admit_control=false). Unknown or bad
    options raise a one-line error here, before any work."""
    import json  # noqa: PLC0415

    opts: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--adaptive-opt: expected KEY=VALUE, got {item!r}")
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    if opts:
        from engine.cache.policies import make_policy  # noqa: PLC0415

        make_policy("adaptive", **opts)
    return opts


def _kwargs_for(cls: Any, spec: CacheSpec) -> dict[str, Any]:
    """Keyword arguments of `cls` (EngineCacheArgs) that the spec sets, by the names it has."""
    try:
        names = set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        names = {f.name for f in dataclasses.fields(cls)}
    want: dict[str, Any] = {
        "policy": spec.policy,
        "policy_opts": spec.policy_opts(),
        "snapshot_slots": spec.snapshot_slots or None,
        "snapshot_budget_bytes": spec.snapshot_budget_bytes,
        "snapshot_interval": spec.snapshot_interval or None,
        "page_size": spec.page_size or None,
        "kv_budget_tokens": spec.kv_budget_tokens or None,
    }
    if spec.kv_budget_tokens and "kv_budget_tokens" not in names and "kv_pages" in names:
        page = spec.page_size or _default_of(cls, "page_size") or 1
        want["kv_pages"] = math.ceil(spec.kv_budget_tokens / page)
    return {k: v for k, v in want.items() if k in names and v is not None}


def _default_of(cls: Any, name: str) -> Any:
    try:
        p = inspect.signature(cls).parameters.get(name)
    except (TypeError, ValueError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


# ----------------------------------------------------------------------------- engine target


class EngineTarget:
    """The in-process engine: sends token ids, reads RequestStats. One request at a time."""

    kind = "engine"
    max_concurrency = 1

    def __init__(self, engine: Any, *, preset: str | None = None) -> None:
        self.engine = engine
        self.preset = preset
        from engine.runtime import SamplingParams

        self._params_cls = SamplingParams

    @classmethod
    def build(
        cls,
        *,
        spec: CacheSpec,
        preset: str = "tiny",
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
    ) -> EngineTarget:
        """Engine.from_preset / from_checkpoint with the cache settings of `spec`."""
        from engine import runtime

        cache = runtime.EngineCacheArgs(**_kwargs_for(runtime.EngineCacheArgs, spec))
        if checkpoint:
            # a checkpoint has its weights: the seed only drives the workload
            eng = runtime.Engine.from_checkpoint(
                checkpoint, device=device, dtype=dtype, cache=cache
            )
        else:
            eng = runtime.Engine.from_preset(
                preset, device=device, dtype=dtype, seed=seed, cache=cache
            )
        return cls(eng, preset=None if checkpoint else preset)

    @property
    def vocab_size(self) -> int | None:
        cfg = getattr(self.engine, "config", None)
        return getattr(cfg, "vocab_size", None)

    def send(self, req: Request) -> Response:
        params = self._params_cls(
            temperature=0.0, max_tokens=req.max_tokens, ignore_eos=req.ignore_eos
        )
        try:
            res = self.engine.generate(list(req.prompt_ids), params, session=req.session)
        except UserError as e:  # budget errors: the engine stays usable, the row records it
            return Response(prompt_tokens=len(req.prompt_ids), error=f"{type(e).__name__}: {e}")
        s = res.stats
        timings = {
            k: float(getattr(s, k))
            for k in ("match_s", "restore_s", "replay_s", "prefill_s", "decode_s", "finalize_s")
            if hasattr(s, k)
        }
        tok = getattr(self.engine, "tokenizer", None)
        text = tok.decode(list(res.tokens)) if tok is not None else ids_to_text(res.tokens)
        return Response(
            ttft_s=s.ttft_s,
            e2e_s=s.e2e_s,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            snapshot_pos=s.snapshot_pos,
            replay_tokens=s.replay_tokens,
            new_tokens=s.new_tokens,
            tokens=list(res.tokens),
            text=text,
            logits_sha256=s.logits_sha256,
            generated_tokens=s.generated_tokens,
            timings=timings,
        )

    def warmup(self) -> float | None:
        """One uncached request before the run (kernel compilation, allocator) so the first row
        measures the cache, not start-up; the cache state is untouched. Seconds, or None."""
        try:
            params = inspect.signature(self.engine.generate).parameters
        except (TypeError, ValueError):
            return None
        if "use_cache" not in params:
            return None  # a warm-up through the cache would change the run's decisions
        vocab = self.vocab_size or 256
        prompt = [32 + k % min(95, max(vocab - 32, 1)) for k in range(200)]
        t0 = time.perf_counter()
        self.engine.generate(
            prompt,
            self._params_cls(temperature=0.0, max_tokens=4, ignore_eos=True),
            use_cache=False,
        )
        return time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def engine_info(self) -> dict[str, Any]:
        info = dict(self.engine.describe())
        if self.preset and "preset" not in info:
            info["preset"] = self.preset
        return info

    def cache_stats(self) -> dict[str, Any]:
        return dict(self.engine.cache_stats())

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- http target


class StreamError(Exception):
    """The server's response could not be read as an OpenAI stream (not retried)."""


class _Retryable(Exception):
    """A failure worth another attempt (connection, timeout, 429, 5xx)."""


class _Rejected(StreamError):
    """HTTP 400/422: the server refused the request body."""


# Fields we add beyond the strict OpenAI API (vLLM and SGLang accept them; api.openai.com answers
# 400 "Unrecognized request argument supplied: ignore_eos"). Dropped once, for the rest of the
# run, when a 400/422 names them; recorded in the result's target description.
_OPTIONAL_FIELDS = ("ignore_eos",)


def normalize_base_url(url: str) -> str:
    """`http://h:8000`, `http://h:8000/`, `http://h:8000/v1/` -> `http://h:8000/v1`."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise UserError(f"--base-url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


@dataclass
class HttpTarget:
    """Any OpenAI-compatible server, through streaming `/v1/chat/completions`.

    TTFT is the time to the first non-empty content delta. `usage.prompt_tokens_details.
    cached_tokens` and an `sbr` object ({snapshot_pos, replay_tokens, new_tokens,
    logits_sha256}) are read when the server sends them.
    """

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    concurrency: int = 1
    extra_body: dict[str, Any] = field(default_factory=dict)
    kind: str = "http"

    def __post_init__(self) -> None:
        import httpx

        self.base_url = normalize_base_url(self.base_url)
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            limits=httpx.Limits(max_connections=self.concurrency + 2),
        )
        self._lock = threading.Lock()
        self.dropped_fields: list[str] = []
        self.server_info: dict[str, Any] = {}
        if not self.model:
            self.model = self._first_model()

    @property
    def max_concurrency(self) -> int:
        return self.concurrency

    def _first_model(self) -> str:
        import httpx

        url = f"{self.base_url}/models"
        try:
            r = self._client.get(url, timeout=self.connect_timeout_s + 10)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise UserError(f"{url}: HTTP {r.status_code}: {_error_message(r.text)}")
        try:
            data = r.json()["data"]
            return str(data[0]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{url}: no model listed; pass --model") from None

    def _body(self, req: Request) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": chat_messages(req.messages),
            "max_tokens": req.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **({"ignore_eos": True} if req.ignore_eos else {}),
            # OpenAI's `user` field: the session hint servers (ours, vLLM) may key caches on
            **({"user": req.session} if req.session else {}),
            **self.extra_body,
        }
        for k in self.dropped_fields:
            body.pop(k, None)
        return body

    def send(self, req: Request) -> Response:
        body = self._body(req)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            try:
                return self._stream(body)
            except _Retryable as e:
                last = str(e)
            except _Rejected as e:
                named = [k for k in _OPTIONAL_FIELDS
                         if k in body and k in str(e) and k not in self.extra_body]
                if not named:
                    return Response(error=str(e))
                with self._lock:
                    self.dropped_fields.extend(k for k in named if k not in self.dropped_fields)
                body = self._body(req)
                try:  # the same attempt again, without the refused field
                    return self._stream(body)
                except _Retryable as e2:
                    last = str(e2)
                except StreamError as e2:
                    return Response(error=str(e2))
            except StreamError as e:
                return Response(error=str(e))
        return Response(error=f"{last} (after {self.retries + 1} attempts)")

    def _stream(self, body: dict[str, Any]) -> Response:
        import httpx

        url = f"{self.base_url}/chat/completions"
        t0 = time.perf_counter()
        try:
            with self._client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    msg = (
                        f"HTTP {r.status_code}: {_error_message(r.read().decode(errors='replace'))}"
                    )
                    if r.status_code == 429 or r.status_code >= 500:
                        raise _Retryable(msg)
                    if r.status_code in (400, 422):
                        raise _Rejected(msg)
                    raise StreamError(msg)
                return _read_sse(r.iter_lines(), t0)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout: {type(e).__name__}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None
        except httpx.HTTPError as e:
            raise StreamError(f"{type(e).__name__}: {e}") from None

    def warmup(self) -> float | None:
        """One short request before the run so the first row does not pay the server's start-up
        (it adds one small unrelated prefix to the server's cache). Seconds; None if it failed."""
        msgs = (Turn("user", tuple(b"Warm-up request from sbrbench; reply briefly.")),)
        t0 = time.perf_counter()
        r = self.send(Request((), msgs, max_tokens=2, session="sbrbench-warmup"))
        return None if r.error else time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_url": self.base_url,
            "model": self.model,
            "concurrency": self.concurrency,
            "retries": self.retries,
            "timeout_s": self.timeout_s,
            "tokens": "utf-8 bytes of the streamed text",
            "dropped_fields": list(self.dropped_fields),
        }

    def engine_info(self) -> dict[str, Any]:
        return {"model": self.model}

    def close(self) -> None:
        self._client.close()


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
    except (ValueError, AttributeError):
        pass
    return text.strip()[:200] or "(empty body)"


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _read_sse(lines: Any, t0: float) -> Response:
    """Read an OpenAI chat-completions SSE stream into a Response; StreamError when malformed."""
    ttft: float | None = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    sbr: dict[str, Any] = {}
    finish: str | None = None
    done = False
    for n, line in enumerate(lines, start=1):
        if not line or line.startswith(":"):
            continue
        if line.startswith(("event:", "id:", "retry:")):
            continue
        if not line.startswith("data:"):
            raise StreamError(f"malformed SSE at line {n}: expected 'data:', got {line[:60]!r}")
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise StreamError(
                f"malformed SSE at line {n}: data is not JSON: {payload[:60]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise StreamError(f"malformed SSE at line {n}: data is not a JSON object")
        if chunk.get("error"):
            raise StreamError(f"server error in stream: {_error_message(json.dumps(chunk))}")
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise StreamError(f"malformed SSE at line {n}: 'choices' is not a list")
        for ch in choices:
            delta = ch.get("delta") if isinstance(ch, dict) else None
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(content)
            if isinstance(ch, dict) and ch.get("finish_reason"):
                finish = str(ch["finish_reason"])
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if isinstance(chunk.get("sbr"), dict):
            sbr = chunk["sbr"]
    e2e = time.perf_counter() - t0
    if not done and finish is None:
        raise StreamError("stream ended before [DONE] and without a finish_reason")
    text = "".join(parts)
    details = usage.get("prompt_tokens_details")
    cached = _opt_int(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Response(
        ttft_s=ttft,
        e2e_s=e2e,
        prompt_tokens=_opt_int(usage.get("prompt_tokens")),
        cached_tokens=cached,
        snapshot_pos=_opt_int(sbr.get("snapshot_pos")),
        replay_tokens=_opt_int(sbr.get("replay_tokens")),
        new_tokens=_opt_int(sbr.get("new_tokens")),
        tokens=list(text.encode("utf-8")),
        text=text,
        logits_sha256=sbr.get("logits_sha256")
        if isinstance(sbr.get("logits_sha256"), str)
        else None,
        generated_tokens=_opt_int(usage.get("completion_tokens")),
        timings=_timings(sbr.get("timing")),
    )


def _timings(obj: Any) -> dict[str, float] | None:
    """The server's per-phase timing split (`sbr.timing`), numbers only."""
    if not isinstance(obj, dict):
        return None
    out = {
        str(k): float(v)
        for k, v in obj.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return out or None
