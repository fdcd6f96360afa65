"""Sparse MoE feed-forward (Qwen3-Next / Qwen3.5-MoE): softmax router, top-k routed SwiGLU
experts, and a shared SwiGLU expert scaled by a sigmoid gate. HF parameter names."""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kernels import ops
from engine.kernels.reference import moe_route
from engine.model.linear import Linear
from engine.model.mlp import MLP


class Experts(nn.Module):
    """The routed experts' weights as 3-D tensors (transformers' layout): gate_up_proj
    [E, 2I, H] holds each expert's gate rows then its up rows; down_proj is [E, H, I]."""

    def __init__(self, n: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk = cfg.norm_topk_prob
        self.gate = Linear(h, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, h, cfg.moe_intermediate_size)
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """x [T, H]; only rows [lo, hi) are routed (the others are a window's padding and get
        the shared expert alone). Every row is a function of its own input only."""
        hi = x.shape[0] if hi is None else hi
        idx, w = moe_route(self.gate(x), self.top_k, self.norm_topk)
        routed = ops.moe_experts(x, idx, w, self.experts.gate_up_proj, self.experts.down_proj,
                                 lo, hi)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared  # type: ignore[no-any-return]
