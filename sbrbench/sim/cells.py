"""A sweep's cells — (workload, policy, pool size), plus one yardstick cell per (workload, pool
size) — run on a backend: in this process, on a local process pool, or on a Ray cluster.

A cell is plain data and its result depends on nothing but the cell, so every backend gives the
same results; `assemble` orders them by the cells, never by completion. Wall-clock figures
(`sim_wall_s`, `solve_s`) are the only fields that differ between runs; `digest` hashes the
rest, so two sweeps can be compared at a glance.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from engine.errors import UserError
from sbrbench.sim import optimum as opt
from sbrbench.sim.simulator import ORACLES, REFERENCES, PolicyVariant, run_policy, versus_belady
from sbrbench.sim.workload import Source, workload

BACKENDS = ("local", "ray")
OPTIMUM_MODES = ("exact", "lp", "floor", "off")
WALL_CLOCK = ("sim_wall_s", "solve_s")  # the fields that may differ between identical runs


class Cell(NamedTuple):
    """One unit of work: a policy run (``variant``) or, with ``variant`` None, the yardstick
    (floor, LP bound, exact optimum and the optimum's schedule run through the manager)."""

    source: Source
    slots: int
    variant: PolicyVariant | None
    optimum: str = "exact"  # OPTIMUM_MODES
    solver_time: float = 300.0  # seconds per solve (HiGHS time limit)
    warmup: int = 0


class _Instances:
    """Per-process memo of a workload's program instance (its unlimited-pool replay)."""

    def __init__(self) -> None:
        self._by: dict[Source, opt.Instance] = {}

    def get(self, src: Source) -> opt.Instance:
        inst = self._by.get(src)
        if inst is None:
            w = workload(src)
            inst = self._by[src] = opt.extract(w.stream, w.base(), max_context=w.max_context)
        return inst


_INSTANCES = _Instances()


def run_cell(cell: Cell) -> dict[str, Any]:
    """The cell's result: a policy's summary (``kind`` "policy") or the yardstick (``kind``
    "yardstick", with the optimum's schedule run as policy ``opt-schedule``)."""
    w = workload(cell.source)
    cache = w.base(slots=cell.slots)
    head = {"trace": cell.source.name, "slots": cell.slots}
    if cell.variant is not None:
        v = cell.variant
        future = w.future() if v.policy == "belady" else None
        run = run_policy(w.stream, cache, v, w.cost, future=future, max_context=w.max_context)
        return {"kind": "policy", **head, "policy": v.name, **run.summary(cell.warmup),
                "_matched": [r.use.cached_tokens for r in run.rows]}
    inst = _INSTANCES.get(cell.source)
    ys, prog, sol = opt.yardstick(inst, cell.slots, exact=cell.optimum == "exact",
                                  lp=cell.optimum in ("exact", "lp"),
                                  time_limit=cell.solver_time)
    out: dict[str, Any] = {"kind": "yardstick", **head, **ys.describe()}
    if sol is not None and sol.kept is not None:
        run = opt.follow(w.stream, cache, inst, prog, sol, w.cost, max_context=w.max_context)
        out["schedule"] = {"policy": "opt-schedule", **head, **run.summary()}
    out["_matched"] = inst.matched
    return out


def run_cells(cells: Sequence[Cell], *, jobs: int = 1, backend: str = "local",
              address: str | None = None,
              on_done: Callable[[Cell, dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run every cell and return the results in the cells' order."""
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    results: list[dict[str, Any] | None] = [None] * len(cells)
    if backend == "ray":
        try:
            import ray
        except ImportError:
            raise UserError("--backend ray needs Ray: pip install 'sbrbench[ray]'") from None
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                 include_dashboard=False)
        try:
            task = ray.remote(run_cell)
            pending = {task.remote(c): i for i, c in enumerate(cells)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    results[i] = res = ray.get(ref)
                    if on_done is not None:
                        on_done(cells[i], res)
        finally:
            ray.shutdown()
    elif jobs == 1:
        for i, c in enumerate(cells):
            results[i] = res = run_cell(c)
            if on_done is not None:
                on_done(c, res)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(run_cell, c): i for i, c in enumerate(cells)}
            for f in as_completed(futs):
                i = futs[f]
                results[i] = res = f.result()
                if on_done is not None:
                    on_done(cells[i], res)
    return [r for r in results if r is not None]


def assemble(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                         list[dict[str, Any]]]:
    """(grid, yardstick): the policy cells (with `opt-schedule`) and, per (trace, slots), the
    yardstick with the gap each online policy closes and the checks of its ordering."""
    grid: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    matched: dict[tuple[str, int], list[list[int]]] = {}
    for r in results:
        key = (r["trace"], r["slots"])
        matched.setdefault(key, []).append(r["_matched"])
        if r["kind"] == "policy":
            grid.append({k: v for k, v in r.items() if k not in ("kind", "_matched")})
        else:
            if "schedule" in r:
                grid.append(r["schedule"])
            marks.append({k: v for k, v in r.items()
                          if k not in ("kind", "_matched", "schedule")})
    for key in dict.fromkeys((c["trace"], c["slots"]) for c in grid):
        cells = {c["policy"]: c for c in grid if (c["trace"], c["slots"]) == key}
        versus_belady(cells)
    for y in marks:
        key = (y["trace"], y["slots"])
        cells = {c["policy"]: c for c in grid if (c["trace"], c["slots"]) == key}
        y.update(judge(cells, y))
        y["kv_independent"] = all(m == matched[key][0] for m in matched[key])
    return grid, marks


def judge(cells: dict[str, dict[str, Any]], ys: dict[str, Any]) -> dict[str, Any]:
    """Gap closed per online policy against the yardstick's reference, and whether floor <=
    bound <= optimum <= best offline schedule <= every online policy holds."""
    replay = {n: float(c["replay_tokens"]) for n, c in cells.items()}
    offline = [n for n in replay if n in REFERENCES or n == "opt-schedule"]
    online = [n for n in replay if n not in offline]
    ref = float(ys["reference"])
    best_simple = min((n for n in opt.SIMPLE if n in replay), key=lambda n: replay[n],
                      default=None)
    best_offline = min(offline, key=lambda n: replay[n], default=None)
    gaps = {n: opt.gap_closed(replay, ref, target=n) for n in replay if n not in opt.SIMPLE}
    chain = [float(ys["floor"]), float(ys["bound"])]
    if ys.get("optimum") is not None:
        chain.append(float(ys["optimum"]))
    if best_offline is not None:
        chain.append(replay[best_offline])
    if online:
        chain.append(min(replay[n] for n in online))
    ordered = all(a <= b + 1e-6 for a, b in zip(chain, chain[1:], strict=False))
    lowest = min((replay[n] for n in offline + online), default=None)
    return {"best_simple": best_simple,
            "best_simple_replay": replay[best_simple] if best_simple else None,
            "best_offline": best_offline,
            "best_offline_replay": replay[best_offline] if best_offline else None,
            "gap_closed": gaps,
            "bound_below_every_run": lowest is None or ref <= lowest + 1e-6,
            "ordered": ordered}


FAMILY_SEP = "@"  # slices of one trace are named FAMILY@K (e.g. conversation@03)


def families(marks: Sequence[dict[str, Any]],
             grid: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trace family (the name before FAMILY_SEP) and pool size: each online policy's gap
    closed over the slices (mean, min, how many slices define it), and the totals of the
    yardstick and of every policy's replay over the slices."""
    out: dict[str, dict[str, Any]] = {}
    for y in marks:
        fam = y["trace"].split(FAMILY_SEP)[0]
        cell = out.setdefault(fam, {}).setdefault(str(y["slots"]), {
            "slices": [], "gap_closed": {}, "replay_tokens": {}, "floor": 0, "bound": 0.0,
            "optimum": 0, "optimum_proven": 0, "ordered": True, "kv_independent": True})
        cell["slices"].append(y["trace"])
        cell["floor"] += y["floor"]
        cell["bound"] += y["bound"]
        if y["optimum"] is not None:
            cell["optimum"] += y["optimum"]
            cell["optimum_proven"] += 1
        cell["ordered"] = cell["ordered"] and y["ordered"]
        cell["kv_independent"] = cell["kv_independent"] and y["kv_independent"]
        for name, g in y["gap_closed"].items():
            cell["gap_closed"].setdefault(name, []).append(g)
        for c in grid:
            if c["trace"] == y["trace"] and c["slots"] == y["slots"]:
                tot = cell["replay_tokens"]
                tot[c["policy"]] = tot.get(c["policy"], 0) + c["replay_tokens"]
    for per in out.values():
        for cell in per.values():
            if cell["optimum_proven"] < len(cell["slices"]):
                cell["optimum"] = None
            stats = {}
            for name, gs in cell["gap_closed"].items():
                ok = [g for g in gs if g is not None]
                stats[name] = {"mean": sum(ok) / len(ok) if ok else None,
                               "min": min(ok) if ok else None,
                               "defined": len(ok), "per_slice": gs}
            cell["gap_closed"] = stats
    return out


def family_summary(doc: dict[str, Any], sweep: str) -> dict[str, Any]:
    """The small per-family result (`sweep --summary`) of a sweep document ``doc`` written to
    ``sweep``: per family and pool size, gap closed over the slices and the totals."""
    fams = doc.get("families") or families(doc["yardstick"], doc["grid"])
    return {
        "schema": "sbrbench.yardstick/v1", "created": doc["created"], "argv": doc["argv"],
        "digest": doc["digest"], "sweep": sweep,
        "units": "replay tokens (the simulator's cache decisions, modelled, no TTFT); gap "
                 "closed = (best simple - policy) / (best simple - optimum, or the lower bound "
                 "where the optimum is not proven)",
        "cache": doc["cache"], "costmodel": doc["costmodel"]["source"],
        "families": {f: {k: {kk: vv for kk, vv in v.items() if kk != "slices"}
                         | {"slices": len(v["slices"])} for k, v in per.items()}
                     for f, per in fams.items()},
    }


def digest(doc: dict[str, Any]) -> str:
    """sha256 of a sweep document without its wall-clock and environment fields: equal for
    the same sweep on any backend."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in WALL_CLOCK and k not in ("created", "argv", "env", "timing",
                                                         "digest", "backend", "jobs")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return hashlib.sha256(json.dumps(strip(doc), sort_keys=True).encode()).hexdigest()


def yardstick_cells(sources: Sequence[Source], slots: Sequence[int],
                    variants: Sequence[PolicyVariant], *, optimum: str = "exact",
                    solver_time: float = 300.0, warmup: int = 0) -> list[Cell]:
    """Every (source, slots, variant) cell, plus a yardstick cell per (source, slots) unless
    ``optimum`` is "off" or requests are warm-up (the program counts every request)."""
    if optimum not in OPTIMUM_MODES:
        raise UserError(f"--optimum must be one of {', '.join(OPTIMUM_MODES)}, got {optimum!r}")
    out: list[Cell] = []
    for src in sources:
        for s in slots:
            out += [Cell(src, s, v, optimum, solver_time, warmup) for v in variants]
            if optimum != "off" and not warmup:
                out.append(Cell(src, s, None, optimum, solver_time, warmup))
    return out


__all__ = ["BACKENDS", "Cell", "FAMILY_SEP", "OPTIMUM_MODES", "ORACLES", "assemble", "digest",
           "families", "family_summary", "judge", "run_cell", "run_cells", "yardstick_cells"]
