#!/usr/bin/env python3
"""Seeded synthetic Mooncake-format traces (timestamp, input_length, output_length, hash_ids of
512-token blocks) with structures unlike the real conversation trace, for policy evaluation on
workloads no policy was tuned on. Deterministic: a seed always gives the same bytes
(benchmarks/traces.sha256 holds the digests of seeds 0, 2 and 3).

  chat:    many short sessions (1-4 turns, geometric) behind one long shared system prompt
           (4 blocks = 2048 tokens, hash ids 0..3), short user turns, many sessions interleaved.
  agentic: few long agentic sessions (10-60 turns) that grow by tool outputs of 1-6 blocks,
           with long idle gaps (heavy-tailed, Pareto) between turns, among one-shot noise.

A next turn's hash ids extend the previous turn's full blocks and diverge at its last partial
block (how the simulator links a turn to its parent: `TraceStream`, min_link_blocks=2).

    python benchmarks/synthetic_traces.py --out-dir /tmp/synth --seed 0
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
from pathlib import Path

BLOCK = 512


class _Ids:
    def __init__(self, start: int) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _turns(rng: random.Random, kind: str) -> int:
    if kind == "chat":
        n = 1
        while n < 4 and rng.random() < 0.45:
            n += 1
        return n
    return rng.randint(10, 60)


def make(kind: str, n_requests: int, seed: int) -> list[dict]:
    rng = random.Random(f"{kind}:{seed}")
    ids = _Ids(16)
    system = list(range(4)) if kind == "chat" else [4]
    sys_tokens = len(system) * BLOCK
    # event queue of (time, seq, session state); a session is [hash_ids, length, turns_left]
    q: list[tuple[float, int, dict]] = []
    seq = 0
    t = 0.0
    out: list[dict] = []
    arrival = 0.5 if kind == "chat" else 6.0  # mean seconds between new sessions

    def new_session(at: float) -> None:
        nonlocal seq
        one_shot = kind == "agentic" and rng.random() < 0.6
        sess = {"hash": list(system), "len": sys_tokens,
                "left": 1 if one_shot else _turns(rng, kind)}
        heapq.heappush(q, (at, seq, sess))
        seq += 1

    next_new = 0.0
    while len(out) < n_requests:
        if not q or next_new <= q[0][0]:
            new_session(next_new)
            next_new += rng.expovariate(1.0 / arrival)
            continue
        t, _, s = heapq.heappop(q)
        # this turn's new tokens: user text (chat) or tool output (agentic)
        if s.get("first", True):  # > one block past the system prompt, so that a new session
            add = rng.randint(BLOCK + 64, 3 * BLOCK)  # is never read as a next turn of another
        elif kind == "chat":
            add = rng.randint(40, 400)
        else:
            add = rng.randint(300, 3000)
        length = s["len"] + add
        # a first turn keeps the system blocks; a next turn keeps the previous prompt's blocks but
        # its last (partial, now followed by the reply) one, where it diverges
        full = len(system) if s.get("first", True) else len(s["hash"]) - 1
        nblocks = -(-length // BLOCK)
        hash_ids = s["hash"][:full] + ids.take(nblocks - full)
        gen = rng.randint(50, 500) if kind == "chat" else rng.randint(30, 300)
        out.append({"timestamp": int(t * 1000), "input_length": length, "output_length": gen,
                    "hash_ids": hash_ids})
        s["hash"], s["len"], s["left"], s["first"] = hash_ids, length + gen, s["left"] - 1, False
        if s["left"] > 0:
            if kind == "chat":
                gap = rng.expovariate(1.0 / 20.0)
            else:  # heavy-tailed idle: Pareto(alpha=1.2), 5 s minimum
                gap = 5.0 * rng.paretovariate(1.2)
            heapq.heappush(q, (t + gap, seq, s))
            seq += 1
    out.sort(key=lambda r: r["timestamp"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="/tmp/synth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    d = Path(a.out_dir)
    d.mkdir(parents=True, exist_ok=True)
    for kind in ("chat", "agentic"):
        recs = make(kind, a.requests, a.seed)
        path = d / f"synthetic_{kind}_s{a.seed}.jsonl"
        with path.open("w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        print(f"{path}: {len(recs)} requests")


if __name__ == "__main__":
    main()
