"""Random request streams through CacheManager: every invariant after every operation.

Streams interleave up to three running requests, share prefixes, hit the KV budget mid-request
(BudgetError), abort, and run under every policy. After each operation the independent audit in
conftest.audit checks budgets, page ownership (no leaks), ref counts, snapshot placement and that
locked / in-use entries survived. Replaying the same stream on a fresh manager must give the
same decisions (the engine and the simulator rely on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cache import CacheConfig, CacheManager, Plan
from engine.errors import BudgetError

PS, CHUNK = 2, 8


def _next_use(entry, tick: int) -> float:
    """A fixed pseudo-future for belady: deterministic in (entry id, tick)."""
    h = (entry.id * 7919 + tick * 104729) % 17
    return math.inf if h == 0 else tick + h


POLICY_CHOICES = [
    ("lru", {}),
    ("forecast", {}),
    ("tail-pin", {"k": 1}),
    ("tail-pin", {"k": 2}),
    ("two-tier", {}),
    ("marconi", {"alpha": 0.5}),
    ("belady", {"next_use": _next_use}),
]

begin_op = st.tuples(
    st.sampled_from(["serve", "serve", "begin"]),  # serve: begin and run to the end at once
    st.integers(0, 1000),  # which finished sequence to extend (if any)
    st.sampled_from([100, 100, 100, 0, 25, 50, 75, 90]),  # where to cut it, in percent
    st.lists(st.integers(0, 2), min_size=1, max_size=30),  # new tokens
    st.integers(0, 10),  # reply length
    st.sampled_from([None, None, None, "a", "b"]),  # explicit session id
)
other_op = st.tuples(st.sampled_from(["advance", "advance", "finish", "abort"]), st.integers(0, 9))
streams = st.lists(st.one_of(begin_op, other_op), min_size=6, max_size=40)


@dataclass
class Req:
    plan: Plan
    prompt: list[int]
    full: list[int]
    stage: int = 0  # 0: alloc; 1..: admissions; then the final insert; -1: done
    pages: list[int] = field(default_factory=list)


def execute(cfg: CacheConfig, stream: list[tuple], check: bool, audit) -> list[object]:
    """Run ``stream`` like an engine would; return what a caller can observe."""
    cm = CacheManager(cfg)
    history: list[list[int]] = []
    running: dict[int, Req] = {}
    seen: list[object] = []
    reply_tok = 100  # replies never repeat, so continuations are identifiable

    for op in stream:
        if op[0] in ("begin", "serve"):
            kind, which, cut, extra, reply_len, session = op
            base: list[int] = []
            if history:
                seq = history[which % len(history)]
                base = seq[: len(seq) * cut // 100]
            prompt = base + list(extra) or [0]
            if len(running) >= 3:
                continue
            before = (cm.tick, cm.radix.free_list(), cm.radix.tree_pages)
            try:
                plan = cm.begin(prompt, session)
            except BudgetError:
                assert -(-len(prompt) // PS) > cfg.kv_pages
                assert (cm.tick, cm.radix.free_list(), cm.radix.tree_pages) == before
                seen.append("rejected")
                continue
            assert plan.matched < len(prompt) and plan.matched % PS == 0
            assert plan.restore_pos <= plan.matched and plan.restore_pos % CHUNK == 0
            reply = list(range(reply_tok, reply_tok + reply_len))
            reply_tok += reply_len
            req = Req(plan, prompt, prompt + reply, pages=list(plan.kv_pages))
            running[plan.tick] = req
            seen.append(plan._replace(snapshot=plan.snapshot and plan.snapshot.id))
            if kind == "serve":
                while req.stage >= 0:
                    seen.append(advance(cm, req, cfg))
                    if check:
                        audit(cm, [r.plan for r in running.values()])
                cm.finish(plan, req.full)
                if req.stage == -1:
                    history.append(req.full)
                del running[plan.tick]
        elif running:
            kind, which = op
            tick = sorted(running)[which % len(running)]
            req = running[tick]
            if kind == "advance" and req.stage >= 0:
                seen.append(advance(cm, req, cfg))
            elif kind == "finish" or (kind == "advance" and req.stage < 0):
                cm.finish(req.plan, req.full)
                if req.stage == -1:
                    history.append(req.full)
                del running[tick]
            else:
                cm.abort(req.plan)
                del running[tick]
        if check:
            audit(cm, [r.plan for r in running.values()])
    for req in running.values():
        cm.finish(req.plan, req.full)
    if check:
        audit(cm)
        assert cm.active == 0 and cm.radix.locked_pages == 0
        assert cm.radix.pages_in_use == cm.radix.tree_pages  # nothing held after the last finish
    seen.append(cm.stats())
    seen.append(sorted((e.pos, e.session, e.slot, e.hit_count) for e in cm.index.entries.values()))
    return seen


def advance(cm: CacheManager, req: Req, cfg: CacheConfig) -> object:
    """One engine step of a running request: alloc, one admission, or the final insert."""
    plan = req.plan
    positions = plan.admit_positions
    if req.stage == 0:
        need = -(-len(req.full) // PS) - len(plan.kv_pages)
        freeable = cm.radix.free_pages + cm.radix.evictable_pages
        before = (cm.radix.free_list(), cm.radix.tree_pages, len(cm.index))
        try:
            req.pages += cm.alloc_pages(need, plan)
        except BudgetError:
            assert need > freeable
            assert (cm.radix.free_list(), cm.radix.tree_pages, len(cm.index)) == before
            req.stage = -2  # the engine gives up; the stream finishes or aborts it later
            return "budget"
        assert need <= freeable
        req.stage = 1
        return ("alloc", need)
    if req.stage <= len(positions):
        p = positions[req.stage - 1]
        req.pages = cm.insert(plan, req.prompt[:p], req.pages)
        entry = cm.admit(plan, req.prompt, p)
        req.stage += 1
        return ("admit", p, entry and entry.slot)
    req.pages = cm.insert(plan, req.full, req.pages)
    assert req.pages[: len(plan.kv_pages)] == plan.kv_pages
    req.stage = -1
    return ("done", len(req.pages))


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    stream=streams,
    policy=st.sampled_from(POLICY_CHOICES),
    kv_pages=st.integers(6, 60),
    slots=st.integers(0, 4),
    interval=st.sampled_from([0, 8, 16]),
)
def test_random_streams_keep_every_invariant_and_replay_identically(audit,
    stream, policy, kv_pages, slots, interval
):
    cfg = CacheConfig(
        page_size=PS,
        chunk=CHUNK,
        kv_pages=kv_pages,
        snapshot_slots=slots,
        snapshot_interval=interval,
        policy=policy[0],
        policy_opts=policy[1],
        snapshot_bytes=0,
        branch_admission=True,
    )
    first = execute(cfg, stream, check=True, audit=audit)
    assert execute(cfg, stream, check=False, audit=audit) == first
