"""`sbrbench decay analyze`: GDN decay horizons and window fidelity of a checkpoint or preset."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine.errors import UserError
from sbrbench import decay
from sbrbench.cache_options import check_model_flags
from sbrbench.decay import LONG_HORIZON, DecayReport, GDNLayerParams
from sbrbench.render import make_console
from sbrbench.results import (
    FORCE_HELP,
    OUTPUT_DIR,
    argv,
    capture_env,
    default_out,
    output_path,
    replacing,
    timestamp,
    write_json_atomic,
)

if TYPE_CHECKING:
    from engine.runtime import Engine

MODES = ("static", "activations")
BAR_WIDTH = 40

console = make_console()
# How the figures were obtained, per --mode (computed, not timed: there is nothing measured).
MODE_NOTES = {
    "static": "computed from the weights alone (A_log, dt_bias; input gate a_t = 0)",
    "activations": "computed from the gates the model produced on the input",
}


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        help="GDN decay forensics: how long each linear-attention head remembers.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    sub.command("analyze")(analyze)
    app.add_typer(sub, name="decay")


def analyze(
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="HF checkpoint dir (single-file or sharded safetensors)."
    ),
    preset: str | None = typer.Option(None, "--preset", help="Engine preset (random weights)."),
    mode: str = typer.Option("static", "--mode", help="static (a_t = 0) or activations."),
    eps: list[str] | None = typer.Option(
        None, "--eps", help="Decay threshold(s): repeat the flag or give a comma list. [1e-3]"
    ),
    corpus: Path | None = typer.Option(None, "--corpus", help="activations: a text file."),
    trace: Path | None = typer.Option(None, "--trace", help="activations: a Mooncake JSONL trace."),
    trace_request: int = typer.Option(0, "--trace-request", min=0,
                                      help="Which request of --trace."),
    max_tokens: int = typer.Option(2048, "--max-tokens", min=2,
                                   help="activations: sequence length cap."),
    taus: str = typer.Option(
        ",".join(map(str, decay.DEFAULT_TAUS)), "--taus", help="Window lengths (tokens)."
    ),
    out: str | None = typer.Option(
        None, "--out", metavar="FILE",
        help=f"JSON to write (default: {OUTPUT_DIR}/decay-<source>-<mode>-<time>.json); an "
        "existing FILE is kept unless --force"),
    plot: str | None = typer.Option(
        None, "--plot", metavar="FILE",
        help="Also write a PNG histogram of the horizons (log-x) to FILE (kept unless --force)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    top: int = typer.Option(10, "--top", min=0, help="How many slowest heads to list."),
    device: str = typer.Option("cpu", "--device", help="activations: engine device."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of a preset's random weights."),
) -> None:
    """Per-head decay horizons, their heavy tail, and window fidelity (docs/DECAY.md)."""
    if (checkpoint is None) == (preset is None):
        raise UserError("give exactly one of --checkpoint DIR or --preset NAME")
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_model_flags(preset=preset, device=device)
    if mode == "static" and (corpus or trace):
        raise UserError("--corpus/--trace need --mode activations")
    if mode == "activations" and (corpus is None) == (trace is None):
        raise UserError("--mode activations needs exactly one of --corpus FILE or --trace FILE")
    eps_values = decay.validate_eps(parse_floats(eps, "--eps") if eps else decay.DEFAULT_EPS)
    tau_values = decay.validate_taus(parse_ints(taus, "--taus"))
    source = str(checkpoint) if checkpoint is not None else f"preset:{preset}"
    name = checkpoint.name if checkpoint is not None else str(preset)
    stamp = timestamp()
    path = output_path(out, default_out("decay", f"{name}-{mode}", stamp), force=force)
    plot_path = (output_path(plot, OUTPUT_DIR / f"decay-{name}-{mode}-{stamp}.png", force=force,
                             flag="--plot") if plot is not None else None)

    if mode == "static":
        params = static_params(checkpoint, preset, seed)
        report = decay.analyze_static(source, params, eps_values, tau_values)
    else:
        engine = load_engine(checkpoint, preset, seed, device)
        if corpus is not None:
            ids = decay.corpus_tokens(corpus, engine.tokenizer.encode, max_tokens)
            input_desc: dict[str, Any] = {"corpus": str(corpus), "tokens": len(ids)}
        else:
            assert trace is not None
            ids = decay.trace_tokens(trace, trace_request, max_tokens)
            input_desc = {
                "trace": str(trace),
                "request": trace_request,
                "tokens": len(ids),
                "tokens_from": "hash_ids: 512 seeded random byte tokens per block",
            }
        report = analyze_engine(engine, ids, source, eps_values, tau_values, input_desc)

    doc = decay.report_to_json(report, argv=argv(), env=capture_env(), top=top)
    write_json_atomic(path, doc)
    render(console, report, doc)
    if plot_path is not None:
        write_plot(plot_path, report)
        console.print(f"plot: {plot_path}")
    console.print(f"wrote {path}")


def parse_floats(values: list[str], flag: str) -> list[float]:
    try:
        return [float(x) for v in values for x in v.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: not a number in {','.join(values)!r}") from None


def parse_ints(value: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected a comma list of integers, got {value!r}") from None


# --------------------------------------------------------------------------- model access


def static_params(checkpoint: Path | None, preset: str | None, seed: int) -> list[GDNLayerParams]:
    """A_log/dt_bias per GDN layer: from the checkpoint's headers and two tiny tensors per
    layer, or from a preset's seeded random initialisation."""
    if checkpoint is not None:
        return decay.read_gdn_params(checkpoint)
    from engine.config import preset as preset_config
    from engine.model.model import HybridModel
    from engine.weights import init_random

    model = HybridModel(preset_config(str(preset)))
    init_random(model, seed)
    return decay.gdn_params_from_state(model.state_dict())


def load_engine(checkpoint: Path | None, preset: str | None, seed: int, device: str) -> Engine:
    """The engine without its prefix cache (a trace needs neither KV pool nor snapshots)."""
    from engine.cache.settings import CacheSettings
    from engine.runtime import Engine

    no_cache = CacheSettings(enabled=False, snapshot_slots=0, kv_budget_tokens=16)
    if checkpoint is None:
        return Engine.from_preset(str(preset), device=device, seed=seed, cache=no_cache)
    decay.read_gdn_params(checkpoint, need_projections=True)  # fail fast, before loading
    return Engine.from_checkpoint(checkpoint, device=device, cache=no_cache)


def analyze_engine(
    engine: Engine,
    ids: list[int],
    source: str,
    eps: list[float],
    taus: list[int],
    input_desc: dict[str, Any],
) -> DecayReport:
    """Run the model over ids, record k/v/g/beta per GDN layer, and analyse them."""
    import torch

    with console.status(f"tracing {len(ids)} tokens through the engine"):
        with torch.inference_mode():
            ids_t = torch.tensor(ids, dtype=torch.long, device=engine.device)
            traces = engine.model.trace_gdn(ids_t, window=engine.window)
    params = decay.gdn_params_from_state(engine.model.state_dict())
    with console.status("window fidelity (float64 gated delta rule)"):
        return decay.analyze_activations(source, params, traces, eps, taus, input_desc)


# --------------------------------------------------------------------------- rendering


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:,.{digits}f}"


def _fmt_horizon(x: float | None, report: DecayReport) -> str:
    """A horizon, or what an unresolved one means: beyond the sequence, or no decay at all."""
    if x is not None and math.isfinite(x):
        return _fmt(x)
    return f"> {report.seq_len - 1:,}" if report.seq_len else "inf"


def render(con: Console, report: DecayReport, doc: dict[str, Any]) -> None:
    """Summary per eps, window fidelity per tau, slowest heads, log-binned histogram."""
    con.print(Text.assemble(
        ("decay ", "bold"),
        f"{report.source}  mode={report.mode}  heads={len(report.heads)}"
        + (f"  tokens={report.seq_len}" if report.seq_len else ""),
        f"\nevery figure below is {MODE_NOTES.get(report.mode, report.mode)}",
    ))
    t = Table(title=Text("horizon over heads: tokens until a head's cumulative decay falls "
                         "below eps"), caption=Text(str(doc["summary"]["basis"])))
    for col in ("eps", "median", "p90", f"> {LONG_HORIZON}", "unresolved", "tail (KS ln/pa)"):
        t.add_column(col, justify="right")
    for s in doc["by_eps"].values():
        fit = s["tail_fit"]
        fit_txt = (
            f"{fit['best']} ({fit['lognormal']['ks']:.3f}/{fit['pareto']['ks']:.3f})"
            if fit
            else "-"
        )
        t.add_row(
            f"{s['eps']:g}",
            _fmt(s["median_horizon_tokens"]),
            _fmt(s["p90_horizon_tokens"]),
            f"{s[f'share_over_{LONG_HORIZON}']:.1%}",
            f"{s['share_unresolved']:.1%}",
            fit_txt,
        )
    con.print(t)

    w = Table(title=Text("window fidelity: cos(state rebuilt from the last tau tokens, true "
                         "state)"), caption=Text(str(report.window_model)))
    for col in ("tau", "mean cos", "p10 cos", "min cos"):
        w.add_column(col, justify="right")
    for tau, row in doc["window"].items():
        w.add_row(tau, _fmt(row["mean_cos"], 4), _fmt(row["p10_cos"], 4), _fmt(row["min_cos"], 4))
    con.print(w)

    s = Table(title=Text(f"slowest heads (lowest cos at tau={decay.ranking_tau(report)}; "
                         "horizon in tokens)"))
    for col in ("layer", "head", "cos", "horizon"):
        s.add_column(col, justify="right")
    for h in doc["slowest_heads"]:
        s.add_row(
            str(h["layer"]),
            str(h["head"]),
            _fmt(h["cos"], 6),
            _fmt_horizon(h["horizon_tokens"], report),
        )
    con.print(s)
    con.print(histogram_table(report.headline_horizons(report.primary_eps), report.primary_eps))


def histogram_table(horizons: np.ndarray, eps: float) -> Table:
    """Terminal histogram: heads per power-of-two horizon bin, with bars."""
    bins, unresolved = decay.log2_histogram(horizons)
    peak = max([b.heads for b in bins] + [unresolved, 1])
    t = Table(title=Text(f"heads by horizon in tokens (eps={eps:g}, log2 bins)"), show_edge=False)
    t.add_column("tokens", justify="right")
    t.add_column("heads", justify="right")
    t.add_column("", justify="left")
    for b in bins:
        t.add_row(f"{b.lo:,.4g}-{b.hi:,.4g}", str(b.heads), "█" * round(BAR_WIDTH * b.heads / peak))
    if unresolved:
        t.add_row("unresolved", str(unresolved), "░" * round(BAR_WIDTH * unresolved / peak))
    return t


def write_plot(path: Path, report: DecayReport) -> None:
    """PNG histogram of the headline horizons on a log-x axis (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = report.primary_eps
    h = report.headline_horizons(eps)
    bins, unresolved = decay.log2_histogram(h)
    fig, ax = plt.subplots(figsize=(7, 4))
    if bins:
        edges = [b.lo for b in bins] + [bins[-1].hi]
        ax.hist(h[np.isfinite(h)], bins=edges, color="tab:blue", edgecolor="white")
        ax.set_xscale("log", base=2)
    ax.axvline(LONG_HORIZON, color="tab:red", linestyle="--", label=f"{LONG_HORIZON} tokens")
    median = decay.quantile_or_none(h, 0.5)
    if median is not None:
        ax.axvline(median, color="black", linestyle=":", label=f"median {median:,.0f}")
    ax.set_xlabel(f"horizon (tokens until the cumulative decay < {eps:g})")
    ax.set_ylabel("GDN heads (count)")
    extra = f", {unresolved} unresolved" if unresolved else ""
    ax.set_title(f"{report.source} ({report.mode}, {h.size} heads{extra})\n"
                 f"{MODE_NOTES.get(report.mode, '')}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    try:
        with replacing(Path(path)) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
