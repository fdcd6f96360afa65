"""The prefix-cache options the verbs share (`run`, `serve`, `sim`): policy, its options, budgets;
and the one way they become `engine.cache.settings.CacheSettings`.

A scenario's `[engine]` table sets the same names; a flag given on the command line wins, and a
name set nowhere takes the `CacheSettings` default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from engine.cache.policies import POLICIES, make_policy
from engine.cache.settings import CacheSettings, parse_bytes
from engine.errors import ConfigError, UserError


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


def parse_adaptive_opts(items: Sequence[str]) -> dict[str, Any]:
    """--adaptive-opt KEY=VALUE items -> options of the adaptive policy (VALUE as JSON if it
    parses, else a string). Unknown or bad options are a one-line error here, before any work."""
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
