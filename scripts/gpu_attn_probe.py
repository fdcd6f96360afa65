"""Which attention kernel for the prefill window (a3b-proxy: Hq 16, Hkv 2, D 256, E 4096)?
Flash with lower-right causal (the engine's call) vs splitting into prefix (no mask) + square
causal part merged by log-sum-exp, on flash and cuDNN. Prints ms, TFLOP/s, repeatability, the
first-call time for a new shape, and the max difference from the current call. (Run 6's first
run of this probe merged cuDNN's [B, H, T, 1] log-sum-exp with the wrong shape and printed
failures for e0 > 0; the engine's merge is triton_glue.attn_merge, tested on the GPU.)"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

dev = torch.device("cuda")
H, HKV, D, T = 16, 2, 256, 4096
scale = D ** -0.5
print(torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version(), torch.__version__)


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(n):
        st.record(); fn(); en.record(); torch.cuda.synchronize()
        ts.append(st.elapsed_time(en))
    ts.sort()
    return ts[len(ts) // 2]


def flops(tq, tk, causal_square):
    pairs = tq * tk - (tq * (tq - 1) // 2 if causal_square else 0)
    return 4 * H * D * pairs


def cur(q, k, v):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              scale=scale, enable_gqa=True)


def part(q, k, v, causal, backend):
    if backend == "cudnn":
        kk = k.repeat_interleave(H // HKV, 1) if k.shape[1] != H else k
        vv = v.repeat_interleave(H // HKV, 1) if v.shape[1] != H else v
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, kk, vv, None, True, 0.0, causal, False, scale=scale)
        return r[0], r[1]
    if backend == "cudnn_gqa":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        return r[0], r[1]
    r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return r[0], r[1]


def merge(o1, l1, o2, l2):
    # flash returns the log-sum-exp as [B, H, T], cuDNN as [B, H, T, 1]
    l1 = l1.float().reshape(*l1.shape[:3])[..., None]
    l2 = l2.float().reshape(*l2.shape[:3])[..., None]
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(o1.dtype)


def split(q, k, v, e0, backend):
    ow, lw = part(q, k[:, :, e0:], v[:, :, e0:], True, backend)
    if e0 == 0:
        return ow
    op, lp = part(q, k[:, :, :e0], v[:, :, :e0], False, backend)
    return merge(op, lp, ow, lw)


for e0 in (0, 4096, 8192, 12288):
    q = torch.randn(1, H, T, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, e0 + T, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, e0 + T, D, device=dev, dtype=torch.bfloat16)
    fl = flops(T, e0 + T, True)
    ref = cur(q, k, v)
    ms = bench(lambda: cur(q, k, v))
    print(f"e0={e0:6d} flash lower-right   {ms:7.3f} ms {fl / ms / 1e9:6.0f} TFLOP/s")
    for be in ("flash", "cudnn", "cudnn_gqa"):
        try:
            torch.cuda.synchronize(); t0 = time.perf_counter()
            o = split(q, k, v, e0, be); torch.cuda.synchronize()
            first = (time.perf_counter() - t0) * 1e3
            ms = bench(lambda: split(q, k, v, e0, be))
            rep = all(torch.equal(split(q, k, v, e0, be), o) for _ in range(5))
            err = (o.float() - ref.float()).abs().max().item()
            parts = ""
            if e0:
                msw = bench(lambda: part(q, k[:, :, e0:], v[:, :, e0:], True, be))
                msp = bench(lambda: part(q, k[:, :, :e0], v[:, :, :e0], False, be))
                parts = f" (square {msw:.3f}, prefix {msp:.3f})"
            print(f"e0={e0:6d} split {be:10s}    {ms:7.3f} ms {fl / ms / 1e9:6.0f} TFLOP/s "
                  f"first {first:7.1f} ms repeatable {rep} maxdiff {err:.3g}{parts}")
        except Exception as e:  # noqa: BLE001
            print(f"e0={e0:6d} split {be}: failed {type(e).__name__}: {str(e)[:200]}")
