"""`sbrbench bench kernels|prefill|resume|decode`: GPU timings of the GDN kernels, of the
engine's prefill, of a warm resume against its GPU floor and of decode against the bandwidth
roofline."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from engine.errors import UserError
from sbrbench.cache_options import check_model_flags
from sbrbench.render import make_console
from sbrbench.results import FORCE_HELP, OUTPUT_DIR, output_path, timestamp

console = make_console()
OUT_HELP = (f"JSON to write (default: {OUTPUT_DIR}/<gpu>/bench-{{}}-<time>.json); an existing "
            "FILE is kept unless --force")


def bench_out(out: str | None, bench: str, force: bool, device: str = "cuda") -> Path:
    """The bench file's path, checked before any timing: --out, else
    sbr-results/<gpu>/bench-<bench>-<time>.json (sbr-results/cpu/... for a CPU smoke run;
    without a GPU the bench itself says it needs one)."""
    slug = "cpu"
    if device == "cuda":
        import torch

        from sbrbench.bench import gpu_slug

        slug = gpu_slug(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    default = OUTPUT_DIR / slug / f"bench-{bench}-{timestamp()}.json"
    return output_path(out, default, force=force)


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        help="GPU timings: GDN kernels against fla and torch, engine prefill and replay costs, "
        "warm-resume TTFT against its floor, decode against the bandwidth roofline.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    sub.command("kernels")(kernels)
    sub.command("prefill")(prefill)
    sub.command("resume")(resume)
    sub.command("decode")(decode)
    app.add_typer(sub, name="bench")


def parse_ints(text: str, flag: str) -> list[int]:
    """'4096,8192' -> [4096, 8192]; anything else is a UserError naming the flag."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise UserError(f"{flag} needs positive integers, got {text!r}")
    return vals


def kernels(
    t: str = typer.Option("4096,8192,16384,32768,65536", "--T", help="Sequence lengths (x64)."),
    out: str | None = typer.Option(None, "--out", metavar="FILE",
                                   help=OUT_HELP.format("kernels")),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    fla: bool = typer.Option(True, "--fla/--no-fla", help="Also time fla (when importable)."),
    flashinfer: bool = typer.Option(
        True, "--flashinfer/--no-flashinfer",
        help="Also time FlashInfer's GDN prefill (when importable; benchmarks/peers)."),
    torch_max_t: int = typer.Option(16384, "--torch-max-t", min=0,
                                    help="Torch reference up to this T."),
    graphs: bool = typer.Option(
        False, "--graphs/--no-graphs",
        help="Also time ours and fla replayed from CUDA graphs (kernels without launch gaps)."),
    profile_at: str = typer.Option(
        "", "--profile-at",
        help="Also record each kernel's device time (ours, fla) at these T."),
) -> None:
    """GDN kernels at Qwen3-Next shapes (H=16, HV=32, K=V=128, B=1): ours vs fla, FlashInfer
    and torch."""
    from sbrbench import bench_kernels

    ts = parse_ints(t, "--T")
    prof = parse_ints(profile_at, "--profile-at") if profile_at.strip() else []
    dest = bench_out(out, "kernels", force)
    path, rows = bench_kernels.run_kernels(ts, dest, fla=fla, flashinfer=flashinfer,
                                   torch_max_t=torch_max_t, graphs=graphs, profile_at=prof,
                                   log=console.print)
    table = Table(title=Text("gdn_chunk_fwd, measured: median device ms per call, and peer ms / "
                             "ours ms (above 1: ours faster)"), title_justify="left")
    for col in ("T", "H", "ours ms (all states)", "fla ms", "fla / ours", "fla / ours (none)",
                "FI ms", "FI / ours", "FI+ckpt / ours", "FI / ours (none)", "ours capture cost",
                "graphs fla / FI"):
        table.add_column(col, justify="right")

    def fmt(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    for r in bench_kernels.speedups(rows):
        g = r.get
        table.add_row(str(r["T"]), str(r["H"]), fmt(r["ours_ms"], 3), fmt(g("fla_ms"), 3),
                      fmt(g("fla_over_ours")), fmt(g("fla_over_ours_no_capture")),
                      fmt(g("fi_ms"), 3), fmt(g("fi_over_ours")), fmt(g("fi_ckpt_over_ours")),
                      fmt(g("fi_over_ours_no_capture")), fmt(g("ours_capture_cost")),
                      f"{fmt(g('fla_over_ours_graph'))} / {fmt(g('fi_over_ours_graph'))}")
    console.print(table)
    console.print(f"wrote {path}")


def prefill(
    preset: str = typer.Option("a3b-proxy", "--preset", help="Engine preset (random weights)."),
    lengths: str = typer.Option("4096,8192,16384,32768", "--lengths", help="Prompt lengths."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Model dtype."),
    windows: str = typer.Option("256,512,1024,2048", "--windows", help="Exec windows to try."),
    reps: int = typer.Option(2, "--reps", min=1, help="Timed requests per (window, length)."),
    out: str | None = typer.Option(None, "--out", metavar="FILE",
                                   help=OUT_HELP.format("prefill")),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Engine cold prefill tokens/s and MFU per exec window, replay and snapshot costs."""
    from sbrbench import bench_engine

    check_model_flags(preset=preset, dtype=dtype)
    lens, wins = parse_ints(lengths, "--lengths"), parse_ints(windows, "--windows")
    dest = bench_out(out, "prefill", force)
    path, rows = bench_engine.run_prefill(preset, lens, wins, dtype, reps, dest, log=console.print)
    table = Table(title=Text(f"cold prefill, {preset} {dtype}, measured: median of {reps} "
                             "requests; MFU against the bf16 dense peak"), title_justify="left")
    for col in ("window", "tokens", "ms", "tok/s", "TFLOP/s", "MFU"):
        table.add_column(col, justify="right")
    for r in rows:
        if r["kernel"] == "prefill":
            table.add_row(str(r["window"]), str(r["tokens"]), f"{r['prefill_s'] * 1e3:.0f}",
                          f"{r['tok_s']:.0f}", f"{r['model_tflops']:.0f}", f"{r['mfu']:.1%}")
    console.print(table)
    console.print(f"wrote {path}")


def resume(
    preset: str = typer.Option("a3b-proxy", "--preset", help="Engine preset (random weights)."),
    depth: int = typer.Option(24576, "--depth", min=1,
                              help="Conversation depth before the resumes."),
    new: int = typer.Option(27, "--new", min=1, help="Fresh tokens sent by each resumed turn."),
    reps: int = typer.Option(3, "--reps", min=1, help="Resumed turns."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Model dtype."),
    window: int | None = typer.Option(
        None, "--window", min=64, help="Exec window, a multiple of 64 (default: the engine's)."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu for a smoke run."),
    windows: str = typer.Option(
        "fixed", "--windows",
        help="fixed (every window --window rows) or sized (a window ends after its last "
        "needed row; batch-invariant kernels)."),
    out: str | None = typer.Option(None, "--out", metavar="FILE",
                                   help=OUT_HELP.format("resume")),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Warm-resume TTFT split into window host time, window GPU time and the rest, beside the
    GPU floor of the work (FLOPs at the bf16 rate, bytes at the memory bandwidth)."""
    from sbrbench import bench_engine

    if device not in ("cuda", "cpu"):
        raise UserError(f"--device is cpu or cuda, got {device!r}")
    check_model_flags(preset=preset, dtype=dtype)
    if windows not in ("fixed", "sized"):
        raise UserError(f"--windows is fixed or sized, got {windows!r}")
    dest = bench_out(out, "resume", force, device)
    path, rows = bench_engine.run_resume(preset, depth, new, reps, dtype, window, device, dest,
                                         log=console.print, windows=windows)
    table = Table(title=Text(f"warm resume, {preset} {dtype} at depth {depth}, {windows} "
                             "windows: TTFT measured "
                             "(ms), split into the windows' host and GPU time and the rest; "
                             "floor modelled (FLOPs at the measured matmul rate, bytes at the "
                             "measured copy rate)"), title_justify="left")
    for col in ("turn", "replay+new tok", "TTFT ms", "windows host ms", "windows GPU ms",
                "other ms", "floor ms", "TTFT / floor"):
        table.add_column(col, justify="right")
    for r in rows:
        gpu = r["windows_gpu_ms"]
        table.add_row(str(r["turn"]), f"{r['replay_tokens']}+{r['new_tokens']}",
                      f"{r['ttft_ms']:.1f}", f"{r['windows_host_ms']:.1f}",
                      "-" if gpu is None else f"{gpu:.1f}", f"{r['outside_windows_ms']:.1f}",
                      f"{r['floor_ms_measured']:.3f}", f"{r['ttft_over_floor_measured']:.1f}x")
    console.print(table)
    console.print(f"wrote {path}")


def decode(
    preset: str = typer.Option("a3b-proxy", "--preset", help="Engine preset (random weights)."),
    depth: int = typer.Option(4096, "--depth", min=1, help="Prompt tokens before decoding."),
    tokens: int = typer.Option(128, "--tokens", min=2, help="Output tokens per request."),
    reps: int = typer.Option(3, "--reps", min=1, help="Requests (each a fresh prompt)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Model dtype."),
    device: str = typer.Option("cuda", "--device", help="cuda, or cpu for a smoke run."),
    out: str | None = typer.Option(None, "--out", metavar="FILE",
                                   help=OUT_HELP.format("decode")),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """Batch-1 decode: time per output token (measured) against the step's bandwidth floor
    (modelled: the active weights, the KV and the recurrent state moved once)."""
    from sbrbench import bench_engine

    if device not in ("cuda", "cpu"):
        raise UserError(f"--device is cpu or cuda, got {device!r}")
    check_model_flags(preset=preset, dtype=dtype)
    dest = bench_out(out, "decode", force, device)
    path, rows = bench_engine.run_decode(preset, depth, tokens, reps, dtype, device, dest,
                                         log=console.print)
    table = Table(title=Text(f"batch-1 decode, {preset} {dtype} after {depth} tokens: TPOT "
                             "measured (ms); floor modelled (bytes at the measured copy rate "
                             "and at the datasheet HBM rate); share = floor / TPOT"),
                  title_justify="left")
    for col in ("rep", "tokens", "TPOT ms", "floor ms", "share", "floor ms (datasheet)",
                "share (datasheet)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["rep"]), str(r["output_tokens"]), f"{r['tpot_ms']:.2f}",
                      f"{r['floor_ms_measured']:.3f}", f"{r['roofline_share_measured']:.0%}",
                      f"{r['floor_ms_datasheet']:.3f}", f"{r['roofline_share_datasheet']:.0%}")
    console.print(table)
    console.print(f"wrote {path}")
