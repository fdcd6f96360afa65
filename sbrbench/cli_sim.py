"""`sbrbench sim`, `sweep`, `calibrate`: policy simulation on traces and scenarios, and the cost
model fit (see docs/SIMULATOR.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from engine.errors import UserError
from sbrbench import sim
from sbrbench.cache_options import (
    ADAPTIVE_OPT_HELP,
    check_model_flags,
    parse_adaptive_opts,
    positive,
)
from sbrbench.costmodel import CostModel
from sbrbench.render import make_console, styled
from sbrbench.results import FORCE_HELP, OUTPUT_DIR, output_path, timestamp
from sbrbench.sim.workload import TRACE_KV_TOKENS, Source

console = make_console()
if not console.is_terminal:  # logs and pipes: room for the whole table
    console = make_console(width=140)

# The simulator runs no model: the preset only sets the snapshot size and the FLOPs the cost
# model prices, so its default is the shape the packaged GPU cost model was fitted on.
PRESET_HELP = ("model whose snapshot size and FLOPs are priced; no model runs, so the default is "
               "a3b-proxy, the shape the packaged H200 cost model was fitted on")

DEFAULT_POLICIES = "lru,forecast,tail-pin,two-tier,marconi,adaptive"


def _ints(text: str, flag: str, minimum: int | None = None) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not out:
        raise UserError(f"{flag}: no value given")
    if minimum is not None and any(x < minimum for x in out):
        raise UserError(f"{flag} {text!r}: every value must be >= {minimum}")
    return out


def _floats(text: str | None, flag: str, minimum: float | None = None) -> list[float]:
    if not text:
        return []
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if minimum is not None and any(not x >= minimum for x in out):
        raise UserError(f"{flag} {text!r}: every value must be >= {minimum:g}")
    return out


def _policies(text: str) -> list[str]:
    pols = [p.strip() for p in text.split(",") if p.strip()]
    if not pols:
        raise UserError("--policy: no policy given")
    return pols


def _header(w: sim.Workload) -> dict[str, Any]:
    from sbrbench.results import argv, capture_env, now_iso

    return {"created": now_iso(), "argv": argv(), "env": capture_env(), **w.header()}


def _cache_info(cache: sim.SimCache) -> dict[str, Any]:
    cfg = cache.config()
    return {
        "page_size": cfg.page_size,
        "chunk": cfg.chunk,
        "kv_pages": cfg.kv_pages,
        "kv_budget_tokens": cfg.kv_pages * cfg.page_size,
        "snapshot_slots": cfg.snapshot_slots,
        "snapshot_bytes": cfg.snapshot_bytes,
        "snapshot_budget_bytes": cfg.snapshot_slots * cfg.snapshot_bytes,
        "snapshot_interval": cfg.snapshot_interval,
        "branch_admission": cfg.branch_admission,
    }


def _run_all(
    setup: sim.Workload, cache: sim.SimCache, vs: list[sim.PolicyVariant],
    future: sim.FutureIndex | None, label: str
) -> dict[str, sim.PolicyRun]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runs: dict[str, sim.PolicyRun] = {}
    n = len(setup.stream)

    def updater(task: Any) -> Any:
        return lambda k: prog.update(task, completed=k)

    with Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as prog:
        for v in vs:
            task = prog.add_task(f"{label} {v.name}", total=n)
            runs[v.name] = sim.run_policy(
                setup.stream,
                cache,
                v,
                setup.cost,
                future=future,
                max_context=setup.model.max_position_embeddings,
                progress=updater(task),
            )
            prog.update(task, completed=n)
    return runs


def _future(setup: sim.Workload, vs: list[sim.PolicyVariant]) -> tuple[Any, float]:
    if not any(v.policy == "belady" for v in vs):
        return None, 0.0
    fut = setup.future()
    return fut, setup.future_s


def _fmt_int(v: Any) -> str:
    """Compact counts: 27.69M, 16.2k, 752."""
    if v is None:
        return "-"
    v = int(v)
    if abs(v) >= 1_000_000:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 10_000:
        return f"{v / 1e3:.1f}k"
    return str(v)


def _fmt_s(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 100 else f"{v:.1f}")


def sim_table(summaries: dict[str, dict[str, Any]], title: str,
              yardstick: dict[str, Any] | None = None) -> Table:
    """Per policy: modelled replay and TTFT, cache counters, the gap it closes; then the
    yardstick's rows (floor, bound, optimum: replay tokens of the program)."""
    t = Table(title=Text(title), title_justify="left")
    for col in (
        "policy",
        "replay tok",
        "replay / belady",
        "replay / best offline",
        "gap closed",
        "KV hit tok",
        "snap hits",
        "evict",
        "evict kv",
        "TTFT s (modelled)",
        "p90 s (modelled)",
        "err",
        "sim wall s",
    ):
        t.add_column(col, justify="left" if col == "policy" else "right")
    gaps = (yardstick or {}).get("gap_closed", {})
    for name, s in summaries.items():
        r, o = s.get("replay_vs_belady"), s.get("replay_vs_oracle")
        g = gaps.get(name)
        t.add_row(
            name,
            _fmt_int(s["replay_tokens"]),
            "-" if r is None else f"{r:.2f}",
            "-" if o is None else f"{o:.2f}",
            "-" if g is None else f"{g:.2f}",
            _fmt_int(s["hit_tokens"]),
            _fmt_int(s["snapshot_hits"]),
            _fmt_int(s["evictions"]),
            _fmt_int(s["evictions_kv"]),
            _fmt_s(s["ttft_model_s"]["mean"]),
            _fmt_s(s["ttft_model_s"]["p90"]),
            str(s["errors"]) if s["errors"] else "",
            f"{s['sim_wall_s']:.1f}",
        )
    if yardstick:
        for label, key in (("optimum (program)", "optimum"), ("lower bound", "bound"),
                           ("floor (unlimited pool)", "floor")):
            v = yardstick.get(key)
            if v is not None:
                t.add_row(styled(label, "italic"), _fmt_int(v), *[""] * 10,
                          f"{yardstick['solve_s']:.1f}" if key == "optimum" else "")
        t.caption = Text(
            f"gap closed = (best simple [{yardstick.get('best_simple')}] - policy) / "
            f"(best simple - {yardstick['reference_kind']}), in replay tokens; ordering "
            f"floor <= bound <= optimum <= best offline <= online: "
            f"{'holds' if yardstick.get('ordered') else 'VIOLATED'}; KV match "
            f"policy-independent: {yardstick.get('kv_independent')}", style="dim")
    t.caption_justify = "left"
    return t


def sweep_table(grid: list[dict[str, Any]], slots: list[int], metric: str, name: str = "",
                marks: list[dict[str, Any]] | None = None) -> Table:
    t = Table(
        title=Text(f"{name}: {metric_label(metric)} per policy and snapshot slots"
                   + (" (ratio to the best offline schedule)" if metric == "replay_tokens"
                      else "")),
        title_justify="left",
    )
    t.add_column("policy")
    for s in slots:
        t.add_column(f"{s} slots", justify="right")
    names = list(dict.fromkeys(c["policy"] for c in grid))
    for pname in names:
        cells = []
        for s in slots:
            c = next((c for c in grid if c["policy"] == pname and c["slots"] == s), None)
            if c is None:
                cells.append("-")
                continue
            v = _metric(c, metric)
            r = c.get("replay_vs_oracle")
            cells.append(
                f"{_fmt_metric(v, metric)} ({r:.2f}x)"
                if r is not None and metric == "replay_tokens"
                else _fmt_metric(v, metric)
            )
        t.add_row(pname, *cells)
    by = {y["slots"]: y for y in marks or []}
    if by:
        for label, key in (("optimum (program)", "optimum"), ("lower bound", "bound"),
                           ("floor (unlimited pool)", "floor")):
            t.add_row(styled(label, "italic"), *[
                _fmt_metric(by[s].get(key), "replay_tokens") if s in by else "-"
                for s in slots])
        online = [n for n in names if n not in sim.REFERENCES and n != "opt-schedule"]
        for pname in online:
            row = [by[s]["gap_closed"].get(pname) if s in by else None for s in slots]
            if any(g is not None for g in row):
                t.add_row(styled(f"gap closed: {pname}", "italic"),
                          *["-" if g is None else f"{g:.2f}" for g in row])
    return t


def family_table(fams: dict[str, dict[str, Any]], slots: list[int]) -> Table:
    """Gap closed per trace family and pool size: mean and minimum over its slices."""
    t = Table(title=Text("gap closed over slices (mean / min; replay tokens vs the best simple "
                         "policy and the optimum or bound)"), title_justify="left")
    t.add_column("family")
    t.add_column("policy")
    for s in slots:
        t.add_column(f"{s} slots", justify="right")
    for fam, per in fams.items():
        names = list(dict.fromkeys(n for c in per.values() for n in c["gap_closed"]))
        for name in names:
            cells = []
            for s in slots:
                g = per.get(str(s), {}).get("gap_closed", {}).get(name)
                if g is None or g["mean"] is None:
                    cells.append("n/a")
                else:
                    n = len(g["per_slice"])
                    cells.append(f"{g['mean']:.2f} / {g['min']:.2f}"
                                 + (f" ({g['defined']}/{n})" if g["defined"] < n else ""))
            t.add_row(fam, name, *cells)
    return t


METRICS = ("replay_tokens", "ttft_mean", "ttft_p90")


def metric_label(metric: str) -> str:
    """A sweep metric with its unit and basis: replay tokens are counted by the engine's cache
    code; TTFT is the cost model's."""
    return ("replay tokens (counted)" if metric == "replay_tokens"
            else f"{metric.replace('_', ' ')} s (modelled)")


def _metric(cell: dict[str, Any], metric: str) -> float | None:
    if metric == "replay_tokens":
        return float(cell["replay_tokens"])
    if metric == "ttft_mean":
        return cell["ttft_model_s"]["mean"]
    if metric == "ttft_p90":
        return cell["ttft_model_s"]["p90"]
    raise UserError(f"--metric must be one of {', '.join(METRICS)}")


def _fmt_metric(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if metric == "replay_tokens" else f"{v:.3f}"


def sweep_cells(grid: list[dict[str, Any]], slots: list[int],
                metric: str) -> tuple[list[str], list[list[float | None]], list[list[str]]]:
    """The heat map's content: policy names, each cell's metric / the best offline
    reference's at the same slots (None where either is missing), and its label (the value,
    compact at every scale: 512, 16.2k, 27.69M; then the ratio)."""
    names = list(dict.fromkeys(c["policy"] for c in grid))
    ratio: list[list[float | None]] = [[None for _ in slots] for _ in names]
    text = [["" for _ in slots] for _ in names]
    for i, name in enumerate(names):
        for j, s in enumerate(slots):
            c = next((c for c in grid if c["policy"] == name and c["slots"] == s), None)
            if c is None:
                continue
            refs = [_metric(x, metric) for x in grid
                    if (x["policy"] in sim.REFERENCES or x["policy"] == "opt-schedule")
                    and x["slots"] == s]
            v = _metric(c, metric)
            bv = min((r for r in refs if r is not None), default=None)
            if v is not None and bv:
                ratio[i][j] = v / bv
            text[i][j] = (_fmt_int(v) if metric == "replay_tokens" and v is not None
                          else _fmt_metric(v, metric))
            if ratio[i][j] is not None:
                text[i][j] += f"\n{ratio[i][j]:.2f}x"
    return names, ratio, text


def plot_sweep(
    grid: list[dict[str, Any]], slots: list[int], metric: str, out: Path, title: str
) -> Path:
    """Heat map: policies x slots, colour = metric / the best offline reference's (min of
    belady and belady-gain) at the same slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, cells, text = sweep_cells(grid, slots, metric)
    ratio = np.array([[np.nan if r is None else r for r in row] for row in cells], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(slots) + 3, 0.55 * len(names) + 2))
    im = ax.imshow(ratio, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(slots)), [str(s) for s in slots])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("snapshot slots")
    for i in range(len(names)):
        for j in range(len(slots)):
            ax.text(
                j,
                i,
                text[i][j],
                ha="center",
                va="center",
                fontsize=8,
                color="white"
                if not np.isnan(ratio[i, j]) and ratio[i, j] > np.nanmean(ratio)
                else "black",
            )
    fig.colorbar(im, ax=ax, label=f"{metric_label(metric)} / best offline reference")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _source(trace: Path | None, scenario: str | None, scenario_file: Path | None,
            sets: list[str], limit: int, seed: int, preset: str, dtype: str, page_size: int,
            snapshot_interval: int | None, kv_budget_tokens: int | None, costmodel: Path | None,
            link_replies: bool, branch_admission: bool) -> Source:
    return Source(trace=str(trace) if trace is not None else None, scenario=scenario,
                  scenario_file=str(scenario_file) if scenario_file is not None else None,
                  sets=tuple(sets), limit=limit, seed=seed, preset=preset, dtype=dtype,
                  page_size=page_size, snapshot_interval=snapshot_interval,
                  kv_budget_tokens=kv_budget_tokens,
                  costmodel=str(costmodel) if costmodel is not None else None,
                  link_replies=link_replies, branch_admission=branch_admission)


def _budget(text: str | None) -> int | None:
    if not text:
        return None
    from engine.cache.settings import parse_bytes

    return parse_bytes(text)


def register(app: typer.Typer) -> None:
    source_help = "Mooncake JSONL trace (hash_ids of 512-token blocks)"

    @app.command("sim")
    def sim_cmd(
        trace: Path | None = typer.Option(None, "--trace", help=source_help),
        scenario: str | None = typer.Option(None, "--scenario", help="or a scenario name"),
        scenario_file: Path | None = typer.Option(None, "--scenario-file", help="scenario TOML"),
        sets: list[str] = typer.Option([], "--set", help="scenario override KEY=VALUE"),
        policy: str = typer.Option(
            DEFAULT_POLICIES, help="policies (belady and belady-gain added unless --no-oracles)"
        ),
        snapshot_slots: int | None = typer.Option(
            None, min=1, help="snapshot pool slots (default 16)"),
        snapshot_budget: str | None = typer.Option(None, help="or pool bytes, e.g. 19GiB"),
        limit: int = typer.Option(0, min=0, help="first N requests (0 = all)"),
        page_size: int = typer.Option(16, min=1, help="KV page size in tokens"),
        snapshot_interval: int | None = typer.Option(
            None, min=0, help="admit every N tokens (default 4096)"),
        kv_budget_tokens: int | None = typer.Option(
            None, min=1,
            help=f"KV pool tokens (default: trace {TRACE_KV_TOKENS}, scenario the engine's)"
        ),
        tail_pin_k: int = typer.Option(8, min=1, help="tail-pin: K deepest pinned per session"),
        marconi_alpha: float | None = typer.Option(
            None, min=0.0, help="marconi: FLOP-saving weight"),
        preset: str = typer.Option("a3b-proxy", help=PRESET_HELP),
        dtype: str = typer.Option("bfloat16", help="dtype of that model"),
        costmodel: Path | None = typer.Option(
            None, help="cost model JSON (default: the packaged fit of --preset, else the "
            "analytic H100 model)"
        ),
        link_replies: bool = typer.Option(
            True, "--link-replies/--no-link-replies", help="trace: next turns continue the reply"
        ),
        branch_admission: bool = typer.Option(
            True,
            "--branch-admission/--no-branch-admission",
            help="manager option: also admit at the match's branch point (engine default: on)",
        ),
        rows: bool = typer.Option(False, "--rows", help="keep per-request decisions in the JSON"),
        oracles: bool = typer.Option(
            True, "--oracles/--no-oracles", help="add belady and belady-gain (the references)"
        ),
        optimum: str = typer.Option(
            "exact", help="yardstick: exact (optimum + LP bound + floor), lp, floor or off"),
        solver_time: float = typer.Option(
            300.0, callback=positive, help="yardstick: HiGHS time limit per solve, s"),
        warmup: int = typer.Option(
            0, min=0, help="count only the requests after the first N (they still fill the cache; "
            "no yardstick then)"),
        adaptive_opt: list[str] = typer.Option([], "--adaptive-opt", help=ADAPTIVE_OPT_HELP),
        seed: int = typer.Option(0, min=0, help="scenario seed"),
        out: str | None = typer.Option(
            None, metavar="FILE", help=f"result JSON (default: {OUTPUT_DIR}/sim-<time>.json); "
            "an existing FILE is kept unless --force"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """Simulate policies on a trace or scenario stream at one snapshot budget, with the
        offline references and the yardstick (floor, LP bound, exact optimum). Latencies are
        modelled by the cost model; replay tokens are the engine cache code's own count."""
        from sbrbench.results import write_json_atomic

        check_model_flags(preset=preset, dtype=dtype)
        path = output_path(out, OUTPUT_DIR / f"sim-{timestamp()}.json", force=force)
        if snapshot_slots is not None and snapshot_budget:
            raise UserError("give --snapshot-slots or --snapshot-budget, not both")
        if optimum not in sim.OPTIMUM_MODES:
            raise UserError(f"--optimum must be one of {', '.join(sim.OPTIMUM_MODES)}")
        aopts = parse_adaptive_opts(adaptive_opt)  # bad options: one red line, before work
        with_refs = sim.with_belady if oracles else list
        vs = with_refs(
            sim.variants(
                _policies(policy),
                tail_pin_k=[tail_pin_k],
                marconi_alpha=[marconi_alpha] if marconi_alpha is not None else [],
            )
        )
        vs = [v._replace(opts={**v.opts, **aopts}) if v.policy == "adaptive" else v for v in vs]
        src = _source(trace, scenario, scenario_file, sets, limit, seed, preset, dtype,
                      page_size, snapshot_interval, kv_budget_tokens, costmodel, link_replies,
                      branch_admission)
        setup = sim.workload(src)
        cache = setup.base(slots=snapshot_slots, budget=_budget(snapshot_budget))
        n_slots = cache.config().snapshot_slots
        future, future_s = _future(setup, vs)
        if warmup and warmup >= len(setup.stream):
            raise UserError(f"--warmup {warmup} leaves none of the {len(setup.stream)} requests")
        runs = _run_all(setup, cache, vs, future, f"{n_slots} slots")
        results = [{"kind": "policy", "trace": src.name, "slots": n_slots, "policy": name,
                    **r.summary(warmup), "_matched": [x.use.cached_tokens for x in r.rows]}
                   for name, r in runs.items()]
        cells = sim.yardstick_cells([src], [n_slots], [], optimum=optimum,
                                    solver_time=solver_time, warmup=warmup)
        for c in cells:
            console.print(Text.assemble(
                ("yardstick", "bold"), f" {n_slots} slots: unlimited-pool floor, LP bound"
                + (", exact optimum and its schedule" if optimum == "exact" else "")))
            results.append(sim.run_cell(c))
        grid, marks = sim.assemble(results)
        summaries = {c["policy"]: {k: v for k, v in c.items()
                                   if k not in ("policy", "trace", "slots")} for c in grid}
        doc: dict[str, Any] = {
            "schema": sim.SIM_SCHEMA,
            **_header(setup),
            "warmup_requests": warmup,
            "cache": _cache_info(cache),
            "policies": {v.name: {"policy": v.policy, "opts": v.opts} for v in vs},
            "timing": {"stream_s": round(setup.stream_s, 3), "belady_index_s": round(future_s, 3)},
            "summary": {"policies": summaries},
        }
        if marks:
            doc["summary"]["yardstick"] = {k: v for k, v in marks[0].items()
                                           if k not in ("trace", "slots")}
        if rows:
            doc["rows"] = {name: sim.rows_json(r) for name, r in runs.items()}
        write_json_atomic(path, doc)
        console.print(
            sim_table(
                summaries,
                f"{len(setup.stream)} requests"
                + (f" (first {warmup} not counted)" if warmup else "")
                + f", {n_slots} slots -> {path}",
                doc["summary"].get("yardstick"),
            )
        )

    @app.command("sweep")
    def sweep_cmd(
        trace: list[Path] = typer.Option([], "--trace", help=source_help + " (repeatable)"),
        scenario: str | None = typer.Option(None, "--scenario", help="or a scenario name"),
        scenario_file: Path | None = typer.Option(None, "--scenario-file", help="scenario TOML"),
        sets: list[str] = typer.Option([], "--set", help="scenario override KEY=VALUE"),
        policy: str = typer.Option(
            DEFAULT_POLICIES, help="policies (belady and belady-gain are always added)"
        ),
        slots: str = typer.Option("8,16,32", help="snapshot slots, comma-separated, each >= 1"),
        tail_pin_k: str = typer.Option(
            "8", help="tail-pin K values, comma-separated, each >= 1"),
        marconi_alpha: str | None = typer.Option(
            None, help="marconi alphas, comma-separated, each >= 0"),
        limit: int = typer.Option(0, min=0, help="first N requests (0 = all)"),
        page_size: int = typer.Option(16, min=1, help="KV page size in tokens"),
        snapshot_interval: int | None = typer.Option(
            None, min=0, help="admit every N tokens (default 4096)"),
        kv_budget_tokens: int | None = typer.Option(
            None, min=1,
            help=f"KV pool tokens (default: trace {TRACE_KV_TOKENS}, scenario the engine's)"
        ),
        preset: str = typer.Option("a3b-proxy", help=PRESET_HELP),
        dtype: str = typer.Option("bfloat16", help="dtype of that model"),
        costmodel: Path | None = typer.Option(None, help="cost model JSON"),
        link_replies: bool = typer.Option(
            True, "--link-replies/--no-link-replies", help="trace: next turns continue the reply"
        ),
        branch_admission: bool = typer.Option(
            True,
            "--branch-admission/--no-branch-admission",
            help="manager option: also admit at the match's branch point (engine default: on)",
        ),
        optimum: str = typer.Option(
            "exact", help="yardstick: exact (optimum + LP bound + floor), lp, floor or off"),
        solver_time: float = typer.Option(
            300.0, callback=positive, help="yardstick: HiGHS time limit per solve, s"),
        adaptive_opt: list[str] = typer.Option([], "--adaptive-opt", help=ADAPTIVE_OPT_HELP),
        jobs: int = typer.Option(
            1, "--jobs", "-j", min=1, help="cells run in parallel (local backend)"),
        backend: str = typer.Option("local", help="local (process pool) or ray"),
        address: str | None = typer.Option(
            None, help="ray: cluster address (default: start a local Ray instance)"),
        metric: str = typer.Option(
            "replay_tokens", help=f"table/plot metric: {', '.join(METRICS)}"),
        seed: int = typer.Option(0, min=0, help="scenario seed"),
        out: str | None = typer.Option(
            None, metavar="FILE", help=f"grid JSON (default: {OUTPUT_DIR}/sweep-<time>.json); "
            "an existing FILE is kept unless --force"),
        plot: str | None = typer.Option(None, metavar="PNG", help="heat-map PNG (first trace)"),
        summary: str | None = typer.Option(
            None, metavar="FILE",
            help="also write the per-family gap summary (slices named FAMILY@K) here"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """Traces x policies x snapshot budgets (x tail-pin K, marconi alpha), with the offline
        references and the yardstick, as independent cells run in parallel. The grid JSON is
        rewritten after every cell, so an interrupted sweep keeps what it finished."""
        from sbrbench.results import write_json_atomic

        if metric not in METRICS:
            raise UserError(f"--metric must be one of {', '.join(METRICS)}")
        check_model_flags(preset=preset, dtype=dtype)
        slot_list = _ints(slots, "--slots", minimum=1)
        path = output_path(out, OUTPUT_DIR / f"sweep-{timestamp()}.json", force=force)
        plot_path = (output_path(plot, OUTPUT_DIR / "sweep.png", force=force, flag="--plot")
                     if plot is not None else None)
        summary_path = (output_path(summary, OUTPUT_DIR / "summary.json", force=force,
                                    flag="--summary") if summary is not None else None)
        given = [p for p in (path, plot_path, summary_path) if p is not None]
        if len(set(given)) < len(given):
            raise UserError("--out, --plot and --summary must name different files")
        if trace and scenario:
            raise UserError("give --trace FILE (repeatable) or --scenario NAME, not both")
        aopts = parse_adaptive_opts(adaptive_opt)
        vs = sim.with_belady(
            sim.variants(
                _policies(policy),
                tail_pin_k=_ints(tail_pin_k, "--tail-pin-k", minimum=1),
                marconi_alpha=_floats(marconi_alpha, "--marconi-alpha", minimum=0.0),
            )
        )
        vs = [v._replace(opts={**v.opts, **aopts}) if v.policy == "adaptive" else v for v in vs]
        sources = [_source(t, None, None, [], limit, seed, preset, dtype, page_size,
                           snapshot_interval, kv_budget_tokens, costmodel, link_replies,
                           branch_admission) for t in trace] or [
            _source(None, scenario, scenario_file, sets, limit, seed, preset, dtype, page_size,
                    snapshot_interval, kv_budget_tokens, costmodel, link_replies,
                    branch_admission)]
        if len({s.name for s in sources}) != len(sources):
            raise UserError("--trace: two traces have the same file name")
        first = sim.workload(sources[0])  # user errors in the inputs surface before any work
        for s in sources[1:]:
            sim.workload(s)
        cells = sim.yardstick_cells(sources, slot_list, vs, optimum=optimum,
                                    solver_time=solver_time)
        t0 = time.perf_counter()
        finished: list[dict[str, Any]] = []

        def document(res: list[dict[str, Any]], partial: bool) -> dict[str, Any]:
            grid, marks = sim.assemble(res)
            doc: dict[str, Any] = {
                "schema": sim.SWEEP_SCHEMA,
                **_header(first),
                "traces": [sim.workload(s).stream.describe() | {"name": s.name}
                           for s in sources],
                "cache": {
                    k: v
                    for k, v in _cache_info(first.base(slots=slot_list[0])).items()
                    if not k.startswith("snapshot_") or k in ("snapshot_bytes",
                                                              "snapshot_interval")
                },
                "slots": slot_list,
                "metric": metric,
                "policies": {v.name: {"policy": v.policy, "opts": v.opts} for v in vs},
                "backend": backend,
                "jobs": jobs,
                "timing": {"wall_s": round(time.perf_counter() - t0, 3)},
                "grid": grid,
                "yardstick": marks,
                "partial": partial,
            }
            if not partial and any(sim.FAMILY_SEP in s.name for s in sources):
                doc["families"] = sim.families(marks, grid)
            doc["digest"] = sim.digest(doc)
            return doc

        def done(cell: sim.Cell, res: dict[str, Any]) -> None:
            what = cell.variant.name if cell.variant is not None else "yardstick"
            console.print(f"  {res['trace']} {cell.slots} slots {what}: "
                          f"{time.perf_counter() - t0:.1f} s")
            finished.append(res)
            write_json_atomic(path, document(finished, True))  # survives an interrupt

        results = sim.run_cells(cells, jobs=jobs, backend=backend, address=address,
                                on_done=done)
        doc = document(results, False)
        grid, marks, fams = doc["grid"], doc["yardstick"], doc.get("families", {})
        write_json_atomic(path, doc)
        if summary_path is not None and fams:
            write_json_atomic(summary_path, sim.family_summary(doc, str(path)))
        for src in sources:
            sub = [c for c in grid if c["trace"] == src.name]
            console.print(sweep_table(sub, slot_list, metric, src.name,
                                      [y for y in marks if y["trace"] == src.name]))
        if fams:
            console.print(family_table(fams, slot_list))
        if plot_path is not None:
            sub = [c for c in grid if c["trace"] == sources[0].name]
            plot_sweep(sub, slot_list, metric, plot_path,
                       f"{sources[0].name}: {metric_label(metric)} / best offline reference")
            console.print(f"plot -> {plot_path}")
        console.print(f"grid -> {path} (digest {doc['digest'][:12]})")

    @app.command("calibrate")
    def calibrate_cmd(
        preset: str = typer.Option("tiny", help="engine preset to time"),
        device: str = typer.Option("cpu", help="cpu | cuda"),
        dtype: str = typer.Option("float32", help="float32 | bfloat16"),
        points: str | None = typer.Option(None, help="s:m:L,... (default: sized for the preset)"),
        reps: int = typer.Option(3, min=1, help="timings per point (the fastest is fitted)"),
        seed: int = typer.Option(0, min=0, help="weights and token seed"),
        out: str | None = typer.Option(
            None, metavar="FILE",
            help=f"cost model JSON (default: {OUTPUT_DIR}/costmodel-<gpu or cpu-preset>-<time>"
            ".json); an existing FILE is kept unless --force",
        ),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        refit: Path | None = typer.Option(
            None, help="refit the points stored in this cost model JSON instead of timing an "
            "engine (no GPU needed)"),
        window: int | None = typer.Option(
            None, min=0, help="with --refit: fit aligned windows of this many rows "
            "(0: per position; default: the better of both, by worst relative error)"),
        check: list[Path] | None = typer.Option(
            None, help="engine result JSONs: print modelled vs measured mean TTFT per phase "
            "and store it in the output (repeatable)"),
    ) -> None:
        """Fit the simulator's TTFT cost model on the real engine (NNLS over timed points)."""
        from sbrbench import calibrate as cal
        from sbrbench.costmodel import save

        if window is not None and refit is None:
            raise UserError("--window needs --refit (a fresh calibration uses the engine's)")
        if refit is not None:
            if out is None:
                raise UserError("--refit needs --out (the source file is kept as measured)")
            path = output_path(out, Path(out), force=force)
            model = cal.refit(refit, window)
            _check(model, check)
            save(model, path)
            fit = model.meta["fit"]
            console.print(
                f"refit of {refit}: window {model.window or 'none (per position)'}; "
                f"a = {model.a:.3e} s/row, b = {model.b:.3e} s/pair, c = {model.c:.3e} s, "
                f"restore = {model.restore:.3e} s; r2 = {fit['r2']:.4f}, "
                f"max rel err = {fit['max_rel_err']:.2%} -> {path}")
            return
        check_model_flags(preset=preset, device=device, dtype=dtype)
        pts = cal.parse_points(points) if points else None
        slug = f"cpu-{preset}"
        if device != "cpu":
            import torch

            from sbrbench.bench import gpu_slug

            slug = gpu_slug(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        path = output_path(out, OUTPUT_DIR / f"costmodel-{slug}-{timestamp()}.json", force=force)
        t = Table(title=Text(f"calibrate {preset} on {device} ({dtype}): measured TTFT per "
                             "point (s: snapshot restored at, m: KV cached to, L: prompt "
                             "tokens)"), title_justify="left")
        for col in ("s", "m", "L", "ttft s (best)", "decode s/tok"):
            t.add_column(col, justify="right")

        def on_sample(smp: cal.Sample) -> None:
            p = smp.point
            console.print(f"  s={p.s:>6} m={p.m:>6} L={p.L:>6}  ttft {smp.ttft_s:.4f} s")
            t.add_row(
                str(p.s),
                str(p.m),
                str(p.L),
                f"{smp.ttft_s:.4f}",
                "-" if smp.decode_s_per_token is None else f"{smp.decode_s_per_token:.4f}",
            )

        model = cal.calibrate(
            preset_name=preset,
            device=device,
            dtype=dtype,
            points=pts,
            reps=reps,
            seed=seed,
            on_sample=on_sample,
        )
        _check(model, check)
        save(model, path)
        console.print(t)
        fit = model.meta["fit"]
        console.print(
            f"a = {model.a:.3e} s/token, b = {model.b:.3e} s/pair, c = {model.c:.3e} s, "
            f"restore = {model.restore:.3e} s, decode = {model.decode:.3e} s/token; "
            f"r2 = {fit['r2']}, max rel err = {fit['max_rel_err']:.2%} -> {path}"
        )


def _check(model: CostModel, paths: list[Path] | None) -> None:
    """`calibrate --check`: modelled vs measured TTFT per phase, printed and kept in meta."""
    from sbrbench.calibrate import validate

    if not paths:
        return
    rows = validate(model, paths)
    t = Table(title="modelled vs measured mean TTFT (s)", title_justify="left")
    for col in ("file", "phase", "n", "measured s", "modelled s", "ratio"):
        t.add_column(col, justify="left" if col in ("file", "phase") else "right")
    for r in rows:
        t.add_row(r["file"], r["phase"], str(r["n"]), f"{r['measured_s']:.4f}",
                  f"{r['predicted_s']:.4f}", "-" if r["ratio"] is None else f"{r['ratio']:.2f}x")
    console.print(t)
    model.meta["validation"] = rows
