"""engine.kernels.triton_glue against reference.py: RMSNorm, the residual add + RMSNorm, q/k
RMSNorm + RoPE, SwiGLU and the log-sum-exp merge of attention pieces; each row-local (a row's
result does not depend on the other rows of the call) and every output written (poisoned
buffers). Interp tests run through Triton's interpreter on the CPU (the `interp` fixture)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.kernels import reference as ref

pytestmark = pytest.mark.timeout(120)  # a bound, not a timing: seconds when the machine is idle


def test_interp_rms_norm_and_swiglu(interp: Any, poison: Any) -> None:
    """RMSNorm (contiguous rows, strided head rows, 1 row) and SwiGLU against the reference, in
    fp32 and bf16."""
    glue = interp.glue
    poison(glue)
    gen = torch.Generator().manual_seed(5)
    w = 0.1 * torch.randn(64, generator=gen)
    x = torch.randn(37, 64, generator=gen)
    torch.testing.assert_close(glue.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    qg = torch.randn(9, 3, 128, generator=gen)  # q of a doubled projection: strided head rows
    q = qg[..., :64]
    got = glue.rms_norm(q, w, 1e-6)
    assert got.shape == q.shape and got.is_contiguous()
    torch.testing.assert_close(got, ref.rms_norm(q, w, 1e-6))
    torch.testing.assert_close(glue.rms_norm(x[:1], w, 1e-6), ref.rms_norm(x[:1], w, 1e-6))
    assert torch.equal(glue.rms_norm(x, w, 1e-6)[5:6], glue.rms_norm(x[5:6], w, 1e-6))
    g = torch.randn(5, 300, generator=gen)
    u = torch.randn(5, 300, generator=gen)
    torch.testing.assert_close(glue.swiglu(g, u), ref.swiglu(g, u))
    xb16, wb16 = x.bfloat16(), w.bfloat16()
    got = glue.rms_norm(xb16, wb16, 1e-6)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.rms_norm(xb16, wb16, 1e-6).float(),
                               atol=1.6e-2, rtol=1.6e-2)
    got = glue.swiglu(g.bfloat16(), u.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.swiglu(g.bfloat16(), u.bfloat16()).float(),
                               atol=1.6e-2, rtol=1.6e-2)


def test_interp_add_norm_and_norm_rope(interp: Any, poison: Any) -> None:
    """The fused residual add + RMSNorm and q/k RMSNorm + partial RoPE equal the reference
    (bitwise sum, norm within fp32 rounding; within bf16 rounding in bf16), reading q in place
    from the doubled projection."""
    from engine.config import preset
    from engine.model.attention import rope_cos_sin

    glue = interp.glue
    poison(glue)
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randn(37, 64, generator=gen), torch.randn(37, 64, generator=gen)
    w = 0.1 * torch.randn(64, generator=gen)
    s1, n1 = glue.add_rms_norm(x, y, w, 1e-6)
    s2, n2 = ref.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(n1, n2)
    cfg = preset("tiny")
    t, h, d = 20, 3, cfg.head_dim
    qg = torch.randn(t, h, 2 * d, generator=gen)
    wq = 0.1 * torch.randn(d, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        cos, sin = rope_cos_sin(cfg, torch.arange(100, 100 + t), dtype)
        q = qg.to(dtype)[..., :d]
        got = glue.rms_norm_rope(q, wq.to(dtype), 1e-6, cos, sin)
        want = ref.rms_norm_rope(q, wq.to(dtype), 1e-6, cos, sin)
        assert torch.equal(want, ref.apply_rope(ref.rms_norm(q, wq.to(dtype), 1e-6), cos, sin))
        tol = 1e-6 if dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        one = glue.rms_norm_rope(q[7:8], wq.to(dtype), 1e-6, cos[7:8].contiguous(),
                                 sin[7:8].contiguous())
        assert torch.equal(one, got[7:8])


def _attn_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (fp64) attention of q [H, T, D] over k/v [H, S, D] and its log-sum-exp."""
    s = (q.double() @ k.double().transpose(1, 2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.double()), lse


@pytest.mark.parametrize("n_prefix", [1, 2, 4])
def test_interp_attn_merge(interp: Any, poison: Any, n_prefix: int) -> None:
    """attn_merge of key-range pieces equals attention over all keys (bottom-right causal): 2,
    3 and 5 pieces (5 goes through the fp32 partial result), pieces in a [T, H, D] layout, and
    log-sum-exp as [1, H, T] or [1, H, T, 1]; repeatable bitwise."""
    glue = interp.glue
    poison(glue)
    gen = torch.Generator().manual_seed(n_prefix)
    h, t, d, piece = 3, 24, 32, 16
    s = n_prefix * piece + t
    q, k, v = (torch.randn(h, n, d, generator=gen) for n in (t, s, s))
    pieces = []
    for i in range(n_prefix):
        o, lse = _attn_piece(q, k[:, i * piece:(i + 1) * piece], v[:, i * piece:(i + 1) * piece],
                             False)
        o = o.float().transpose(0, 1).contiguous().transpose(0, 1)[None]  # [T, H, D] storage
        pieces.append((o, lse.float()[None, ..., None] if i % 2 else lse.float()[None]))
    o, lse = _attn_piece(q, k[:, -t:], v[:, -t:], True)
    pieces.append((o.float()[None], lse.float()[None]))
    got = glue.attn_merge(pieces, torch.float32)
    full = (q.double() @ k.double().transpose(1, 2)) * d ** -0.5
    mask = torch.arange(s)[None, :] > (s - t + torch.arange(t))[:, None]
    want = torch.softmax(full.masked_fill(mask, float("-inf")), -1) @ v.double()
    assert got.shape == (t, h, d)
    torch.testing.assert_close(got.double(), want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(glue.attn_merge(pieces, torch.float32), got)
    with pytest.raises(ValueError, match="two pieces"):
        glue.attn_merge(pieces[:1], torch.float32)


@pytest.mark.gpu
def test_glue_kernels_on_gpu(poison: Any) -> None:
    import engine.kernels.triton_glue as glue

    poison(glue)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    w = (0.1 * torch.randn(2048, generator=gen)).bfloat16().cuda()
    torch.testing.assert_close(glue.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6),
                               atol=1.6e-2, rtol=1.6e-2)
    assert torch.equal(glue.rms_norm(x, w, 1e-6)[100:101], glue.rms_norm(x[100:101], w, 1e-6))
    qg = torch.randn(512, 16, 512, generator=gen).bfloat16().cuda()
    wq = (0.1 * torch.randn(256, generator=gen)).bfloat16().cuda()
    torch.testing.assert_close(glue.rms_norm(qg[..., :256], wq, 1e-6),
                               ref.rms_norm(qg[..., :256], wq, 1e-6), atol=1.6e-2, rtol=1.6e-2)
    g = torch.randn(4096, 5632, generator=gen).bfloat16().cuda()
    u = torch.randn(4096, 5632, generator=gen).bfloat16().cuda()
    torch.testing.assert_close(glue.swiglu(g, u), ref.swiglu(g, u), atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.gpu
def test_add_norm_and_norm_rope_on_gpu() -> None:
    """On CUDA (bf16, a3b-proxy shapes): the fused add + norm equals torch's add and our norm
    bitwise; the fused norm + RoPE is within a bf16 step of the op-by-op result, repeatable
    and row-local."""
    import engine.kernels.triton_glue as glue
    from engine.config import preset
    from engine.model.attention import rope_cos_sin

    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    y = torch.randn(4096, 2048, generator=gen).bfloat16().cuda()
    w = (0.1 * torch.randn(2048, generator=gen)).bfloat16().cuda()
    s1, n1 = glue.add_rms_norm(x, y, w, 1e-6)
    assert torch.equal(s1, x + y)
    assert torch.equal(n1, glue.rms_norm(x + y, w, 1e-6))
    cfg = preset("a3b-proxy")
    qg = torch.randn(4096, 16, 512, generator=gen).bfloat16().cuda()
    wq = (0.1 * torch.randn(256, generator=gen)).bfloat16().cuda()
    cos, sin = rope_cos_sin(cfg, torch.arange(8192, 8192 + 4096, device="cuda"), torch.bfloat16)
    got = glue.rms_norm_rope(qg[..., :256], wq, 1e-6, cos, sin)
    want = ref.apply_rope(glue.rms_norm(qg[..., :256], wq, 1e-6), cos, sin)
    torch.testing.assert_close(got.float(), want.float(), atol=1.6e-2, rtol=1.6e-2)
    one = glue.rms_norm_rope(qg[100:101, :, :256], wq, 1e-6, cos[100:101].contiguous(),
                             sin[100:101].contiguous())
    assert torch.equal(one, got[100:101])
    assert torch.equal(glue.rms_norm_rope(qg[..., :256], wq, 1e-6, cos, sin), got)
