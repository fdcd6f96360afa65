"""Sparse-MoE experts as two grouped GEMMs (torch._grouped_mm), with static shapes and no host
synchronisation: the GPU path of reference.moe_experts (prefill windows and CUDA-graph decode).

Layout: the T*K (row, slot) assignments are sorted by (expert, row, slot), padding rows' ones
behind every expert (a sentinel expert E), so expert e's tokens are one contiguous group of the
[T*K, H] operand whose end offsets come from a binary search of the sorted ids. The shapes are
those of the window whatever its valid range, so the GEMM configuration is fixed, and each
output row of a group is computed by the same tile code whatever its place in the group: a
row's result depends on its own inputs only. Outputs go back to (row, slot) order by a gather
with a permutation, and slots are summed in the fixed order of reference.moe_combine.
"""

from __future__ import annotations

import torch

from engine.kernels.reference import moe_combine, swiglu


def grouped_available(x: torch.Tensor) -> bool:
    """Whether the grouped GEMM runs as one kernel here: bf16 on a CUDA device of compute
    capability 9.0 or above (torch's CUTLASS grouped GEMM; elsewhere it is a per-group loop)."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def moe_experts_grouped(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, lo: int,
                        hi: int) -> torch.Tensor:
    """reference.moe_experts on grouped GEMMs: rows [lo, hi) of x [T, H] routed by idx, w
    [T, K] (other rows give zeros); gate_up [E, 2I, H], down [E, H, I]. Returns [T, H]."""
    t, k = idx.shape
    n_exp = gate_up.shape[0]
    dev = x.device
    rows = torch.arange(t, device=dev)[:, None]
    valid = (rows >= lo) & (rows < hi)  # [T, 1]
    e = torch.where(valid, idx, n_exp).reshape(-1)
    # unique keys: the order is the same on every device and needs no stable sort
    key = e * (t * k) + torch.arange(t * k, device=dev)
    order = torch.argsort(key)
    ends = torch.searchsorted(e[order], torch.arange(n_exp, device=dev), right=True)
    offs = ends.to(torch.int32)
    xs = x[order // k]
    g, u = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    ys = torch._grouped_mm(swiglu(g, u), down.transpose(1, 2), offs=offs)
    # rows past the last group (padding rows' slots) are left unwritten by the GEMM: drop them
    y = torch.empty_like(ys)
    y[order] = ys
    y = torch.where(valid.repeat_interleave(k, dim=0), y, 0.0)
    return moe_combine(y.view(t, k, -1), w)
