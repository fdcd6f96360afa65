"""Why do some a3b-proxy decode steps take 8 ms and others ~45 ms inside the engine?
Runs fresh and cache-hit requests through an Engine, prints decode ms/token for each, then
profiles the decode of one cache-hit request. Usage: python3 scripts/gpu_decode_diag.py"""

from __future__ import annotations

import random

import torch
from torch.profiler import ProfilerActivity, profile

from engine.runtime import Engine, EngineCacheArgs, SamplingParams


def main() -> None:
    eng = Engine.from_preset("a3b-proxy", device="cuda", dtype="bfloat16",
                             cache=EngineCacheArgs(policy="lru", snapshot_slots=16))
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    rnd = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rnd.randrange(300, 1000) for _ in range(n)]

    eng.generate(fresh(200), sp, use_cache=False)  # warm-up + graph capture
    convs = [fresh(420) for _ in range(3)]
    for rnd_i in range(3):
        for c, hist in enumerate(convs):
            r = eng.generate(hist, sp, session=f"c{c}")
            s = r.stats
            print(f"round {rnd_i} conv {c}: L={s.prompt_tokens} cached={s.cached_tokens} "
                  f"snap={s.snapshot_pos} decode {s.decode_s / 15 * 1e3:.1f} ms/tok "
                  f"ttft {s.ttft_s * 1e3:.0f} ms", flush=True)
            hist += r.tokens + fresh(100)
    for label, kw in (("uncached", {"use_cache": False}), ("cached", {})):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = eng.generate(convs[0], sp, session="c0", **kw)
        convs[0] += r.tokens + fresh(100)
        print(f"==== profiled {label} request: decode {r.stats.decode_s / 15 * 1e3:.1f} ms/tok")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25,
                                        max_name_column_width=50))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=50))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
