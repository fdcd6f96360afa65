"""The method of `sbrbench bench`: the timers, the ceilings, the FLOP counts, the profile
breakdown and the `sbrbench.bench/v1` result file that every bench (bench_kernels.py,
bench_engine.py) shares.

Method (see docs/KERNELS.md): inputs are random (never zeros), every timing is the median of
repeats measured with CUDA events through triton.testing.do_bench after a warm-up call that is
kept out of the figures, and each result row says what the hardware achieved (TFLOP/s, GB/s)
against the FLOP and byte counts defined beside the bench.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.config import ModelConfig
from engine.errors import UserError

SCHEMA = "sbrbench.bench/v1"


# Dense bf16 tensor-core peak of an H100 SXM / H200 (the datasheet's 989.4 TFLOP/s without
# sparsity); MFU is reported against it and against the measured 8192^3 matmul rate.
DENSE_BF16_PEAK_TFLOPS = 989.0


# Datasheet ceilings of an H200 SXM: dense bf16 tensor-core rate and HBM3e bandwidth. The
# floor is reported against these and against the ceilings measured in the same run.
H200_HBM_GBPS = 4800.0


DEVICE = "cuda"  # every tensor of a bench lives here (tests smoke-run the code on "cpu")


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise UserError("sbrbench bench needs a CUDA GPU (torch.cuda.is_available() is False)")


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the results/<gpu>/ folder name)."""
    words = re.sub(r"(?i)\bnvidia\b", "", name or "").lower().split()
    return re.sub(r"[^a-z0-9.-]", "", words[0]) if words else "unknown-gpu"


def bench_env() -> dict[str, Any]:
    """Environment of the run: sbrbench.results' capture when present, plus the GPU details."""
    try:
        from sbrbench.results import capture_env  # noqa: PLC0415

        env = capture_env()
    except ImportError:
        env = {"host": socket.gethostname(), "python": platform.python_version(),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm_count=p.multi_processor_count,
                   gpu_mem_gib=round(p.total_memory / 2**30, 1))
        from engine.kernels.ops import gdn_config, glue_enabled  # noqa: PLC0415

        env["gdn_config"] = gdn_config("cuda")
        env["glue_kernels"] = env["gdn_config"] is not None and glue_enabled()
        from engine.model.attention import attention_impl  # noqa: PLC0415

        env["attention"] = attention_impl("cuda")
    try:
        import triton  # noqa: PLC0415

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    from sbrbench import peers  # noqa: PLC0415

    env["fla"] = peers.version("fla")
    env["flashinfer"] = peers.version("flashinfer")
    return env


def write_doc(path: Path, bench: str, env: dict[str, Any], rows: list[dict[str, Any]],
              extra: dict[str, Any] | None = None) -> None:
    """Write one bench file atomically (sbrbench.results when present)."""
    doc: dict[str, Any] = {"schema": SCHEMA, "bench": bench,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": env,
                           **(extra or {}), "rows": rows}
    try:
        from sbrbench.results import write_json_atomic  # noqa: PLC0415
    except ImportError:
        import json  # noqa: PLC0415

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
        return
    write_json_atomic(path, doc)


def time_ms(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median device time of fn() in ms (CUDA events, L2 flushed between repeats; on the CPU
    the median of five wall-clock calls, so one descheduled call does not set the figure)."""
    fn()  # compile / autotune / allocate: never in the figures
    if DEVICE != "cuda":
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    try:
        from triton.testing import do_bench  # noqa: PLC0415
    except ImportError:
        return _events_median(fn, n=max(3, int(rep_ms // 5)))
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms(fn: Callable[[], Any]) -> float | None:
    """Median device time of a CUDA-graph replay of fn(): the kernels alone, without the host's
    launch gaps (which make a many-launch call's eager time swing between runs). None off
    CUDA, or when fn cannot be captured (a host sync inside, say)."""
    if DEVICE != "cuda" or not torch.cuda.is_available():
        return None
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # allocations settle outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - a third-party kernel may refuse capture in many ways
        torch.cuda.synchronize()
        return None
    return time_ms(graph.replay)


def _events_median(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


class Ceilings(NamedTuple):
    matmul_tflops: float  # 8192^3 bf16 torch.matmul on random data
    copy_gbps: float  # device-to-device copy, bytes read + written


def measure_ceilings(n: int = 8192, copy_mib: int = 1024) -> Ceilings:
    """The two ceilings the method asks for, measured once on this device: an n^3 bf16 matmul
    and a copy of copy_mib MiB (the CPU smoke runs take small ones)."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, rep_ms=200)
    src = torch.randn(copy_mib * 2**18, device=DEVICE)  # fp32
    dst = torch.empty_like(src)
    ms_copy = time_ms(lambda: dst.copy_(src), rep_ms=200)
    return Ceilings(2 * n**3 / ms / 1e9, 2 * src.numel() * 4 / ms_copy / 1e6)


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for y in x for t in _flat(y)]
    buf = getattr(x, "buffer", None)  # GridStates
    return [buf] if isinstance(buf, torch.Tensor) else []


def repeatable(fn: Callable[[], Any], n: int = 10) -> bool:
    """Whether n more calls return bitwise the tensors of the first (outputs, final state and
    grid states): the run-to-run determinism that exact parity needs."""
    first = [t.clone() for t in _flat(fn())]
    for _ in range(n):
        again = _flat(fn())
        if len(again) != len(first):
            return False
        if not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
            return False
    return True


def _guarded_ms(fn: Callable[[], Any], what: str, log: Callable[[str], None],
                **kw: float) -> float | None:
    """time_ms, but a failing baseline (not ours) is logged and skipped, not fatal."""
    try:
        return time_ms(fn, **kw)
    except Exception as e:  # noqa: BLE001 - a third-party kernel may fail in many ways
        log(f"  {what}: failed ({type(e).__name__}: {str(e)[:200]})")
        _empty_cache()
        return None


def kernel_times(fn: Callable[[], Any], reps: int = 5) -> dict[str, float]:
    """Device ms per call of each kernel fn() launches (torch.profiler, `reps` calls after a
    warm-up), largest first."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = {}
    for ev in prof.key_averages():
        t_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t_us and not ev.key.startswith("aten::"):
            acc[ev.key[:80]] = acc.get(ev.key[:80], 0.0) + t_us / reps / 1e3
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def triton_kernel_names() -> dict[str, list[str]]:
    """Names of our Triton kernels as the profiler shows them, by family: gdn_triton
    (engine.kernels.triton_gdn) and glue_triton (engine.kernels.triton_glue)."""
    import triton  # noqa: PLC0415

    from engine.kernels import triton_gdn, triton_glue  # noqa: PLC0415

    return {fam: sorted(n.lower() for n, o in vars(mod).items()
                        if isinstance(o, triton.runtime.JITFunction) and n.endswith("_kernel"))
            for fam, mod in (("gdn_triton", triton_gdn), ("glue_triton", triton_glue))}


def kernel_family(name: str, ours: dict[str, list[str]]) -> str:
    """gemm, attention, one of our Triton families (triton_kernel_names) or other."""
    low = name.lower()
    if any(s in low for s in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(s in low for s in ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")):
        return "gemm"
    for fam, names in ours.items():
        if any(s in low for s in names):
            return fam
    return "other"


def kernel_families(events: Sequence[tuple[str, float, int]], ours: dict[str, list[str]],
                    top: int = 24) -> dict[str, Any]:
    """Device ms per family from (kernel name, ms, launches), plus `other_top`: the largest
    kernels of `other` (name -> [ms, launches]), which is what to fuse next."""
    fam: dict[str, float] = {}
    other: list[tuple[str, float, int]] = []
    for name, ms, n in events:
        f = kernel_family(name, ours)
        fam[f] = fam.get(f, 0.0) + ms
        if f == "other":
            other.append((name, ms, n))
    fam["total"] = sum(fam.values())
    res: dict[str, Any] = {k: round(v, 3) for k, v in fam.items()}
    merged: dict[str, list[float]] = {}  # names cut to 160 characters can collide: add them up
    for name, ms, n in other:
        acc = merged.setdefault(name[:160], [0.0, 0])
        acc[0] += ms
        acc[1] += n
    ranked = sorted(merged.items(), key=lambda e: -e[1][0])[:top]
    res["other_top"] = {name: [round(ms, 3), int(n)] for name, (ms, n) in ranked}
    return res


def model_flops(cfg: ModelConfig, start: int, end: int) -> float:
    """Model FLOPs of prefilling positions [start, end): dense matmuls (lm_head excluded: one row
    only), the chunked GDN rule and causal attention scores + values."""
    n = end - start
    dense = (cfg.flops_per_token() + cfg.gdn_flops_per_token()) * n
    per_q = cfg.attn_flops(0)  # FLOPs per (query, key) pair, all attention layers
    attn = per_q * (end * (end + 1) - start * (start + 1)) / 2
    return dense + attn
