"""Gated full attention (Qwen3-Next): doubled q_proj for a sigmoid output gate, zero-centred
q/k RMSNorm, partial RoPE, GQA. Keys and values live in a per-request contiguous buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from engine.config import ModelConfig
from engine.kernels import ops, reference
from engine.model.linear import Linear
from engine.model.norm import RMSNorm

# On CUDA, SDPA may pick cuDNN, which builds a new graph for every new key length (milliseconds
# of host time per call, on every attention layer of every decode step). Flash attention has no
# per-shape set-up, so decode and short windows keep it.
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Prefill windows on CUDA: cuDNN's fused attention runs the a3b-proxy window (D 256, GQA 8:1)
# at ~1.8x flash's speed on an H200, but takes no lower-right causal mask. So the keys go in
# pieces: the prefix in fixed pieces of _PIECE keys (no mask; bounded shapes, so cuDNN builds a
# bounded number of graphs, ~75 ms each on first use), then the window's own keys (square,
# causal), merged by log-sum-exp in a fixed order (triton_glue.attn_merge). The "flash"
# attention setting (engine.settings) keeps the single flash call.
_PIECE = 16384  # at most; a window of E rows uses pieces of min(_PIECE, 16 E) keys
_CUDNN_DTYPES = (torch.bfloat16, torch.float16)  # fp32 windows keep flash/efficient/math
# Windows of fewer rows keep the single flash call: there the pieces' extra launches and merge
# cost more than cuDNN saves (at 512 rows they lost to flash up to 8k keys on the H200).
_CUDNN_MIN_ROWS = 2048


def attention_impl(device: torch.device | str) -> str:
    """What prefill windows attend with under the current kernel choice (ops.current()):
    'cudnn-pieces' or 'flash' on CUDA, 'sdpa' on CPU; with sized windows 'invariant' (the
    Triton kernel) or 'invariant-reference' (the blocked torch reference)."""
    k = ops.current()
    cuda = torch.device(device).type == "cuda"
    if k.sized:
        return "invariant" if cuda and ops.glue_module() is not None else "invariant-reference"
    if not cuda:
        return "sdpa"
    if k.attention == "flash" or k.failures:
        return "flash"
    return "cudnn-pieces" if ops.glue_module() is not None else "flash"


def uses_pieces(rows: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether a causal window of `rows` queries attends in cuDNN key pieces (else flash)."""
    return (rows >= _CUDNN_MIN_ROWS and dtype in _CUDNN_DTYPES
            and attention_impl(device) == "cudnn-pieces")


def piece_keys(window: int) -> int:
    """Keys per prefix piece for windows of `window` rows (a function of the window only, so
    every window of an engine merges the same way)."""
    return min(_PIECE, 16 * window)


def warm_pieces(cfg: ModelConfig, window: int, dtype: torch.dtype, device: torch.device,
                max_keys: int) -> int:
    """Build cuDNN's graphs for the key-piece shapes that windows of `window` rows meet (the
    square part, and prefixes of j * window keys up to one piece): ~75 ms each on first use
    on an H200, paid here instead of inside a measured TTFT. A cuDNN that fails here leaves
    the engine on flash from the start (same numbers for the whole run). Returns the number
    of shapes built."""
    if not uses_pieces(window, dtype, device):
        return 0
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    top = min(piece_keys(window), max(0, max_keys - window)) // window * window
    q = torch.zeros(window, hq, d, dtype=dtype, device=device)
    kv = torch.zeros(top + window, hkv, d, dtype=dtype, device=device)
    n = 0
    try:
        for e0 in range(0, top + 1, window):
            attend_pieces(q, kv[:e0 + window], kv[:e0 + window], d ** -0.5)
            n += 1
    except RuntimeError as e:
        ops.current().failures.append(f"{type(e).__name__}: {e}")
        return 0
    return n


def _cudnn_piece(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qh, kh, vh, None, True, 0.0, causal, False, scale=scale)
    return r[0], r[1]


def attend_pieces(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Bottom-right causal attention of q [T, H, D] over keys/vals [S, Hkv, D] (S >= T) on
    cuDNN, in key pieces merged by log-sum-exp. Returns [T, H, D]."""
    t, s = q.shape[0], keys.shape[0]
    e0 = s - t
    qh = q.transpose(0, 1)[None]
    size = piece_keys(t)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)[None]

    pieces = [_cudnn_piece(qh, heads(keys[a:min(a + size, e0)]),
                           heads(vals[a:min(a + size, e0)]), False, scale)
              for a in range(0, e0, size)]
    pieces.append(_cudnn_piece(qh, heads(keys[e0:]), heads(vals[e0:]), True, scale))
    if len(pieces) == 1:
        return pieces[0][0][0].transpose(0, 1)
    return ops.glue_module().attn_merge(pieces, q.dtype)  # type: ignore[no-any-return]


def rope_cos_sin(cfg: ModelConfig, pos: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, rotary_dim] for absolute positions, computed in fp32 then cast (as HF does)."""
    rot = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32,
                                                 device=pos.device) / rot))
    freqs = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.hq * self.d * 2, bias=False)
        self.k_proj = Linear(h, self.hkv * self.d, bias=False)
        self.v_proj = Linear(h, self.hkv * self.d, bias=False)
        self.o_proj = Linear(self.hq * self.d, h, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = x.shape[0]
        qg = self.q_proj(x).view(t, self.hq, 2 * self.d)
        q, gate = qg[..., :self.d], qg[..., self.d:].reshape(t, -1)
        q = ops.rms_norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin)
        k = ops.rms_norm_rope(self.k_proj(x).view(t, self.hkv, self.d), self.k_norm.weight,
                              self.k_norm.eps, cos, sin)
        v = self.v_proj(x).view(t, self.hkv, self.d)
        return q, gate, k, v

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                causal: bool) -> torch.Tensor:
        # [1, H, T, D] layout; bottom-right causal alignment: the T queries are the last T keys.
        if causal and ops.rows_invariant():
            # windows sized to the work: key blocks at absolute positions (SDPA's blocking, on
            # the CPU too, follows the call's shape)
            if attention_impl(q.device) == "invariant":
                from engine.kernels import triton_attention  # noqa: PLC0415

                return triton_attention.window_attention(q, keys, vals, self.d ** -0.5)
            return reference.window_attention(q, keys, vals, self.d ** -0.5)
        if causal and uses_pieces(q.shape[0], q.dtype, q.device):
            try:
                return attend_pieces(q, keys, vals, self.d ** -0.5)
            except RuntimeError as e:  # a cuDNN without this kernel: flash from now on
                ops.current().failures.append(f"{type(e).__name__}: {e}")
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, keys, vals))
        mask = causal_lower_right(q.shape[0], keys.shape[0]) if causal else None
        if q.is_cuda:
            with sdpa_kernel(_CUDA_SDPA):
                o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                                   scale=self.d ** -0.5, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask,
                                               scale=self.d ** -0.5, enable_gqa=True)
        return o[0].transpose(0, 1)

    def forward_window(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       kbuf: torch.Tensor, vbuf: torch.Tensor, e0: int, lo: int,
                       hi: int) -> torch.Tensor:
        """One aligned window at absolute start e0: writes fresh K/V of rows [lo, T) into the
        buffers (rows outside [lo, hi) as zeros) and attends over keys [0, e0 + T)."""
        t = x.shape[0]
        q, gate, k, v = self._qkv(x, cos, sin)
        rows = torch.arange(t, device=x.device)[:, None, None]
        ok = (rows >= lo) & (rows < hi)
        kbuf[e0 + lo:e0 + t] = torch.where(ok, k, 0.0)[lo:]
        vbuf[e0 + lo:e0 + t] = torch.where(ok, v, 0.0)[lo:]
        o = self._attend(q, kbuf[:e0 + t], vbuf[:e0 + t], causal=True)
        return self.o_proj(o.reshape(t, -1) * torch.sigmoid(gate))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kbuf: torch.Tensor,
             vbuf: torch.Tensor, pos: int) -> torch.Tensor:
        """One token at absolute position pos (keys 0..pos)."""
        q, gate, k, v = self._qkv(x, cos, sin)
        kbuf[pos] = k[0]
        vbuf[pos] = v[0]
        o = self._attend(q, kbuf[:pos + 1], vbuf[:pos + 1], causal=False)
        return self.o_proj(o.reshape(1, -1) * torch.sigmoid(gate))
