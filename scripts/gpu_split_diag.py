"""Which buffer of the split GDN pipeline differs between identical calls (run-to-run
determinism), per configuration variant. Usage: python scripts/gpu_split_diag.py"""

from __future__ import annotations

import torch

import engine.kernels.triton_gdn as tg
from sbrbench import bench

NAMES = ["out", "s_out", "states", "fac", "glast", "xmat", "aqk", "w", "u", "vn", "hbuf"]


def run_once(cfg: tg.GdnConfig, inputs: tuple[torch.Tensor, ...], lo: int, hi: int,
             ) -> list[torch.Tensor]:
    bufs: list[torch.Tensor] = []

    def zeros(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = torch.zeros(*shape, dtype=dtype, device=device)
        bufs.append(b)
        return b

    orig = tg._empty
    tg._empty = zeros
    try:
        tg.gdn_chunk_fwd(*inputs, lo, hi, True, cfg)
    finally:
        tg._empty = orig
    torch.cuda.synchronize()
    return bufs


def main() -> None:
    t = 1024
    q, k, v, g, beta, s0 = bench.gdn_inputs(t, 16, 32, 128, 128, seed=13)
    inputs = (q, k, v, g, beta, s0)
    split = tg.config_for(128, 128, name="split")
    variants = {
        "split": split,
        "split,fuse_prep=False": split._replace(fuse_prep=False),
        "split,overlap": split._replace(overlap=True, seg_chunks=4),
        "split,overlap,prio": split._replace(overlap=True, prio=True, seg_chunks=4),
        "split,qk_warps=8": split._replace(qk_warps=8),
        "split,grp_share": split._replace(grp_share=True),
        "split-tf32": tg.config_for(128, 128, name="split-tf32"),
    }
    for name, cfg in variants.items():
        for lo, hi in ((0, t), (64, 989)):
            first = run_once(cfg, inputs, lo, hi)
            diff: dict[int, int] = {}
            for _ in range(8):
                again = run_once(cfg, inputs, lo, hi)
                for i, (a, b) in enumerate(zip(first, again, strict=True)):
                    if not torch.equal(a.view(torch.uint8) if a.dtype != torch.uint8 else a,
                                       b.view(torch.uint8)):
                        diff[i] = diff.get(i, 0) + 1
            names = NAMES if cfg.split else NAMES[:7]  # allocation order
            print(f"{name:24s} lo={lo} hi={hi}: " + (", ".join(
                f"{names[i] if i < len(names) else i} {n}/8" for i, n in sorted(diff.items()))
                or "repeatable"))


if __name__ == "__main__":
    main()
