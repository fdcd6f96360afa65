"""Zero-centred RMSNorm and the gated RMSNorm of GDN outputs, as parameter holders."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import ops


class RMSNorm(nn.Module):
    """x_hat * (1 + w); w starts at zero (Qwen3-Next convention)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)  # type: ignore[no-any-return]


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * w * silu(z); w starts at one."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps)  # type: ignore[no-any-return]
