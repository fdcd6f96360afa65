"""The attention kernel choice of engine.model.attention: SDPA on the CPU, cuDNN key pieces
merged by log-sum-exp for long prefill windows on CUDA (within bf16 rounding of one flash call,
repeatable), and the warm-up that builds cuDNN's graphs for every piece shape."""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.kernels import ops
from engine.model import attention as at


def test_attention_choice_on_cpu() -> None:
    """The CPU attends with SDPA whatever the attention setting says, warms nothing, and piece
    sizes depend on the window only (16 windows, at most 16384 keys)."""
    for val in ("cudnn", "flash"):
        with ops.using(ops.Kernels(attention=val)):
            assert at.attention_impl("cpu") == "sdpa"
            assert not at.uses_pieces(4096, torch.bfloat16, "cpu")
    assert at.warm_pieces(preset("tiny"), 2048, torch.bfloat16, torch.device("cpu"), 10**6) == 0
    assert [at.piece_keys(e) for e in (64, 512, 1024, 2048, 4096)] == [1024, 8192, 16384,
                                                                       16384, 16384]


@pytest.mark.gpu
def test_attention_pieces_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuDNN key pieces merged by log-sum-exp (prefill windows) against the single flash
    call with a bottom-right causal mask: within bf16 rounding, repeatable, and each window's
    result independent of the piece size only through that rounding."""
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 1024, 16, 2, 256
    for e0, piece in ((0, 16384), (3072, 16384), (3072, 1024), (5120, 2048)):
        monkeypatch.setattr(at, "_PIECE", piece)
        q = torch.randn(t, hq, d, generator=gen).bfloat16().cuda()
        keys = torch.randn(e0 + t, hkv, d, generator=gen).bfloat16().cuda()
        vals = torch.randn(e0 + t, hkv, d, generator=gen).bfloat16().cuda()
        got = at.attend_pieces(q, keys, vals, d ** -0.5)
        qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, keys, vals))
        want = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=causal_lower_right(t, e0 + t), scale=d ** -0.5,
            enable_gqa=True)[0].transpose(0, 1)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
        assert all(torch.equal(at.attend_pieces(q, keys, vals, d ** -0.5), got)
                   for _ in range(3))


@pytest.mark.gpu
def test_warm_pieces_builds_every_shape() -> None:
    """warm_pieces runs every key-piece shape a window can meet (square + j windows of prefix
    up to one piece), capped by the KV budget; nothing on the CPU."""
    cfg = preset("small")
    dev = torch.device("cuda")
    assert at.piece_keys(2048) == 16384 and at.piece_keys(256) == 4096
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, dev, 100_000) == 9
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, dev, 8192) == 4
    assert at.warm_pieces(cfg, 2048, torch.float32, dev, 100_000) == 0
    assert at.warm_pieces(cfg, 1024, torch.bfloat16, dev, 100_000) == 0  # flash below 2048
    assert at.warm_pieces(cfg, 2048, torch.bfloat16, torch.device("cpu"), 100_000) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_attention_rows_do_not_depend_on_the_window_on_cpu(dtype: torch.dtype) -> None:
    """The CPU's window attention (SDPA, bottom-right causal) gives the queries of positions
    1024..1087 the same bits in windows of 64, 128, 1024 and 2048 rows starting anywhere on
    the 64-row grid: windows can be sized to the work. (A decode step, one query over its keys
    without a mask, is not promised the bits of the same row in a window.)"""
    cfg = preset("small")
    attn = at.GatedAttention(cfg, 3)
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(2048, hq, d, generator=gen).to(dtype)
    keys = torch.randn(2048, hkv, d, generator=gen).to(dtype)
    vals = torch.randn(2048, hkv, d, generator=gen).to(dtype)

    def window(e0: int, t: int) -> torch.Tensor:
        return attn._attend(q[e0:e0 + t], keys[:e0 + t], vals[:e0 + t], causal=True)

    want = window(1024, 64)
    for e0, t in ((1024, 128), (960, 128), (512, 1024), (0, 2048)):
        assert torch.equal(window(e0, t)[1024 - e0:1088 - e0], want), (e0, t)
