"""Scenario plumbing: TOML definitions and their checks, token-level conversations, Steps.

A scenario is a generator of *waves*: lists of independent requests (Steps). The runner
(runner.py) sends a wave, turns each Response into a result row, and calls the step's `on_done`
so the scenario can grow its conversations before it yields the next wave.
"""

from __future__ import annotations

import random
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from engine.chat import ChatTemplate, Message
from engine.errors import ConfigError, UserError
from sbrbench.targets.base import Request, Response, Target

_PKG = Path(__file__).resolve().parent.parent
REPO_ROOT = _PKG.parent


def scenario_dirs() -> list[Path]:
    """Where shipped scenario TOMLs live: the checkout's `scenarios/`, the wheel's copy."""
    return [REPO_ROOT / "scenarios", _PKG / "_scenarios"]


# ----------------------------------------------------------------------------- parameters


class Param(NamedTuple):
    type: type  # int | float | bool | str
    help: str = ""
    min: float | None = None
    max: float | None = None


# The [engine] table: the cache settings a scenario is meant to run with (sbrbench.cache_options;
# a key left out takes engine.cache.settings.CacheSettings' default; flags override).
ENGINE_PARAMS: dict[str, Param] = {
    "policy": Param(str, "policy or comma-separated policies to run"),
    "tail_pin_k": Param(int, "tail-pin: deepest snapshots pinned per resumable session", 1),
    "marconi_alpha": Param(float, "marconi: weight of FLOPs saved per byte", 0),
    "snapshot_slots": Param(int, "snapshot pool slots", 1),
    "snapshot_budget": Param(str, "snapshot pool bytes, e.g. 2GiB (instead of slots)"),
    "snapshot_interval": Param(int, "also admit a snapshot every this many tokens (0 = off)", 0),
    "page_size": Param(int, "KV page size in tokens (a divisor of 64)", 1, 64),
    "kv_budget_tokens": Param(int, "KV pool size in tokens", 1),
}

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value: Any, typ: type) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def check_value(key: str, value: Any, spec: Param, where: str) -> Any:
    """The value if it has the declared type and bounds; ConfigError naming the key otherwise."""
    if not _type_ok(value, spec.type):
        raise ConfigError(f"{where}: '{key}' must be {_TYPE_NAMES[spec.type]}, got {value!r}")
    if spec.type is float:
        value = float(value)
    if spec.min is not None and value < spec.min:
        raise ConfigError(f"{where}: '{key}' must be >= {spec.min:g}, got {value!r}")
    if spec.max is not None and value > spec.max:
        raise ConfigError(f"{where}: '{key}' must be <= {spec.max:g}, got {value!r}")
    return value


def check_table(table: Any, schema: dict[str, Param], where: str, *,
                required: bool = True) -> dict[str, Any]:
    """No key outside `schema`, each of the right type and bounds; with `required`, every key
    of `schema` present."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(schema)})")
    missing = [k for k in schema if k not in table]
    if required and missing:
        raise ConfigError(f"{where}: missing key '{missing[0]}'")
    return {k: check_value(k, table[k], spec, where) for k, spec in schema.items()
            if k in table}


def parse_set_value(key: str, text: str, spec: Param) -> Any:
    """`--set KEY=VALUE`: the value read as the parameter's type."""
    try:
        if spec.type is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return low in ("true", "1", "yes", "on")
        if spec.type is int:
            return int(text.replace("_", ""))
        if spec.type is float:
            return float(text)
        return text
    except ValueError:
        raise UserError(f"--set {key}: expected {_TYPE_NAMES[spec.type]}, got {text!r}") from None


class ScenarioConfig(NamedTuple):
    name: str
    description: str
    params: dict[str, Any]
    engine: dict[str, Any]
    source: str


# ----------------------------------------------------------------------------- text and turns

_SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "vo",
    "shi",
    "pre",
    "con",
    "dex",
    "ar",
    "el",
    "io",
    "un",
    "fa",
    "gri",
    "ber",
    "tul",
    "os",
    "ma",
    "qui",
    "ste",
    "ny",
    "zo",
    "pha",
]
_TOOL_KEYS = ["path", "line", "status", "msg", "value", "id", "size", "kind", "ok", "took_ms"]


class TextGen:
    """Seeded printable-ASCII text (one byte per character: the byte-level tokenizer's tokens)."""

    def __init__(self, seed: int | str) -> None:
        self.rng = random.Random(seed)
        self.words = [
            "".join(self.rng.choice(_SYLLABLES) for _ in range(self.rng.randint(1, 3)))
            for _ in range(600)
        ]

    def _fill(self, n: int, piece: Callable[[], str]) -> str:
        out: list[str] = []
        size = 0
        while size < n:
            s = piece()
            out.append(s)
            size += len(s)
        return "".join(out)[:n]

    def prose(self, n: int) -> str:
        """n characters of sentence-like text."""

        def sentence() -> str:
            w = [self.rng.choice(self.words) for _ in range(self.rng.randint(4, 14))]
            return " ".join(w).capitalize() + self.rng.choice([". ", "? ", ", then "])

        return self._fill(n, sentence)

    def tool_output(self, n: int) -> str:
        """n characters of log/JSON-like tool output."""

        def record() -> str:
            keys = self.rng.sample(_TOOL_KEYS, self.rng.randint(2, 5))
            vals = [
                self.rng.choice(
                    [
                        str(self.rng.randint(0, 99999)),
                        self.rng.choice(self.words),
                        f"src/{self.rng.choice(self.words)}.py",
                    ]
                )
                for _ in keys
            ]
            return (
                "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(keys, vals, strict=False)) + "}\n"
            )

        return self._fill(n, record)


# Tool outputs travel as user messages on every target (an OpenAI `tool` message needs a tool
# call id a scenario does not have), marked so a reader of the prompt can tell them apart.
TOOL_PREFIX = "[tool output]\n"


class Conversation:
    """A chat whose every request renders all turns so far with the target's chat template."""

    def __init__(self, session: str, template: ChatTemplate) -> None:
        self.session = session
        self.template = template
        self.messages: list[Message] = []
        self._ids: list[int] | None = None  # the rendered prompt, until the next add

    def add(self, role: str, text: str) -> None:
        """Append a turn: "system", "user", or "tool" (sent as a marked user message)."""
        if role == "tool":
            role, text = "user", TOOL_PREFIX + text
        self.messages.append(Message(role, text))
        self._ids = None

    def _prompt(self) -> list[int]:
        if self._ids is None:
            self._ids = self.template.render(self.messages)
        return self._ids

    def request(self, max_tokens: int) -> Request:
        """The next request: every turn so far, then the assistant's generation prompt."""
        return Request(tuple(self._prompt()), tuple(self.messages), max_tokens, self.session)

    def add_reply(self, resp: Response) -> None:
        """Append the reply (empty on error, so the next prompt still extends this one); with
        the generated ids when the target knows them (they render exactly, lossy or not)."""
        if resp.error:
            self.messages.append(Message("assistant", ""))
        else:
            ids = tuple(resp.tokens) if resp.stats is not None else None
            self.messages.append(Message("assistant", resp.text, ids))
        self._ids = None

    @property
    def depth(self) -> int:
        """Tokens of the next request's prompt."""
        return len(self._prompt())


def turn_plan_lengths(rng: random.Random, p: dict[str, Any]) -> tuple[str, int]:
    """Role and length of the next agentic turn: a tool output or a user message."""
    if rng.random() < p["tool_share"]:
        return "tool", rng.randint(p["tool_min"], p["tool_max"])
    return "user", rng.randint(p["user_min"], p["user_max"])


def add_agentic_turn(conv: Conversation, rng: random.Random, p: dict[str, Any],
                     text: TextGen) -> None:
    """Append the next agentic turn (a tool output or a user message) to `conv`."""
    role, n = turn_plan_lengths(rng, p)
    conv.add(role, text.tool_output(n) if role == "tool" else text.prose(n))


TURN_PARAMS: dict[str, Param] = {
    "user_min": Param(int, "shortest user message (tokens)", 1),
    "user_max": Param(int, "longest user message (tokens)", 1),
    "tool_min": Param(int, "shortest tool output (tokens)", 1),
    "tool_max": Param(int, "longest tool output (tokens)", 1),
    "tool_share": Param(float, "share of turns that are tool outputs", 0, 1),
    "reply_tokens": Param(int, "tokens generated per conversation turn", 1),
}


def check_ranges(p: dict[str, Any], where: str) -> None:
    for lo, hi in (("user_min", "user_max"), ("tool_min", "tool_max")):
        if lo in p and p[lo] > p[hi]:
            raise ConfigError(f"{where}: '{lo}' ({p[lo]}) is larger than '{hi}' ({p[hi]})")


# ----------------------------------------------------------------------------- scenario


@dataclass(slots=True)
class Step:
    """One request of a wave: what to send, the row fields it fills, what to do with the reply."""

    request: Request
    row: dict[str, Any]
    on_done: Callable[[Response], None] | None = None
    at_s: float | None = None  # send no earlier than this offset from the run start


class Scenario(ABC):
    """A workload: parameters from TOML, then waves of Steps."""

    name: ClassVar[str]
    summary: ClassVar[str]
    PARAMS: ClassVar[dict[str, Param]]

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.p = params
        self.seed = seed

    @classmethod
    def check_params(cls, p: dict[str, Any], where: str) -> None:
        """Cross-field checks beyond types and bounds."""
        check_ranges(p, where)

    def prepare(self, target: Target) -> None:
        """Take the target's chat template; subclasses also check what they need of the target
        (e.g. its vocabulary) before the first request."""
        self.template = target.template

    def conversation(self, session: str) -> Conversation:
        return Conversation(session, self.template)

    @abstractmethod
    def waves(self) -> Iterator[list[Step]]: ...

    def expected_requests(self) -> int | None:
        """How many requests the run will send (an estimate is fine; None if unknown)."""
        return None


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such scenario file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
