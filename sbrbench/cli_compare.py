"""`sbrbench compare`, `report` and `plot`: statistics across result files, an index, images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import typer

from engine.errors import UserError
from sbrbench.render import make_console
from sbrbench.results import (
    COMPARE_SCHEMA,
    FORCE_HELP,
    OUTPUT_DIR,
    file_kind,
    latency_basis,
    load_json,
    load_result,
    now_iso,
    output_path,
    policy_of,
    timestamp,
    write_json_atomic,
    write_text_atomic,
)
from sbrbench.stats import (
    METRICS,
    THROUGHPUT_KEYS,
    compare_samples,
    comparison_dict,
    metric_values,
    parse_slo,
    run_throughput,
)

console = make_console()


# ----------------------------------------------------------------------------- result files


def phases_of(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("phase", "?")) for r in rows))


def compare_result_docs(
    a: dict[str, Any], b: dict[str, Any], *, seed: int = 0, n_resamples: int = 10_000,
    slo: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per phase (present in both) and metric: summaries, ratio A/B, ci95 and p-value; with
    `slo`, also the share of requests that met it (`slo_met`, 1 or 0 per request)."""
    phases: dict[str, Any] = {}
    b_phases = set(phases_of(b["rows"]))
    metrics = (*METRICS, "slo_met") if slo else METRICS
    for phase in phases_of(a["rows"]):
        if phase not in b_phases:
            continue
        entry = {}
        for m in metrics:
            xa = metric_values(a["rows"], phase, m, slo)
            xb = metric_values(b["rows"], phase, m, slo)
            if xa.size == 0 and xb.size == 0:
                continue
            entry[m] = comparison_dict(compare_samples(xa, xb, seed=seed, n_resamples=n_resamples))
        if entry:
            phases[phase] = entry
    return phases


def _first_diff(x: list[Any], y: list[Any]) -> int | None:
    for k, (u, v) in enumerate(zip(x, y, strict=False)):
        if u != v:
            return k
    return None if len(x) == len(y) else min(len(x), len(y))


class ParityRow(NamedTuple):
    """One request of a parity comparison. match: tokens equal and the logits digests too
    (where both files have them); None when either row failed. first_token: the first
    generated token that differs (None when the tokens match)."""

    request: Any
    match: bool | None
    tokens_match: bool
    first_token: int | None
    digest_match: bool | None
    replay_a: Any
    replay_b: Any


def parity_rows(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> list[ParityRow]:
    """The requests both files have (by `i`), in order, compared token by token."""
    ai = {r.get("i", k): r for k, r in enumerate(a_rows)}
    bi = {r.get("i", k): r for k, r in enumerate(b_rows)}
    common = sorted(set(ai) & set(bi), key=lambda k: (isinstance(k, str), k))
    out = []
    for k in common:
        ra, rb = ai[k], bi[k]
        pos = _first_diff(list(ra.get("tokens") or []), list(rb.get("tokens") or []))
        da, db = ra.get("logits_sha256"), rb.get("logits_sha256")
        dig = None if da is None or db is None else da == db
        failed = bool(ra.get("error") or rb.get("error"))
        match = None if failed else (pos is None and dig is not False)
        out.append(ParityRow(k, match, pos is None, pos, dig, ra.get("replay_tokens"),
                             rb.get("replay_tokens")))
    return out


def parity_report(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exact-match rates of generated tokens and logits digests, request by request (by `i`)."""
    rows = parity_rows(a_rows, b_rows)
    ok = [r for r in rows if r.match is not None]
    first = next(({"request": r.request, "token": r.first_token} for r in ok
                  if not r.tokens_match), None)
    digests = [r for r in ok if r.digest_match is not None]
    a_ids = {r.get("i", k) for k, r in enumerate(a_rows)}
    b_ids = {r.get("i", k) for k, r in enumerate(b_rows)}
    return {
        "requests": len(rows),
        "only_in_a": len(a_ids - b_ids),
        "only_in_b": len(b_ids - a_ids),
        "errors": len(rows) - len(ok),
        "token_match_rate": sum(r.tokens_match for r in ok) / len(ok) if ok else 0.0,
        "digest_match_rate": (sum(bool(r.digest_match) for r in digests) / len(digests)
                              if digests else None),
        "first_divergence": first,
        "first_digest_divergence": next((r.request for r in digests if not r.digest_match),
                                        None),
        "replay_differs": sum(r.replay_a != r.replay_b for r in ok),
    }


def runs_of(doc: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The rows of each run a (possibly pooled) result holds."""
    runs = doc.get("runs")
    return runs if isinstance(runs, list) else [doc["rows"]]


def compare_throughput(a: dict[str, Any], b: dict[str, Any], *, seed: int = 0,
                       slo: dict[str, float] | None = None) -> dict[str, Any]:
    """Run-level rates (request, output and total token throughput, goodput under `slo`) of A
    vs B: one value per run, so ratio of means always, and ci95 and p once each side pools two
    or more repetitions."""
    ta = [run_throughput(rows, slo) for rows in runs_of(a)]
    tb = [run_throughput(rows, slo) for rows in runs_of(b)]
    out: dict[str, Any] = {}
    for k in THROUGHPUT_KEYS:
        if k == "goodput" and not slo:
            continue
        c = compare_samples([t[k] for t in ta], [t[k] for t in tb], seed=seed)
        if c.a is not None or c.b is not None:
            out[k] = comparison_dict(c)
    return out


def slo_for(a: dict[str, Any], b: dict[str, Any], given: dict[str, float] | None
            ) -> tuple[dict[str, float] | None, str | None]:
    """The SLO to judge both files by: the one given, else the one both runs were made with;
    with a note when they differ."""
    if given:
        return given, None
    sa, sb = a.get("slo"), b.get("slo")
    if sa and sa == sb:
        return dict(sa), None
    if sa or sb:
        return None, "the files were run with different SLOs; pass --slo to judge both by one"
    return None, None


def compare_results(a: dict[str, Any], b: dict[str, Any], *, seed: int = 0,
                    slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole comparison of two result files (same scenario), as JSON-ready dict."""
    if a["scenario"] != b["scenario"]:
        raise UserError(f"cannot compare a {a['scenario']} result with a {b['scenario']} result")
    slo, note = slo_for(a, b, slo)
    out: dict[str, Any] = {
        "kind": "result",
        "scenario": a["scenario"],
        "latency": {"a": latency_basis(a), "b": latency_basis(b)},
        "slo": slo,
        "slo_note": note,
        "phases": compare_result_docs(a, b, seed=seed, slo=slo),
        "throughput": compare_throughput(a, b, seed=seed, slo=slo),
        "parity": None,
    }
    if a["scenario"] == "parity":
        out["parity"] = parity_report(a["rows"], b["rows"])
    return out


# ----------------------------------------------------------------------------- decay files


def _numbers(d: Any) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_decay(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Decay summaries and window fidelity (per tau) of two `sbrbench.decay/v1` files."""
    for name, doc in (("A", a), ("B", b)):
        if not isinstance(doc.get("summary"), dict):
            raise UserError(f"decay file {name} has no 'summary' object")
    sa, sb = _numbers(a["summary"]), _numbers(b["summary"])
    summary = {
        k: {
            "a": sa.get(k),
            "b": sb.get(k),
            "ratio": (sa[k] / sb[k]) if k in sa and k in sb and sb[k] else None,
        }
        for k in dict.fromkeys([*sa, *sb])
    }
    wa, wb = a.get("window") or {}, b.get("window") or {}
    window = {
        str(t): {"a": _numbers(wa.get(t)), "b": _numbers(wb.get(t))}
        for t in dict.fromkeys([*wa, *wb])
    }
    return {
        "kind": "decay",
        "summary": summary,
        "window": window,
        "heads": {"a": len(a.get("heads") or []), "b": len(b.get("heads") or [])},
    }


# ----------------------------------------------------------------------------- printing


def _describe(doc: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    return {
        "path": ",".join(str(p) for p in paths),
        "files": len(paths),
        "label": doc.get("label"),
        "policy": policy_of(doc),
        "partial": bool(doc.get("partial")),
        "failed": doc.get("failed"),
    }


def print_comparison(cmp: dict[str, Any], label_a: str, label_b: str, *,
                     explained: bool = True) -> None:
    """The comparison's tables; `explained`: with the captions that say what phases and
    metrics are (a run that printed them above passes False)."""
    from sbrbench.render import (
        compare_table,
        parity_table,
        side_by_side_table,
        throughput_compare_table,
    )

    if cmp["kind"] == "decay":
        console.print(
            side_by_side_table(
                "decay summary, A vs B (horizons in tokens; shares of heads)",
                {k: v["a"] for k, v in cmp["summary"].items()},
                {k: v["b"] for k, v in cmp["summary"].items()},
                label_a,
                label_b,
            )
        )
        for tau, v in cmp["window"].items():
            console.print(side_by_side_table(
                f"window tau={tau}: cos(state rebuilt from the last {tau} tokens, full state)",
                v["a"], v["b"], label_a, label_b))
        return
    if cmp["phases"]:
        lat = cmp.get("latency") or {}
        console.print(compare_table(cmp["phases"], label_a, label_b, scenario=cmp.get("scenario"),
                                    basis=(lat.get("a", "measured"), lat.get("b", "measured")),
                                    explained=explained))
    else:
        console.print("no phase with data in both files", style="yellow")
    if cmp.get("throughput"):
        console.print(throughput_compare_table(cmp["throughput"]))
    if cmp.get("slo_note"):
        console.print(f"note: {cmp['slo_note']}", style="yellow")
    if cmp.get("parity"):
        console.print(parity_table(cmp["parity"]))


def pool_results(paths: list[Path]) -> dict[str, Any]:
    """Repetitions of one run (same scenario and policy) as one result: rows concatenated, so
    `compare` gives the pooled ratio and its interval. Parity files compare request by request
    and are not pooled."""
    docs = [load_result(p) for p in paths]
    first = docs[0]
    for p, d in zip(paths[1:], docs[1:], strict=True):
        if d["scenario"] != first["scenario"] or policy_of(d) != policy_of(first):
            raise UserError(f"cannot pool {p} ({d['scenario']}, {policy_of(d)}) with {paths[0]} "
                            f"({first['scenario']}, {policy_of(first)}): repetitions only")
    if first["scenario"] == "parity":
        raise UserError("parity results compare request by request: one file per side")
    return {**first, "rows": [r for d in docs for r in d["rows"]],
            "runs": [d["rows"] for d in docs],
            "partial": any(d.get("partial") for d in docs),
            "failed": sum(int(d.get("failed") or 0) for d in docs)}


def _side(spec: str | Path) -> tuple[list[Path], dict[str, Any] | None]:
    """A compare argument: one file, or repetitions joined by commas (pooled)."""
    paths = [Path(p) for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise UserError(f"no file in {str(spec)!r}")
    return paths, (pool_results(paths) if len(paths) > 1 else None)


def compare_files(
    spec_a: str | Path, spec_b: str | Path, json_out: str | Path | None = None, seed: int = 0,
    slo: dict[str, float] | None = None, force: bool = False,
) -> dict[str, Any]:
    """Load, check, compare, print; write the comparison JSON when asked (its path checked
    first). Each side is one file or several repetitions joined by commas (results only; rows
    pooled)."""
    dest = (output_path(json_out, OUTPUT_DIR / "compare.json", force=force, flag="--json")
            if json_out is not None else None)
    paths_a, pooled_a = _side(spec_a)
    paths_b, pooled_b = _side(spec_b)
    path_a, path_b = paths_a[0], paths_b[0]
    da = pooled_a if pooled_a is not None else load_json(path_a)
    db = pooled_b if pooled_b is not None else load_json(path_b)
    ka, kb = file_kind(da), file_kind(db)
    if ka != kb:
        raise UserError(f"cannot compare a {ka} file ({path_a}) with a {kb} file ({path_b})")
    if ka == "result":
        da = pooled_a if pooled_a is not None else load_result(path_a)
        db = pooled_b if pooled_b is not None else load_result(path_b)
        if not da["rows"] or not db["rows"]:
            empty = path_a if not da["rows"] else path_b
            raise UserError(f"{empty}: result has no rows")
        cmp = compare_results(da, db, seed=seed, slo=slo)
    elif ka == "decay":
        cmp = compare_decay(da, db)
    else:
        raise UserError(
            f"{path_a}: cannot compare files of kind {ka!r} (result and decay files only)"
        )
    doc = {
        "schema": COMPARE_SCHEMA,
        "created": now_iso(),
        **cmp,
        "a": _describe(da, paths_a),
        "b": _describe(db, paths_b),
    }
    for side, d in (("a", da), ("b", db)):
        if doc[side]["partial"]:
            why = d.get("stopped") or (f"{d['failed']} failed requests" if d.get("failed")
                                       else "unfinished run")
            console.print(f"note: {doc[side]['path']} is partial ({why})", style="yellow")
    def name(paths: list[Path]) -> str:
        return paths[0].name if len(paths) == 1 else f"{paths[0].name} +{len(paths) - 1} pooled"

    print_comparison(
        cmp, f"{doc['a']['policy']} ({name(paths_a)})", f"{doc['b']['policy']} ({name(paths_b)})"
    )
    if dest is not None:
        write_json_atomic(dest, doc)
        console.print(f"comparison written to {dest}")
    return doc


# ----------------------------------------------------------------------------- report


def _fnum(v: Any, unit: str = "", digits: int = 3) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "-"
    return f"{v:.{digits}g}{unit}" if isinstance(v, float) else f"{v}{unit}"


def headline(doc: dict[str, Any]) -> str:
    """The numbers a reader wants first from one file."""
    kind = file_kind(doc)
    if kind == "result":
        summ = doc.get("summary") or {}
        for phase in ("resume", "round", "prompt", "build"):
            s = summ.get(phase)
            if not isinstance(s, dict):
                continue
            t, rp = s.get("ttft_s") or {}, s.get("replay_tokens") or {}
            parts = [
                f"{phase}: TTFT mean {_fnum(t.get('mean'), ' s')}",
                f"p90 {_fnum(t.get('p90'), ' s')}",
            ]
            if rp:
                parts.append(f"replay mean {_fnum(rp.get('mean'), ' tok', 4)}")
            parts.append(f"n={s.get('rows', t.get('n', 0))}")
            if s.get("errors"):
                parts.append(f"{s['errors']} errors")
            return ", ".join(parts)
        return f"{len(doc.get('rows') or [])} rows"
    if kind == "decay":
        s = doc.get("summary") or {}
        return (
            f"median horizon {_fnum(s.get('median_horizon_tokens'), ' tok', 4)}, "
            f"p90 {_fnum(s.get('p90_horizon_tokens'), ' tok', 4)}, "
            f"share > 8192: {_fnum(s.get('share_over_8192'))}"
        )
    if doc.get("bench") in ("kernels", "prefill"):
        return _bench_headline(doc)
    summ = doc.get("summary")
    pols = summ.get("policies") if isinstance(summ, dict) else None
    if isinstance(pols, dict) and pols:  # sim: replay per policy, relative to Belady if known
        parts = ["replay tokens (modelled) per policy as a multiple of classic Belady's:"]
        for name, p in list(pols.items())[:6]:
            p = p if isinstance(p, dict) else {}
            vb = p.get("replay_vs_belady")
            parts.append(
                f"{name} {_fnum(vb)}x"
                if isinstance(vb, (int, float))
                else f"{name} replay {_fnum(p.get('replay_tokens'), ' tok', 4)}"
            )
        return parts[0] + " " + ", ".join(parts[1:])
    s = _numbers(summ)
    return ", ".join(f"{k} {_fnum(v)}" for k, v in list(s.items())[:4]) or "-"


def _bench_headline(doc: dict[str, Any]) -> str:
    """bench kernels: fla / ours per T (grouped q/k, every grid state captured); bench prefill:
    cold-prefill MFU per (window, tokens). Prefixed by the GDN configuration and the attention
    implementation when recorded."""
    env = doc.get("env")
    cfg = env.get("gdn_config") if isinstance(env, dict) else None
    attn = env.get("attention") if isinstance(env, dict) and doc.get("bench") == "prefill" else None
    tags = ([f"gdn {cfg}"] if cfg else []) + ([f"attention {attn}"] if attn else [])
    pre = ", ".join(tags) + ": " if tags else ""
    if doc.get("bench") == "kernels":
        sp = [r for r in doc.get("speedups") or [] if isinstance(r, dict) and r.get("H") == 16]
        if not sp:
            return pre + "-"
        return pre + "fla/ours " + ", ".join(
            f"T={r.get('T')} {_fnum(r.get('fla_over_ours'))}" for r in sp)
    rows = [r for r in doc.get("rows") or [] if isinstance(r, dict)
            and r.get("kernel") == "prefill" and isinstance(r.get("mfu"), (int, float))]
    if not rows:
        return pre + "-"
    return pre + "MFU " + ", ".join(
        f"E={r.get('window')} L={r.get('tokens')} {100 * r['mfu']:.1f}%" for r in rows[:4])


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


REPORT_TITLE = "# Results index"
REPORT_STAMP = "Generated by `sbrbench report`"


def is_report_index(path: Path) -> bool:
    """Whether `path` is an index `sbrbench report` wrote (its title and stamp open it), which
    report may refresh; any other file is never replaced without --force."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(len(REPORT_TITLE) + len(REPORT_STAMP) + 8)
    except OSError:
        return False
    return head.startswith(f"{REPORT_TITLE}\n\n{REPORT_STAMP}")


def build_report(root: Path) -> tuple[str, int, list[str]]:
    """Markdown index of every sbrbench JSON under `root`; returns (text, files, skipped)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    lines = [
        REPORT_TITLE,
        "",
        f"{REPORT_STAMP} on {now_iso()}. One line per sbrbench JSON file under this directory; "
        "TTFT figures are measured unless the target is `sim` (modelled).",
        "",
        "| file | kind | scenario | target | policy | preset | GPU | headline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    count, skipped = 0, []
    for path in sorted(root.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            doc = load_json(path)
        except UserError:
            skipped.append(str(path.relative_to(root)))
            continue
        kind = file_kind(doc)
        if kind == "unknown":
            skipped.append(str(path.relative_to(root)))
            continue
        eng: dict[str, Any] = doc["engine"] if isinstance(doc.get("engine"), dict) else {}
        env: dict[str, Any] = doc["env"] if isinstance(doc.get("env"), dict) else {}
        tgt: dict[str, Any] = doc["target"] if isinstance(doc.get("target"), dict) else {}
        rel = path.relative_to(root).as_posix()
        scen = doc.get("scenario") or doc.get("trace") or "-"
        partial = " (partial)" if doc.get("partial") else ""
        lines.append(
            "| "
            + " | ".join(
                _md(x)
                for x in (
                    f"[{rel}]({rel}){partial}",
                    kind,
                    scen,
                    tgt.get("kind", "-"),
                    policy_of(doc) if kind == "result" else eng.get("policy", "-"),
                    eng.get("preset") or doc.get("preset") or "-",
                    env.get("gpu") or ("cpu" if env else "-"),
                    headline(doc),
                )
            )
            + " |"
        )
        count += 1
    if skipped:
        lines += ["", f"Not indexed (not sbrbench JSON or unreadable): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n", count, skipped


# ----------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        a: str = typer.Argument(..., help="result (or decay) JSON A; repetitions of one run "
                                "joined by commas are pooled (a1.json,a2.json)"),
        b: str = typer.Argument(..., help="result (or decay) JSON B (likewise)"),
        json_out: str | None = typer.Option(
            None, "--json", metavar="FILE",
            help="also write the comparison JSON to FILE (an existing FILE is kept unless "
            "--force)"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
        seed: int = typer.Option(0, min=0, help="bootstrap seed"),
        slo: str | None = typer.Option(
            None, help="judge goodput by these SLOs (default: the runs' own, when they agree), "
            "e.g. ttft=500ms,tpot=50ms"),
    ) -> None:
        """Compare two result files (or pooled repetitions) phase by phase: TTFT, TPOT, ITL,
        E2EL, replay tokens, as A/B = mean of A over mean of B (above 1: A is slower or replays
        more), with a bootstrap ci95 of that ratio and a Mann-Whitney p; throughput and goodput;
        for parity files, whether every request matched bitwise."""
        compare_files(a, b, json_out, seed, parse_slo(slo) if slo else None, force)

    @app.command("report")
    def report_cmd(
        root: Path = typer.Argument(
            OUTPUT_DIR, help="directory of result files (searched recursively)"),
        out: str | None = typer.Option(
            None, metavar="FILE",
            help="markdown index to write (default: ROOT/README.md). A file report wrote itself "
            "is refreshed; any other existing file is kept unless --force"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """Write a markdown index of every result, bench, decay and sim JSON under ROOT."""
        if not root.is_dir():
            raise UserError(f"{root}: not a directory")
        default = root / "README.md"
        if out is None and default.exists() and not (force or is_report_index(default)):
            raise UserError(f"{default}: exists and was not written by sbrbench report (pass "
                            "--out FILE to index elsewhere, or --force to replace it)")
        dest = output_path(out if out is not None else default, default, force=force,
                           rewritable=is_report_index)
        text, count, _ = build_report(root)
        write_text_atomic(dest, text)
        console.print(f"indexed {count} files in {dest}")

    @app.command("plot")
    def plot_cmd(
        files: list[Path] = typer.Argument(..., help="result files (one line per file)"),
        out: str | None = typer.Option(
            None, metavar="FILE",
            help=f"PNG to write (default: {OUTPUT_DIR}/plot-<scenario>-<time>.png; an existing "
            "FILE is kept unless --force)"),
        force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    ) -> None:
        """PNG of per-cycle resume TTFT (one line per file) and TTFT vs depth; for two or more
        parity files, match or divergence per request against the first, and each policy's
        replay."""
        from sbrbench.render import plot_results

        docs = [load_result(f) for f in files]
        for f, d in zip(files, docs, strict=False):
            if not d["rows"]:
                raise UserError(f"{f}: result has no rows")
        default = OUTPUT_DIR / f"plot-{docs[0]['scenario']}-{timestamp()}.png"
        dest = output_path(out, default, force=force)
        plot_results(docs, dest)
        console.print(f"plot written to {dest}")
