"""Gated DeltaNet layer exactly as Qwen3-Next defines it, run on aligned windows or one token."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kernels import ops
from engine.kernels.reference import Layout, gdn_gates, mixed_rows
from engine.model.linear import Linear
from engine.model.norm import GatedRMSNorm

StatePair = tuple[torch.Tensor, torch.Tensor]  # (recurrent state, conv state)


class GDNTrace(NamedTuple):
    """Per-token GDN inputs of one layer (for decay forensics): k l2-normalised, heads expanded."""

    layer: int
    q: torch.Tensor  # [T, HV, K] raw (not normalised)
    k: torch.Tensor  # [T, HV, K] l2-normalised
    v: torch.Tensor  # [T, HV, V]
    g: torch.Tensor  # [T, HV] log decay, fp32
    beta: torch.Tensor  # [T, HV]


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.in_proj_qkvz = Linear(cfg.hidden_size, 2 * cfg.key_dim + 2 * cfg.value_dim,
                                      bias=False)
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * self.hv, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.linear_conv_kernel_dim,
                                groups=cfg.conv_dim, bias=False,
                                padding=cfg.linear_conv_kernel_dim - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(cfg.value_dim, cfg.hidden_size, bias=False)
        self.record: list[GDNTrace] | None = None

    def _proj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Layout]:
        """x [T, hidden] -> qkvz [T, HK, 2K + 2RV] and ba [T, HK, 2R] (the projections'
        interleaved per-head layouts) and the layout (HK, K, RV) that reads them."""
        t = x.shape[0]
        r = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).view(t, self.hk, 2 * self.dk + 2 * r * self.dv)
        ba = self.in_proj_ba(x).view(t, self.hk, 2 * r)
        return qkvz, ba, (self.hk, self.dk, r * self.dv)

    def _heads(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = conv_out.shape[0]
        kd = self.cfg.key_dim
        q = conv_out[:, :kd].reshape(t, self.hk, self.dk)
        k = conv_out[:, kd:2 * kd].reshape(t, self.hk, self.dk)
        v = conv_out[:, 2 * kd:].reshape(t, self.hv, self.dv)
        # q/k stay grouped (HK heads): the kernels read value head h's q/k from head h // r
        return q, k, v

    def _out(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = o.shape[0]
        o = ops.gated_rms_norm(o, z, self.norm.weight, self.norm.eps)  # rounds o to z's dtype
        return self.out_proj(o.reshape(t, -1))

    def forward_window(
        self, x: torch.Tensor, state: torch.Tensor, conv: torch.Tensor, lo: int, hi: int,
        capture: set[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[int, StatePair]]:
        """One aligned window. x: [T, hidden] (rows outside [lo, hi) are padding);
        state [HV, K, V] fp32 and conv [W-1, conv_dim] at row lo.
        Returns (out [T, hidden], state at hi, conv at hi, {row: (state, conv)} for rows in
        `capture`)."""
        # Fixed shape whatever lo is (CPU SIMD tails make elementwise math position-dependent):
        # the conv reads the projection in place, with the conv state as the W-1 input rows
        # just before row lo (ops.conv_window; no [q | k | v] copy of the window).
        t = x.shape[0]
        w1 = conv.shape[0]
        r = self.hv // self.hk
        qkvz, ba, layout = self._proj(x)
        conv_out = ops.conv_window(qkvz, layout, self.conv1d.weight[:, 0], conv, lo)
        q, k, v = self._heads(conv_out)
        g, beta = ops.gdn_gates(ba, self.A_log, self.dt_bias)
        # only the requested rows' states are kept (the split kernel stores no others)
        o, s_hi, states = ops.chunk_gated_delta_rule(q, k, v, g, beta, state, lo, hi,
                                                     capture if capture else False)
        if self.record is not None:
            from engine.kernels.reference import l2norm

            qe, ke = q[lo:hi].repeat_interleave(r, 1), k[lo:hi].repeat_interleave(r, 1)
            self.record.append(GDNTrace(self.layer_idx, qe.float(), l2norm(ke.float()),
                                        v[lo:hi].float(), g[lo:hi], beta[lo:hi].float()))
        caps = {row: (states[row], mixed_rows(qkvz, layout, row - w1, row)) for row in capture
                if row in states}
        if hi - lo >= w1:
            conv_hi = mixed_rows(qkvz, layout, hi - w1, hi)
        else:
            conv_hi = torch.cat([conv.to(qkvz.dtype)[hi - lo:], mixed_rows(qkvz, layout, lo, hi)])
        z = qkvz[..., 2 * self.dk + r * self.dv:].unflatten(-1, (r, self.dv))  # [T, HK, R, V]
        o = ops.gated_rms_norm(o.view(t, self.hk, r, self.dv), z, self.norm.weight,
                               self.norm.eps)  # rounds o to z's dtype
        return self.out_proj(o.reshape(t, -1)), s_hi, conv_hi, caps

    def step(self, x: torch.Tensor, state: torch.Tensor,
             conv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token. x: [1, hidden]. Returns (out [1, hidden], new state, new conv)."""
        qkvz, ba, layout = self._proj(x)
        mixed = mixed_rows(qkvz, layout, 0, 1)
        conv_out = ops.causal_conv1d(mixed, self.conv1d.weight[:, 0], conv)
        new_conv = torch.cat([conv[1:], mixed.to(conv.dtype)], dim=0)
        q, k, v = self._heads(conv_out)
        # the torch gates, as decode always had them (its CUDA graphs were validated with these)
        g, beta = gdn_gates(ba, self.A_log, self.dt_bias)
        z = qkvz[..., 2 * self.dk + layout[2]:].reshape(1, self.hv, self.dv)
        o, s = ops.recurrent_step(q[0], k[0], v[0], g[0], beta[0], state)
        return self._out(o[None], z), s, new_conv
