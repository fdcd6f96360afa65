#!/usr/bin/env python3
"""Issue 10, round 5: the gap closed by adaptive variants over many overlapping slices of the
Mooncake conversation trace, instead of one slice per cell.

Each slice is `--length` consecutive requests (cold: empty cache, no statistics) starting every
`--step` requests. Per slice and pool size: lru, forecast, tail-pin, belady, and each variant;
gap = (best online - variant) / (best online - belady). Writes every replay and gap, and per
variant and size the mean, min and the number of slices with gap >= 0.5.

    python scripts/adaptive_slices.py --out results/sim/adaptive-slices.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sbrbench import sim  # noqa: E402
from sbrbench.cli_sim import Setup  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "mooncake_conversation_trace.jsonl"
ONLINE = ("lru", "forecast", "tail-pin")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "swap": {"swap": True},
    "hazard=empirical": {"hazard": "empirical"},
    "swap,hazard=empirical": {"swap": True, "hazard": "empirical"},
    "duel=1000,hazard=empirical": {"duel": 1000, "hazard": "empirical"},
}


def _one(job: tuple[str, int, int, int]) -> dict[str, Any]:
    path, start, length, slots = job
    lines = Path(path).read_text().splitlines()[start:start + length]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    setup = Setup(trace=Path(f.name), scenario=None, scenario_file=None, sets=[], limit=0,
                  seed=0, preset="a3b-proxy", dtype="bfloat16", page_size=16,
                  snapshot_interval=None, kv_budget_tokens=None, costmodel=None,
                  link_replies=True)
    Path(f.name).unlink()
    cfg = setup.base(slots=slots)
    mc = setup.model.max_position_embeddings
    fut = sim.FutureIndex(setup.stream, cfg, max_context=mc)
    t0 = time.perf_counter()
    replay: dict[str, int] = {}
    vs = [*sim.variants(list(ONLINE)), sim.ORACLES["belady"],
          *(sim.PolicyVariant(name, "adaptive", opts) for name, opts in VARIANTS.items())]
    for v in vs:
        r = sim.run_policy(setup.stream, cfg, v, setup.cost, model=setup.model,
                           future=fut if v.policy == "belady" else None, max_context=mc)
        replay[v.name] = int(r.summary()["replay_tokens"])
    best = min(replay[p] for p in ONLINE)
    den = best - replay["belady"]
    gap = {n: (round((best - replay[n]) / den, 3) if den > 0 else None) for n in VARIANTS}
    return {"start": start, "length": length, "slots": slots, "replay": replay, "gap": gap,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--length", type=int, default=3000)
    ap.add_argument("--step", type=int, default=1000)
    ap.add_argument("--slots", default="16,64")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    n = len(Path(a.trace).read_text().splitlines())
    starts = list(range(0, n - a.length + 1, a.step))
    jobs = [(a.trace, s, a.length, int(k)) for k in a.slots.split(",") for s in starts]
    rows = []
    with ProcessPoolExecutor(a.jobs) as ex:
        for row in ex.map(_one, jobs):
            rows.append(row)
            print(f"start {row['start']:5d} slots {row['slots']:3d} " + " ".join(
                f"{k}={v}" for k, v in row["gap"].items()) + f" ({row['wall_s']} s)", flush=True)
    summary: dict[str, Any] = {}
    for k in a.slots.split(","):
        sel = [r for r in rows if r["slots"] == int(k)]
        summary[k] = {}
        for name in VARIANTS:
            g = [r["gap"][name] for r in sel if r["gap"][name] is not None]
            summary[k][name] = {"mean": round(sum(g) / len(g), 3), "min": min(g),
                                "met": sum(x >= 0.5 for x in g), "slices": len(g)}
    out = {"argv": sys.argv, "trace": a.trace, "variants": VARIANTS,
           "gap": "(best online - variant) / (best online - belady)", "summary": summary,
           "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
