"""GPU timings: the GDN kernels against fla and torch (`bench kernels`), and the engine's cold
prefill, replay cost and snapshot copies (`bench prefill`), as `sbrbench.bench/v1` rows.

Method (see docs/KERNELS.md): inputs are random (never zeros), every timing is the median of
repeats measured with CUDA events through triton.testing.do_bench after a warm-up call that is
kept out of the figures, and each result row says what the hardware achieved (TFLOP/s, GB/s)
against the FLOP and byte counts defined here.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.config import CHUNK, ModelConfig
from engine.errors import UserError

SCHEMA = "sbrbench.bench/v1"
# Dense bf16 tensor-core peak of an H100 SXM / H200 (the datasheet's 989.4 TFLOP/s without
# sparsity); MFU is reported against it and against the measured 8192^3 matmul rate.
DENSE_BF16_PEAK_TFLOPS = 989.0
QWEN3_NEXT = {"B": 1, "H": 16, "HV": 32, "K": 128, "V": 128}
ENGINE_INTERVAL = 4096  # the engine's default snapshot interval (engine.cache.settings)
DEVICE = "cuda"  # every tensor of a bench lives here (tests smoke-run the code on "cpu")


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


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
    """Median device time of fn() in ms (CUDA events; L2 flushed between repeats)."""
    fn()  # compile / autotune / allocate: never in the figures
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
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


# ---------------------------------------------------------------------------------------------
# bench kernels
# ---------------------------------------------------------------------------------------------


def gdn_flops(t: int, hv: int, kd: int, vd: int) -> float:
    """FLOPs of the chunked gated delta rule (C = 64), counted the same for every impl: per token
    and value head 2C(3K + 2V) for K K^T, Q K^T, W and U, plus 6KV for W S, Q S and K^T Vn, plus
    2CV for Aqk Vn."""
    c = CHUNK
    return float(t * hv * (2 * c * (3 * kd + 2 * vd) + 6 * kd * vd))


def gdn_bytes(t: int, hq: int, hv: int, kd: int, vd: int, out_bytes: int,
              n_states: int) -> float:
    """Fewest bytes a call must move: bf16 q, k, v and beta, fp32 g, the fp32 state in and out,
    the output, and the captured grid states (fp32)."""
    inputs = t * (2 * hq * kd * 2 + hv * vd * 2 + hv * 4 + hv * 2)
    states = (2 + n_states) * hv * kd * vd * 4
    return float(inputs + states + t * hv * vd * out_bytes)


def gdn_inputs(t: int, hq: int, hv: int, kd: int, vd: int, seed: int = 0,
               ) -> tuple[torch.Tensor, ...]:
    """Random Qwen3-Next-like GDN inputs on the GPU: raw bf16 q, k [T, H, K], v [T, HV, V], the
    model's log decay g (fp32) and sigmoid beta (bf16), a small fp32 initial state."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    a_log = torch.log(torch.rand(hv, generator=gen, device=DEVICE) * 15 + 1)
    dt_bias = rnd(hv) - 4
    g = -a_log.exp() * torch.nn.functional.softplus(rnd(t, hv) + dt_bias)
    return (rnd(t, hq, kd).bfloat16(), rnd(t, hq, kd).bfloat16(), rnd(t, hv, vd).bfloat16(),
            g, torch.sigmoid(rnd(t, hv)).bfloat16(), rnd(hv, kd, vd) * 0.05)


def _row(impl: str, t: int, hq: int, hv: int, kd: int, vd: int, ms: float, nbytes: float,
         **extra: Any) -> dict[str, Any]:
    fl = gdn_flops(t, hv, kd, vd)
    return {"kernel": "gdn_chunk_fwd", "impl": impl, "B": 1, "T": t, "H": hq, "HV": hv,
            "K": kd, "V": vd, "ms": round(ms, 4), "tflops": round(fl / ms / 1e9, 2),
            "gbps": round(nbytes / ms / 1e6, 1), **extra}


def bench_gdn(ts: Sequence[int], *, fla: bool = True, flashinfer: bool = True,
              torch_max_t: int = 16384, graphs: bool = False,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """gdn_chunk_fwd rows for Qwen3-Next shapes at each T: ours (capture on and off, q/k
    grouped and expanded), fla and FlashInfer on the same inputs (sbrbench.peers; skipped when
    not importable) and the torch reference."""
    rows: list[dict[str, Any]] = []
    for t in ts:
        if t % CHUNK:
            raise UserError(f"--T values must be multiples of {CHUNK}, got {t}")
        rows += _bench_gdn_at(t, fla, flashinfer, t <= torch_max_t, log, graphs)
        _empty_cache()
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _bench_gdn_at(t: int, fla: bool, flashinfer: bool, with_torch: bool,
                  log: Callable[[str], None], graphs: bool = False) -> list[dict[str, Any]]:
    from engine.kernels import reference as ref  # noqa: PLC0415
    from engine.kernels import triton_gdn as tg  # noqa: PLC0415
    from sbrbench import peers  # noqa: PLC0415

    hq, hv, kd, vd = QWEN3_NEXT["H"], QWEN3_NEXT["HV"], QWEN3_NEXT["K"], QWEN3_NEXT["V"]
    rows: list[dict[str, Any]] = []
    launch = tg.launch_for(kd, vd)
    q, k, v, g, beta, s0 = gdn_inputs(t, hq, hv, kd, vd, seed=t)
    qx, kx = q.repeat_interleave(hv // hq, 1), k.repeat_interleave(hv // hq, 1)
    n_states = t // CHUNK
    # capture: every grid state (True), the engine's snapshot rows (one per ENGINE_INTERVAL
    # rows, stored alone), or none
    sparse = set(range(ENGINE_INTERVAL, t + 1, ENGINE_INTERVAL))
    runs: list[tuple[bool | set[int], bool]] = [(True, True), (True, False), (sparse, True),
                                                (False, True)]
    for capture, grouped in runs:
        qq, kk = (q, k) if grouped else (qx, kx)
        ours = partial(tg.gdn_chunk_fwd, qq, kk, v, g, beta, s0, 0, t, capture, launch)
        ms = time_ms(ours)
        n_cap = n_states if capture is True else len(capture) if capture else 0
        nb = gdn_bytes(t, qq.shape[1], hv, kd, vd, 2, n_cap)
        rep = repeatable(ours) if capture is True and grouped else None
        label = capture if isinstance(capture, bool) else f"every {ENGINE_INTERVAL}"
        rows.append(_row("sbrbench", t, qq.shape[1], hv, kd, vd, ms, nb, capture=label,
                         captured_states=n_cap, repeatable=rep))
        log(f"  sbrbench T={t} H={qq.shape[1]} capture={label}: {ms:.3f} ms"
            + ("" if rep is None else f" repeatable={rep}"))
    fla_fns = [peers.fla_fn(a, b, v, g, beta, s0) for a, b in ((q, k), (qx, kx))] if fla else []
    for fn in fla_fns:
        fla_ms = _guarded_ms(fn, "fla", log) if fn is not None else None
        if fla_ms is None:
            break
        h = hq if fn is fla_fns[0] else hv
        rep = repeatable(fn) if fn is not None and fn is fla_fns[0] else None
        rows.append(_row("fla", t, h, hv, kd, vd, fla_ms, gdn_bytes(t, h, hv, kd, vd, 2, 0),
                         capture=False, repeatable=rep))
        log(f"  fla      T={t} H={h}: {fla_ms:.3f} ms" +
            ("" if rep is None else f" repeatable={rep}"))
    fi_calls = [peers.flashinfer_call(q, k, v, g, beta, s0, cap) for cap in (False, True)] \
        if flashinfer else []
    ours_out, ours_s, _ = tg.gdn_chunk_fwd(q, k, v, g, beta, s0, 0, t, False, launch)
    for call in fi_calls:
        fi_ms = _guarded_ms(call.run, "flashinfer", log) if call is not None else None
        if call is None or fi_ms is None:
            break
        err_o, err_s = _rel(call.output(), ours_out), _rel(call.final_state(), ours_s)
        rows.append(_row("flashinfer", t, hq, hv, kd, vd, fi_ms,
                         gdn_bytes(t, hq, hv, kd, vd, 2, call.checkpoints),
                         capture=call.checkpoints > 0, captured_states=call.checkpoints,
                         rel_err_out_vs_ours=round(err_o, 5),
                         rel_err_state_vs_ours=round(err_s, 5), notes=call.notes[:1],
                         repeatable=repeatable(call.run)))
        log(f"  flashinfer T={t} H={hq} checkpoints={call.checkpoints}: {fi_ms:.3f} ms "
            f"(vs ours: output {err_o:.1e}, state {err_s:.1e}; {call.notes[:1]})")
    if graphs:  # the same calls replayed from CUDA graphs: kernels only, no launch gaps
        pairs: list[tuple[str, Callable[[], Any], float, bool]] = [
            ("sbrbench", partial(tg.gdn_chunk_fwd, q, k, v, g, beta, s0, 0, t, True, launch),
             gdn_bytes(t, hq, hv, kd, vd, 2, n_states), True)]
        if fla_fns and fla_fns[0] is not None:
            pairs.append(("fla", fla_fns[0], gdn_bytes(t, hq, hv, kd, vd, 2, 0), False))
        if fi_calls and fi_calls[0] is not None:
            pairs.append(("flashinfer", fi_calls[0].run, gdn_bytes(t, hq, hv, kd, vd, 2, 0),
                          False))
        for impl, fn, nb, cap in pairs:
            gms = graph_ms(fn)
            log(f"  {impl:8s} T={t} H={hq} graph replay: "
                + ("not capturable" if gms is None else f"{gms:.3f} ms"))
            if gms is not None:
                rows.append(_row(impl, t, hq, hv, kd, vd, gms, nb, capture=cap, launch="graph"))
    ref_ms = _guarded_ms(partial(ref.chunk_gated_delta_rule, qx, kx, v, g, beta, s0, 0, t, True),
                         "torch", log, warmup_ms=1, rep_ms=1) if with_torch else None
    if ref_ms is not None:
        rows.append(_row("torch", t, hv, hv, kd, vd, ref_ms,
                         gdn_bytes(t, hv, hv, kd, vd, 4, n_states), capture=True))
        log(f"  torch    T={t}: {ref_ms:.3f} ms")
    return rows


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


def bench_small_kernels(window: int = 512, log: Callable[[str], None] = print,
                        ) -> list[dict[str, Any]]:
    """recurrent_step, causal_conv1d and gated_rms_norm at a3b-proxy shapes, Triton vs torch."""
    from engine.kernels import reference as ref  # noqa: PLC0415
    from engine.kernels import triton_gdn as tg  # noqa: PLC0415

    hq, hv, kd, vd = QWEN3_NEXT["H"], QWEN3_NEXT["HV"], QWEN3_NEXT["K"], QWEN3_NEXT["V"]
    rows: list[dict[str, Any]] = []
    q, k, v, g, beta, s0 = gdn_inputs(1, hq, hv, kd, vd, seed=1)
    qx, kx = q[0].repeat_interleave(2, 0), k[0].repeat_interleave(2, 0)
    step_bytes = 2 * hv * kd * vd * 4
    fns: list[tuple[str, Callable[[], Any]]] = [
        ("sbrbench", partial(tg.recurrent_step, q[0], k[0], v[0], g[0], beta[0], s0)),
        ("torch", partial(ref.recurrent_step, qx, kx, v[0], g[0], beta[0], s0))]
    for impl, fn in fns:
        ms = time_ms(fn)
        rows.append({"kernel": "recurrent_step", "impl": impl, "HV": hv, "K": kd, "V": vd,
                     "ms": round(ms, 4), "gbps": round(step_bytes / ms / 1e6, 1)})
        log(f"  recurrent_step {impl}: {ms * 1e3:.1f} us")
    d = 2 * hq * kd + hv * vd
    x = torch.randn(window, d, device=DEVICE).bfloat16()
    w = (torch.randn(d, 4, device=DEVICE) * 0.3).bfloat16()
    st = torch.randn(3, d, device=DEVICE).bfloat16()
    conv_bytes = 2 * window * d * 2
    fns = [("sbrbench", partial(tg.causal_conv1d, x, w, st)),
           ("torch", partial(ref.causal_conv1d, x, w, st))]
    for impl, fn in fns:
        ms = time_ms(fn)
        rows.append({"kernel": "causal_conv1d", "impl": impl, "T": window, "D": d,
                     "ms": round(ms, 4), "gbps": round(conv_bytes / ms / 1e6, 1)})
        log(f"  causal_conv1d {impl}: {ms * 1e3:.1f} us")
    xo = torch.randn(window, hv, vd, device=DEVICE).bfloat16()
    z = torch.randn(window, hv, vd, device=DEVICE).bfloat16()
    wn = torch.ones(vd, device=DEVICE).bfloat16()
    norm_bytes = 3 * window * hv * vd * 2
    fns = [("sbrbench", partial(tg.gated_rms_norm, xo, z, wn, 1e-6)),
           ("torch", partial(ref.gated_rms_norm, xo, z, wn, 1e-6))]
    for impl, fn in fns:
        ms = time_ms(fn)
        rows.append({"kernel": "gated_rms_norm", "impl": impl, "T": window, "HV": hv, "V": vd,
                     "ms": round(ms, 4), "gbps": round(norm_bytes / ms / 1e6, 1)})
        log(f"  gated_rms_norm {impl}: {ms * 1e3:.1f} us")
    return rows


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


def profile_gdn_rows(t: int, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per-kernel device time of one gdn_chunk_fwd call at T (Qwen3-Next shape, grouped q/k,
    every grid state captured): ours, and fla and FlashInfer (with its checkpoints) when
    importable. Rows: kernel "gdn_chunk_fwd.part", impl, part (the kernel), ms."""
    from engine.kernels import triton_gdn as tg  # noqa: PLC0415
    from sbrbench import peers  # noqa: PLC0415

    hq, hv, kd, vd = QWEN3_NEXT["H"], QWEN3_NEXT["HV"], QWEN3_NEXT["K"], QWEN3_NEXT["V"]
    q, k, v, g, beta, s0 = gdn_inputs(t, hq, hv, kd, vd, seed=t)
    runs: list[tuple[str, Callable[[], Any] | None]] = [
        ("sbrbench", partial(tg.gdn_chunk_fwd, q, k, v, g, beta, s0, 0, t, True,
                             tg.launch_for(kd, vd))),
        ("fla", peers.fla_fn(q, k, v, g, beta, s0))]
    fi = peers.flashinfer_call(q, k, v, g, beta, s0, True)
    runs.append(("flashinfer", fi.run if fi is not None else None))
    rows: list[dict[str, Any]] = []
    for impl, fn in runs:
        if fn is None:
            continue
        parts = kernel_times(fn)
        log(f"  {impl} T={t}: {sum(parts.values()):.3f} ms in "
            + ", ".join(f"{p} {ms:.3f}" for p, ms in list(parts.items())[:5]))
        rows += [{"kernel": "gdn_chunk_fwd.part", "impl": impl, "T": t, "H": hq, "HV": hv,
                  "K": kd, "V": vd, "part": part, "ms": round(ms, 4)}
                 for part, ms in parts.items()]
    _empty_cache()
    return rows


def run_kernels(ts: Sequence[int], out: Path | None, *, fla: bool = True,
                flashinfer: bool = True, torch_max_t: int = 16384, graphs: bool = False,
                profile_at: Sequence[int] = (),
                log: Callable[[str], None] = print) -> tuple[Path, list[dict[str, Any]]]:
    """`sbrbench bench kernels`: write the rows and return (path, rows)."""
    require_cuda()
    env = bench_env()
    path = out or Path("results") / gpu_slug(env.get("gpu")) / "bench-kernels.json"
    ceil = measure_ceilings()
    log(f"{env.get('gpu')}: matmul {ceil.matmul_tflops:.0f} TFLOP/s, "
        f"copy {ceil.copy_gbps:.0f} GB/s")
    extra = {"ceilings": ceil._asdict(), "shape": dict(QWEN3_NEXT), "partial": True}
    rows: list[dict[str, Any]] = []
    for t in ts:  # rewritten after each T: a run cut short keeps what it measured
        rows += bench_gdn([t], fla=fla, flashinfer=flashinfer, torch_max_t=torch_max_t,
                          graphs=graphs, log=log)
        if t in profile_at:
            rows += profile_gdn_rows(t, log)
        write_doc(path, "kernels", env, rows, extra)
    rows += bench_small_kernels(log=log)
    extra.update(partial=False, speedups=speedups(rows))
    write_doc(path, "kernels", env, rows, extra)
    return path, rows


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (T, H) where ours ran with every grid state captured (ours_ms): peer_ms / ours_ms,
    above 1 where ours is faster. fla: fla_over_ours (the headline: ours capturing, fla
    returning no intermediate state), and against ours with the engine's snapshot rows only
    or no capture. FlashInfer: fi_over_ours (FlashInfer's plain call against ours capturing),
    fi_ckpt_over_ours (both storing every grid state), fi_over_ours_no_capture (neither);
    capture costs ours_capture_cost and fi_capture_cost (time with / without). Graph-replay
    rows give the *_graph columns and never replace the eager ones."""
    def pick(impl: str, cap: Any, launch: str = "eager") -> dict[tuple[int, int], float]:
        return {(r["T"], r["H"]): r["ms"] for r in rows
                if r["kernel"] == "gdn_chunk_fwd" and r.get("launch", "eager") == launch
                and r["impl"] == impl and (cap is None or r.get("capture") == cap)}

    every, engine, none = (pick("sbrbench", c) for c in (True, f"every {ENGINE_INTERVAL}",
                                                         False))
    fla, fi, fi_ck = pick("fla", None), pick("flashinfer", False), pick("flashinfer", True)
    g_ours, g_fla, g_fi = pick("sbrbench", True, "graph"), pick("fla", None, "graph"), \
        pick("flashinfer", False, "graph")

    def ratio(a: dict[tuple[int, int], float], b: dict[tuple[int, int], float],
              key: tuple[int, int]) -> float | None:
        return round(a[key] / b[key], 3) if key in a and key in b else None

    res = []
    for key in sorted(every):
        if key not in fla and key not in fi:
            continue
        row: dict[str, Any] = {"T": key[0], "H": key[1], "ours_ms": every[key]}
        cols = {"fla_ms": fla.get(key), "fla_over_ours": ratio(fla, every, key),
                "fla_over_ours_engine_capture": ratio(fla, engine, key),
                "fla_over_ours_no_capture": ratio(fla, none, key),
                "fla_over_ours_graph": ratio(g_fla, g_ours, key),
                "fi_ms": fi.get(key), "fi_ckpt_ms": fi_ck.get(key),
                "fi_over_ours": ratio(fi, every, key),
                "fi_ckpt_over_ours": ratio(fi_ck, every, key),
                "fi_over_ours_no_capture": ratio(fi, none, key),
                "fi_over_ours_graph": ratio(g_fi, g_ours, key),
                "ours_capture_cost": ratio(every, none, key),
                "fi_capture_cost": ratio(fi_ck, fi, key)}
        row.update({k: v for k, v in cols.items() if v is not None})
        res.append(row)
    return res


# ---------------------------------------------------------------------------------------------
# bench prefill
# ---------------------------------------------------------------------------------------------


def model_flops(cfg: ModelConfig, start: int, end: int) -> float:
    """Model FLOPs of prefilling positions [start, end): dense matmuls (lm_head excluded: one row
    only), the chunked GDN rule and causal attention scores + values."""
    n = end - start
    dense = (cfg.flops_per_token() + cfg.gdn_flops_per_token()) * n
    per_q = cfg.attn_flops(0)  # FLOPs per (query, key) pair, all attention layers
    attn = per_q * (end * (end + 1) - start * (start + 1)) / 2
    return dense + attn


def build_model_on_gpu(preset_name: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """The weights Engine.from_preset(device="cuda") gets (engine.weights.init_random draws on
    the model's device), built on the GPU directly: no CPU construction of 4B parameters."""
    from engine.config import preset  # noqa: PLC0415
    from engine.model.model import HybridModel  # noqa: PLC0415
    from engine.weights import init_random  # noqa: PLC0415

    with torch.device(DEVICE):
        model = HybridModel(preset(preset_name))
    init_random(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def _engine(model: Any, dtype: torch.dtype, window: int, kv_tokens: int) -> Any:
    from engine.runtime import Engine, EngineCacheArgs  # noqa: PLC0415
    from engine.tokenizer import ByteTokenizer  # noqa: PLC0415

    cfg = model.cfg
    args = EngineCacheArgs(policy="lru", snapshot_slots=2, exec_window=window,
                           kv_budget_tokens=kv_tokens)
    return Engine(model, ByteTokenizer(cfg.vocab_size, cfg.eos_token_id), DEVICE, dtype, args)


def bench_prefill_rows(model: Any, dtype: torch.dtype, lengths: Sequence[int],
                       windows: Sequence[int], reps: int, peak: float,
                       log: Callable[[str], None] = print,
                       on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
                       ) -> list[dict[str, Any]]:
    """Cold prefill (engine.generate, max_tokens=1, use_cache=False) per exec window x length."""
    from engine.runtime import SamplingParams  # noqa: PLC0415

    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (max(lengths),), generator=gen).tolist()
    rows = []
    for w in windows:
        eng = _engine(model, dtype, w, max(lengths) + 2 * w)
        for n in sorted({min(lengths), min(2 * w + 64, max(lengths))}):
            # warm-up: compile the kernels of windows with and without grid captures
            eng.generate(ids[:n], SamplingParams(max_tokens=1), use_cache=False)
        for n in lengths:
            stats = [eng.generate(ids[:n], SamplingParams(max_tokens=1), use_cache=False).stats
                     for _ in range(reps)]
            each = [round(s.prefill_s, 4) for s in stats]
            pre = statistics.median(s.prefill_s for s in stats)
            ttft = statistics.median(s.ttft_s for s in stats)
            fl = model_flops(cfg, 0, n)
            row = {"kernel": "prefill", "impl": "sbrbench", "preset": cfg.name, "window": w,
                   "tokens": n, "prefill_s": round(pre, 4), "ttft_s": round(ttft, 4),
                   "tok_s": round(n / pre, 1), "model_tflops": round(fl / pre / 1e12, 1),
                   "mfu": round(fl / pre / 1e12 / DENSE_BF16_PEAK_TFLOPS, 4),
                   "mfu_vs_measured": round(fl / pre / 1e12 / peak, 4), "prefill_s_each": each}
            rows.append(row)
            log(f"  prefill E={w} L={n}: {pre * 1e3:.0f} ms, {row['tok_s']:.0f} tok/s, "
                f"MFU {row['mfu']:.1%} (each: {', '.join(f'{x * 1e3:.0f}' for x in each)} ms)")
        del eng
        _empty_cache()
        if on_rows is not None:
            on_rows(rows)
    return rows


def bench_replay_rows(model: Any, dtype: torch.dtype, window: int, depths: Sequence[int],
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One aligned window at several depths (what replay and prefill cost per window/token),
    and the snapshot save/restore copies of one slot."""
    cfg = model.cfg
    dev = torch.device(DEVICE)
    rows = []
    cap = max(depths) + window
    kv = model.kv_buffers(cap, dev, dtype)
    for kb, vb in kv:
        kb.normal_()
        vb.normal_()
    state = model.zero_state(dev, dtype)
    state.ssm.normal_(0, 0.05)
    ids = torch.randint(0, 256, (window,), device=dev)
    for d in depths:
        e0 = d // window * window
        ms = time_ms(partial(model.forward_window, ids, e0, 0, window, state, kv, set()),
                     warmup_ms=1, rep_ms=50)
        rows.append({"kernel": "replay_window", "impl": "sbrbench", "preset": cfg.name,
                     "window": window, "depth": e0, "ms": round(ms, 3),
                     "ms_per_token": round(ms / window, 5)})
        log(f"  window E={window} at depth {e0}: {ms:.2f} ms ({ms / window * 1e3:.1f} us/token)")
    eng = _engine(model, dtype, window, 2 * window)
    ssm, conv = eng.snap_ssm[0], eng.snap_conv[0]
    ms_save = time_ms(lambda: (ssm.copy_(state.ssm), conv.copy_(state.conv)))
    ms_restore = time_ms(lambda: (ssm.clone(), conv.clone()))
    nbytes = eng.snapshot_bytes
    for kind, ms in (("snapshot_save", ms_save), ("snapshot_restore", ms_restore)):
        rows.append({"kernel": kind, "impl": "sbrbench", "preset": cfg.name, "bytes": nbytes,
                     "ms": round(ms, 4), "gbps": round(2 * nbytes / ms / 1e6, 1)})
        log(f"  {kind}: {ms * 1e3:.0f} us for {nbytes / 2**20:.1f} MiB")
    return rows


def bench_attention_rows(cfg: ModelConfig, dtype: torch.dtype, windows: Sequence[int],
                         contexts: Sequence[int], log: Callable[[str], None] = print,
                         ) -> list[dict[str, Any]]:
    """The window attention per window and context, in TFLOP/s of causal attention work:
    flash through SDPA with a lower-right causal mask (impl "sdpa", the single-call path) and
    the engine's cuDNN key pieces merged by log-sum-exp (impl "cudnn-pieces", where cuDNN
    runs)."""
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

    from engine.model import attention as at  # noqa: PLC0415

    rows = []
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for w in windows:
        for ctx in (c for c in contexts if c >= w):
            q = torch.randn(1, hq, w, d, device=DEVICE, dtype=dtype)
            k = torch.randn(1, hk, ctx, d, device=DEVICE, dtype=dtype)
            v = torch.randn(1, hk, ctx, d, device=DEVICE, dtype=dtype)
            mask = causal_lower_right(w, ctx)
            ms = time_ms(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask,
                                 scale=d ** -0.5, enable_gqa=True))
            pairs = w * ctx - w * (w - 1) / 2
            fl = 4 * hq * d * pairs
            rows.append({"kernel": "attention_window", "impl": "sdpa", "window": w,
                         "context": ctx, "Hq": hq, "Hkv": hk, "D": d, "ms": round(ms, 4),
                         "tflops": round(fl / ms / 1e9, 1)})
            log(f"  attention E={w} ctx={ctx}: {ms:.3f} ms, {fl / ms / 1e9:.0f} TFLOP/s")
            if at.attention_impl(DEVICE) != "cudnn-pieces" or dtype not in at._CUDNN_DTYPES:
                continue
            qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D] as the engine
            try:
                ms = time_ms(partial(at.attend_pieces, qt, kt, vt, d ** -0.5))
            except RuntimeError as e:
                log(f"  attention cudnn-pieces E={w} ctx={ctx}: failed ({e})")
                continue
            rows.append({"kernel": "attention_window", "impl": "cudnn-pieces", "window": w,
                         "context": ctx, "Hq": hq, "Hkv": hk, "D": d, "ms": round(ms, 4),
                         "tflops": round(fl / ms / 1e9, 1), "piece": at.piece_keys(w)})
            log(f"  attention cudnn-pieces E={w} ctx={ctx}: {ms:.3f} ms, "
                f"{fl / ms / 1e9:.0f} TFLOP/s")
    return rows


def triton_kernel_names() -> dict[str, list[str]]:
    """Names of our Triton kernels as the profiler shows them, by family: gdn_triton
    (engine.kernels.triton_gdn) and glue_triton (engine.kernels.triton_glue)."""
    import triton  # noqa: PLC0415

    from engine.kernels import triton_gdn, triton_glue  # noqa: PLC0415

    return {fam: sorted(n.lower() for n, o in vars(mod).items()
                        if isinstance(o, triton.runtime.JITFunction) and n.endswith("_kernel"))
            for fam, mod in (("gdn_triton", triton_gdn), ("glue_triton", triton_glue))}


def profile_window(model: Any, window: int, depth: int, dtype: torch.dtype) -> dict[str, Any]:
    """Device time of one window by kernel family (gemm, attention, gdn, other), in ms, and
    the largest `other` kernels (kernel_families)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    dev = torch.device(DEVICE)
    kv = model.kv_buffers(depth + window, dev, dtype)
    state = model.zero_state(dev, dtype)
    ids = torch.randint(0, 256, (window,), device=dev)
    e0 = depth // window * window
    model.forward_window(ids, e0, 0, window, state, kv, set())
    if DEVICE != "cuda":
        return {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.forward_window(ids, e0, 0, window, state, kv, set())
        torch.cuda.synchronize()
    events = []
    for ev in prof.key_averages():
        t_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t_us and not ev.key.startswith("aten::") and not ev.key.startswith("cuda"):
            events.append((ev.key, t_us / 1e3, ev.count))
    return kernel_families(events, triton_kernel_names())


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


def graph_window_rows(model: Any, dtype: torch.dtype, window: int, depths: Sequence[int],
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """What-if: one window captured in a CUDA graph and replayed, i.e. the window's device time
    without the Python launch overhead of the eager engine (a graph per depth)."""
    if DEVICE != "cuda":
        return []
    dev = torch.device(DEVICE)
    cfg = model.cfg
    rows = []
    kv = model.kv_buffers(max(depths) + window, dev, dtype)
    state = model.zero_state(dev, dtype)
    ids = torch.randint(0, 256, (window,), device=dev)
    for d in depths:
        e0 = d // window * window
        try:
            model.forward_window(ids, e0, 0, window, state, kv, set())  # compile, warm caches
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model.forward_window(ids, e0, 0, window, state, kv, set())
            ms = time_ms(graph.replay, warmup_ms=1, rep_ms=50)
        except Exception as e:  # noqa: BLE001 - a what-if measurement must not stop the bench
            log(f"  graph window E={window} depth {e0}: failed ({type(e).__name__}: {e})")
            break
        fl = model_flops(cfg, e0, e0 + window)
        rows.append({"kernel": "window_graph", "impl": "sbrbench", "preset": cfg.name,
                     "window": window, "depth": e0, "ms": round(ms, 3),
                     "model_tflops": round(fl / ms / 1e9, 1),
                     "mfu": round(fl / ms / 1e9 / DENSE_BF16_PEAK_TFLOPS, 4)})
        log(f"  graph window E={window} depth {e0}: {ms:.2f} ms, MFU {rows[-1]['mfu']:.1%}")
        del graph
    return rows


def run_prefill(preset_name: str, lengths: Sequence[int], windows: Sequence[int],
                dtype_name: str, reps: int, out: Path | None,
                log: Callable[[str], None] = print) -> tuple[Path, list[dict[str, Any]]]:
    """`sbrbench bench prefill`: write the rows and return (path, rows)."""
    require_cuda()
    from engine.kernels.ops import impl_name  # noqa: PLC0415
    from engine.runtime import DTYPES  # noqa: PLC0415

    if dtype_name not in DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r} (bfloat16, float16, float32)")
    dtype = DTYPES[dtype_name]
    for w in windows:
        if w <= 0 or w % CHUNK:
            raise UserError(f"exec windows must be positive multiples of {CHUNK}, got {w}")
    env = bench_env()
    path = out or Path("results") / gpu_slug(env.get("gpu")) / "bench-prefill.json"
    ceil = measure_ceilings()
    log(f"{env.get('gpu')}: matmul {ceil.matmul_tflops:.0f} TFLOP/s, "
        f"copy {ceil.copy_gbps:.0f} GB/s")
    t0 = time.perf_counter()
    model = build_model_on_gpu(preset_name, dtype)
    log(f"model {preset_name} built in {time.perf_counter() - t0:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)")
    extra: dict[str, Any] = {"ceilings": ceil._asdict(),
                             "peak_assumed_tflops": DENSE_BF16_PEAK_TFLOPS, "preset": preset_name,
                             "dtype": dtype_name, "kernels": impl_name(DEVICE), "partial": True}
    rows = bench_prefill_rows(model, dtype, lengths, windows, reps, ceil.matmul_tflops, log,
                              on_rows=lambda r: write_doc(path, "prefill", env, r, extra))
    best = max((r for r in rows if r["tokens"] == max(lengths)), key=lambda r: r["tok_s"])
    depths = sorted({0, *[n // 2 for n in lengths], max(lengths) - best["window"]})
    rows += bench_replay_rows(model, dtype, best["window"], depths, log)
    rows += bench_attention_rows(model.cfg, dtype, sorted({512, 2048, best["window"]}),
                                 sorted(set(lengths)), log)
    rows += graph_window_rows(model, dtype, best["window"], depths, log)
    prof = profile_window(model, best["window"], max(lengths) // 2, dtype)
    fams = {k: v for k, v in prof.items() if k != "other_top"}
    log(f"  one window E={best['window']} at depth {max(lengths) // 2} by family (ms): {fams}")
    for name, (ms, n) in (prof.get("other_top") or {}).items():
        log(f"    other: {ms:8.3f} ms  x{n:<4d} {name}")
    extra.update(partial=False, best_window=best["window"], window_profile_ms=prof)
    write_doc(path, "prefill", env, rows, extra)
    return path, rows


# ---------------------------------------------------------------------------------------------
# bench resume
# ---------------------------------------------------------------------------------------------

# Datasheet ceilings of an H200 SXM: dense bf16 tensor-core rate and HBM3e bandwidth. The
# floor is reported against these and against the ceilings measured in the same run.
H200_HBM_GBPS = 4800.0


class WindowTime(NamedTuple):
    """One window of a request, timed from outside the engine: host_ms is the wall time of
    the forward call (issuing its launches), gpu_ms the device time between CUDA events
    recorded on either side of it (None on the CPU)."""

    e0: int
    lo: int
    hi: int
    host_ms: float
    gpu_ms: float | None


class Floor(NamedTuple):
    """The least device time some work can take: its FLOPs at the bf16 matmul rate, or its
    bytes at the memory bandwidth, whichever is longer."""

    flops: float
    nbytes: float
    ms: float

    @classmethod
    def of(cls, flops: float, nbytes: float, tflops: float, gbps: float) -> Floor:
        return cls(flops, nbytes, max(flops / tflops / 1e9, nbytes / gbps / 1e6))


def pass_floor(cfg: ModelConfig, start: int, end: int, weight_bytes: float, dtype_bytes: int,
               tflops: float, gbps: float) -> Floor:
    """Floor of one forward pass over positions [start, end) at depth `start`: the model FLOPs
    of those rows (model_flops) against reading every weight once, the KV of all `end`
    positions once (writing the new rows' KV) and the recurrent state in and out."""
    kv = cfg.kv_bytes_per_token(dtype_bytes) * (end + (end - start))
    state = 2 * cfg.snapshot_bytes(dtype_bytes)
    return Floor.of(model_flops(cfg, start, end), weight_bytes + kv + state, tflops, gbps)


def timed_windows(model: Any, into: list[WindowTime]) -> Callable[[], None]:
    """Time every model.forward_window call (the engine's windows) into `into`; returns the
    function that takes the timing off again."""
    orig = model.forward_window
    cuda = next(model.parameters()).is_cuda

    def timed(ids: torch.Tensor, e0: int, lo: int, hi: int, *args: Any, **kw: Any) -> Any:
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        t0 = time.perf_counter()
        res = orig(ids, e0, lo, hi, *args, **kw)
        host = (time.perf_counter() - t0) * 1e3
        gpu = None
        if cuda:
            b.record()
            b.synchronize()
            gpu = a.elapsed_time(b)
        into.append(WindowTime(e0, lo, hi, host, gpu))
        return res

    model.forward_window = timed

    def undo() -> None:
        del model.forward_window  # the instance attribute; the class method shows again

    return undo


def resume_rows(eng: Any, depth: int, new: int, reps: int, ceil: Ceilings,
                log: Callable[[str], None] = print, seed: int = 0) -> list[dict[str, Any]]:
    """Warm resumes of one conversation: a cold build to `depth` tokens, then `reps` turns,
    each sending `new` fresh tokens after the previous turn (one generated token each). Per
    turn: the TTFT split into window host time, window GPU time and the rest, against the GPU
    floor of the tokens the turn needs (replay from the snapshot plus the new ones) and of the
    rows its windows compute, at the measured and at the datasheet ceilings."""
    from engine.runtime import SamplingParams  # noqa: PLC0415

    cfg, model = eng.config, eng.model
    dbytes = torch.empty((), dtype=eng.dtype).element_size()
    wbytes = float(sum(p.numel() * p.element_size() for p in model.parameters()))
    gen = torch.Generator().manual_seed(seed)
    vocab = min(cfg.vocab_size, 256)
    ids = torch.randint(0, vocab, (depth,), generator=gen).tolist()
    p = SamplingParams(max_tokens=1, ignore_eos=True)
    full = ids + eng.generate(ids, p, session="resume").tokens
    rows: list[dict[str, Any]] = []
    peaks = {"measured": (ceil.matmul_tflops, ceil.copy_gbps),
             "datasheet": (DENSE_BF16_PEAK_TFLOPS, H200_HBM_GBPS)}
    for turn in range(reps):
        prompt = full + torch.randint(0, vocab, (new,), generator=gen).tolist()
        calls: list[WindowTime] = []
        undo = timed_windows(model, calls)
        try:
            res = eng.generate(prompt, p, session="resume")
        finally:
            undo()
        st = res.stats
        full = prompt + res.tokens
        E, L, s = eng.window, len(prompt), st.snapshot_pos
        wins = calls[:len(range(s // E * E, L, E))]  # the prompt's windows; then finalize's
        gpu = None if any(w.gpu_ms is None for w in wins) else sum(w.gpu_ms or 0 for w in wins)
        host = sum(w.host_ms for w in wins)
        row: dict[str, Any] = {
            "kernel": "resume", "impl": "sbrbench", "preset": cfg.name, "window": E,
            "turn": turn, "prompt_tokens": L, "snapshot_pos": s, "replay_tokens": st.replay_tokens,
            "new_tokens": st.new_tokens, "ttft_ms": round(st.ttft_s * 1e3, 3),
            "windows": len(wins), "windows_host_ms": round(host, 3),
            "windows_gpu_ms": None if gpu is None else round(gpu, 3),
            "windows_wall_ms": round((st.replay_s + st.prefill_s) * 1e3, 3),
            "outside_windows_ms": round((st.ttft_s - st.replay_s - st.prefill_s) * 1e3, 3),
            "per_window": [w._asdict() for w in wins]}
        for name, (tf, bw) in peaks.items():
            need = pass_floor(cfg, s, L, wbytes, dbytes, tf, bw)
            done = sum(pass_floor(cfg, w.e0, w.e0 + E, wbytes, dbytes, tf, bw).ms for w in wins)
            row[f"floor_ms_{name}"] = round(need.ms, 4)
            row[f"floor_windows_ms_{name}"] = round(done, 4)
            row[f"ttft_over_floor_{name}"] = round(st.ttft_s * 1e3 / need.ms, 2)
        row["floor_flops"], row["floor_bytes"] = need.flops, need.nbytes
        rows.append(row)
        log(f"  turn {turn}: L={L} replay {st.replay_tokens} + new {st.new_tokens} tok, "
            f"TTFT {row['ttft_ms']:.1f} ms = windows {row['windows_wall_ms']:.1f} (host "
            f"{host:.1f}, GPU {'-' if gpu is None else f'{gpu:.1f}'}) + other "
            f"{row['outside_windows_ms']:.1f}; floor {row['floor_ms_measured']:.2f} ms "
            f"({row['ttft_over_floor_measured']:.1f}x), windows' rows "
            f"{row['floor_windows_ms_measured']:.2f} ms")
    return rows


def run_resume(preset_name: str, depth: int, new: int, reps: int, dtype_name: str,
               window: int | None, device: str, out: Path | None,
               log: Callable[[str], None] = print) -> tuple[Path, list[dict[str, Any]]]:
    """`sbrbench bench resume`: write the rows and return (path, rows). On the CPU (a smoke
    run) the ceilings are measured small and there is no GPU time."""
    global DEVICE
    from engine.runtime import DTYPES, Engine, EngineCacheArgs  # noqa: PLC0415

    if device == "cuda":
        require_cuda()
    elif device != "cpu":
        raise UserError(f"--device is cpu or cuda, got {device!r}")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r} (bfloat16, float16, float32)")
    if depth < 1 or new < 1 or reps < 1:
        raise UserError("--depth, --new and --reps must be >= 1")
    if window is not None and (window <= 0 or window % CHUNK):
        raise UserError(f"--window must be a positive multiple of {CHUNK}, got {window}")
    prev, DEVICE = DEVICE, device
    try:
        env = bench_env()
        slug = gpu_slug(env.get("gpu")) if device == "cuda" else "cpu"
        path = out or Path("results") / slug / "bench-resume.json"
        ceil = measure_ceilings() if device == "cuda" else measure_ceilings(512, 16)
        log(f"{env.get('gpu') or 'cpu'}: matmul {ceil.matmul_tflops:.3g} TFLOP/s, "
            f"copy {ceil.copy_gbps:.0f} GB/s")
        cache = EngineCacheArgs(policy="lru", exec_window=window,
                                kv_budget_tokens=depth + (new + 1) * reps + 4096)
        eng = Engine.from_preset(preset_name, device=device, dtype=dtype_name, cache=cache)
        rows = resume_rows(eng, depth, new, reps, ceil, log)
        extra = {"ceilings": ceil._asdict(), "peak_assumed_tflops": DENSE_BF16_PEAK_TFLOPS,
                 "hbm_assumed_gbps": H200_HBM_GBPS, "preset": preset_name, "dtype": dtype_name,
                 "depth": depth, "new": new, "engine": eng.describe()}
        write_doc(path, "resume", env, rows, extra)
    finally:
        DEVICE = prev
    return path, rows
