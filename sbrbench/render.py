"""Terminal and image output: run progress, summary and comparison tables, PNG plots.

Text that carries data (names, paths, error messages) is never read as Rich markup: the CLI's
consoles print text as given (`make_console`), tables get `Text` cells, and styles are passed
as styles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
from rich.text import Text

from sbrbench.stats import LATENCY_METRICS, METRICS

# names as vLLM's and SGLang's benchmarks print them; latencies shown in milliseconds
_METRIC_NAMES = {"ttft_s": "TTFT ms", "tpot_s": "TPOT ms", "itl_s": "ITL ms",
                 "e2e_s": "E2EL ms", "replay_tokens": "replay tok", "slo_met": "SLO met"}
_THROUGHPUT_NAMES = {"request_throughput": "requests/s", "output_throughput": "output tok/s",
                     "total_token_throughput": "total tok/s", "goodput": "goodput req/s"}


# What each phase of a scenario's rows is (scenario -> phase -> text); `phase_notes` falls back
# on the phase name alone for scenarios not listed.
PHASES: dict[str, dict[str, str]] = {
    "deep-resume": {
        "build": "the conversation's turns while it grows to its depth",
        "pressure": "one-shot requests that fill the snapshot pool while it idles",
        "resume": "its turn after each idle period (where policies differ)",
    },
    "round-robin": {"round": "each conversation's next turn, the conversations in turn"},
    "parity": {
        "prompt": "the conversations' turns",
        "pressure": "one-shot requests between rounds of turns",
    },
    "trace": {"prompt": "the trace's requests, in order"},
}

METRIC_NOTES = {
    "ttft_s": "TTFT: time to first token",
    "tpot_s": "TPOT: per output token after the first",
    "itl_s": "ITL: between two tokens (n counts gaps)",
    "e2e_s": "E2EL: end to end",
    "replay_tokens": "replay tok: tokens recomputed to rebuild the recurrent state, from the "
    "deepest surviving snapshot to the cached prefix (0: cold, or nothing to replay)",
    "slo_met": "SLO met: share of requests within every SLO",
}

BASIS_NOTES = {
    "measured": "measured (wall clock of this client)",
    "modelled": "modelled (the simulator's cost model; no model ran)",
}


def make_console(*, stderr: bool = False, width: int | None = None) -> Console:
    """A console that prints text as given: no markup, no emoji codes (styles are passed as
    `style=` or in `Text`)."""
    return Console(stderr=stderr, width=width, markup=False, emoji=False)


def styled(text: str, style: str) -> Text:
    """`text` (data, printed as is) in `style`."""
    return Text(text, style=style)


def phase_notes(scenario: str | None, phases: Iterable[str]) -> str:
    """'build: ...; pressure: ...' for the phases shown."""
    known = PHASES.get(scenario or "", {})
    fallback = {k: v for table in PHASES.values() for k, v in table.items()}
    parts = [f"{p}: {known.get(p) or fallback.get(p, p)}" for p in phases]
    return "phases: " + "; ".join(parts) if parts else ""


def explain(scenario: str | None, phases: Iterable[str], metrics: Iterable[str],
            basis: str) -> Text:
    """The caption under a table of per-request figures: what the phases and metrics are and
    whether the latencies were measured or modelled."""
    shown = [m for m in dict.fromkeys(metrics) if m in METRIC_NOTES]
    lat = [METRIC_NOTES[m] for m in shown if m in LATENCY_METRICS]
    lines = [phase_notes(scenario, phases)]
    if lat:
        lines.append("; ".join(lat) + f"; in ms, {BASIS_NOTES.get(basis, basis)}")
    lines += [METRIC_NOTES[m] for m in shown if m not in LATENCY_METRICS]
    return Text("\n".join(x for x in lines if x), style="dim")


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
            TextColumn("{task.description}", style="bold", markup=False),
            TextColumn("{task.fields[phase]:<8}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("depth {task.fields[depth]:>6}", markup=False),
            TextColumn("ttft {task.fields[ttft]}", markup=False),
            TextColumn("{task.fields[errors]}", style="red", markup=False),
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


def _row(*cells: Any) -> list[Text]:
    return [c if isinstance(c, Text) else Text(str(c)) for c in cells]


def summary_table(summary: dict[str, Any], title: str, *, scenario: str | None = None,
                  basis: str = "measured", explained: bool = True) -> Table:
    """Per phase: n, mean, p50, p90, p99, max of TTFT, TPOT, ITL, E2EL and replay tokens
    (metrics the target does not report are left out; ITL's n counts gaps); `explained`, a
    caption saying what the phases and metrics are and whether the latencies were measured
    (the title says it in short either way)."""
    t = Table(title=Text(title), title_justify="left", caption_justify="left")
    t.add_column("phase")
    t.add_column("metric", no_wrap=True)
    for col in ("n", "mean", "p50", "p90", "p99", "max"):
        t.add_column(col, justify="right")
    t.add_column("err", justify="right")
    used: list[str] = []
    for phase, entry in summary.items():
        shown = [m for m in METRICS if entry.get(m)] or [METRICS[0]]
        used += shown
        for k, m in enumerate(shown):
            s = entry.get(m)
            err = str(entry.get("errors", 0)) if k == 0 and entry.get("errors") else ""
            name = _METRIC_NAMES.get(m, m)
            if s is None:
                t.add_row(*_row(phase if k == 0 else "", name, "0", "-", "-", "-", "-", "-", err))
                continue
            t.add_row(*_row(
                phase if k == 0 else "",
                name,
                str(s["n"]),
                *(_fmt(s[c], m) for c in ("mean", "median", "p90", "p99", "max")),
                err,
            ))
    if explained:
        t.caption = explain(scenario, summary, used, basis)
    return t


def throughput_table(tp: dict[str, Any], basis: str = "measured") -> Table:
    """The run's requests, tokens, wall time and rates (goodput under its SLO)."""
    clock = "measured, wall clock" if basis == "measured" else \
        "the simulator's wall clock, not modelled"
    t = Table(title=Text(f"throughput ({clock})"), title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    done = Text(f"{tp.get('completed', 0)} completed")
    if tp.get("failed"):
        done.append(", ")
        done.append(f"{tp['failed']} failed", style="red")
    t.add_row(Text("requests"), done)
    t.add_row(*_row("duration s", _fmt(tp.get("duration_s"), "duration_s")))
    t.add_row(*_row("tokens in / out",
                    f"{tp.get('input_tokens', 0)} / {tp.get('output_tokens', 0)}"))
    for k, name in _THROUGHPUT_NAMES.items():
        if k == "goodput" and not tp.get("slo"):
            continue
        t.add_row(*_row(name, _fmt_rate(tp.get(k))))
    if tp.get("slo"):
        limits = ", ".join(f"{k.removesuffix('_s')} {_fmt(v, 'ttft_s')} ms"
                           for k, v in tp["slo"].items())
        share = tp.get("slo_attainment")
        t.add_row(*_row("SLO met", f"{tp.get('slo_met')} "
                        f"({'-' if share is None else f'{share:.0%}'}; {limits})"))
    return t


def _fmt_rate(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


RATIO_NOTE = ("A/B: mean of A over mean of B (above 1: A is slower, or replays more); "
              "ci95: bootstrap 95% interval of A/B; p: two-sided Mann-Whitney U test")


def throughput_compare_table(cmp: dict[str, Any]) -> Table:
    """Run-level rates of A and B, ratio A/B, and ci95 / p where repetitions were pooled."""
    t = Table(title=Text("throughput per run (wall clock), A vs B"), title_justify="left",
              caption_justify="left",
              caption=Text("A/B above 1: A served more per second; ci95 and p need 2+ "
                           "pooled runs a side", style="dim"))
    for col in ("metric", "runs", "A", "B", "A/B", "ci95", "p"):
        t.add_column(col, justify="left" if col == "metric" else "right", no_wrap=True)
    for k, c in cmp.items():
        a, b = c["a"] or {}, c["b"] or {}
        ci = c["ci95"]
        t.add_row(*_row(
            _THROUGHPUT_NAMES.get(k, k),
            f"{a.get('n', 0)}/{b.get('n', 0)}",
            _fmt_rate(a.get("mean")),
            _fmt_rate(b.get("mean")),
            fmt_ratio(c["ratio"]),
            f"{_ci(ci[0])}-{_ci(ci[1])}" if ci else "-",
            "-" if c["p_value"] is None or not ci else f"{c['p_value']:.2g}",
        ))
    return t


def compare_table(cmp: dict[str, Any], label_a: str, label_b: str, *,
                  scenario: str | None = None, basis: tuple[str, str] = ("measured", "measured"),
                  explained: bool = True) -> Table:
    """Per phase and metric: A and B means, ratio A/B, ci95, Mann-Whitney p (80 columns), with
    a caption saying how to read the ratio and (`explained`) what the phases and metrics are
    and whether they were measured."""
    same = basis[0] if basis[0] == basis[1] else f"A {basis[0]}, B {basis[1]}"
    t = Table(title=Text(f"A = {label_a}\nB = {label_b}\nper phase, {same}: mean of A and of "
                         "B, their ratio A/B"), title_justify="left", caption_justify="left")
    for col in ("phase", "metric", "n", "mean A", "mean B", "A/B", "ci95", "p"):
        t.add_column(
            col,
            justify="left" if col in ("phase", "metric") else "right",
            no_wrap=True,
            min_width=5 if col == "phase" else None,
        )
    used: list[str] = []
    for phase, metrics in cmp.items():
        used += list(metrics)
        for k, (m, c) in enumerate(metrics.items()):
            a, b = c["a"] or {}, c["b"] or {}
            ci = c["ci95"]
            t.add_row(*_row(
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
            ))
    caption = explain(scenario, cmp, used, same) if explained else Text(style="dim")
    caption.append_text(Text(("\n" if explained else "") + RATIO_NOTE, style="dim"))
    t.caption = caption
    return t


def parity_table(par: dict[str, Any]) -> Table:
    """Request by request, A against B: generated tokens and logits digests equal or not."""
    t = Table(title=Text("parity: A vs B, request by request"), title_justify="left",
              show_header=False, caption_justify="left",
              caption=Text("exact replay means every request matches bitwise whatever the "
                           "policy restored from; 'replay differs' counts requests where the "
                           "two policies restored from different snapshots", style="dim"))
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row(*_row("requests compared", str(par["requests"])))
    t.add_row(*_row("token exact-match", f"{par['token_match_rate'] * 100:.1f}%"))
    dig = par["digest_match_rate"]
    t.add_row(*_row("logits_sha256 match", "-" if dig is None else f"{dig * 100:.1f}%"))
    t.add_row(*_row("replay differs on", f"{par['replay_differs']} requests"))
    fd = par["first_divergence"]
    t.add_row(*_row(
        "first divergence",
        "none" if fd is None else f"request {fd['request']}, token {fd['token']}",
    ))
    if par.get("errors"):
        t.add_row(styled("rows with errors", "red"), Text(str(par["errors"])))
    return t


def side_by_side_table(
    title: str, a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str
) -> Table:
    """Two flat dicts of numbers next to each other (decay summaries, windows)."""
    t = Table(title=Text(title), title_justify="left")
    t.add_column("key")
    t.add_column(Text(label_a), justify="right")
    t.add_column(Text(label_b), justify="right")
    for k in dict.fromkeys([*a, *b]):
        t.add_row(*_row(str(k), _fmt(a.get(k)), _fmt(b.get(k))))
    return t


# ----------------------------------------------------------------------------- plots


def _label(doc: dict[str, Any]) -> str:
    from sbrbench.results import policy_of

    lab = doc.get("label")
    pol = policy_of(doc)
    return f"{pol} ({lab})" if lab and lab != pol else pol


def _basis(docs: Sequence[dict[str, Any]]) -> str:
    from sbrbench.results import latency_basis

    kinds = sorted({latency_basis(d) for d in docs})
    return " / ".join(kinds)


def _save(fig: Any, out: Path) -> Path:
    """Write the figure atomically (a PNG is never torn) and close it."""
    import matplotlib.pyplot as plt

    from sbrbench.results import replacing

    try:
        with replacing(out) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return out


def plot_results(docs: Sequence[dict[str, Any]], out: Path) -> Path:
    """PNG: per-cycle resume TTFT (or per-round TTFT) per file, and TTFT vs depth; parity
    files: whether each request matched the first file, and what each replayed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(docs) > 1 and all(d.get("scenario") == "parity" for d in docs):
        return plot_parity(docs, out)
    basis = _basis(docs)
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
            ax1.set_xlabel("idle/resume cycle")
            ax1.set_title("TTFT of the turn after each idle period (resume phase)")
        else:
            by_round: dict[Any, list[float]] = {}
            for r in rows:
                by_round.setdefault(r.get("round", r.get("i")), []).append(r["ttft_s"])
            xs = sorted(k for k in by_round if k is not None)
            ax1.plot(xs, [sum(by_round[x]) / len(by_round[x]) for x in xs], marker="o", label=lab)
            ax1.set_xlabel("round (request index where rows have no round)")
            ax1.set_title("mean TTFT per round")
        ax2.scatter([r.get("depth", 0) for r in rows], [r["ttft_s"] for r in rows], s=10, label=lab)
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # cycles and rounds are counts
    ax1.set_ylabel(f"TTFT (s, {basis})")
    ax2.set_xlabel("depth (prompt tokens of the request)")
    ax2.set_ylabel(f"TTFT (s, {basis})")
    ax2.set_title("TTFT vs depth, every request")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    scen = {d.get("scenario") for d in docs}
    fig.suptitle(", ".join(sorted(str(s) for s in scen)))
    fig.tight_layout()
    return _save(fig, out)


def plot_parity(docs: Sequence[dict[str, Any]], out: Path) -> Path:
    """PNG of parity files against the first: per request, a green dot where tokens and logits
    digest match it, a red cross where they diverge (annotated with the first differing token),
    and below, the tokens each policy replayed for that request (where they differ, the
    policies restored from different snapshots and still had to agree)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sbrbench.cli_compare import parity_rows

    base = docs[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 2.2 + 0.5 * len(docs) + 3), sharex=True,
                                   gridspec_kw={"height_ratios": [max(1, len(docs) - 1), 2]})
    names = []
    for y, doc in enumerate(docs[1:]):
        names.append(f"{_label(doc)} vs {_label(base)}")
        cmp = parity_rows(base["rows"], doc["rows"])
        ok = [c.request for c in cmp if c.match]
        bad = [c for c in cmp if c.match is False]
        ax1.scatter(ok, [y] * len(ok), marker="o", color="tab:green", s=25,
                    label="match (tokens and logits digest)" if y == 0 else None)
        ax1.scatter([c.request for c in bad], [y] * len(bad), marker="x", color="tab:red", s=40,
                    label="diverges" if y == 0 and bad else None)
        for c in bad:
            if c.first_token is not None:
                ax1.annotate(f"tok {c.first_token}", (c.request, y), fontsize=7,
                             xytext=(0, 6), textcoords="offset points", ha="center")
    ax1.set_yticks(range(len(names)), names)
    ax1.set_ylim(-0.6, len(names) - 0.4)
    ax1.set_title("parity per request against the first file")
    ax1.legend(fontsize=8, loc="upper right")
    for doc in docs:
        rows = sorted((r for r in doc["rows"] if isinstance(r.get("replay_tokens"), int)),
                      key=lambda r: r.get("i", 0))
        ax2.plot([r.get("i") for r in rows], [r["replay_tokens"] for r in rows], marker=".",
                 label=_label(doc))
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("request index")
    ax2.set_ylabel("replay (tokens recomputed)")
    ax2.set_title("what each policy replayed for the same request")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
