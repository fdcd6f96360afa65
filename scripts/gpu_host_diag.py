"""Host vs device time of one a3b-proxy prefill window (E=4096) per GDN configuration: wall
time per eagerly launched window, CUDA-event time, and the top host functions (cProfile)."""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

import torch

from sbrbench import bench

model = bench.build_model_on_gpu("a3b-proxy", torch.bfloat16)
dev = torch.device("cuda")
kv = model.kv_buffers(16384, dev, torch.bfloat16)
state = model.zero_state(dev, torch.bfloat16)
ids = torch.randint(0, 256, (4096,), device=dev)
for name in sys.argv[1:] or ["split", "split2"]:
    os.environ["SBR_GDN_CONFIG"] = name
    for _ in range(3):
        model.forward_window(ids, 8192, 0, 4096, state, kv, {4096})
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.forward_window(ids, 8192, 0, 4096, state, kv, {4096})
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    # host only: launches without waiting (the queue absorbs them while the GPU is busy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.forward_window(ids, 8192, 0, 4096, state, kv, {4096})
    host = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    print(f"{name}: wall per window {' '.join(f'{w:.1f}' for w in walls)} ms; host issue "
          f"{host:.1f} ms")
    pr = cProfile.Profile()
    pr.enable()
    model.forward_window(ids, 8192, 0, 4096, state, kv, {4096})
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)
