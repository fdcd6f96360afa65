"""Trim an installed peer site (pip install --target) to what `sbrbench bench kernels` runs:
FlashInfer's GDN prefill with the CuTe DSL it compiles its kernels with, apache-tvm-ffi, fla.

    python benchmarks/peers/trim_peers.py SITE

FlashInfer: its package __init__ imports every kernel family it ships, so it is replaced by
one that only names the version; kept are the modules that flashinfer.gdn_prefill imports at
module level (followed statically, the way the interpreter would), every Python file of the
packages its GDN prefill reaches at call time (gdn_kernels, cute_dsl, cudnn, jit, trace), and
no data (C++ sources, headers): its SM90 path is CuTe-DSL Python, compiled when first called.
The CuTe DSL keeps its compiler library and runtime, less the stubs for other platforms,
headers and static libraries. Wheel RECORDs go (their file lists no longer hold), and so do the
wheels' stray top-level files (a build backend, examples). The DSL's .pth file stays but does
nothing from PYTHONPATH: unpack.sh puts its packages on PYTHONPATH itself.
"""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

START = ["flashinfer.gdn_prefill", "flashinfer.fi_trace", "flashinfer.version"]
WHOLE = ["gdn_kernels", "cute_dsl", "cudnn", "jit", "trace"]
STUB = '''"""flashinfer, trimmed to its GDN prefill (flashinfer.gdn_prefill) by sbrbench's
benchmarks/peers recipe."""
from .version import __version__ as __version__
'''


def _file(site: Path, mod: str) -> Path | None:
    p = site.joinpath(*mod.split("."))
    if p.is_dir():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").exists() else None


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        yield node
        for name in ("body", "orelse", "finalbody", "handlers"):
            sub = getattr(node, name, None)
            if isinstance(sub, list):
                yield from _module_level([n for n in sub if isinstance(n, ast.stmt)])
            if isinstance(sub, list) and name == "handlers":
                for h in sub:
                    yield from _module_level(h.body)


def import_closure(site: Path, start: list[str]) -> set[Path]:
    """The flashinfer files that importing `start` loads (module-level imports only)."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = list(start)
    while todo:
        mod = todo.pop()
        f = _file(site, mod)
        if mod in seen or f is None:
            continue
        seen.add(mod)
        parts = mod.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if not f.exists() or mod == "flashinfer":
            continue
        files.add(f)
        pkg = parts if f.name == "__init__.py" else parts[:-1]
        for node in _module_level(ast.parse(f.read_text()).body):
            if isinstance(node, ast.ImportFrom):
                base = pkg[:len(pkg) - node.level + 1] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                if name.startswith("flashinfer"):
                    todo.append(name)
                    todo += [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("flashinfer")]
    return files


def trim_flashinfer(site: Path) -> None:
    root = site / "flashinfer"
    keep = import_closure(site, START)
    for d in WHOLE:
        keep |= set((root / d).rglob("*.py"))
    for f in list(root.rglob("*")):
        if f.is_file() and f not in keep:
            f.unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    (root / "__init__.py").write_text(STUB)


KEEP_TOP = ("flashinfer", "nvidia_cutlass_dsl", "tvm_ffi", "fla")


def trim_libraries(site: Path) -> None:
    for top in site.iterdir():  # the wheels' stray top-level files and packages
        if not (top.name.startswith(KEEP_TOP) or top.name.endswith(".dist-info")):
            if top.is_dir():
                shutil.rmtree(top)
            else:
                top.unlink()
    dsl = site / "nvidia_cutlass_dsl"
    for junk in list(dsl.rglob("stubs")) + list(dsl.rglob("include")):
        shutil.rmtree(junk, ignore_errors=True)
    for pattern in ("*.a", "*.h", "*.hpp", "*.cmake"):
        for f in site.rglob(pattern):
            f.unlink()
    for f in site.rglob("RECORD"):
        f.unlink()
    for d in list(site.rglob("__pycache__")) + [site / "bin"]:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    site = Path(sys.argv[1])
    trim_flashinfer(site)
    trim_libraries(site)


if __name__ == "__main__":
    main()
