"""Where does a3b-proxy request time go on the GPU? Times one decode step and one prefill window
in isolation and prints torch.profiler's top ops. Usage: python3 scripts/gpu_profile.py [depth]"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engine.config import preset
from engine.model.model import HybridModel


def timed(fn, n: int = 5) -> float:  # type: ignore[no-untyped-def]
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 24000
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    cfg = preset("a3b-proxy" if gpu else "tiny")  # CPU: a smoke run of this script
    with torch.device(dev):
        model = HybridModel(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    state = model.zero_state(dev, torch.bfloat16)
    kv = model.kv_buffers(depth + 4096, dev, torch.bfloat16)
    for kb, vb in kv:
        kb[:depth].normal_()
        vb[:depth].normal_()
    step = lambda: model.step(7, depth, state, kv)  # noqa: E731
    print(f"decode step at depth {depth}: {timed(step) * 1e3:.2f} ms")
    if gpu:
        from engine.model.graphs import DecodeGraphs

        graphs = DecodeGraphs(model, dev, torch.bfloat16)
        graphs.start(state)
        gstep = lambda: graphs.step(7, depth, kv)  # noqa: E731
        print(f"decode step (CUDA graphs) at depth {depth}: {timed(gstep) * 1e3:.2f} ms")
    for E in (512, 2048, 4096):
        ids = torch.randint(0, min(1000, cfg.vocab_size), (E,), device=dev)
        e0 = depth // E * E
        win = lambda ids=ids, e0=e0, E=E: model.forward_window(  # noqa: E731
            ids, e0, 0, E, state, kv, set())
        ms = timed(win, 3) * 1e3
        print(f"window E={E} at e0={e0}: {ms:.1f} ms ({E / ms * 1e3:.0f} tok/s)")
    ids = torch.randint(0, min(1000, cfg.vocab_size), (2048,), device=dev)
    e0 = depth // 2048 * 2048
    for name, fn in (("step", step),
                     ("window2048", lambda: model.forward_window(ids, e0, 0, 2048, state, kv,
                                                                 set()))):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=acts) as prof:
            fn()
            if gpu:
                torch.cuda.synchronize()
        print(f"==== {name}: top by CUDA time")
        key = "cuda_time_total" if gpu else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
        print(f"==== {name}: top by CPU time")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
