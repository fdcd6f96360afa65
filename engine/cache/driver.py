"""The one path of a request through the prefix cache, for the engine and the simulator alike.

`run_request` makes every cache call in order (match -> plan -> allocate -> insert -> admit ->
finish); an `Executor` does the computing in between. The engine's executor runs the model on
the planned windows (engine.runtime), the simulator's charges a cost model (sbrbench.sim), so a
policy decides in simulation exactly what it decides in the engine, by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol, TypeVar

from engine.cache.manager import CacheConfig, CacheManager, Plan
from engine.cache.snapshots import SnapshotEntry
from engine.errors import BudgetError, UserError
from engine.record import CacheUse

S = TypeVar("S")


class Executor(Protocol[S]):
    """What computes one request between the cache's calls; ``S`` is a recurrent state."""

    def prompt(self, plan: Plan | None, pages: list[int]) -> Mapping[int, S]:
        """Restore ``plan.snapshot`` (or start from zero), replay [s, m) and prefill [m, L),
        writing the prompt's KV into ``pages`` (which cover [0, L + max_tokens)); sample the
        first token. Returns the states at ``plan.admit_positions`` (the cache admits from them).
        ``plan`` is None when the request bypasses the cache."""
        ...

    def store(self, entry: SnapshotEntry, state: S) -> None:
        """Keep ``state`` in snapshot slot ``entry.slot`` (the cache admitted it)."""
        ...

    def generate(self) -> Sequence[int]:
        """The reply: the first token and the rest of the decode."""
        ...

    def reply(self, full: tuple[int, ...], pages: list[int], end: int | None) -> Mapping[int, S]:
        """Make the reply's cached KV canonical (as a later prompt would compute it) in
        ``pages``, and return the state at grid position ``end`` when it is not None."""
        ...


class Served(NamedTuple):
    """What `run_request` returns: the plan (None without cache), what the cache did, the
    reply tokens."""

    plan: Plan | None
    use: CacheUse
    reply: tuple[int, ...]


def check_request(cfg: CacheConfig | None, prompt: Sequence[int], max_tokens: int, *,
                  max_context: int, vocab_size: int | None = None) -> None:
    """Refuse a request before it touches the cache: UserError for a malformed one,
    BudgetError for one the context or the KV budget cannot hold (``cfg`` None: no cache)."""
    n = len(prompt)
    if n == 0:
        raise UserError("empty prompt: at least one token is needed")
    if vocab_size is not None:
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise UserError(
                f"prompt token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
    if n + max_tokens > max_context:
        raise BudgetError(f"prompt ({n}) + max_tokens ({max_tokens}) exceeds the context of "
                          f"{max_context} tokens")
    if cfg is not None:
        ps = cfg.page_size
        need = -(-(n + max_tokens) // ps)
        if need > cfg.kv_pages:
            raise BudgetError(f"request needs {need * ps} KV tokens; the KV budget is "
                              f"{cfg.kv_pages * ps} tokens")


def run_request(cm: CacheManager | None, prompt: tuple[int, ...], max_tokens: int,
                session: str | None, ex: Executor[S]) -> Served:
    """Drive one (checked) request through the cache, computing it with ``ex``.

    Without a cache (``cm`` None) the executor computes the prompt from zero and decodes;
    nothing is cached. On any exception the plan is aborted (locks and pages released) and the
    exception propagates.
    """
    n_prompt = len(prompt)
    if cm is None:
        ex.prompt(None, [])
        return Served(None, CacheUse.of(n_prompt, 0, 0), tuple(ex.generate()))
    plan = cm.begin(prompt, session)
    try:
        ps = cm.cfg.page_size
        pages = plan.kv_pages + cm.alloc_pages(
            -(-(n_prompt + max_tokens) // ps) - plan.matched // ps, plan)
        states = ex.prompt(plan, pages)
        pages = cm.insert(plan, prompt[:n_prompt // ps * ps], pages)
        _admit(cm, plan, prompt, plan.admit_positions, states, ex)
        reply = tuple(ex.generate())
        full = prompt + reply
        end = cm.final_admit_position(plan, len(full))
        states = ex.reply(full, pages, end)
        cm.insert(plan, full[:len(full) // ps * ps], pages)
        if end is not None:
            _admit(cm, plan, full, (end,), states, ex)
    except BaseException:
        cm.abort(plan)
        raise
    cm.finish(plan, full)
    return Served(plan, CacheUse.of(n_prompt, plan.matched, plan.restore_pos), reply)


def _admit(cm: CacheManager, plan: Plan, tokens: tuple[int, ...], positions: Sequence[int],
           states: Mapping[int, S], ex: Executor[S]) -> None:
    for pos in positions:
        entry = cm.admit(plan, tokens, pos)
        if entry is not None:
            ex.store(entry, states[pos])
