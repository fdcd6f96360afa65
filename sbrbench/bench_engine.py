"""`sbrbench bench prefill` and `bench resume`: the engine's cold prefill per exec window
(tokens/s, MFU), a window's cost at depth and its kernel families, the window attention, and
a warm resume's TTFT split into host and GPU time beside the GPU floor of its work."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.config import CHUNK, ModelConfig
from engine.errors import UserError
from sbrbench import bench
from sbrbench.bench import (
    DENSE_BF16_PEAK_TFLOPS,
    H200_HBM_GBPS,
    Ceilings,
    _empty_cache,
    bench_env,
    gpu_slug,
    kernel_families,
    measure_ceilings,
    model_flops,
    require_cuda,
    time_ms,
    triton_kernel_names,
    write_doc,
)

# ---------------------------------------------------------------------------------------------
# bench prefill
# ---------------------------------------------------------------------------------------------


def build_model_on_gpu(preset_name: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """The weights Engine.from_preset(device="cuda") gets (engine.weights.build_random), built
    on the GPU in `dtype` directly: no fp32 copy of a 35B-parameter preset anywhere."""
    from engine.config import preset  # noqa: PLC0415
    from engine.weights import build_random  # noqa: PLC0415

    model = build_random(preset(preset_name), bench.DEVICE, dtype, seed)
    return model.eval().requires_grad_(False)


def _engine(model: Any, dtype: torch.dtype, window: int, kv_tokens: int) -> Any:
    from engine.cache.settings import CacheSettings  # noqa: PLC0415
    from engine.runtime import Engine  # noqa: PLC0415
    from engine.settings import EngineSettings  # noqa: PLC0415
    from engine.tokenizer import ByteTokenizer  # noqa: PLC0415

    cfg = model.cfg
    cache = CacheSettings(policy="lru", snapshot_slots=2, kv_budget_tokens=kv_tokens)
    return Engine(model, ByteTokenizer(cfg.vocab_size, cfg.eos_token_id), bench.DEVICE, dtype,
                  cache, settings=EngineSettings.from_env(exec_window=window))


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
            one = SamplingParams(max_tokens=1)
            stats = [eng.generate(ids[:n], one, use_cache=False).stats.timing
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
    dev = torch.device(bench.DEVICE)
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
    flash through SDPA with a lower-right causal mask (impl "sdpa", the single-call path), the
    window-invariant Triton kernel (impl "invariant", triton_attention: what windows sized to
    the work would attend with) and the engine's cuDNN key pieces merged by log-sum-exp (impl
    "cudnn-pieces", where cuDNN runs)."""
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

    from engine.model import attention as at  # noqa: PLC0415

    rows = []
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for w in windows:
        for ctx in (c for c in contexts if c >= w):
            q = torch.randn(1, hq, w, d, device=bench.DEVICE, dtype=dtype)
            k = torch.randn(1, hk, ctx, d, device=bench.DEVICE, dtype=dtype)
            v = torch.randn(1, hk, ctx, d, device=bench.DEVICE, dtype=dtype)
            mask = causal_lower_right(w, ctx)
            ms = time_ms(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask,
                                 scale=d ** -0.5, enable_gqa=True))
            pairs = w * ctx - w * (w - 1) / 2
            fl = 4 * hq * d * pairs
            rows.append({"kernel": "attention_window", "impl": "sdpa", "window": w,
                         "context": ctx, "Hq": hq, "Hkv": hk, "D": d, "ms": round(ms, 4),
                         "tflops": round(fl / ms / 1e9, 1)})
            log(f"  attention E={w} ctx={ctx}: {ms:.3f} ms, {fl / ms / 1e9:.0f} TFLOP/s")
            qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H, D] as the engine
            if bench.DEVICE == "cuda":
                from engine.kernels import triton_attention as ta  # noqa: PLC0415

                ms = time_ms(partial(ta.window_attention, qt, kt, vt, d ** -0.5))
                rows.append({"kernel": "attention_window", "impl": "invariant", "window": w,
                             "context": ctx, "Hq": hq, "Hkv": hk, "D": d, "ms": round(ms, 4),
                             "tflops": round(fl / ms / 1e9, 1),
                             "tile": ta.tile_for(d, dtype)._asdict()})
                log(f"  attention invariant E={w} ctx={ctx}: {ms:.3f} ms, "
                    f"{fl / ms / 1e9:.0f} TFLOP/s")
            if at.attention_impl(bench.DEVICE) != "cudnn-pieces" or dtype not in at._CUDNN_DTYPES:
                continue
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


def profile_window(model: Any, window: int, depth: int, dtype: torch.dtype) -> dict[str, Any]:
    """Device time of one window by kernel family (gemm, attention, gdn, other), in ms, and
    the largest `other` kernels (kernel_families)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    dev = torch.device(bench.DEVICE)
    kv = model.kv_buffers(depth + window, dev, dtype)
    state = model.zero_state(dev, dtype)
    ids = torch.randint(0, 256, (window,), device=dev)
    e0 = depth // window * window
    model.forward_window(ids, e0, 0, window, state, kv, set())
    if bench.DEVICE != "cuda":
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


def graph_window_rows(model: Any, dtype: torch.dtype, window: int, depths: Sequence[int],
                      log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """What-if: one window captured in a CUDA graph and replayed, i.e. the window's device time
    without the Python launch overhead of the eager engine (a graph per depth)."""
    if bench.DEVICE != "cuda":
        return []
    dev = torch.device(bench.DEVICE)
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
                             "dtype": dtype_name, "kernels": impl_name(bench.DEVICE),
                             "partial": True}
    rows = bench_prefill_rows(model, dtype, lengths, windows, reps, ceil.matmul_tflops, log,
                              on_rows=lambda r: write_doc(path, "prefill", env, r, extra))
    best = max((r for r in rows if r["tokens"] == max(lengths)), key=lambda r: r["tok_s"])
    depths = sorted({0, *[n // 2 for n in lengths], max(lengths) - best["window"]})
    rows += bench_replay_rows(model, dtype, best["window"], depths, log)
    rows += bench_attention_rows(model.cfg, dtype, sorted({64, 512, 2048, best["window"]}),
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


class WindowTime(NamedTuple):
    """One window of a request, timed from outside the engine: host_ms is the wall time of
    the forward call (issuing its launches), gpu_ms the device time between CUDA events
    recorded on either side of it (None on the CPU)."""

    e0: int
    lo: int
    hi: int
    rows: int  # rows the window computes (exec_window, or fewer with sized windows)
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
        into.append(WindowTime(e0, lo, hi, int(ids.shape[0]), host, gpu))
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
        use, st = res.stats.cache, res.stats.timing
        full = prompt + res.tokens
        E, L, s = eng.window, len(prompt), use.snapshot_pos
        wins = calls[:len(range(s // E * E, L, E))]  # the prompt's windows; then finalize's
        gpu = None if any(w.gpu_ms is None for w in wins) else sum(w.gpu_ms or 0 for w in wins)
        host = sum(w.host_ms for w in wins)
        row: dict[str, Any] = {
            "kernel": "resume", "impl": "sbrbench", "preset": cfg.name, "window": E,
            "turn": turn, "prompt_tokens": L, "snapshot_pos": s, "replay_tokens": use.replay_tokens,
            "new_tokens": use.new_tokens, "ttft_ms": round(st.ttft_s * 1e3, 3),
            "windows": len(wins), "windows_host_ms": round(host, 3),
            "windows_gpu_ms": None if gpu is None else round(gpu, 3),
            "windows_wall_ms": round((st.replay_s + st.prefill_s) * 1e3, 3),
            "outside_windows_ms": round((st.ttft_s - st.replay_s - st.prefill_s) * 1e3, 3),
            "per_window": [w._asdict() for w in wins]}
        for name, (tf, bw) in peaks.items():
            need = pass_floor(cfg, s, L, wbytes, dbytes, tf, bw)
            done = sum(pass_floor(cfg, w.e0, w.e0 + w.rows, wbytes, dbytes, tf, bw).ms
                       for w in wins)
            row[f"floor_ms_{name}"] = round(need.ms, 4)
            row[f"floor_windows_ms_{name}"] = round(done, 4)
            row[f"ttft_over_floor_{name}"] = round(st.ttft_s * 1e3 / need.ms, 2)
        row["floor_flops"], row["floor_bytes"] = need.flops, need.nbytes
        rows.append(row)
        log(f"  turn {turn}: L={L} replay {use.replay_tokens} + new {use.new_tokens} tok, "
            f"TTFT {row['ttft_ms']:.1f} ms = windows {row['windows_wall_ms']:.1f} (host "
            f"{host:.1f}, GPU {'-' if gpu is None else f'{gpu:.1f}'}) + other "
            f"{row['outside_windows_ms']:.1f}; floor {row['floor_ms_measured']:.2f} ms "
            f"({row['ttft_over_floor_measured']:.1f}x), windows' rows "
            f"{row['floor_windows_ms_measured']:.2f} ms")
    return rows


def check_device(device: str, dtype_name: str) -> None:
    """The engine benches' --device (cuda, which must be present, or cpu) and --dtype."""
    from engine.runtime import DTYPES  # noqa: PLC0415

    if device == "cuda":
        require_cuda()
    elif device != "cpu":
        raise UserError(f"--device is cpu or cuda, got {device!r}")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r} (bfloat16, float16, float32)")


def run_resume(preset_name: str, depth: int, new: int, reps: int, dtype_name: str,
               window: int | None, device: str, out: Path | None,
               log: Callable[[str], None] = print, windows: str = "fixed",
               ) -> tuple[Path, list[dict[str, Any]]]:
    """`sbrbench bench resume`: write the rows and return (path, rows). On the CPU (a smoke
    run) the ceilings are measured small and there is no GPU time."""
    from engine.cache.settings import CacheSettings  # noqa: PLC0415
    from engine.runtime import Engine  # noqa: PLC0415
    from engine.settings import EngineSettings  # noqa: PLC0415

    check_device(device, dtype_name)
    if depth < 1 or new < 1 or reps < 1:
        raise UserError("--depth, --new and --reps must be >= 1")
    if window is not None and (window <= 0 or window % CHUNK):
        raise UserError(f"--window must be a positive multiple of {CHUNK}, got {window}")
    prev, bench.DEVICE = bench.DEVICE, device
    try:
        env = bench_env()
        slug = gpu_slug(env.get("gpu")) if device == "cuda" else "cpu"
        path = out or Path("results") / slug / "bench-resume.json"
        ceil = measure_ceilings() if device == "cuda" else measure_ceilings(512, 16)
        log(f"{env.get('gpu') or 'cpu'}: matmul {ceil.matmul_tflops:.3g} TFLOP/s, "
            f"copy {ceil.copy_gbps:.0f} GB/s")
        cache = CacheSettings(policy="lru", kv_budget_tokens=depth + (new + 1) * reps + 4096)
        eng = Engine.from_preset(preset_name, device=device, dtype=dtype_name, cache=cache,
                                 settings=EngineSettings.from_env(exec_window=window,
                                                                  windows=windows))
        rows = resume_rows(eng, depth, new, reps, ceil, log)
        extra = {"ceilings": ceil._asdict(), "peak_assumed_tflops": DENSE_BF16_PEAK_TFLOPS,
                 "hbm_assumed_gbps": H200_HBM_GBPS, "preset": preset_name, "dtype": dtype_name,
                 "depth": depth, "new": new, "windows": windows, "engine": eng.describe()}
        write_doc(path, "resume", env, rows, extra)
    finally:
        bench.DEVICE = prev
    return path, rows


# ---------------------------------------------------------------------------------------------
# bench decode
# ---------------------------------------------------------------------------------------------


def decode_bytes(cfg: ModelConfig, pos: int, dtype_bytes: int) -> float:
    """Bytes one decode step at position `pos` must move at least: every weight the token
    touches once (the active parameters; the input embedding is one row, not its table, unless
    it is tied to lm_head), the KV of the `pos` positions before it read and its own written,
    and the recurrent state read and written."""
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weights = (cfg.active_param_count() - embed) * dtype_bytes
    kv = cfg.kv_bytes_per_token(dtype_bytes) * (pos + 1)
    return float(weights + kv + 2 * cfg.snapshot_bytes(dtype_bytes))


def decode_rows(eng: Any, depth: int, tokens: int, reps: int, ceil: Ceilings,
                log: Callable[[str], None] = print, seed: int = 0) -> list[dict[str, Any]]:
    """Batch-1 decode after a `depth`-token prompt, after one unrecorded request of the same
    shape: per request the time per output token (TPOT, the engine's own timing: first token
    to last over tokens - 1 steps) against the step's bandwidth floor (decode_bytes at the
    middle position, at the measured copy rate and at the datasheet HBM rate); floor / TPOT is
    the share of the roofline reached."""
    from engine.runtime import SamplingParams  # noqa: PLC0415

    cfg = eng.config
    dbytes = torch.empty((), dtype=eng.dtype).element_size()
    gen = torch.Generator().manual_seed(seed)
    vocab = min(cfg.vocab_size, 256)
    p = SamplingParams(max_tokens=tokens, ignore_eos=True)
    mid = depth + tokens // 2
    nbytes = decode_bytes(cfg, mid, dbytes)
    # one unrecorded request of the same shape first: it captures the decode graphs and warms
    # the allocator, which the first timed request would otherwise pay for in its TPOT
    eng.generate(torch.randint(0, vocab, (depth,), generator=gen).tolist(), p, session="warmup")
    rows: list[dict[str, Any]] = []
    for rep in range(reps):
        ids = torch.randint(0, vocab, (depth,), generator=gen).tolist()
        res = eng.generate(ids, p, session=f"decode-{rep}")
        tpot = res.stats.tpot_s
        if tpot is None:
            raise UserError("--tokens must be >= 2 (TPOT needs two output tokens)")
        row: dict[str, Any] = {
            "kernel": "decode", "impl": "sbrbench", "preset": cfg.name, "rep": rep,
            "prompt_tokens": depth, "output_tokens": len(res.tokens),
            "tpot_ms": round(tpot * 1e3, 4), "ttft_ms": round(res.stats.timing.ttft_s * 1e3, 3),
            "floor_bytes": nbytes, "cuda_graphs": bool(getattr(eng, "cuda_graphs", False))}
        for name, gbps in (("measured", ceil.copy_gbps), ("datasheet", H200_HBM_GBPS)):
            floor_ms = nbytes / gbps / 1e6
            row[f"floor_ms_{name}"] = round(floor_ms, 4)
            row[f"roofline_share_{name}"] = round(floor_ms / (tpot * 1e3), 4)
        rows.append(row)
        log(f"  rep {rep}: {len(res.tokens)} tokens after {depth}, TPOT {row['tpot_ms']:.2f} ms; "
            f"floor {row['floor_ms_measured']:.2f} ms ({nbytes / 1e9:.2f} GB at "
            f"{ceil.copy_gbps:.0f} GB/s): {row['roofline_share_measured']:.0%} of the roofline")
    return rows


def run_decode(preset_name: str, depth: int, tokens: int, reps: int, dtype_name: str,
               device: str, out: Path, log: Callable[[str], None] = print
               ) -> tuple[Path, list[dict[str, Any]]]:
    """`sbrbench bench decode`: write the rows and return (path, rows). On the CPU (a smoke
    run) the copy ceiling is measured small."""
    from engine.cache.settings import CacheSettings  # noqa: PLC0415
    from engine.runtime import Engine  # noqa: PLC0415
    from engine.settings import EngineSettings  # noqa: PLC0415

    check_device(device, dtype_name)
    if depth < 1 or tokens < 2 or reps < 1:
        raise UserError("--depth and --reps must be >= 1, --tokens >= 2")
    prev, bench.DEVICE = bench.DEVICE, device
    try:
        env = bench_env()
        ceil = measure_ceilings() if device == "cuda" else measure_ceilings(512, 16)
        log(f"{env.get('gpu') or 'cpu'}: copy {ceil.copy_gbps:.0f} GB/s")
        cache = CacheSettings(policy="lru", kv_budget_tokens=(depth + tokens) * (reps + 1) + 4096)
        eng = Engine.from_preset(preset_name, device=device, dtype=dtype_name, cache=cache,
                                 settings=EngineSettings.from_env())
        rows = decode_rows(eng, depth, tokens, reps, ceil, log)
        extra = {"ceilings": ceil._asdict(), "hbm_assumed_gbps": H200_HBM_GBPS,
                 "preset": preset_name, "dtype": dtype_name, "depth": depth, "tokens": tokens,
                 "engine": eng.describe()}
        write_doc(out, "decode", env, rows, extra)
    finally:
        bench.DEVICE = prev
    return out, rows
