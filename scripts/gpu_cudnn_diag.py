"""Why engine prefill with cuDNN key pieces is slower than its windows replayed: host time of
the cuDNN calls (new buffers each call vs the same, inference_mode), and a profile of one
engine prefill (top ops by host time)."""
from __future__ import annotations

import time

import torch

from engine.model import attention as at
from sbrbench import bench

dev = torch.device("cuda")
q = torch.randn(4096, 16, 256, device=dev, dtype=torch.bfloat16)


def wall(fn, n=5):
    out = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return " ".join(f"{x:.2f}" for x in out)


kb = torch.randn(20000, 2, 256, device=dev, dtype=torch.bfloat16)
vb = torch.randn(20000, 2, 256, device=dev, dtype=torch.bfloat16)
print("same buffers      ", wall(lambda: at.attend_pieces(q, kb[:12288], vb[:12288], 1 / 16)))


def fresh():
    k2 = torch.randn(20000 + int(torch.randint(1, 64, ()).item()) * 8, 2, 256, device=dev,
                     dtype=torch.bfloat16)
    v2 = torch.randn_like(k2)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    at.attend_pieces(q, k2[:12288], v2[:12288], 1 / 16)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


print("fresh buffers     ", " ".join(f"{fresh():.2f}" for _ in range(5)))
with torch.inference_mode():
    print("inference_mode    ", wall(lambda: at.attend_pieces(q, kb[:12288], vb[:12288], 1 / 16)))
with torch.no_grad():
    print("no_grad           ", wall(lambda: at.attend_pieces(q, kb[:12288], vb[:12288], 1 / 16)))

from engine.runtime import SamplingParams  # noqa: E402

model = bench.build_model_on_gpu("a3b-proxy", torch.bfloat16)
eng = bench._engine(model, torch.bfloat16, 4096, 16384 + 8192)
ids = list(range(256)) * 64
for _ in range(2):
    eng.generate(ids, SamplingParams(max_tokens=1), use_cache=False)
for _ in range(2):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    st = eng.generate(ids, SamplingParams(max_tokens=1), use_cache=False).stats
    torch.cuda.synchronize()
    print(f"engine prefill 16k: {st.prefill_s * 1e3:.1f} ms (wall {(time.perf_counter() - t0) * 1e3:.1f})")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    eng.generate(ids, SamplingParams(max_tokens=1), use_cache=False)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
