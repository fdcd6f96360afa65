"""The models' projection layer: nn.Linear, computed by the batch-invariant linear inside the
windows of an engine that sizes its windows to the work (ops.rows_invariant).

With fixed windows every projection call of a window has the same number of rows, so the
library GEMM's shape-dependent choice of kernel is fixed and its rows are exact; decode steps
always take the library GEMM (one row, no window to be invariant across)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import ops


class Linear(nn.Linear):
    """nn.Linear without bias (every projection of these models), batch-invariant when the
    engine's windows are sized to the work."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.rows_invariant():
            return ops.linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)
