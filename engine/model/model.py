"""The hybrid decoder (HF Qwen3-Next parameter names) and its window / step forward passes.

Exactness rule ("fixed aligned windows"): every pass over prompt tokens runs in windows of E
rows aligned to absolute multiples of E (E a multiple of the GDN chunk). A window always has the
same shapes whatever range of it is valid, GEMM rows are independent of each other, padding rows
contribute exact zeros, attention reads keys [0, e0 + E) (cached ones before the valid range,
fresh ones inside it), and a MoE block routes only the valid rows, through expert GEMMs of fixed
shapes. So the hidden states, KV and grid states of a position are bitwise the same whichever
snapshot a computation started from: the cache can change only the work, never the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kernels import ops
from engine.model.attention import GatedAttention, rope_cos_sin
from engine.model.gdn import GatedDeltaNet, GDNTrace
from engine.model.mlp import MLP
from engine.model.moe import SparseMoE
from engine.model.norm import RMSNorm


@dataclass(slots=True)
class RecurrentState:
    """Recurrent state of every GDN layer at one position (what a snapshot stores)."""

    ssm: torch.Tensor  # [nG, HV, K, V] fp32
    conv: torch.Tensor  # [nG, W-1, conv_dim] model dtype

    def clone(self) -> RecurrentState:
        return RecurrentState(self.ssm.clone(), self.conv.clone())


class DecoderLayer(nn.Module):
    linear_attn: GatedDeltaNet
    self_attn: GatedAttention
    input_layernorm: RMSNorm
    post_attention_layernorm: RMSNorm
    mlp: MLP | SparseMoE

    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        self.kind = cfg.layer_types[i]
        if self.kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, i)
        else:
            self.self_attn = GatedAttention(cfg, i)
        if i in cfg.moe_layers:
            self.mlp = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _Backbone(nn.Module):
    embed_tokens: nn.Embedding
    norm: RMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder: list[DecoderLayer] = list(self.model.layers)  # type: ignore[arg-type]
        self.gdn_index = {li: j for j, li in enumerate(cfg.gdn_layers)}
        self.attn_index = {li: j for j, li in enumerate(cfg.attn_layers)}

    # ---- state helpers -------------------------------------------------------------------
    def zero_state(self, device: torch.device, dtype: torch.dtype) -> RecurrentState:
        c = self.cfg
        n = len(c.gdn_layers)
        return RecurrentState(
            torch.zeros(n, c.linear_num_value_heads, c.linear_key_head_dim,
                        c.linear_value_head_dim, dtype=torch.float32, device=device),
            torch.zeros(n, c.linear_conv_kernel_dim - 1, c.conv_dim, dtype=dtype, device=device))

    def kv_buffers(self, cap: int, device: torch.device,
                   dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.cfg
        return [(torch.zeros(cap, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device),
                 torch.zeros(cap, c.num_key_value_heads, c.head_dim, dtype=dtype, device=device))
                for _ in c.attn_layers]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)  # type: ignore[no-any-return]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h)).float()

    # ---- passes ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward_window(
        self, ids: torch.Tensor, e0: int, lo: int, hi: int, state: RecurrentState,
        kv: list[tuple[torch.Tensor, torch.Tensor]], capture: set[int],
    ) -> tuple[torch.Tensor, RecurrentState, dict[int, RecurrentState]]:
        """Run one aligned window. ids: [E] (padding outside [lo, hi)), e0: absolute start,
        `state` at absolute position e0 + lo. Returns (hidden of row hi-1 [1, hidden],
        state at e0 + hi, {absolute grid pos: state} for window rows in `capture`)."""
        with ops.window():
            return self._window(ids, e0, lo, hi, state, kv, capture)

    def _window(
        self, ids: torch.Tensor, e0: int, lo: int, hi: int, state: RecurrentState,
        kv: list[tuple[torch.Tensor, torch.Tensor]], capture: set[int],
    ) -> tuple[torch.Tensor, RecurrentState, dict[int, RecurrentState]]:
        t = ids.shape[0]
        dev = ids.device
        x = self.embed(ids)
        pos = torch.arange(e0, e0 + t, device=dev)
        cos, sin = rope_cos_sin(self.cfg, pos, x.dtype)
        ssm_out, conv_out = [], []
        caps: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {r: [] for r in capture}
        n_layers = len(self.decoder)
        hn = self.decoder[0].input_layernorm(x) if n_layers else x
        for i, layer in enumerate(self.decoder):
            if layer.kind == "linear_attention":
                j = self.gdn_index[i]
                y, s_hi, c_hi, got = layer.linear_attn.forward_window(
                    hn, state.ssm[j], state.conv[j], lo, hi, capture)
                ssm_out.append(s_hi)
                conv_out.append(c_hi)
                for r, st in got.items():
                    caps[r].append(st)
            else:
                kb, vb = kv[self.attn_index[i]]
                y = layer.self_attn.forward_window(hn, cos, sin, kb, vb, e0, lo, hi)
            # residual adds fused with the norm that follows each (same numbers as x + y and
            # then the norm: the sum is rounded first)
            pn = layer.post_attention_layernorm
            x, h2 = ops.add_rms_norm(x, y, pn.weight, pn.eps)
            # a MoE block routes only the valid rows (fixed shapes: see reference.moe_experts)
            m = layer.mlp(h2, lo, hi) if isinstance(layer.mlp, SparseMoE) else layer.mlp(h2)
            if i + 1 < n_layers:
                nn_ = self.decoder[i + 1].input_layernorm
                x, hn = ops.add_rms_norm(x, m, nn_.weight, nn_.eps)
            else:
                x = x + m
        new = RecurrentState(torch.stack(ssm_out), torch.stack(conv_out)) if ssm_out else state
        captured = {e0 + r: RecurrentState(torch.stack([a for a, _ in v]),
                                           torch.stack([b for _, b in v]))
                    for r, v in caps.items() if v}
        return x[hi - 1:hi], new, captured

    @torch.no_grad()
    def step(self, token: int, pos: int, state: RecurrentState,
             kv: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, RecurrentState]:
        """Decode one token at absolute position pos; returns (hidden [1, hidden], new state)."""
        dev = state.ssm.device
        x = self.embed(torch.tensor([token], device=dev))
        cos, sin = rope_cos_sin(self.cfg, torch.tensor([pos], device=dev), x.dtype)
        ssm, conv = [], []
        for i, layer in enumerate(self.decoder):
            hn = layer.input_layernorm(x)
            if layer.kind == "linear_attention":
                j = self.gdn_index[i]
                y, s, c = layer.linear_attn.step(hn, state.ssm[j], state.conv[j])
                ssm.append(s)
                conv.append(c)
            else:
                kb, vb = kv[self.attn_index[i]]
                y = layer.self_attn.step(hn, cos, sin, kb, vb, pos)
            x = x + y
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        new = RecurrentState(torch.stack(ssm), torch.stack(conv)) if ssm else state
        return x, new

    @torch.no_grad()
    def trace_gdn(self, ids: torch.Tensor, window: int = 64) -> list[GDNTrace]:
        """Run ids cold and return every GDN layer's per-token (q, k, v, g, beta)."""
        dev = ids.device
        dtype = self.lm_head.weight.dtype
        n = ids.shape[0]
        state = self.zero_state(dev, dtype)
        cap = -(-n // window) * window
        kv = self.kv_buffers(cap, dev, dtype)
        gdns = [layer.linear_attn for layer in self.decoder if layer.kind == "linear_attention"]
        for m in gdns:
            m.record = []
        try:
            for e0 in range(0, n, window):
                hi = min(window, n - e0)
                w = torch.zeros(window, dtype=torch.long, device=dev)
                w[:hi] = ids[e0:e0 + hi]
                _, state, _ = self.forward_window(w, e0, 0, hi, state, kv, set())
            out = []
            for m in gdns:
                recs = m.record or []
                out.append(GDNTrace(m.layer_idx, *(torch.cat([getattr(r, f) for r in recs])
                                                   for f in ("q", "k", "v", "g", "beta"))))
            return out
        finally:
            for m in gdns:
                m.record = None
