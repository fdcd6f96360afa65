"""The command line as a whole: --version, --help without torch or scipy, every help text shown
as written (no bracket or colon read as markup), and data in run output and errors kept whole."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.rich_utils
from typer.core import TyperGroup
from typer.testing import CliRunner

from sbrbench import __version__, cli_run
from sbrbench.cli import app, main, plain_markup
from sbrbench.render import make_console


def test_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"sbrbench {__version__}"


def test_help_imports_neither_torch_nor_scipy() -> None:
    code = ("import sys; from sbrbench.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['run', '--help']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- help texts


def _verbs(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group under `cmd`, with the words that reach it."""
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _verbs(sub, (*path, name))


def _flat(text: str) -> str:
    """Rendered help without panel borders, one space between words."""
    return " ".join(text.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


def _as_written() -> list[tuple[tuple[str, ...], Any]]:
    """The command tree with the help texts as the verbs write them (a plain group does not
    escape them)."""
    saved = app.info.cls
    app.info.cls = TyperGroup
    try:
        return list(_verbs(typer.main.get_command(app)))
    finally:
        app.info.cls = saved


RAW = _as_written()


@pytest.mark.parametrize("path", [p for p, _ in RAW], ids=lambda p: " ".join(p) or "sbrbench")
def test_every_help_text_is_shown_as_written(path: tuple[str, ...],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each verb's --help (nested verbs too) shows its own help and every option's help word
    for word: "[default: ...]" and "[engine]" written in a help survive, and "s:m:L" is not
    an emoji."""
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)  # no wrapping inside a help text
    raw = dict(RAW)[path]
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    shown = _flat(res.output)
    texts = [raw.help or ""] + [p.help for p in raw.params if getattr(p, "help", None)]
    for text in texts:
        for para in text.split("\n\n"):
            para = _flat(para.replace("\b", ""))
            assert para in shown, f"{' '.join(path)} --help lost text: {para!r}"
    for p in raw.params:
        if getattr(p, "show_default", None) is not False and p.default not in (None, [], (), ""):
            if isinstance(p.default, (int, float, str)) and not isinstance(p.default, bool):
                assert f"[default: {p.default}]" in shown, (path, p.name)


def test_known_bracketed_words_survive_in_help(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 1000)
    shown = _flat(CliRunner().invoke(app, ["run", "--help"]).output)
    assert "the [engine] table" in shown and "[default: tiny]" in shown
    shown = _flat(CliRunner().invoke(app, ["calibrate", "--help"]).output)
    assert "s:m:L" in shown


@pytest.mark.parametrize("text", ["[lru]", "a [default: x] b", "s:m:L,...", ":smile: [b]x[/b]",
                                  "path\\[x]", "[params] :m: :L:"])
def test_plain_markup_renders_as_the_text(text: str) -> None:
    from rich.text import Text

    assert Text.from_markup(plain_markup(text)).plain == text


# ----------------------------------------------------------------------------- run output, errors


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--set", "turns=2", "--set", "pressure=2", "--set", "convs=2"]


def test_run_titles_and_progress_keep_the_policy_in_brackets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_run, "console", make_console(width=240))
    out = tmp_path / "p.json"
    code, text, err = _main(["run", "parity", "--target", "sim", "--policy", "lru", *SMALL,
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert any("parity [lru]" in line and "━" in line for line in text.splitlines()), text
    flat = _flat(text)  # the table title wraps at the table's width
    assert f"parity [lru] on sim: per-request figures, modelled -> {out}" in flat, text
    assert "in ms, modelled (the simulator's cost model" in flat  # the sim target models TTFT
    assert "phases: prompt: the conversations' turns" in flat and "replay tok:" in flat


def test_user_errors_keep_bracketed_words(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('scenario = "parity"\n[engine]\npolicy = "lru"\n')
    code, out, err = _main(["run", "parity", "--scenario-file", str(bad), "--target", "sim"],
                           capsys)
    assert code == 2 and err.strip() == f"error: {bad}: missing table [params]"
    good = (Path(__file__).parents[2] / "scenarios" / "parity.toml").read_text()
    bad.write_text(good.replace("[engine]", "[engine]\nnope = 1"))
    code, out, err = _main(["run", "parity", "--scenario-file", str(bad), "--target", "sim"],
                           capsys)
    assert code == 2 and f"{bad} [engine]: unknown key 'nope'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_option_errors_name_the_option_and_the_accepted_values(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["run", "parity", "--target", "sim", "--adaptive-opt", "foo=1"], capsys)
    assert code == 2 and "--adaptive-opt foo: not an option of the adaptive policy" in err
    assert re.search(r"accepted, with defaults: .*delta=", err) and "TypeError" not in err
    code, out, err = _main(["run", "parity", "--target", "sim", "--adaptive-opt", "delta=x"],
                           capsys)
    assert code == 2 and "--adaptive-opt delta: expected a number" in err
    for flag, value in (("--timeout", "-1"), ("--snapshot-slots", "0"), ("--seed", "-1"),
                        ("--retries", "-1")):
        code, out, err = _main(["run", "parity", flag, value], capsys)
        assert code == 2 and f"Invalid value for '{flag}'" in _flat(err), (flag, err)
    for args, msg in ((["run", "parity", "--dtype", "fp64"], "--dtype 'fp64': unknown dtype"),
                      (["run", "parity", "--device", "tpu"], "--device 'tpu': unknown device"),
                      (["run", "parity", "--preset", "big"], "--preset 'big': unknown preset"),
                      (["serve", "--preset", "big"], "(choose from tiny, "),
                      (["decay", "analyze", "--preset", "big"], "--preset 'big'")):
        code, out, err = _main(args, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, err = _main(["generate", "--prompt", "x", "--top-p", "0"], capsys)
    assert code == 2 and "Invalid value for '--top-p'" in _flat(err)
    code, out, err = _main(["run", "parity", "--scenario", "x.toml"], capsys)
    assert code == 2 and "--scenario-file" in _flat(err)  # click suggests the file flag
