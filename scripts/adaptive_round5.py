#!/usr/bin/env python3
"""Issue 10, round 5: changes to the `adaptive` rule on the cells the default misses and on the
tuning cells. `swap=true` is the engine option (engine/cache/adaptive.py); the others are
patches on the policy class here, not options, since none was kept.

  swap=true a newcomer of session S replaces S's deepest evictable snapshot on its own path that
           is off the interval grid and never hit by another session (no admission test);
  swap-any the first form tried (a patch): any live own ancestor on the path, grid or not, even
           the running request's restore anchor;
  swap-noguard  swap=true without its last condition (a patch): a branch point a session's first
           request made inside another session's prefix may be swapped out too;
  ancestor admission control is skipped when such an ancestor is live (it becomes dominated and
           goes next), i.e. a session's new tail is always admitted;
  domf     dominance (delta) discounts only the session's own return value P(S), not the hit
           rate F(e) of other sessions (a shared prompt snapshot owned by a session that went
           deeper keeps its foreign value); run with delta 0, 0.05, 0.2;
  hyst     set dueling (duel=1000, hazard=empirical) with hysteresis: the real pool switches
           to the other shadow only when its decayed replay is below (1 - m) x the current
           leader's; m = 0.1, 0.2.

Baselines (lru/forecast/tail-pin/belady) are the committed `results/sim/<cell>.json` files; the
tuning cells (Mooncake first 3000 requests, chat seed 1) are recomputed. Gap = (best online -
adaptive) / (best online - belady). Writes one JSON with every cell's replay and gap.

    python scripts/make_synthetic_traces.py --out-dir /tmp/r5 --seed 1
    head -3000 ../shared/data/mooncake_conversation_trace.jsonl > /tmp/r5/moon3k.jsonl
    sed -n 3016,9015p ../shared/data/mooncake_conversation_trace.jsonl \
        > /tmp/r5/moon-3016-9015.jsonl
    python scripts/adaptive_round5.py --tmp /tmp/r5 --out results/sim/adaptive-round5.json \
        --cells chat_s0-16,chat_s0-64,chat_s2-16,chat_s2-64,hold6016-16,hold6016w-16,\
hold3016-16,hold9016-16,moon3k-16,moon3k-64,chat_s1-16,chat_s1-64
    sed -n 1001,4000p ../shared/data/mooncake_conversation_trace.jsonl \
        > /tmp/r5/moon-1001-4000.jsonl  # and 7001,10000 likewise
    python scripts/adaptive_round5.py --tmp /tmp/r5 --out results/sim/adaptive-round5-guard.json \
        --cells slice1000-16,slice7000-16 --variants default,swap=true,swap-noguard
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.cache import adaptive as ad  # noqa: E402
from engine.cache import snapshots as sn  # noqa: E402
from sbrbench import sim  # noqa: E402
from sbrbench.cli_sim import Setup  # noqa: E402

ONLINE = ("lru", "forecast", "tail-pin")
# cell -> (trace, slots, warm-up requests, committed baseline JSON or None = recompute)
CELLS: dict[str, tuple[str, int, int, str | None]] = {
    "chat_s0-16": ("results/sim/traces/synthetic_chat_s0.jsonl", 16, 0, "synthetic_chat_s0-s16"),
    "chat_s0-64": ("results/sim/traces/synthetic_chat_s0.jsonl", 64, 0, "synthetic_chat_s0-s64"),
    "chat_s2-16": ("results/sim/traces/synthetic_chat_s2.jsonl", 16, 0, "synthetic_chat_s2-s16"),
    "chat_s2-64": ("results/sim/traces/synthetic_chat_s2.jsonl", 64, 0, "synthetic_chat_s2-s64"),
    "hold6016-16": ("results/sim/traces/mooncake-holdout-6016-9015.jsonl", 16, 0,
                    "mooncake-holdout-6016-9015-s16"),
    "hold6016w-16": ("{tmp}/moon-3016-9015.jsonl", 16, 3000,
                     "mooncake-holdout-6016-9015-warm3000-s16"),
    "hold3016-16": ("results/sim/traces/mooncake-holdout-3016-6015.jsonl", 16, 0,
                    "mooncake-holdout-3016-6015-s16"),
    "hold9016-16": ("results/sim/traces/mooncake-holdout-9016-12031.jsonl", 16, 0,
                    "mooncake-holdout-9016-12031-s16"),
    "moon3k-16": ("{tmp}/moon3k.jsonl", 16, 0, None),
    "moon3k-64": ("{tmp}/moon3k.jsonl", 64, 0, None),
    "chat_s1-16": ("{tmp}/synthetic_chat_s1.jsonl", 16, 0, None),
    "chat_s1-64": ("{tmp}/synthetic_chat_s1.jsonl", 64, 0, None),
    # the two slices of scripts/adaptive_slices.py where swap-noguard collapsed
    "slice1000-16": ("{tmp}/moon-1001-4000.jsonl", 16, 0, None),
    "slice7000-16": ("{tmp}/moon-7001-10000.jsonl", 16, 0, None),
}


def _ancestor(policy: ad.Adaptive, node: Any, session: str) -> sn.SnapshotEntry | None:
    """Deepest live snapshot of `session` on `node`'s path that no other session has hit."""
    assert policy.index is not None
    best = None
    for e in policy.index.entries.values():
        if (e.session == session and e.node is not node and ad._on_path(e.node, node)
                and not policy._foreign.get(e.id) and (best is None or e.pos > best.pos)):
            best = e
    return best


@contextlib.contextmanager
def patched(variant: str, m: float) -> Iterator[None]:
    saved = (sn.SnapshotIndex.admit, ad.Adaptive.should_admit, ad.Adaptive.values,
             ad.Adaptive.leader)
    orig_admit, orig_should, orig_values, _ = saved
    orig_offer = ad.Adaptive.on_offer

    def offer_noguard(self: Any, node: Any, pos: int, session: str, tick: int) -> None:
        orig_offer(self, node, pos, session, tick)
        self._shared_nodes.clear()

    def admit_swap(self: Any, node: Any, pos: int, session: str, tick: int) -> Any:
        pol = self.policy
        if (isinstance(pol, ad.Adaptive) and node.snapshot is None
                and len(self.entries) >= self.slots):
            a = _ancestor(pol, node, session)
            if a is not None:
                held, a.in_use = a.in_use, 0
                self.drop(a, "replaced")
                a.in_use = held  # the running request still releases it
        return orig_admit(self, node, pos, session, tick)

    def should_ancestor(self: Any, node: Any, pos: int, session: str, tick: int,
                        victim: Any) -> bool:
        if _ancestor(self, node, session) is not None:
            return True
        return bool(orig_should(self, node, pos, session, tick, victim))

    def values_domf(self: Any, entries: list[Any], tick: int, inflate: bool = True,
                    pool: Any = None) -> dict[int, float]:
        pool = pool or self._pool
        by_session: dict[str, list[Any]] = {}
        for e in pool.entries.values():
            by_session.setdefault(e.session, []).append(e)
        tau_fresh = self._tau_fresh()
        wanted = {e.id for e in entries}
        out: dict[int, float] = {}
        for session, live in by_session.items():
            live.sort(key=lambda e: e.pos)
            ps = None
            for i, e in enumerate(live):
                if e.id not in wanted:
                    continue
                if ps is None:
                    ps = self._return_prob(session, tick, tau_fresh, pool.hazard)
                below = self._below(e.node.parent, pool)
                dom = any(ad._on_path(e.node, x.node) for x in live[i + 1:])
                own = ps * (self.delta if dom else 1.0)
                out[e.id] = float(e.pos - below) * max(own, self._freq(e, tick, pool))
        return out

    def leader_hyst(self: Any) -> tuple[str, bool]:
        if not self._shadows:
            return self.hazard, True
        cur = getattr(self, "_lead", None) or self._shadows[0]
        best = min(self._shadows, key=lambda sh: sh.score)
        if best is not cur and best.score < (1.0 - m) * cur.score:
            cur = best
        self._lead = cur
        return cur.hazard, cur.strict

    try:
        if variant == "swap-any":
            sn.SnapshotIndex.admit = admit_swap  # type: ignore[method-assign]
        elif variant == "ancestor":
            ad.Adaptive.should_admit = should_ancestor  # type: ignore[method-assign]
        elif variant == "domf":
            ad.Adaptive.values = values_domf  # type: ignore[method-assign]
        elif variant == "hyst":
            ad.Adaptive.leader = leader_hyst  # type: ignore[method-assign]
        elif variant == "noguard":
            ad.Adaptive.on_offer = offer_noguard  # type: ignore[method-assign]
        yield
    finally:
        ad.Adaptive.on_offer = orig_offer  # type: ignore[method-assign]
        (sn.SnapshotIndex.admit, ad.Adaptive.should_admit, ad.Adaptive.values,
         ad.Adaptive.leader) = saved


VARIANTS: list[tuple[str, str, float, dict[str, Any]]] = [
    ("default", "", 0.0, {}),
    ("swap=true", "", 0.0, {"swap": True}),
    ("swap-any", "swap-any", 0.0, {}),
    ("swap-noguard", "noguard", 0.0, {"swap": True}),
    ("ancestor", "ancestor", 0.0, {}),
    ("domf delta=0", "domf", 0.0, {"delta": 0.0}),
    ("domf delta=0.05", "domf", 0.0, {}),
    ("domf delta=0.2", "domf", 0.0, {"delta": 0.2}),
    ("delta=0.2 (no domf)", "", 0.0, {"delta": 0.2}),
    ("duel=1000,hazard=empirical", "", 0.0, {"duel": 1000, "hazard": "empirical"}),
    ("  + hyst 0.1", "hyst", 0.1, {"duel": 1000, "hazard": "empirical"}),
    ("  + hyst 0.2", "hyst", 0.2, {"duel": 1000, "hazard": "empirical"}),
    ("  + swap=true", "", 0.0, {"duel": 1000, "hazard": "empirical", "swap": True}),
]


def _setup(trace: str, tmp: str) -> Setup:
    path = Path(trace.format(tmp=tmp))
    return Setup(trace=path if path.is_absolute() else ROOT / path, scenario=None,
                 scenario_file=None, sets=[], limit=0, seed=0, preset="a3b-proxy",
                 dtype="bfloat16", page_size=16, snapshot_interval=None, kv_budget_tokens=None,
                 costmodel=None, link_replies=True)


def _run(setup: Setup, slots: int, warm: int, variant: sim.PolicyVariant,
         future: sim.FutureIndex | None = None) -> int:
    cfg = setup.base(slots=slots)
    r = sim.run_policy(setup.stream, cfg, variant, setup.cost, model=setup.model, future=future,
                       max_context=setup.model.max_position_embeddings)
    return int(r.summary(warm)["replay_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tmp", required=True, help="folder with the tuning/warm-up traces")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--variants", default="", help="comma-separated names (default: all)")
    a = ap.parse_args()
    out: dict[str, Any] = {"argv": sys.argv, "gap": "(best online - adaptive) / "
                           "(best online - belady)", "cells": {}}
    for cell in a.cells.split(","):
        trace, slots, warm, ref = CELLS[cell]
        setup = _setup(trace, a.tmp)
        if ref is not None:
            pols = json.loads((ROOT / "results/sim" / f"{ref}.json").read_text())
            base = {k: int(v["replay_tokens"]) for k, v in pols["summary"]["policies"].items()
                    if k in (*ONLINE, "belady")}
        else:
            cfg = setup.base(slots=slots)
            fut = sim.FutureIndex(setup.stream, cfg,
                                  max_context=setup.model.max_position_embeddings)
            base = {p: _run(setup, slots, warm, sim.PolicyVariant(p, p, {"k": 8}
                                                                  if p == "tail-pin" else {}))
                    for p in ONLINE}
            base["belady"] = _run(setup, slots, warm, sim.ORACLES["belady"], fut)
        best = min(base[p] for p in ONLINE)
        row: dict[str, Any] = {"trace": trace, "slots": slots, "warmup": warm, "baseline_json":
                               ref, "replay": dict(base), "gap": {}}
        pick = a.variants.split(",") if a.variants else [v[0] for v in VARIANTS]
        for name, patch, m, opts in VARIANTS:
            if name.strip() not in pick and name not in pick:
                continue
            t0 = time.perf_counter()
            with patched(patch, m):
                rep = _run(setup, slots, warm, sim.PolicyVariant("adaptive", "adaptive", opts))
            row["replay"][name] = rep
            row["gap"][name] = round((best - rep) / (best - base["belady"]), 3)
            print(f"{cell:13s} {name:28s} {rep / 1e6:7.3f}M gap {row['gap'][name]:6.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out["cells"][cell] = row
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
