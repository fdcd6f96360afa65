"""Prefix-cache settings as a user gives them, and the one place that turns them into a
`CacheConfig` (budgets into snapshot slots and KV pages) for the engine and the simulator alike.

Plain data, no torch: `sbrbench sim` resolves the same settings for the same model to the same
`CacheConfig` the engine builds, so a policy decides in simulation what it decides in the engine.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.cache.manager import CacheConfig
from engine.cache.policies import POLICIES
from engine.errors import BudgetError, ConfigError, UserError

CHUNK = 64  # the GDN chunk: snapshots sit only at multiples of it (engine.config.CHUNK)


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The prefix cache of one engine (what `--policy`, `--snapshot-*`, `--kv-budget-tokens` set).

    ``snapshot_budget_bytes``, when given, sizes the pool instead of ``snapshot_slots``: as many
    snapshots of the model's size as fit. ``snapshot_interval`` also admits a snapshot every that
    many tokens inside a long prefill (0 = only at request ends and branch points).
    """

    policy: str = "adaptive"
    policy_opts: Mapping[str, Any] = field(default_factory=dict)
    snapshot_slots: int = 16
    snapshot_budget_bytes: int | None = None
    snapshot_interval: int = 4096
    page_size: int = 16
    kv_budget_tokens: int = 262144
    branch_admission: bool = True
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.policy!r} (known: {', '.join(POLICIES)})")
        if self.snapshot_slots < 0:
            raise UserError(f"snapshot slots must be >= 0, got {self.snapshot_slots}")
        if self.snapshot_budget_bytes is not None and self.snapshot_budget_bytes < 1:
            raise UserError(
                f"snapshot budget must be > 0 bytes, got {self.snapshot_budget_bytes}")
        if self.page_size < 1 or CHUNK % self.page_size:
            raise UserError(f"page size must divide {CHUNK}, got {self.page_size}")
        if self.snapshot_interval < 0 or self.snapshot_interval % CHUNK:
            raise UserError(
                f"snapshot interval must be 0 or a multiple of {CHUNK}, "
                f"got {self.snapshot_interval}")
        if self.kv_budget_tokens < self.page_size:
            raise UserError(
                f"KV budget must hold at least one page of {self.page_size} tokens, "
                f"got {self.kv_budget_tokens}")

    def replace(self, **changes: Any) -> CacheSettings:
        return dataclasses.replace(self, **changes)

    def slots(self, snapshot_bytes: int) -> int:
        """Snapshot pool size for snapshots of ``snapshot_bytes``: the budget's fit, or the
        slot count when no byte budget is set."""
        if self.snapshot_budget_bytes is None:
            return self.snapshot_slots
        if snapshot_bytes <= 0:
            raise ConfigError(f"snapshot size must be > 0 bytes, got {snapshot_bytes}")
        slots = self.snapshot_budget_bytes // snapshot_bytes
        if slots < 1:
            raise BudgetError(
                f"snapshot budget {self.snapshot_budget_bytes} B is smaller than one snapshot "
                f"({snapshot_bytes} B)")
        return slots

    def resolve(self, snapshot_bytes: int,
                model_flops: Mapping[str, float] | None = None) -> CacheConfig:
        """The manager's configuration for snapshots of ``snapshot_bytes``; ``model_flops``
        (`policy_flops`) goes to the policies that value a snapshot by the FLOPs it saves,
        unless their options set it."""
        opts = dict(self.policy_opts)
        if model_flops and POLICIES[self.policy].uses_model_flops:
            opts = {**model_flops, **opts}
        return CacheConfig(
            page_size=self.page_size,
            chunk=CHUNK,
            kv_pages=self.kv_budget_tokens // self.page_size,
            snapshot_slots=self.slots(snapshot_bytes),
            snapshot_bytes=snapshot_bytes,
            snapshot_interval=self.snapshot_interval,
            policy=self.policy,
            policy_opts=opts,
            branch_admission=self.branch_admission,
        )

    def describe(self) -> dict[str, Any]:
        """The settings as given, for the result JSON."""
        d = dataclasses.asdict(self)
        d["policy_opts"] = dict(self.policy_opts)
        return d


class FlopModel(Protocol):
    def flops_per_token(self) -> float: ...
    def gdn_flops_per_token(self) -> float: ...
    def attn_flops(self, q_pos: int) -> float: ...


def policy_flops(model: FlopModel) -> dict[str, float]:
    """What FLOP-valuing policies (marconi, adaptive) are told about the model: FLOPs per
    recomputed token and the attention coefficient (FLOPs per token per key)."""
    return {"flops_per_token": model.flops_per_token() + model.gdn_flops_per_token(),
            "attn_flops_coeff": 0.5 * model.attn_flops(0)}


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1e9' -> 1000000000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UserError(f"cannot read size {text!r} (examples: 2GiB, 512MB, 1e9)")
    unit, binary = m.group(2).lower(), m.group(3)
    if binary and not unit:
        raise UserError(f"cannot read size {text!r} (examples: 2GiB, 512MB, 1e9)")
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit]
    return int(float(m.group(1)) * base**power)
