"""`sbrbench bench kernels`: the GDN kernels at Qwen3-Next shapes, ours (with and without
grid-state capture) against fla, FlashInfer (sbrbench.peers) and the torch reference, and the
decode-step, conv and gated-norm kernels against torch, as `sbrbench.bench/v1` rows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from engine.config import CHUNK
from engine.errors import UserError
from sbrbench import bench
from sbrbench.bench import (
    _empty_cache,
    _guarded_ms,
    bench_env,
    gpu_slug,
    graph_ms,
    kernel_times,
    measure_ceilings,
    repeatable,
    require_cuda,
    time_ms,
    write_doc,
)

QWEN3_NEXT = {"B": 1, "H": 16, "HV": 32, "K": 128, "V": 128}


ENGINE_INTERVAL = 4096  # the engine's default snapshot interval (engine.cache.settings)


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
    gen = torch.Generator(device=bench.DEVICE).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=bench.DEVICE)

    a_log = torch.log(torch.rand(hv, generator=gen, device=bench.DEVICE) * 15 + 1)
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
    x = torch.randn(window, d, device=bench.DEVICE).bfloat16()
    w = (torch.randn(d, 4, device=bench.DEVICE) * 0.3).bfloat16()
    st = torch.randn(3, d, device=bench.DEVICE).bfloat16()
    conv_bytes = 2 * window * d * 2
    fns = [("sbrbench", partial(tg.causal_conv1d, x, w, st)),
           ("torch", partial(ref.causal_conv1d, x, w, st))]
    for impl, fn in fns:
        ms = time_ms(fn)
        rows.append({"kernel": "causal_conv1d", "impl": impl, "T": window, "D": d,
                     "ms": round(ms, 4), "gbps": round(conv_bytes / ms / 1e6, 1)})
        log(f"  causal_conv1d {impl}: {ms * 1e3:.1f} us")
    xo = torch.randn(window, hv, vd, device=bench.DEVICE).bfloat16()
    z = torch.randn(window, hv, vd, device=bench.DEVICE).bfloat16()
    wn = torch.ones(vd, device=bench.DEVICE).bfloat16()
    norm_bytes = 3 * window * hv * vd * 2
    fns = [("sbrbench", partial(tg.gated_rms_norm, xo, z, wn, 1e-6)),
           ("torch", partial(ref.gated_rms_norm, xo, z, wn, 1e-6))]
    for impl, fn in fns:
        ms = time_ms(fn)
        rows.append({"kernel": "gated_rms_norm", "impl": impl, "T": window, "HV": hv, "V": vd,
                     "ms": round(ms, 4), "gbps": round(norm_bytes / ms / 1e6, 1)})
        log(f"  gated_rms_norm {impl}: {ms * 1e3:.1f} us")
    return rows


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


# (K, N) of the a3b-proxy's projections: q (doubled for the gate), k and v, o and the GDN
# output, the GDN input (q, k, v, z), the MLP's gate and up, its down
LINEAR_SHAPES = ((2048, 8192), (2048, 512), (4096, 2048), (2048, 12288), (2048, 5632),
                 (5632, 2048))


def bench_linear_rows(ms_rows: Sequence[int] = (1, 64, 512, 2048, 4096),
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The batch-invariant linear (ops.linear's triton_gemm) against torch's F.linear (cuBLAS)
    in bf16 at the a3b-proxy's projection shapes and window sizes M: what the invariance costs
    (TFLOP/s, and GB/s of weights read for the small M that decode and short windows meet)."""
    from engine.kernels import triton_gemm  # noqa: PLC0415

    rows: list[dict[str, Any]] = []
    for k, n in LINEAR_SHAPES:
        w = (torch.randn(n, k, device=bench.DEVICE) * k ** -0.5).bfloat16()
        for m in ms_rows:
            x = torch.randn(m, k, device=bench.DEVICE).bfloat16()
            for impl, fn in (("sbrbench", partial(triton_gemm.linear, x, w)),
                             ("torch", partial(torch.nn.functional.linear, x, w))):
                ms = time_ms(fn)
                rows.append({"kernel": "linear", "impl": impl, "M": m, "K": k, "N": n,
                             "ms": round(ms, 4), "tflops": round(2 * m * k * n / ms / 1e9, 1),
                             "weight_gbps": round(2 * k * n / ms / 1e6, 1)})
            ours, cublas = rows[-2]["ms"], rows[-1]["ms"]
            log(f"  linear M={m} K={k} N={n}: ours {ours:.3f} ms, cuBLAS {cublas:.3f} ms")
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
    rows += bench_linear_rows(log=log)
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
