"""run_request: the one request path, with a recording executor; check_request's refusals."""

from __future__ import annotations

import pytest

from engine.cache import CacheManager, check_request, run_request
from engine.cache.snapshots import SnapshotEntry
from engine.errors import BudgetError, UserError


class Recorder:
    """An executor that computes nothing and records what the driver asked of it, in order."""

    def __init__(self, reply: tuple[int, ...], fail_in: str | None = None) -> None:
        self.reply_ids = reply
        self.fail_in = fail_in
        self.calls: list[tuple] = []

    def prompt(self, plan, pages):
        self.calls.append(("prompt", plan.restore_pos if plan else None, len(pages)))
        if self.fail_in == "prompt":
            raise RuntimeError("boom")
        return {p: f"state@{p}" for p in (plan.admit_positions if plan else [])}

    def store(self, entry: SnapshotEntry, state: str) -> None:
        self.calls.append(("store", entry.pos, state))

    def generate(self):
        self.calls.append(("generate",))
        return self.reply_ids

    def reply(self, full, pages, end):
        self.calls.append(("reply", len(full), end))
        return {end: f"state@{end}"} if end is not None else {}


def test_the_calls_in_order_and_the_cache_use(config) -> None:
    cm = CacheManager(config(snapshot_slots=4))
    prompt = tuple(range(300))
    ex = Recorder(tuple(range(1000, 1040)))
    first = run_request(cm, prompt, 40, None, ex)
    assert ex.calls == [("prompt", 0, 22), ("store", 256, "state@256"), ("generate",),
                        ("reply", 340, 320), ("store", 320, "state@320")]
    assert first.use == (300, 0, 0, 0, 300) and first.reply == ex.reply_ids
    # the next turn extends prompt + reply: it matches through the reply, restores at 320
    nxt = prompt + first.reply + tuple(range(2000, 2050))
    ex2 = Recorder((7,) * 8)
    second = run_request(cm, nxt, 8, None, ex2)
    assert second.plan is not None and second.plan.session == first.plan.session
    assert second.use == (390, 336, 320, 16, 54)
    assert ex2.calls[0] == ("prompt", 320, 25)
    assert cm.active == 0


def test_without_a_cache_only_the_model_runs() -> None:
    ex = Recorder((5, 6))
    served = run_request(None, (1, 2, 3), 2, None, ex)
    assert served.plan is None and served.use == (3, 0, 0, 0, 3) and served.reply == (5, 6)
    assert ex.calls == [("prompt", None, 0), ("generate",)]


def test_a_failing_executor_aborts_the_plan(config, audit) -> None:
    cm = CacheManager(config())
    with pytest.raises(RuntimeError, match="boom"):
        run_request(cm, tuple(range(200)), 4, None, Recorder((1,), fail_in="prompt"))
    assert cm.active == 0 and cm.held_pages() == []
    audit(cm)
    ok = run_request(cm, tuple(range(200)), 4, None, Recorder((1, 2, 3, 4)))
    assert ok.use.cached_tokens == 0  # the aborted request cached nothing


def test_check_request_refusals(config) -> None:
    cfg = config(kv_pages=16)  # 256 tokens of KV
    check_request(cfg, (1, 2, 3), 4, max_context=100, vocab_size=10)
    with pytest.raises(UserError, match="empty prompt"):
        check_request(cfg, (), 4, max_context=100)
    with pytest.raises(UserError, match=r"token id 12 is outside the vocabulary \(0\.\.9\)"):
        check_request(cfg, (1, 12), 4, max_context=100, vocab_size=10)
    with pytest.raises(UserError, match="max_tokens must be >= 1"):
        check_request(cfg, (1,), 0, max_context=100)
    with pytest.raises(BudgetError, match=r"prompt \(90\) \+ max_tokens \(20\) exceeds"):
        check_request(cfg, (1,) * 90, 20, max_context=100)
    with pytest.raises(BudgetError, match="needs 272 KV tokens; the KV budget is 256"):
        check_request(cfg, (1,) * 260, 10, max_context=1000)
    check_request(None, (1,) * 260, 10, max_context=1000)  # no cache: no KV budget
