"""CacheSettings: the defaults, the checks, and resolve() (budgets into slots and pages)."""

from __future__ import annotations

import pytest

from engine.cache import CacheSettings, parse_bytes, policy_flops
from engine.config import preset
from engine.errors import BudgetError, ConfigError, UserError


def test_defaults_resolve_to_the_engines_configuration() -> None:
    s = CacheSettings()
    cfg = s.resolve(snapshot_bytes=1000)
    assert (s.policy, cfg.policy) == ("adaptive", "adaptive")
    assert (cfg.page_size, cfg.chunk, cfg.kv_pages) == (16, 64, 262144 // 16)
    assert (cfg.snapshot_slots, cfg.snapshot_bytes, cfg.snapshot_interval) == (16, 1000, 4096)
    assert cfg.branch_admission and cfg.policy_opts == {}


def test_a_byte_budget_sizes_the_pool() -> None:
    s = CacheSettings(snapshot_budget_bytes=2 * 2**30)
    assert s.resolve(75_000_000).snapshot_slots == 28
    with pytest.raises(BudgetError, match="smaller than one snapshot"):
        CacheSettings(snapshot_budget_bytes=1000).resolve(75_000_000)


def test_model_flops_go_to_the_policies_that_use_them() -> None:
    flops = policy_flops(preset("tiny"))
    assert set(flops) == {"flops_per_token", "attn_flops_coeff"} and flops["flops_per_token"] > 0
    assert CacheSettings(policy="marconi").resolve(1, flops).policy_opts == flops
    assert CacheSettings(policy="lru").resolve(1, flops).policy_opts == {}
    given = CacheSettings(policy="adaptive", policy_opts={"flops_per_token": 5.0})
    assert given.resolve(1, flops).policy_opts["flops_per_token"] == 5.0  # options win


@pytest.mark.parametrize(("kw", "msg"), [
    ({"policy": "nope"}, "unknown policy 'nope'"),
    ({"snapshot_slots": -1}, "snapshot slots must be >= 0"),
    ({"page_size": 48}, "page size must divide 64"),
    ({"snapshot_interval": 100}, "multiple of 64"),
    ({"kv_budget_tokens": 8}, "at least one page"),
    ({"snapshot_budget_bytes": 0}, "must be > 0 bytes"),
])
def test_bad_settings_are_one_line_user_errors(kw: dict, msg: str) -> None:
    with pytest.raises(UserError, match=msg):
        CacheSettings(**kw)


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1e9") == 10**9
    assert parse_bytes("1024") == 1024
    assert parse_bytes("4 KiB") == 4096
    for bad in ("lots", "2iB", "-1GB"):
        with pytest.raises(UserError, match="cannot read size"):
            parse_bytes(bad)
    assert isinstance(ConfigError("x"), UserError)
