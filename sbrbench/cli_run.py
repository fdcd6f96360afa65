"""`sbrbench run SCENARIO`: drive a scenario through a target into a result file per policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import typer

from engine.cache.settings import CacheSettings
from engine.errors import UserError
from sbrbench.cache_options import (
    ADAPTIVE_OPT_HELP,
    cache_settings,
    check_model_flags,
    parse_adaptive_opts,
    positive,
    split_policies,
)
from sbrbench.render import make_console
from sbrbench.results import (
    FORCE_HELP,
    OUTPUT_DIR,
    ResultWriter,
    argv,
    capture_env,
    latency_basis,
    load_result,
    run_outputs,
    timestamp,
)
from sbrbench.scenarios import (
    SCENARIOS,
    Arrivals,
    ScenarioConfig,
    load_config,
    make_scenario,
    run_scenario,
)
from sbrbench.stats import parse_slo
from sbrbench.targets.base import Target
from sbrbench.targets.engine import EngineTarget
from sbrbench.targets.http import HttpTarget

console = make_console()
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


class Load(NamedTuple):
    """How requests are sent: at most `concurrency` in flight; with `request_rate`, open-loop
    arrivals (Poisson, or gamma of shape `burstiness`); `abort_after` consecutive failures end
    the run early (0: never)."""

    concurrency: int = 1
    request_rate: float | None = None
    burstiness: float = 1.0
    abort_after: int = 10

    def describe(self) -> dict[str, Any]:
        return {"max_concurrency": self.concurrency, "request_rate": self.request_rate,
                "burstiness": self.burstiness if self.request_rate else None,
                "abort_after": self.abort_after or None}


class RunResult(NamedTuple):
    path: Path
    interrupted: bool
    rows: int
    errors: int
    aborted: str | None = None


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
    load: Load = Load(),
    slo: dict[str, float] | None = None,
    explained: bool = True,
) -> RunResult:
    """One scenario run into `out`; the file is partial if a request failed, if the run was
    interrupted or stopped early, or on an exception. `explained`: the summary table says what
    its phases and metrics are (the first run of several does)."""
    from sbrbench.render import RunProgress, summary_table, throughput_table

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
        "load": load.describe(),
        "slo": slo,
    }
    writer = ResultWriter(out, header)
    bar = RunProgress(console, f"{cfg.name} [{policy}]", scenario.expected_requests(), progress)

    def on_row(row: dict[str, Any]) -> None:
        writer.append(row)
        bar.row(row)

    arrivals = Arrivals(load.request_rate, load.burstiness, seed) if load.request_rate else None
    try:
        with bar:
            outcome = run_scenario(
                scenario, target, on_row, concurrency=load.concurrency, arrivals=arrivals,
                abort_after=load.abort_after or None,
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
    stopped = "interrupted" if outcome.interrupted else outcome.aborted
    writer.finish(partial=stopped is not None, reason=stopped, extra=extra)
    doc = writer.doc
    basis = latency_basis(doc)
    console.print(summary_table(doc["summary"], f"{cfg.name} [{policy}] on {target.kind}: "
                                f"per-request figures, {basis} -> {out}", scenario=cfg.name,
                                basis=basis,
                                explained=explained))
    console.print(throughput_table(doc["throughput"], basis))
    for text, count in doc["warnings"].items():
        console.print(f"warning: {count} of {len(doc['rows'])} rows: {text}", style="yellow")
    if outcome.aborted:
        console.print(outcome.aborted, style="red")
    if outcome.errors:
        console.print(
            f"{outcome.errors} of {outcome.rows} requests failed (see 'error' in the rows; "
            "the file is marked partial)", style="red"
        )
    return RunResult(out, outcome.interrupted, outcome.rows, outcome.errors, outcome.aborted)


def failure_exit(results: list[RunResult], allow_failures: float) -> int:
    """0 when every run finished with at most `allow_failures` (a share) of its requests
    failed, else 1 (the message says which run and why)."""
    code = 0
    for r in results:
        share = r.errors / r.rows if r.rows else 0.0
        if r.aborted or share > allow_failures:
            why = r.aborted or (f"{r.errors} of {r.rows} requests failed ({share:.0%}; "
                                f"--allow-failures {allow_failures:g})")
            console.print(f"{r.path}: {why}", style="red")
            code = 1
    return code


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        scenario: str = typer.Argument(..., help=f"scenario name, one of: {', '.join(SCENARIOS)}"),
        scenario_file: Path | None = typer.Option(
            None, "--scenario-file", metavar="FILE",
            help="scenario TOML defining SCENARIO (default: the shipped one)"),
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
        timeout: float = typer.Option(300.0, callback=positive,
                                      help="http: seconds per request"),
        retries: int = typer.Option(
            2, min=0, help="http: retries after connection errors, timeouts and 5xx (429/503 are "
            "retried after the server's Retry-After while --timeout allows)"),
        concurrency: int = typer.Option(
            1, "--max-concurrency", "--concurrency", min=1,
            help="requests in flight at most (http; the in-process engine runs one)"),
        request_rate: float | None = typer.Option(
            None, "--request-rate",
            help="open-loop arrivals: requests per second (Poisson; see --burstiness); "
            "default: each request as soon as a slot is free"),
        burstiness: float = typer.Option(
            1.0,
            help="--request-rate gaps: gamma shape (1 Poisson, <1 burstier, >1 steadier)"),
        slo: str | None = typer.Option(
            None, help="goodput SLOs, e.g. ttft=500ms,tpot=50ms,e2el=2s (units required)"),
        allow_failures: float = typer.Option(
            0.0, min=0.0, max=1.0,
            help="share of failed requests a run may have and still exit 0"),
        abort_after: int = typer.Option(
            10, min=0, help="stop a run after this many consecutive failed requests (0: never)"),
        preset: str = typer.Option(
            "tiny", help="engine/sim: model preset. tiny (random weights, real Qwen3-Next "
            "structure) keeps a run a CPU-minute job; `sbrbench sim` defaults to a3b-proxy, the "
            "shapes its packaged H200 cost model was fitted on, because it runs no model"),
        checkpoint: str | None = typer.Option(None, help="engine: checkpoint directory"),
        device: str = typer.Option("cpu", help="engine: cpu | cuda"),
        dtype: str = typer.Option("float32", help="engine: float32 | bfloat16"),
        policy: str | None = typer.Option(
            None, help="eviction policy, or a,b to run both and compare (default: scenario's)"
        ),
        tail_pin_k: int | None = typer.Option(None, min=1, help="tail-pin: K deepest pinned"),
        marconi_alpha: float | None = typer.Option(
            None, min=0.0, help="marconi: FLOP-saving weight"),
        snapshot_slots: int | None = typer.Option(None, min=1, help="snapshot pool slots"),
        snapshot_budget: str | None = typer.Option(None, help="snapshot pool bytes, e.g. 2GiB"),
        snapshot_interval: int | None = typer.Option(
            None, min=0, help="tokens between snapshots"),
        kv_budget_tokens: int | None = typer.Option(None, min=1, help="KV pool size in tokens"),
        adaptive_opt: list[str] = typer.Option([], "--adaptive-opt", help=ADAPTIVE_OPT_HELP),
        seed: int = typer.Option(0, min=0, help="weights and workload seed"),
        label: str | None = typer.Option(None, help="label stored in the result"),
        out: str | None = typer.Option(
            None, metavar="FILE",
            help=f"result JSON (default: {OUTPUT_DIR}/<scenario>-<policy>-<time>.json; with "
            "several policies FILE-<policy>.json each); an existing FILE is kept unless --force"
        ),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
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
        if target != "http":
            check_model_flags(preset=None if checkpoint else preset, device=device, dtype=dtype)
        cfg = load_config(scenario, scenario_file, sets)
        slo_limits = parse_slo(slo) if slo else None
        if request_rate is not None:
            Arrivals(request_rate, burstiness)  # checks both (> 0), naming the flag
            if cfg.params.get("time_scale"):
                raise UserError("--request-rate replaces the trace's own timestamps: "
                                "pass --set time_scale=0 with it")
        load = Load(concurrency, request_rate, burstiness, abort_after)
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
        caches = [make_settings(cfg, str(pol), flags) if target != "http" else None
                  for pol in pols]
        names = [pol or "http" for pol in pols]
        paths = run_outputs(out, names, cfg.name, timestamp(), force=force)
        results: list[RunResult] = []
        for pol, name, cache, path in zip(pols, names, caches, paths, strict=True):
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
                    load=load,
                    slo=slo_limits,
                    explained=not results,
                )
            finally:
                tgt.close()
            results.append(res)
            if res.interrupted:
                console.print(
                    f"interrupted: {res.rows} finished rows kept in {res.path} (partial)",
                    style="yellow",
                )
                raise typer.Exit(130)
        if len(results) > 1:
            from sbrbench.cli_compare import compare_results, print_comparison

            base = load_result(results[0].path)
            for other in results[1:]:
                doc = load_result(other.path)
                print_comparison(
                    compare_results(base, doc, slo=slo_limits),
                    f"{pols[0]} ({results[0].path.name})",
                    f"{doc['engine'].get('policy')} ({other.path.name})",
                    explained=False,
                )
        code = failure_exit(results, allow_failures)
        if code:
            raise typer.Exit(code)


def split_policies_loose(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
