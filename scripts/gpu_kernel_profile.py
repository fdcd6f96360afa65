"""Per-kernel device time of the chunked GDN rule (ours, each named config, and fla) at one T,
from torch.profiler: which launch costs what. Usage: python scripts/gpu_kernel_profile.py [T]"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from engine.kernels import triton_gdn as tg
from sbrbench import bench


def device_times(fn, reps: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.device_time_total > 0:
            acc[ev.key[:60]] += ev.device_time_total / reps / 1e3  # ms per call
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def main() -> None:
    t = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    sh = bench.QWEN3_NEXT
    q, k, v, g, beta, s0 = bench.gdn_inputs(t, sh["H"], sh["HV"], sh["K"], sh["V"], seed=t)
    res: dict[str, dict[str, float]] = {}
    for name in tg.NAMED_CONFIGS:
        cfg = tg.config_for(128, 128, name=name)
        res[name] = device_times(partial(tg.gdn_chunk_fwd, q, k, v, g, beta, s0, 0, t, True, cfg))
    fla = bench._fla_fn(q, k, v, g, beta, s0)
    if fla is not None:
        res["fla"] = device_times(fla)
    for name, d in res.items():
        print(f"{name}: total {sum(d.values()):.3f} ms")
        for kname, ms in d.items():
            print(f"    {ms:8.3f}  {kname}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"kernel-profile-T{t}.json"), "w") as f:
            json.dump({"T": t, "gpu": torch.cuda.get_device_name(0), "ms": res}, f, indent=1)


if __name__ == "__main__":
    main()
