"""Prefix cache for hybrid models: KV radix tree, recurrent-state snapshots, eviction policies.

Pure Python (no torch): the engine and the simulator drive the same ``CacheManager`` through
the same ``run_request`` (engine/cache/driver.py).
"""

from engine.cache import adaptive as _adaptive  # noqa: F401  (registers 'adaptive')
from engine.cache.driver import Executor, Served, check_request, run_request
from engine.cache.manager import CacheConfig, CacheManager, Plan
from engine.cache.policies import POLICIES, Policy, make_policy, online_policies
from engine.cache.radix import InsertResult, MatchResult, RadixCache, RadixNode
from engine.cache.settings import CacheSettings, parse_bytes, policy_flops
from engine.cache.snapshots import SessionInfo, SessionTable, SnapshotEntry, SnapshotIndex

__all__ = [
    "POLICIES",
    "CacheConfig",
    "CacheManager",
    "CacheSettings",
    "Executor",
    "InsertResult",
    "MatchResult",
    "Plan",
    "Policy",
    "RadixCache",
    "RadixNode",
    "Served",
    "SessionInfo",
    "SessionTable",
    "SnapshotEntry",
    "SnapshotIndex",
    "check_request",
    "make_policy",
    "online_policies",
    "parse_bytes",
    "policy_flops",
    "run_request",
]
