"""Terminal and image output: run progress, summary and comparison tables, PNG plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from sbrbench.stats import LATENCY_METRICS, METRICS

# names as vLLM's and SGLang's benchmarks print them; latencies shown in milliseconds
_METRIC_NAMES = {"ttft_s": "TTFT ms", "tpot_s": "TPOT ms", "itl_s": "ITL ms",
                 "e2e_s": "E2EL ms", "replay_tokens": "replay tok", "slo_met": "SLO met"}
_THROUGHPUT_NAMES = {"request_throughput": "requests/s", "output_throughput": "output tok/s",
                     "total_token_throughput": "total tok/s", "goodput": "goodput req/s"}


def _fmt(v: Any, metric: str = "") -> str:
    if v is None:
        return "-"
    if metric in LATENCY_METRICS and isinstance(v, (int, float)):
        ms = 1000.0 * v
        return f"{ms:.2f}" if abs(ms) < 10 else f"{ms:.1f}" if abs(ms) < 1000 else f"{ms:.0f}"
    if isinstance(v, float):
        if metric == "slo_met":
            return f"{100 * v:.1f}%"
        if metric.endswith("_s"):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 10 or v == int(v) else f"{v:.3g}"
    return str(v)


def _ci(v: float | None) -> str:
    if v is None or v == float("inf"):
        return "inf"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.0f}x" if abs(r) >= 100 else f"{r:.2f}x"


class RunProgress:
    """A rich progress bar: phase, request count, depth and last TTFT of the running scenario."""

    def __init__(
        self, console: Console, label: str, total: int | None, enabled: bool = True
    ) -> None:
        self.total = total
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            TextColumn("{task.fields[phase]:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("depth {task.fields[depth]:>6}"),
            TextColumn("ttft {task.fields[ttft]}"),
            TextColumn("[red]{task.fields[errors]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(
            label, total=total, phase="", depth="", ttft="-", errors=""
        )
        self.errors = 0

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def row(self, row: dict[str, Any]) -> None:
        self.errors += bool(row.get("error"))
        done = self.progress.tasks[0].completed + 1
        if self.total is not None and done > self.total:
            self.total = int(done)
            self.progress.update(self.task, total=self.total)
        ttft = row.get("ttft_s")
        self.progress.update(
            self.task,
            advance=1,
            phase=str(row.get("phase", "")),
            depth=str(row.get("depth", "")),
            ttft=f"{ttft:.3f}s" if isinstance(ttft, float) else "-",
            errors=f"{self.errors} err" if self.errors else "",
        )


def summary_table(summary: dict[str, Any], title: str) -> Table:
    """Per phase: n, mean, p50, p90, p99, max of TTFT, TPOT, ITL, E2EL and replay tokens
    (metrics the target does not report are left out; ITL's n counts gaps)."""
    t = Table(title=title, title_justify="left")
    t.add_column("phase")
    t.add_column("metric", no_wrap=True)
    for col in ("n", "mean", "p50", "p90", "p99", "max"):
        t.add_column(col, justify="right")
    t.add_column("err", justify="right")
    for phase, entry in summary.items():
        shown = [m for m in METRICS if entry.get(m)] or [METRICS[0]]
        for k, m in enumerate(shown):
            s = entry.get(m)
            err = str(entry.get("errors", 0)) if k == 0 and entry.get("errors") else ""
            name = _METRIC_NAMES.get(m, m)
            if s is None:
                t.add_row(phase if k == 0 else "", name, "0", "-", "-", "-", "-", "-", err)
                continue
            t.add_row(
                phase if k == 0 else "",
                name,
                str(s["n"]),
                *(_fmt(s[c], m) for c in ("mean", "median", "p90", "p99", "max")),
                err,
            )
    return t


def throughput_table(tp: dict[str, Any]) -> Table:
    """The run's requests, tokens, wall time and rates (goodput under its SLO)."""
    t = Table(title="throughput", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    failed = f", [red]{tp['failed']} failed[/]" if tp.get("failed") else ""
    t.add_row("requests", f"{tp.get('completed', 0)} completed{failed}")
    t.add_row("duration s", _fmt(tp.get("duration_s"), "duration_s"))
    t.add_row("tokens in / out", f"{tp.get('input_tokens', 0)} / {tp.get('output_tokens', 0)}")
    for k, name in _THROUGHPUT_NAMES.items():
        if k == "goodput" and not tp.get("slo"):
            continue
        t.add_row(name, _fmt_rate(tp.get(k)))
    if tp.get("slo"):
        limits = ", ".join(f"{k.removesuffix('_s')} {_fmt(v, 'ttft_s')} ms"
                           for k, v in tp["slo"].items())
        share = tp.get("slo_attainment")
        t.add_row("SLO met", f"{tp.get('slo_met')} ({'-' if share is None else f'{share:.0%}'}"
                  f"; {limits})")
    return t


def _fmt_rate(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def throughput_compare_table(cmp: dict[str, Any]) -> Table:
    """Run-level rates of A and B, ratio A/B, and ci95 / p where repetitions were pooled."""
    t = Table(title="throughput (per run; ci95 needs 2+ pooled runs a side)",
              title_justify="left")
    for col in ("metric", "runs", "A", "B", "A/B", "ci95", "p"):
        t.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for k, c in cmp.items():
        a, b = c["a"] or {}, c["b"] or {}
        ci = c["ci95"]
        t.add_row(
            _THROUGHPUT_NAMES.get(k, k),
            f"{a.get('n', 0)}/{b.get('n', 0)}",
            _fmt_rate(a.get("mean")),
            _fmt_rate(b.get("mean")),
            fmt_ratio(c["ratio"]),
            f"{_ci(ci[0])}-{_ci(ci[1])}" if ci else "-",
            "-" if c["p_value"] is None or not ci else f"{c['p_value']:.2g}",
        )
    return t


def compare_table(cmp: dict[str, Any], label_a: str, label_b: str) -> Table:
    """Per phase and metric: A and B means, ratio A/B, ci95, Mann-Whitney p (80 columns)."""
    t = Table(title=f"A = {label_a}\nB = {label_b}", title_justify="left")
    for col in ("phase", "metric", "n", "mean A", "mean B", "A/B", "ci95", "p"):
        t.add_column(
            col,
            justify="left" if col in ("phase", "metric") else "right",
            no_wrap=True,
            min_width=5 if col == "phase" else None,
        )
    for phase, metrics in cmp.items():
        for k, (m, c) in enumerate(metrics.items()):
            a, b = c["a"] or {}, c["b"] or {}
            ci = c["ci95"]
            t.add_row(
                phase if k == 0 else "",
                _METRIC_NAMES.get(m, m),
                str(a.get("n", 0))
                if a.get("n") == b.get("n")
                else f"{a.get('n', 0)}/{b.get('n', 0)}",
                _fmt(a.get("mean"), m),
                _fmt(b.get("mean"), m),
                fmt_ratio(c["ratio"]),
                f"{_ci(ci[0])}-{_ci(ci[1])}" if ci else "-",
                "-" if c["p_value"] is None else f"{c['p_value']:.2g}",
            )
    return t


def parity_table(par: dict[str, Any]) -> Table:
    t = Table(title="parity", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("requests compared", str(par["requests"]))
    t.add_row("token exact-match", f"{par['token_match_rate'] * 100:.1f}%")
    dig = par["digest_match_rate"]
    t.add_row("logits_sha256 match", "-" if dig is None else f"{dig * 100:.1f}%")
    t.add_row("replay differs on", f"{par['replay_differs']} requests")
    fd = par["first_divergence"]
    t.add_row(
        "first divergence",
        "none" if fd is None else f"request {fd['request']}, token {fd['token']}",
    )
    if par.get("errors"):
        t.add_row("[red]rows with errors", str(par["errors"]))
    return t


def side_by_side_table(
    title: str, a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str
) -> Table:
    """Two flat dicts of numbers next to each other (decay summaries, windows)."""
    t = Table(title=title, title_justify="left")
    t.add_column("key")
    t.add_column(label_a, justify="right")
    t.add_column(label_b, justify="right")
    for k in dict.fromkeys([*a, *b]):
        t.add_row(str(k), _fmt(a.get(k)), _fmt(b.get(k)))
    return t


# ----------------------------------------------------------------------------- plots


def _label(doc: dict[str, Any]) -> str:
    from sbrbench.results import policy_of

    lab = doc.get("label")
    pol = policy_of(doc)
    return f"{pol} ({lab})" if lab and lab != pol else pol


def plot_results(docs: Sequence[dict[str, Any]], out: Path) -> Path:
    """PNG: per-cycle resume TTFT (or per-round TTFT) per file, and TTFT vs depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for doc in docs:
        rows = [
            r
            for r in doc["rows"]
            if not r.get("error") and isinstance(r.get("ttft_s"), (int, float))
        ]
        lab = _label(doc)
        resume = [r for r in rows if r.get("phase") == "resume"]
        if resume:
            ax1.plot(
                [r.get("cycle") for r in resume],
                [r["ttft_s"] for r in resume],
                marker="o",
                label=lab,
            )
            ax1.set_xlabel("cycle")
            ax1.set_title("resume TTFT per cycle")
        else:
            by_round: dict[Any, list[float]] = {}
            for r in rows:
                by_round.setdefault(r.get("round", r.get("i")), []).append(r["ttft_s"])
            xs = sorted(k for k in by_round if k is not None)
            ax1.plot(xs, [sum(by_round[x]) / len(by_round[x]) for x in xs], marker="o", label=lab)
            ax1.set_xlabel("round")
            ax1.set_title("mean TTFT per round")
        ax2.scatter([r.get("depth", 0) for r in rows], [r["ttft_s"] for r in rows], s=10, label=lab)
    ax1.set_ylabel("TTFT (s)")
    ax2.set_xlabel("depth (prompt tokens)")
    ax2.set_ylabel("TTFT (s)")
    ax2.set_title("TTFT vs depth")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    scen = {d.get("scenario") for d in docs}
    fig.suptitle(", ".join(sorted(str(s) for s in scen)))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
