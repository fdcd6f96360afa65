"""The engine's prefix-cache settings: plain data (no torch), shared by the engine and the
simulator so both start from the same defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class EngineCacheArgs:
    """Prefix-cache settings of an engine (what `--policy`, `--snapshot-*` flags set)."""

    policy: str = "adaptive"
    policy_opts: dict[str, Any] = field(default_factory=dict)
    snapshot_slots: int | None = 16
    snapshot_budget_bytes: int | None = None  # overrides snapshot_slots when set
    snapshot_interval: int = 4096
    page_size: int = 16
    kv_budget_tokens: int = 262144
    exec_window: int | None = None  # None: 64 on CPU, 2048 on CUDA (docs/KERNELS.md)
    enabled: bool = True
