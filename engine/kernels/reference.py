"""Torch reference kernels (CPU and GPU): the gated delta rule, causal conv1d, norms, the
batch-invariant linear layer and the oracle of the window-invariant attention.

The gated delta rule (per value head, state S in R^{K x V}, fp32):

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + k_t (beta_t * (v_t - S_t^T k_t))^T
    o_t = S_t^T q_t,        q, k l2-normalised, q scaled by 1/sqrt(K)

Chunked form (WY / UT transform), chunk size C = 64, on an *absolute* grid: chunk c covers
positions [cC, (c+1)C) of the sequence, whatever call computes it. Within a chunk, with
gc_i = sum_{j<=i} g_j (cumulative log decay) and Gamma_ij = exp(gc_i - gc_j) for j <= i (0 above):

    L  = strict_lower((beta * K) K^T * Gamma)              # C x C
    U  = (I + L)^-1 (beta * V)                              # new values, C x V
    W  = (I + L)^-1 (beta * K * exp(gc))                    # decayed keys reading S_in
    Vn = U - W S_in
    O  = (Q * exp(gc)) S_in + (lower_incl(Q K^T * Gamma)) Vn
    S_out = exp(gc_last) S_in + (K * exp(gc_last - gc))^T Vn

Each chunk's result is a deterministic function of (S_in, the chunk's rows) computed with fixed
shapes, so the state at any grid position is bitwise the same whichever earlier grid state a
computation started from. Rows outside [lo, hi) of a call are neutralised (k = v = q = beta = 0,
g = 0): they contribute exact zeros, so a partial last chunk yields the exact state at `hi` and
valid rows are bitwise independent of what the padding rows held.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F

from engine.config import CHUNK


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, as fla and transformers compute it (fp32 in, fp32 out)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# Rows per block of reference.linear: the engine's windows start on the 64-row grid.
ROW_BLOCK = 64


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] times weight [N, K] transposed (torch's F.linear), in blocks of ROW_BLOCK rows
    (the last one padded with zero rows), so that a row's result does not depend on how many
    rows the call has: BLAS picks its kernel and thread split by shape, and torch's CPU matmul
    of one row (a matrix-vector kernel) or of a few rows sums in another order than of 64.
    Every row goes through the same [ROW_BLOCK, K] product, whose rows BLAS computes
    independently of each other and of their place in the block (the kernel tests check it)."""
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    pad = -m % ROW_BLOCK
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, k)])
    blocks = [F.linear(x2[i:i + ROW_BLOCK], weight) for i in range(0, m + pad, ROW_BLOCK)]
    out = torch.cat(blocks)[:m] if blocks else x2.new_zeros(0, n)
    return out.reshape(*x.shape[:-1], n)


ATTN_BLOCK = 64  # query rows and keys per block of window_attention


def window_attention(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Bottom-right causal attention of q [T, H, D], the last T of S positions, over keys/vals
    [S, Hkv, D] (GQA: query head h reads key head h // (H / Hkv)), in fp32; [T, H, D] in q's
    dtype. Window-invariant like triton_attention.window_attention (its oracle): queries go in
    blocks of ATTN_BLOCK rows (the last one zero-padded) through key blocks at absolute
    positions 0, 64, 128, ... with an online softmax, every product of one fixed shape, so a
    row's bits depend on its position, its query and the keys before it only (torch's CPU SDPA
    is not: its blocking follows the call's shape)."""
    t, hq, d = q.shape
    s, hkv, _ = keys.shape
    g = hq // hkv
    B = ATTN_BLOCK
    sc = d ** -0.5 if scale is None else scale
    e0 = s - t
    pad_t = -t % B
    qf = torch.cat([q.float(), q.new_zeros(pad_t, hq, d).float()]).transpose(0, 1)  # [H, T', D]
    pad_s = -s % B
    kf = torch.cat([keys.float(), keys.new_zeros(pad_s, hkv, d).float()])
    vf = torch.cat([vals.float(), vals.new_zeros(pad_s, hkv, d).float()])
    kf = kf.repeat_interleave(g, dim=1).transpose(0, 1)  # [H, S', D]
    vf = vf.repeat_interleave(g, dim=1).transpose(0, 1)
    dev = q.device
    out = torch.empty(hq, t + pad_t, d, device=dev)
    cols = torch.arange(B, device=dev)
    for a in range(0, t + pad_t, B):
        pos = e0 + a + cols  # absolute positions of the block's queries
        qb = qf[:, a:a + B]
        m = torch.full((hq, B), float("-inf"), device=dev)
        el = torch.zeros(hq, B, device=dev)
        acc = torch.zeros(hq, B, d, device=dev)
        for n0 in range(0, min(e0 + a + B, s), B):
            seen = (n0 + cols)[None, :] <= pos[:, None]  # [B queries, B keys]
            sb = torch.bmm(qb, kf[:, n0:n0 + B].transpose(1, 2)) * sc
            sb = sb.masked_fill(~seen[None], float("-inf"))
            active = (n0 <= pos)[None, :]  # the row has a key in this block
            m_new = torch.where(active, torch.maximum(m, sb.amax(-1)), m)
            alpha = torch.exp(m - m_new)
            p = torch.where(seen[None], torch.exp(sb - m_new[..., None]), 0.0)
            pv = torch.bmm(p, vf[:, n0:n0 + B])
            acc = torch.where(active[..., None], acc * alpha[..., None] + pv, acc)
            el = torch.where(active, el * alpha + p.sum(-1), el)
            m = m_new
        out[:, a:a + B] = acc / el.clamp_min(1e-30)[..., None]
    return out[:, :t].transpose(0, 1).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero-centred RMSNorm: x_hat * (1 + w), computed in fp32, cast back."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: (x + y, rms_norm(x + y)), the sum in x's dtype."""
    s = x + y
    return s, rms_norm(s, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; rotates the first rotary_dim features (rotate-half convention; cos/sin
    [T, rot] in x's dtype, each product and the sum rounded to it)."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    xr = xr * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([xr, xp], dim=-1)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """rms_norm over the last dim of x [T, H, D], then apply_rope."""
    return apply_rope(rms_norm(x, weight, eps), cos, sin)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """RMSNorm(x) * w * silu(gate) over the last dim (Qwen3-Next's RMSNormGated), in gate's
    dtype: x is first rounded to it (the GDN output arrives in fp32)."""
    dt = gate.dtype
    xf = x.to(dt).float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(dt)
    return (out * F.silu(gate.float())).to(dt)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU MLP's product), in the inputs' dtype."""
    return F.silu(gate) * up


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv + SiLU over time with a carried state.

    x: [T, D] (model dtype), weight: [D, W], state: [W-1, D] (the W-1 inputs before x[0]).
    Computed as a fixed-order sum of shifted products, so each output row is a function of
    its own W inputs only (bitwise independent of T and of other rows).
    """
    w = weight.shape[1]
    ext = torch.cat([state.to(x.dtype), x], dim=0)
    t = x.shape[0]
    acc = ext[0:t].float() * weight[:, 0].float()
    for j in range(1, w):
        acc = acc + ext[j:j + t].float() * weight[:, j].float()
    return F.silu(acc).to(x.dtype)


Layout = tuple[int, int, int]  # (q/k heads HK, key dim K, value columns per q/k head R*V)


def mixed_rows(qkvz: torch.Tensor, layout: Layout, a: int, b: int) -> torch.Tensor:
    """Rows a..b-1 of the conv input [q | k | v] (conv_dim channels, Qwen3-Next's order) from
    the projection's interleaved per-head layout qkvz [T, HK, 2K + 2RV]."""
    hk, kd, rv = layout
    n = b - a
    rows = qkvz[a:b]
    return torch.cat([rows[..., :kd].reshape(n, hk * kd), rows[..., kd:2 * kd].reshape(n, hk * kd),
                      rows[..., 2 * kd:2 * kd + rv].reshape(n, hk * rv)], dim=1)


def conv_window(qkvz: torch.Tensor, layout: Layout, weight: torch.Tensor, state: torch.Tensor,
                lo: int) -> torch.Tensor:
    """causal_conv1d over one window straight from the projection (see mixed_rows): rows from
    lo on are the window's inputs, the W-1 rows before lo are the conv state, and earlier rows
    are zeros (their outputs, rows < lo, are padding that nothing reads)."""
    t = qkvz.shape[0]
    w1 = state.shape[0]
    ext = torch.zeros(w1 + t, weight.shape[0], dtype=qkvz.dtype, device=qkvz.device)
    ext[w1 + lo:] = mixed_rows(qkvz, layout, lo, t)
    ext[lo:lo + w1] = state.to(qkvz.dtype)
    return causal_conv1d(ext[w1:], weight, ext[:w1])


def gdn_gates(ba: torch.Tensor, a_log: torch.Tensor,
              dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-Next's gates from the b/a projection ba [T, HK, 2R] (per q/k head: R b's, R a's):
    g = -e^A_log softplus(a + dt_bias) (fp32 log decay) and beta = sigmoid(b), [T, HV] each."""
    t, hk, r2 = ba.shape
    r = r2 // 2
    b, a = ba[..., :r].reshape(t, hk * r), ba[..., r:].reshape(t, hk * r)
    g = -a_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.sigmoid()


def conv_state_after(x: torch.Tensor, state: torch.Tensor, upto: int) -> torch.Tensor:
    """The conv state (last W-1 inputs) after consuming x[:upto], given the state before x[0]
    (only the last W-1 rows are copied, not the window)."""
    w1 = state.shape[0]
    if upto >= w1:
        return x[upto - w1:upto].clone()
    return torch.cat([state.to(x.dtype)[upto:], x[:upto]], dim=0)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor, lo: int, hi: int, capture: bool | Collection[int] = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """Chunked gated delta rule over one aligned window.

    q, k: [T, H, K] (raw, l2-normalised here; H already expanded to the value heads),
    v: [T, H, V], g, beta: [T, H]; T a multiple of CHUNK and row 0 on the grid.
    state: [H, K, V] fp32, the state at row `lo` (a multiple of CHUNK).
    Returns (out [T, H, V] fp32 with zeros outside [lo, hi), state at row `hi`,
    {row r: state at r} for every grid row lo < r <= hi when `capture` is True, or for the
    grid rows in it when it is a collection of rows).
    """
    t, h, kd = q.shape
    vd = v.shape[-1]
    assert t % CHUNK == 0 and lo % CHUNK == 0 and 0 <= lo < hi <= t
    n = t // CHUNK
    rows = torch.arange(t, device=q.device)
    valid = ((rows >= lo) & (rows < hi))[:, None]
    qf = torch.where(valid[..., None], l2norm(q.float()) * (kd ** -0.5), 0.0)
    kf = torch.where(valid[..., None], l2norm(k.float()), 0.0)
    vf = torch.where(valid[..., None], v.float(), 0.0)
    gf = torch.where(valid, g.float(), 0.0)
    bf = torch.where(valid, beta.float(), 0.0)

    # [H, N, C, *]
    def chunked(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n, CHUNK, h, -1).permute(2, 0, 1, 3).contiguous()

    qc, kc, vc = chunked(qf), chunked(kf), chunked(vf)
    gc = chunked(gf[..., None]).squeeze(-1).cumsum(-1)  # [H, N, C]
    bc = chunked(bf[..., None])  # [H, N, C, 1]
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    gamma = (gc[..., :, None] - gc[..., None, :]).masked_fill(upper, float("-inf")).exp()
    kb = kc * bc
    lmat = torch.tril((kb @ kc.transpose(-1, -2)) * gamma, -1)
    eye = torch.eye(CHUNK, dtype=lmat.dtype, device=lmat.device)
    sys = lmat + eye
    u = torch.linalg.solve_triangular(sys, vc * bc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(sys, kb * gc.exp()[..., None], upper=False,
                                      unitriangular=True)
    intra = torch.tril((qc @ kc.transpose(-1, -2)) * gamma)
    q_dec = qc * gc.exp()[..., None]
    k_dec = kc * (gc[..., -1:] - gc).exp()[..., None]
    c_dec = gc[..., -1].exp()[..., None, None]  # [H, N, 1, 1]

    out = torch.zeros(h, n, CHUNK, vd, dtype=torch.float32, device=q.device)
    s = state.float()
    states: dict[int, torch.Tensor] = {}
    for c in range(lo // CHUNK, (hi + CHUNK - 1) // CHUNK):
        vn = u[:, c] - w[:, c] @ s
        out[:, c] = q_dec[:, c] @ s + intra[:, c] @ vn
        s = s * c_dec[:, c] + k_dec[:, c].transpose(-1, -2) @ vn
        end = (c + 1) * CHUNK
        if end <= hi and (capture is True or (capture is not False and end in capture)):
            states[end] = s
    return out.permute(1, 2, 0, 3).reshape(t, h, vd), s, states


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the gated delta rule. q, k: [H, K], v: [H, V], g, beta: [H];
    state [H, K, V] fp32. Returns (o [H, V] fp32, new state)."""
    kd = q.shape[-1]
    qf = l2norm(q.float()) * (kd ** -0.5)
    kf = l2norm(k.float())
    s = state.float() * g.float().exp()[:, None, None]
    kv_mem = (s * kf[..., None]).sum(dim=-2)
    delta = (v.float() - kv_mem) * beta.float()[:, None]
    s = s + kf[..., None] * delta[:, None, :]
    o = (s * qf[..., None]).sum(dim=-2)
    return o, s


def recurrent_gated_delta_rule(q, k, v, g, beta, state):  # type: ignore[no-untyped-def]
    """Token-by-token form over [T, ...] inputs (the oracle for the chunked form)."""
    outs = []
    s = state.float()
    for i in range(q.shape[0]):
        o, s = recurrent_step(q[i], k[i], v[i], g[i], beta[i], s)
        outs.append(o)
    return torch.stack(outs), s


# ---- sparse mixture of experts -------------------------------------------------------------
#
# Exactness rule: a token's routing and expert outputs must not depend on which other rows of
# its window are valid (a warm request restored at another snapshot pads the same window
# differently). So only valid rows are routed; every expert GEMM has the same shape (each
# expert's tokens go in blocks of MOE_BLOCK rows, the last one zero-padded: a GEMM row's result
# depends on the matrix shape, not on its neighbours or its place in the block); and a token's
# top-k outputs are summed in one fixed order (ascending expert id), with no scatter-add.

MOE_BLOCK = 16


def moe_route(logits: torch.Tensor, top_k: int,
              norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: softmax over experts in fp32, top-k, optional renormalisation (in fp32, over
    the top-k in descending order, as transformers sums them), weights cast to the logits'
    dtype. logits [T, E]. Returns (expert ids [T, K] ascending per row, weights [T, K])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        top = top / top.sum(dim=-1, keepdim=True)
    top = top.to(logits.dtype)
    idx, order = idx.sort(dim=-1)
    return idx, top.gather(-1, order)


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU: x [M, H], gate_up [2I, H] (gate rows, then up rows), down [H, I]."""
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(swiglu(g, u), down)


def moe_combine(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k w[:, k] * y[:, k] in slot order (y [T, K, H], w [T, K]), in y's dtype: each
    product and each partial sum rounded to it, as transformers' index_add_ accumulates."""
    acc = y[:, 0] * w[:, 0:1]
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j] * w[:, j:j + 1]
    return acc


def moe_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, lo: int, hi: int, block: int = MOE_BLOCK) -> torch.Tensor:
    """Routed experts of rows [lo, hi) of x [T, H] (other rows give zeros). idx, w [T, K] from
    moe_route; gate_up [E, 2I, H], down [E, H, I]. Each expert runs on its tokens (in row
    order) in fixed blocks of `block` rows. Returns [T, H] in x's dtype."""
    t, k = idx.shape
    hdim = x.shape[1]
    y = torch.zeros(t * k, hdim, dtype=x.dtype, device=x.device)
    if hi > lo:
        e = idx[lo:hi].reshape(-1)
        order = torch.argsort(e, stable=True)
        slots = (torch.arange(lo * k, hi * k, device=x.device))[order]  # (row * K + k) per expert
        counts = torch.bincount(e, minlength=gate_up.shape[0]).tolist()
        buf = torch.zeros(block, hdim, dtype=x.dtype, device=x.device)
        start = 0
        for ex, c in enumerate(counts):
            for b0 in range(0, c, block):
                ids = slots[start + b0:start + min(b0 + block, c)]
                n = ids.shape[0]
                buf.zero_()
                buf[:n] = x[ids // k]
                y[ids] = expert_mlp(buf, gate_up[ex], down[ex])[:n]
            start += c
    return moe_combine(y.view(t, k, hdim), w)


def moe_experts_gathered(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                         gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """moe_experts of every row of a few-row x (decode), without host synchronisation (so a
    CUDA graph can hold it): each (row, slot) gathers its expert's weights, one batched GEMM."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    xs = x.repeat_interleave(k, dim=0)[:, None, :]  # [T*K, 1, H]
    g, u = torch.bmm(xs, gate_up[flat].transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(swiglu(g, u), down[flat].transpose(1, 2))  # [T*K, 1, H]
    return moe_combine(y.view(t, k, -1), w)
