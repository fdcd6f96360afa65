#!/usr/bin/env python3
"""Gap-closed table for the `adaptive` snapshot policy (issue 10) from committed `sbrbench sim`
JSONs.

gap = (best online - adaptive) / (best online - belady), best online = min replay of lru,
forecast and tail-pin, belady = the next-use oracle. Baselines and the default rule come from
`results/sim/<trace>-s<N>.json`; a variant's adaptive replay from
`results/sim/<trace>-<suffix>-s<N>.json` (its belady must equal the baseline file's).

    python scripts/adaptive_gap_table.py --trace mooncake-holdout-3016-6015 \
        --trace synthetic_chat_s2 --variant duel-emp --slots 16,64,256
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ONLINE = ("lru", "forecast", "tail-pin")


def _replay(path: Path) -> dict[str, int] | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return {k: int(v["replay_tokens"]) for k, v in d["summary"]["policies"].items()}


def _cell(base: dict[str, int] | None, var: dict[str, int] | None) -> str:
    if base is None or var is None:
        return "—"
    best = min(base[p] for p in ONLINE)
    bel = base["belady"]
    if var["belady"] != bel:
        raise SystemExit(f"belady differs: {var['belady']} vs {bel}")
    ad = var["adaptive"]
    if best <= bel:
        return f"n/a ({ad / 1e6:.3f}M{' < online' if ad < best else ''})"
    return f"{(best - ad) / (best - bel):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", action="append", required=True)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--slots", default="16,64,256")
    ap.add_argument("--dir", default="results/sim")
    a = ap.parse_args()
    d = Path(a.dir)
    slots = [int(s) for s in a.slots.split(",")]
    names = ["default", *a.variant]
    head = ["trace"] + [f"{n} {s}" for n in names for s in slots]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for t in a.trace:
        row = [t]
        for n in names:
            for s in slots:
                base = _replay(d / f"{t}-s{s}.json")
                var = base if n == "default" else _replay(d / f"{t}-{n}-s{s}.json")
                row.append(_cell(base, var))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
