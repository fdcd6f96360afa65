"""`sbrbench serve`: the OpenAI-compatible HTTP server over the engine (engine/server/)."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.errors import UserError
from sbrbench.cache_options import ADAPTIVE_OPT_HELP, check_model_flags


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    preset: str = typer.Option("tiny", "--preset", help="Engine preset (random weights)."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="HF checkpoint dir (overrides --preset)."
    ),
    policy: str = typer.Option("adaptive", "--policy", help="Snapshot eviction policy."),
    tail_pin_k: int = typer.Option(
        8, "--tail-pin-k", min=1, help="tail-pin: snapshots pinned per session."
    ),
    adaptive_opt: list[str] = typer.Option([], "--adaptive-opt", help=ADAPTIVE_OPT_HELP),
    snapshot_slots: int = typer.Option(16, "--snapshot-slots", min=1,
                                       help="Snapshot pool slots."),
    snapshot_budget: str | None = typer.Option(
        None, "--snapshot-budget", help="Snapshot pool bytes (2GiB, 512MB; default: slots decide)."
    ),
    snapshot_interval: int = typer.Option(
        4096, "--snapshot-interval", min=0,
        help="Also admit a snapshot every this many tokens of a prefill (0: off)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", min=0, max=65535,
                             help="Port to bind (0: any free port)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    max_queue: int = typer.Option(64, "--max-queue", min=1,
                                  help="Requests waiting before 503."),
    default_max_tokens: int = typer.Option(
        256, "--default-max-tokens", min=1, help="max_tokens of a chat request that sets none."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of a preset's random weights."),
    served_model_name: list[str] = typer.Option(
        [],
        "--served-model-name",
        help="Another name the model answers to (repeatable); the preset or checkpoint dir "
        "name always does. Other names get 404 model_not_found.",
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SBRBENCH_SERVE_API_KEY",
        help="Require 'Authorization: Bearer KEY' on /v1 (401 otherwise)."),
    key_exempt: str = typer.Option(
        "health,metrics", "--key-exempt",
        help="With --api-key: endpoints served without the key (health, metrics; 'none')."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """OpenAI-compatible server (chat + completions, SSE, logprobs, /metrics) over the engine.

    The engine runs one request at a time (no batching); the others wait in a queue of
    --max-queue requests, beyond which the server answers 503 with Retry-After. /metrics shows
    the queue depth and the time requests waited (sbr_queue_depth, sbr_queue_seconds).
    """
    from engine.server import serve as run_server
    from engine.server.middleware import EXEMPTABLE
    from sbrbench.cache_options import cache_settings, parse_adaptive_opts
    from sbrbench.targets.engine import EngineTarget

    exempt = [] if key_exempt.strip().lower() == "none" else [
        e.strip() for e in key_exempt.split(",") if e.strip()]
    bad = sorted(set(exempt) - set(EXEMPTABLE))
    if bad:
        raise UserError(f"--key-exempt: unknown endpoint {bad[0]!r} "
                        f"(choose from {', '.join(EXEMPTABLE)}, or none)")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key must not be empty")
    if checkpoint is not None and not checkpoint.is_dir():
        raise UserError(f"--checkpoint {checkpoint}: not a directory")
    check_model_flags(preset=None if checkpoint else preset, device=device, dtype=dtype)
    cache = cache_settings(
        policy,
        tail_pin_k=tail_pin_k,
        snapshot_slots=snapshot_slots,
        snapshot_budget=snapshot_budget,
        snapshot_interval=snapshot_interval,
        adaptive_opts=parse_adaptive_opts(adaptive_opt),
    )
    target = EngineTarget.build(
        cache=cache,
        preset=preset,
        checkpoint=str(checkpoint) if checkpoint else None,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    name = checkpoint.resolve().name if checkpoint else preset
    names = ", ".join(dict.fromkeys([name, *served_model_name]))
    auth = "; API key required" if api_key else ""
    typer.secho(f"sbrbench serve: {names} on http://{host}:{port}/v1 (policy {policy}; one "
                f"request at a time, queue {max_queue}{auth})", err=True)
    run_server(
        target.engine,
        model_name=name,
        aliases=served_model_name,
        host=host,
        port=port,
        max_queue=max_queue,
        default_max_tokens=default_max_tokens,
        api_keys=[api_key] if api_key else [],
        key_exempt=exempt,
        log_level=log_level,
    )
