"""`sbrbench run SCENARIO`: drive a scenario through a target into a result file per policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import typer
from rich.console import Console

from engine.cache.settings import CacheSettings
from engine.errors import UserError
from sbrbench.cache_options import cache_settings, parse_adaptive_opts, split_policies
from sbrbench.results import (
    ResultWriter,
    argv,
    capture_env,
    default_out,
    load_result,
    sibling_out,
    timestamp,
)
from sbrbench.scenarios import (
    SCENARIOS,
    ScenarioConfig,
    load_config,
    make_scenario,
    run_scenario,
)
from sbrbench.targets.base import Target
from sbrbench.targets.engine import EngineTarget
from sbrbench.targets.http import HttpTarget

console = Console()
TARGETS = ("engine", "http", "sim")


class TargetArgs(NamedTuple):
    kind: str
    preset: str
    checkpoint: str | None
    device: str
    dtype: str
    seed: int
    base_url: str | None
    model: str | None
    api_key: str | None
    timeout_s: float
    retries: int
    concurrency: int


def make_settings(cfg: ScenarioConfig, policy: str, flags: dict[str, Any]) -> CacheSettings:
    """Cache settings of one policy run: CLI flags over the scenario's [engine] table."""
    return cache_settings(policy, cfg.engine, **flags)


def load_sim_target() -> Any:
    """sbrbench.sim.SimTarget (imported lazily: the simulator is not needed for other targets)."""
    from sbrbench.sim import SimTarget

    return SimTarget


def make_target(args: TargetArgs, cache: CacheSettings) -> Target:
    """A fresh target for one policy run (fresh cache state)."""
    if args.kind == "engine":
        return EngineTarget.build(
            cache=cache,
            preset=args.preset,
            checkpoint=args.checkpoint,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
        )
    if args.kind == "sim":
        return load_sim_target().build(
            cache=cache,
            preset=args.preset,
            checkpoint=args.checkpoint,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
        )
    if not args.base_url:
        raise UserError("--target http needs --base-url")
    return HttpTarget(
        args.base_url,
        model=args.model,
        api_key=args.api_key,
        timeout_s=args.timeout_s,
        retries=args.retries,
        concurrency=args.concurrency,
    )


class RunResult(NamedTuple):
    path: Path
    interrupted: bool
    rows: int
    errors: int


def run_one(
    cfg: ScenarioConfig,
    target: Target,
    cache: CacheSettings | None,
    out: Path,
    *,
    seed: int,
    label: str | None,
    progress: bool,
    warmup: bool = True,
    declared_policy: str | None = None,
) -> RunResult:
    """One scenario run into `out`; the file is partial if interrupted or on an exception."""
    from sbrbench.render import RunProgress, summary_table

    scenario = make_scenario(cfg, seed)
    scenario.prepare(target)
    warm = getattr(target, "warmup", None) if warmup else None
    warmup_s = warm() if callable(warm) else None
    eng: dict[str, Any] = dict(target.engine_info() or {})
    if declared_policy and not eng.get("policy"):
        # an HTTP server's policy is what the user says it is; keep it, marked as declared
        eng.update(policy=declared_policy, policy_declared=True)
    policy = eng.get("policy") or target.kind
    header = {
        "scenario": cfg.name,
        "label": label or str(policy),
        "argv": argv(),
        "env": capture_env(),
        "target": target.describe(),
        "engine": eng,
        "params": {**cfg.params, "seed": seed},
        "scenario_file": cfg.source,
        "warmup_s": warmup_s,
    }
    writer = ResultWriter(out, header)
    bar = RunProgress(console, f"{cfg.name} [{policy}]", scenario.expected_requests(), progress)

    def on_row(row: dict[str, Any]) -> None:
        writer.append(row)
        bar.row(row)

    try:
        with bar:
            outcome = run_scenario(
                scenario, target, on_row, concurrency=getattr(target, "max_concurrency", 1)
            )
    except BaseException as e:
        writer.finish(partial=True, reason=f"{type(e).__name__}: {e}",
                      extra={"target": target.describe()})
        raise
    extra: dict[str, Any] = {"target": target.describe()}  # what the run learned (dropped fields)
    stats = getattr(target, "cache_stats", None)
    if callable(stats):
        try:
            extra["cache_stats"] = stats()
        except Exception as e:  # noqa: BLE001 - stats are a bonus; the rows are what matters
            extra["cache_stats"] = {"error": f"{type(e).__name__}: {e}"}
    writer.finish(
        partial=outcome.interrupted,
        reason="interrupted" if outcome.interrupted else None,
        extra=extra,
    )
    console.print(summary_table(writer.doc["summary"], f"{cfg.name} [{policy}] -> {out}"))
    if outcome.errors:
        console.print(
            f"[red]{outcome.errors} of {outcome.rows} requests failed (see 'error' in the rows)"
        )
    return RunResult(out, outcome.interrupted, outcome.rows, outcome.errors)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        scenario: str = typer.Argument(..., help=f"one of: {', '.join(SCENARIOS)}"),
        scenario_file: Path | None = typer.Option(
            None, "--scenario", help="scenario TOML (default: the shipped one)"
        ),
        sets: list[str] = typer.Option(
            [],
            "--set",
            help="override a parameter: KEY=VALUE "
            "(engine.KEY=VALUE for the [engine] table); repeatable",
        ),
        target: str = typer.Option("engine", help="engine | http | sim"),
        base_url: str | None = typer.Option(None, help="http: server URL (with or without /v1)"),
        model: str | None = typer.Option(None, help="http: model (default: first of /v1/models)"),
        api_key: str | None = typer.Option(None, envvar="SBRBENCH_API_KEY", help="http: API key"),
        timeout: float = typer.Option(300.0, help="http: seconds per request"),
        retries: int = typer.Option(2, help="http: retries on connection errors, 429, 5xx"),
        concurrency: int = typer.Option(1, help="http: requests in flight"),
        preset: str = typer.Option("tiny", help="engine/sim: model preset"),
        checkpoint: str | None = typer.Option(None, help="engine: checkpoint directory"),
        device: str = typer.Option("cpu", help="engine: cpu | cuda"),
        dtype: str = typer.Option("float32", help="engine: float32 | bfloat16"),
        policy: str | None = typer.Option(
            None, help="eviction policy, or a,b to run both and compare (default: scenario's)"
        ),
        tail_pin_k: int | None = typer.Option(None, min=1, help="tail-pin: K deepest pinned"),
        marconi_alpha: float | None = typer.Option(None, help="marconi: FLOP-saving weight"),
        snapshot_slots: int | None = typer.Option(None, min=1, help="snapshot pool slots"),
        snapshot_budget: str | None = typer.Option(None, help="snapshot pool bytes, e.g. 2GiB"),
        snapshot_interval: int | None = typer.Option(
            None, min=0, help="tokens between snapshots"),
        kv_budget_tokens: int | None = typer.Option(None, min=1, help="KV pool size in tokens"),
        adaptive_opt: list[str] = typer.Option(
            [], "--adaptive-opt",
            help="adaptive: policy option KEY=VALUE, repeatable (duel=1000, hazard=empirical)"),
        seed: int = typer.Option(0, help="weights and workload seed"),
        label: str | None = typer.Option(None, help="label stored in the result"),
        out: Path | None = typer.Option(
            None, help="result JSON (default sbr-results/<scenario>-<policy>-<time>.json)"
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        warmup: bool = typer.Option(
            True,
            "--warmup/--no-warmup",
            help="one unrecorded request first (engine: uncached; http: a short one)",
        ),
    ) -> None:
        """Run a scenario (deep-resume, round-robin, parity, trace) and write its result JSON."""
        if target not in TARGETS:
            raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
        if target == "http" and not base_url:
            raise UserError("--target http needs --base-url")
        cfg = load_config(scenario, scenario_file, sets)
        aopts = parse_adaptive_opts(adaptive_opt)
        if aopts and target == "http":
            raise UserError("--adaptive-opt needs --target engine or sim (set it on the server)")
        flags: dict[str, Any] = dict(
            tail_pin_k=tail_pin_k, marconi_alpha=marconi_alpha, adaptive_opts=aopts,
            snapshot_slots=snapshot_slots, snapshot_budget=snapshot_budget,
            snapshot_interval=snapshot_interval, kv_budget_tokens=kv_budget_tokens)
        targs = TargetArgs(
            target,
            preset,
            checkpoint,
            device,
            dtype,
            seed,
            base_url,
            model,
            api_key,
            timeout,
            retries,
            concurrency,
        )
        if target == "http":
            pols: list[str | None] = [None]
            if policy:
                if len(split_policies_loose(policy)) > 1:
                    raise UserError(
                        "--policy a,b needs --target engine or sim (an HTTP server has one policy)"
                    )
                pols = [policy]
        else:
            pols = list(split_policies(policy or cfg.engine.get("policy", "adaptive")))
        stamp = timestamp()
        results: list[RunResult] = []
        for pol in pols:
            cache = None
            if target != "http":
                cache = make_settings(cfg, str(pol), flags)
            name = pol or "http"
            path = (
                (out if len(pols) == 1 else sibling_out(out, name))
                if out
                else default_out(cfg.name, name, stamp)
            )
            tgt = make_target(targs, cache or CacheSettings())
            try:
                res = run_one(
                    cfg,
                    tgt,
                    cache,
                    path,
                    seed=seed,
                    label=label if len(pols) == 1 or not label else f"{label}-{name}",
                    progress=progress,
                    warmup=warmup,
                    declared_policy=pol if cache is None else None,
                )
            finally:
                tgt.close()
            results.append(res)
            if res.interrupted:
                console.print(
                    f"[yellow]interrupted: {res.rows} finished rows kept in {res.path} (partial)"
                )
                raise typer.Exit(130)
        if len(results) > 1:
            from sbrbench.cli_compare import compare_results, print_comparison

            base = load_result(results[0].path)
            for other in results[1:]:
                doc = load_result(other.path)
                print_comparison(
                    compare_results(base, doc),
                    f"{pols[0]} ({results[0].path.name})",
                    f"{doc['engine'].get('policy')} ({other.path.name})",
                )


def split_policies_loose(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
