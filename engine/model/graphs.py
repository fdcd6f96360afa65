"""CUDA-graph decode: `HybridModel.step` with the launch overhead taken out.

A decode step of a3b-proxy is ~2,300 small kernels: 6.7 ms of GPU work behind 85 ms of Python
and launch time on an H200 host (torch profiler). The step is captured as one graph
per stretch of layers between two full-attention layers; only the attention itself (the new
key/value written at `pos`, then SDPA over the request's keys [0, pos]) runs eagerly, because its
buffer and length change with every request and token. Each segment ends with the next
attention layer's q/gate/k/v in static buffers; the next segment starts from its SDPA output.

The ops are those of `HybridModel.step`, in the same order, on static tensors: the recurrent
state is updated in place in `self.ssm` / `self.conv` (load it with `start`). Decode tokens are
not cached as computed here (finalize recomputes the reply in windows), so the graph path only
has to be deterministic, which it is: every replay runs the same kernels on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from engine.model.attention import rope_cos_sin
from engine.model.model import HybridModel, RecurrentState


class DecodeGraphs:
    """Captured decode step for one model on one CUDA device (batch 1)."""

    def __init__(self, model: HybridModel, device: torch.device, dtype: torch.dtype) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.m = model
        cfg = model.cfg
        st = model.zero_state(device, dtype)
        self.ssm, self.conv = st.ssm, st.conv
        self.tok = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.x = torch.zeros(1, cfg.hidden_size, dtype=dtype, device=device)
        rot = cfg.rotary_dim
        self.cos = torch.zeros(1, rot, dtype=dtype, device=device)
        self.sin = torch.zeros(1, rot, dtype=dtype, device=device)
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=device)
        attn = list(cfg.attn_layers)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.attn = attn
        self.q = [torch.zeros(1, hq, d, dtype=dtype, device=device) for _ in attn]
        self.gate = [torch.zeros(1, hq * d, dtype=dtype, device=device) for _ in attn]
        self.k = [torch.zeros(1, hkv, d, dtype=dtype, device=device) for _ in attn]
        self.v = [torch.zeros(1, hkv, d, dtype=dtype, device=device) for _ in attn]
        self.o = torch.zeros(1, hq * d, dtype=dtype, device=device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._capture()

    # ---- the segments ------------------------------------------------------------------------
    def _segment(self, s: int) -> None:
        """Segment s: (s == 0: embed + rope) or attention layer attn[s-1]'s output projection,
        then every layer up to attn[s] (exclusive), then attn[s]'s q/gate/k/v (if any)."""
        m = self.m
        layers = m.decoder
        if s == 0:
            x = m.embed(self.tok)
            cos, sin = rope_cos_sin(m.cfg, self.pos, x.dtype)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
            first = 0
        else:
            a = self.attn[s - 1]
            layer = layers[a]
            y = layer.self_attn.o_proj(self.o * torch.sigmoid(self.gate[s - 1]))
            x = self.x + y
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            first = a + 1
        last = self.attn[s] if s < len(self.attn) else len(layers)
        for i in range(first, last):
            layer = layers[i]
            hn = layer.input_layernorm(x)
            j = m.gdn_index[i]
            y, st, cv = layer.linear_attn.step(hn, self.ssm[j], self.conv[j])
            self.ssm[j].copy_(st)
            self.conv[j].copy_(cv)
            x = x + y
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if s < len(self.attn):
            layer = layers[last]
            q, gate, k, v = layer.self_attn._qkv(layer.input_layernorm(x), self.cos, self.sin)
            self.q[s].copy_(q)
            self.gate[s].copy_(gate)
            self.k[s].copy_(k)
            self.v[s].copy_(v)
        else:
            self.logits.copy_(m.logits(x))
        self.x.copy_(x)

    def _capture(self) -> None:
        fns: list[Callable[[], None]] = [
            partial(self._segment, s) for s in range(len(self.attn) + 1)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, picks GEMM algorithms
            for _ in range(2):
                for fn in fns:
                    fn()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            self.graphs.append(g)
        torch.cuda.synchronize()

    # ---- use -----------------------------------------------------------------------------------
    def start(self, state: RecurrentState) -> None:
        """Load the recurrent state the next `step` continues from."""
        self.ssm.copy_(state.ssm)
        self.conv.copy_(state.conv)

    def step(self, token: int, pos: int,
             kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Decode `token` at absolute position `pos`; returns logits [1, vocab] (fp32; a view of
        a static buffer, valid until the next step)."""
        self.tok.fill_(token)
        self.pos.fill_(pos)
        layers = self.m.decoder
        for s, g in enumerate(self.graphs):
            g.replay()
            if s < len(self.attn):
                kb, vb = kv[s]
                kb[pos] = self.k[s][0]
                vb[pos] = self.v[s][0]
                o = layers[self.attn[s]].self_attn._attend(self.q[s], kb[:pos + 1],
                                                          vb[:pos + 1], causal=False)
                self.o.copy_(o.reshape(1, -1))
        return self.logits
