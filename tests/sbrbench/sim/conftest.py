"""Fixtures of the simulator tests: a cost model, a SimCache factory, the shipped trace sample."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.cache.settings import CacheSettings, policy_flops
from engine.config import preset
from sbrbench import sim
from sbrbench.costmodel import CostModel
from sbrbench.tracefile import SAMPLE_TRACE


@pytest.fixture(scope="session")
def cost() -> CostModel:
    return CostModel(a=1e-4, b=1e-8, c=1e-3, restore=1e-3, decode=1e-3)


@pytest.fixture(scope="session")
def sim_cache() -> Callable[..., sim.SimCache]:
    """SimCache(policy, slots, interval, kv_tokens, model=tiny, dtype=float32, **policy opts)."""

    def make(policy: str = "lru", slots: int = 2, interval: int = 0, kv_tokens: int = 1 << 16,
             model: str = "tiny", dtype_bytes: int = 4, branch_admission: bool = True,
             **opts: object) -> sim.SimCache:
        cfg = preset(model)
        settings = CacheSettings(policy=policy, policy_opts=dict(opts), snapshot_slots=slots,
                                 snapshot_interval=interval, kv_budget_tokens=kv_tokens,
                                 branch_admission=branch_admission)
        return sim.SimCache(settings, cfg.snapshot_bytes(dtype_bytes), policy_flops(cfg))

    return make


@pytest.fixture
def trace_slice(tmp_path: Path) -> Callable[[int], Path]:
    """The first n (<= 400) requests of the shipped Mooncake conversation trace, as a file."""

    def make(n: int) -> Path:
        path = tmp_path / "slice.jsonl"
        if n >= 400:
            shutil.copy(SAMPLE_TRACE, path)
            return path
        with SAMPLE_TRACE.open() as f, path.open("w") as g:
            for _ in range(n):
                g.write(f.readline())
        return path

    return make
