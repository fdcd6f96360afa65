"""Prefix cache for hybrid models: KV radix tree, recurrent-state snapshots, eviction policies.

Pure Python (no torch): the engine and the simulator drive the same ``CacheManager``.
"""

from engine.cache import adaptive as _adaptive  # noqa: E402,F401  (registers 'adaptive')
from engine.cache.manager import CacheConfig, CacheManager, Plan, slots_for_budget
from engine.cache.policies import POLICIES, Policy, make_policy, online_policies
from engine.cache.radix import InsertResult, MatchResult, RadixCache, RadixNode
from engine.cache.snapshots import SessionInfo, SessionTable, SnapshotEntry, SnapshotIndex

__all__ = [
    "POLICIES",
    "CacheConfig",
    "CacheManager",
    "InsertResult",
    "MatchResult",
    "Plan",
    "Policy",
    "RadixCache",
    "RadixNode",
    "SessionInfo",
    "SessionTable",
    "SnapshotEntry",
    "SnapshotIndex",
    "make_policy",
    "online_policies",
    "slots_for_budget",
]
