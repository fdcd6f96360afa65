"""The chat template (one for every path: in-process scenarios, the server, the simulator) and
incremental reply text for the OpenAI-compatible server.

`load_template` picks the checkpoint's own template when it has one (`chat_template` in
tokenizer_config.json, or chat_template.jinja), rendered as transformers renders it (a sandboxed
Jinja environment, then the tokenizer without added special tokens), and the built-in ChatML
template otherwise (the presets' byte-level tokenizer).

The built-in template is prefix-stable, which is what lets multi-turn traffic hit the prefix
cache: the ids of turn N+1's prompt extend turn N's prompt + reply ids exactly. Two things could
break it:

- tokenizing the whole conversation as one string (BPE merges across message boundaries):
  each message is therefore encoded on its own and the pieces concatenated;
- the reply's text not re-encoding to the generated ids (a byte-level model may emit invalid
  UTF-8 or special ids; the client sees U+FFFD or nothing, and cannot send the bytes back):
  such replies are kept in a bounded server-side `ReplyMemory`, keyed by the exact prompt they
  answered and the text the client received, and rendered from the remembered ids; an
  in-process caller passes the ids themselves (`Message.ids`).

Message layout (ChatML): `<|im_start|>` + `{role}\\n` + content + END + `\\n`, where
`<|im_start|>` is the tokenizer's special id when it has one and END is its `eos_id`, the token
that ends a generated reply; the generation prompt is the assistant header. A reply that ended
on END is therefore a verbatim prefix of the next prompt. A checkpoint's own template is as
prefix-stable as the checkpoint makes it (many drop earlier turns' reasoning), as on any server.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, Protocol

from engine.errors import ConfigError, UserError


class TokenizerLike(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Message(NamedTuple):
    role: str
    content: str
    ids: tuple[int, ...] | None = None  # the content's exact ids, when the caller has them


class ChatTemplate(Protocol):
    """Renders chat messages to prompt ids."""

    name: str

    def render(self, messages: Sequence[Message], *,
               add_generation_prompt: bool = True) -> list[int]: ...

    def remember(self, prompt_ids: Sequence[int], text: str,
                 reply_ids: Sequence[int]) -> None: ...


_SURROGATE = re.compile("[\ud800-\udfff]")


def encode_text(tokenizer: TokenizerLike, text: str) -> list[int]:
    """`tokenizer.encode`, with lone surrogates (valid in JSON, not in UTF-8) made U+FFFD."""
    try:
        return list(tokenizer.encode(text))
    except UnicodeError:
        return list(tokenizer.encode(_SURROGATE.sub("\ufffd", text)))


def _ids_bytes(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


class ReplyMemory:
    """Bounded LRU map (prompt digest, reply text) -> generated ids, for lossy replies only."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._map: OrderedDict[tuple[str, str], array[int]] = OrderedDict()  # 4 bytes an id

    def __len__(self) -> int:
        return len(self._map)

    def put(self, prompt_digest: str, text: str, ids: Sequence[int]) -> None:
        if self.capacity <= 0:
            return
        key = (prompt_digest, text)
        self._map[key] = array("i", ids)
        self._map.move_to_end(key)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def get(self, prompt_digest: str, text: str) -> tuple[int, ...] | None:
        ids = self._map.get((prompt_digest, text))
        if ids is None:
            return None
        self._map.move_to_end((prompt_digest, text))
        return tuple(ids)


class ChatML:
    """The built-in template: renders messages so that each turn's prompt extends the previous
    one (module docstring)."""

    name = "chatml"

    def __init__(self, tokenizer: TokenizerLike, *, memory_entries: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.memory = ReplyMemory(memory_entries)
        self._start = self._special("<|im_start|>")
        end = tokenizer.eos_id
        self._end = [end] if end is not None else self._special("<|im_end|>")
        self._newline = list(tokenizer.encode("\n"))
        self._headers: dict[str, list[int]] = {}

    def _special(self, name: str) -> list[int]:
        special_id = getattr(self.tokenizer, "special_id", None)
        sid = special_id(name) if special_id is not None else None
        return [sid] if sid is not None else list(self.tokenizer.encode(name))

    def header(self, role: str) -> list[int]:
        ids = self._headers.get(role)
        if ids is None:
            ids = self._headers[role] = [*self._start, *self.tokenizer.encode(f"{role}\n")]
        return ids

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt ids: every message encoded on its own, concatenated, then the assistant header."""
        out: list[int] = []
        digest = hashlib.sha256()
        for m in messages:
            head = self.header(m.role)
            out += head
            digest.update(_ids_bytes(head))
            body: Sequence[int] | None = m.ids
            if body is None and m.role == "assistant":
                body = self.memory.get(digest.hexdigest(), m.content)
            if body is None:
                body = encode_text(self.tokenizer, m.content)
            tail = [*body, *self._end, *self._newline]
            out += tail
            digest.update(_ids_bytes(tail))
        if add_generation_prompt:
            out += self.header("assistant")
        return out

    def remember(self, prompt_ids: Sequence[int], text: str, reply_ids: Sequence[int]) -> None:
        """Record a reply whose text does not re-encode to its ids (the lossy case only)."""
        if encode_text(self.tokenizer, text) == list(reply_ids):
            return
        self.memory.put(hashlib.sha256(_ids_bytes(prompt_ids)).hexdigest(), text, reply_ids)


class CheckpointTemplate:
    """A checkpoint's own Jinja chat template, rendered as transformers' `apply_chat_template`
    renders it: a sandboxed environment (trim_blocks, lstrip_blocks, loop controls, `tojson`,
    `raise_exception`, `strftime_now`), the tokenizer's special tokens as variables, then the
    text encoded without added special tokens."""

    name = "checkpoint"

    def __init__(self, tokenizer: TokenizerLike, source: str,
                 variables: dict[str, object] | None = None) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the checkpoint's chat template does not compile: {e}") from None
        self.tokenizer = tokenizer
        self.variables = dict(variables or {})

    def text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        import jinja2

        msgs = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return str(self._template.render(messages=msgs,
                                             add_generation_prompt=add_generation_prompt,
                                             **self.variables))
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def render(self, messages: Sequence[Message], *,
               add_generation_prompt: bool = True) -> list[int]:
        text = self.text(messages, add_generation_prompt=add_generation_prompt)
        return encode_text(self.tokenizer, text)

    def remember(self, prompt_ids: Sequence[int], text: str, reply_ids: Sequence[int]) -> None:
        """Nothing to remember: the template renders text, as transformers does."""


def load_template(tokenizer: TokenizerLike, checkpoint: Path | None = None) -> ChatTemplate:
    """The checkpoint's own chat template (`chat_template.jinja`, or `chat_template` in
    tokenizer_config.json: a string, or a list of named templates of which "default" is used),
    else the built-in ChatML template."""
    if checkpoint is not None:
        source, variables = _checkpoint_template(Path(checkpoint))
        if source is not None:
            return CheckpointTemplate(tokenizer, source, variables)
    return ChatML(tokenizer)


def _checkpoint_template(d: Path) -> tuple[str | None, dict[str, object]]:
    cfg_path = d / "tokenizer_config.json"
    cfg: dict[str, object] = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg_path}: cannot read ({e})") from None
    variables: dict[str, object] = {}
    for k, v in cfg.items():
        text = _token_text(v)
        if k.endswith("_token") and text is not None:
            variables[k] = text
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), variables
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    return (tmpl if isinstance(tmpl, str) else None), variables


def _token_text(v: object) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


class Delta(NamedTuple):
    text: str  # text safe to show now
    stopped: bool  # a stop string matched; `text` ends right before it


class TextStream:
    """Incremental detokenizer with stop strings: ids in, text deltas out.

    Text is released only once it is stable: a byte sequence still incomplete (decodes to a
    trailing U+FFFD) or a tail that may begin a stop string is held back. The concatenated
    deltas are the reply text; `ids` holds the ids that text came from (for `ReplyMemory`).
    """

    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to text already taken from the decoder
        self._read = 0
        self._pending = ""  # decoded but held back (may begin a stop string)
        self._text_ends: list[int] = []  # len(decoded text) after each id, for stop truncation
        self._decoded = 0

    def push(self, token_id: int) -> Delta:
        if self.stopped:
            return Delta("", True)
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix :])
        piece = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
        self._decoded += len(piece)
        self._text_ends.append(self._decoded)
        return self._release(piece, final=False)

    def finish(self) -> str:
        """Flush whatever is held (an incomplete byte sequence, a partial stop match)."""
        if self.stopped:
            return ""
        piece = ""
        if self._read < len(self.ids):
            prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
            new_text = self.tokenizer.decode(self.ids[self._prefix :])
            piece = new_text[len(prefix_text) :]
            self._read = len(self.ids)
            self._decoded += len(piece)
            if self._text_ends:
                self._text_ends[-1] = self._decoded
        return self._release(piece, final=True).text

    def reply_ids(self) -> list[int] | None:
        """Ids whose text is exactly `text`, or None if a stop string cut a token in two."""
        if not self.stopped:
            return list(self.ids)
        n = len(self.text)
        if n == 0:
            return []
        # The first id after which exactly n characters were decoded; later ids only began
        # the stop string (or an incomplete character inside it).
        k = bisect.bisect_left(self._text_ends, n)
        if k < len(self._text_ends) and self._text_ends[k] == n:
            return self.ids[: k + 1]
        return None

    def _release(self, piece: str, *, final: bool) -> Delta:
        pending = self._pending + piece
        if self.stop:
            hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out = pending[: min(hits)]
                self._pending = ""
                self.text += out
                self.stopped = True
                return Delta(out, True)
        hold = 0 if final else self._held_tail(pending)
        out = pending[: len(pending) - hold]
        self._pending = pending[len(pending) - hold :]
        self.text += out
        return Delta(out, False)

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
