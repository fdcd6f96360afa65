"""The options the verbs share: the model flags' checks (`--preset`, `--device`, `--dtype`), the
prefix-cache options (`run`, `serve`, `sim`: policy, its options, budgets) and the one way they
become `engine.cache.settings.CacheSettings`.

A scenario's `[engine]` table sets the same names; a flag given on the command line wins, and a
name set nowhere takes the `CacheSettings` default.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import typer

from engine.cache.policies import POLICIES, make_policy
from engine.cache.settings import CacheSettings, parse_bytes
from engine.errors import ConfigError, UserError


def check_model_flags(*, preset: str | None = None, device: str | None = None,
                      dtype: str | None = None) -> None:
    """--preset, --device and --dtype checked before any work: each error names its flag and
    the values it accepts."""
    from engine.config import DTYPE_BYTES, PRESETS

    if preset is not None and preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: unknown preset (choose from {', '.join(PRESETS)})")
    if device is not None and not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device!r}: unknown device (cpu, cuda or cuda:N)")
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise UserError(f"--dtype {dtype!r}: unknown dtype (float32, bfloat16 or float16)")


def split_policies(text: str, *, offline: bool = False) -> list[str]:
    """'forecast,tail-pin' -> ['forecast', 'tail-pin']; unknown or repeated names are errors.
    Offline policies (belady) are refused unless ``offline``."""
    pols = [p.strip() for p in text.split(",") if p.strip()]
    if not pols:
        raise UserError("--policy: no policy given")
    if len(set(pols)) != len(pols):
        raise UserError(f"--policy {text!r}: a policy is listed twice")
    known = [k for k, cls in POLICIES.items() if offline or not cls.offline]
    for p in pols:
        if p not in known:
            raise UserError(f"--policy: unknown policy {p!r} (known: {', '.join(known)})")
    return pols


def positive(value: float | None) -> float | None:
    """Typer callback of a flag that must be > 0 (seconds, rates, shapes); None passes."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"Input should be greater than 0, got {value:g}")
    return value


ADAPTIVE_OPT_HELP = ("adaptive: a policy option KEY=VALUE, repeatable, e.g. delta=0.1 or "
                     "admit_control=false (an unknown KEY lists the accepted ones)")


def policy_options(policy: str) -> dict[str, Any]:
    """The options `policy`'s constructor accepts, with their defaults (what --adaptive-opt may
    set)."""
    cls = POLICIES[policy]
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _accepted(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                     for k, v in options.items())


def _typed(key: str, raw: str, default: Any) -> Any:
    """VALUE of KEY=VALUE as the type of the option's default (JSON for numbers and booleans,
    the text itself for strings); a value of another type is a UserError naming the option."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    kinds: tuple[type, ...] | None = None
    if isinstance(default, bool):
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
        kinds, what = (bool,), "true or false"
    elif isinstance(default, int):
        kinds, what = (int,), "an integer"
    elif isinstance(default, float):
        kinds, what = (int, float), "a number"
    elif isinstance(default, str):
        return raw
    else:  # no default to type it by: the JSON value, or the text
        return value
    if kinds is not None and (not isinstance(value, kinds)
                              or (bool not in kinds and isinstance(value, bool))):
        raise UserError(f"--adaptive-opt {key}: expected {what} (default {json.dumps(default)}), "
                        f"got {raw!r}")
    return float(value) if isinstance(default, float) else value


def parse_adaptive_opts(items: Sequence[str]) -> dict[str, Any]:
    """--adaptive-opt KEY=VALUE items -> options of the adaptive policy, each VALUE of its
    option's type. Unknown keys, bad values and out-of-range options are a one-line error here,
    naming the option and what it accepts, before any work."""
    accepted = policy_options("adaptive")
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--adaptive-opt: expected KEY=VALUE, got {item!r} "
                            f"(accepted, with defaults: {_accepted(accepted)})")
        if key not in accepted:
            raise UserError(f"--adaptive-opt {key}: not an option of the adaptive policy "
                            f"(accepted, with defaults: {_accepted(accepted)})")
        opts[key] = _typed(key, raw.strip(), accepted[key])
    if opts:
        try:
            make_policy("adaptive", **opts)
        except ConfigError as e:
            raise UserError(f"--adaptive-opt: {e}") from None
    return opts


def policy_opts(policy: str, *, tail_pin_k: int | None = None,
                marconi_alpha: float | None = None,
                adaptive_opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The constructor options of ``policy`` that the shared flags set (tail-pin's k, marconi's
    alpha, adaptive's KEY=VALUE options); the flags of other policies are ignored."""
    if policy == "tail-pin" and tail_pin_k is not None:
        return {"k": tail_pin_k}
    if policy == "marconi" and marconi_alpha is not None:
        return {"alpha": marconi_alpha}
    if policy == "adaptive":
        return dict(adaptive_opts or {})
    return {}


def cache_settings(policy: str, table: Mapping[str, Any] | None = None, *,
                   tail_pin_k: int | None = None, marconi_alpha: float | None = None,
                   adaptive_opts: Mapping[str, Any] | None = None,
                   snapshot_slots: int | None = None, snapshot_budget: str | None = None,
                   snapshot_interval: int | None = None, page_size: int | None = None,
                   kv_budget_tokens: int | None = None) -> CacheSettings:
    """CacheSettings for one ``policy``: each flag given, else the scenario ``table``'s value,
    else the default."""
    t = dict(table or {})

    def pick(flag: Any, key: str) -> Any:
        return flag if flag is not None else t.get(key)

    budget = pick(snapshot_budget, "snapshot_budget")
    given: dict[str, Any] = {
        "policy": policy,
        "policy_opts": policy_opts(policy, tail_pin_k=pick(tail_pin_k, "tail_pin_k"),
                                   marconi_alpha=pick(marconi_alpha, "marconi_alpha"),
                                   adaptive_opts=adaptive_opts),
        "snapshot_slots": pick(snapshot_slots, "snapshot_slots"),
        "snapshot_budget_bytes": parse_bytes(budget) if budget else None,
        "snapshot_interval": pick(snapshot_interval, "snapshot_interval"),
        "page_size": pick(page_size, "page_size"),
        "kv_budget_tokens": pick(kv_budget_tokens, "kv_budget_tokens"),
    }
    return CacheSettings(**{k: v for k, v in given.items() if v is not None})
