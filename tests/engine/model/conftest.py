"""Fixtures of the model tests: tiny random checkpoints of every supported model family, saved by
transformers itself, and the two window drives the tests share (the last logits after a prompt;
a resume from a grid state inside a window).

Each is written in bf16 and sharded (model.safetensors.index.json), as released checkpoints
are; the fixture also returns the oracle the engine is compared with: transformers' own model
loaded back from that directory in fp32.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    # fla's kernels need a GPU; make transformers take its torch reference path on CPU.
    sys.modules.setdefault("fla", None)  # type: ignore[arg-type]
import transformers  # noqa: E402

# Shapes chosen to catch layout mistakes: key and value head dims differ, two value heads per
# key head, a prompt of more than one 64-row CPU window.
TEXT = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
            linear_conv_kernel_dim=4)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
              patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
              num_position_embeddings=16)


def _qwen3_next_dense() -> Any:
    return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        **TEXT, intermediate_size=96, num_experts=0))


def _qwen3_next_moe() -> Any:
    # layer 2 dense (mlp_only_layers); top-k weights not renormalised
    return transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        **TEXT, **MOE, intermediate_size=96, mlp_only_layers=[2], norm_topk_prob=False))


def _qwen35_dense() -> Any:
    # tied embeddings, as the small Qwen3.5 checkpoints have them: no lm_head on disk
    return transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
        **TEXT, intermediate_size=96, tie_word_embeddings=True))


def _qwen35_moe() -> Any:
    return transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT, **MOE))


def _qwen35_dense_vl() -> Any:
    return transformers.Qwen3_5ForConditionalGeneration(transformers.Qwen3_5Config(
        text_config=dict(**TEXT, intermediate_size=96), vision_config=VISION))


def _qwen35_moe_vl() -> Any:
    return transformers.Qwen3_5MoeForConditionalGeneration(transformers.Qwen3_5MoeConfig(
        text_config=dict(**TEXT, **MOE), vision_config=VISION))


BUILDERS: dict[str, Callable[[], Any]] = {
    "qwen3-next-dense": _qwen3_next_dense, "qwen3-next-moe": _qwen3_next_moe,
    "qwen3.5-dense": _qwen35_dense, "qwen3.5-moe": _qwen35_moe,
    "qwen3.5-dense-vl": _qwen35_dense_vl, "qwen3.5-moe-vl": _qwen35_moe_vl,
}


class Checkpoint(NamedTuple):
    path: Path
    hf: Any  # transformers' model loaded from `path` in fp32


def _perturb(model: Any, gen: torch.Generator) -> None:
    """Away from transformers' neutral init: norm weights off zero/one (so the (1 + w) and
    w conventions differ) and a router sharp enough that no two experts nearly tie."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def build(family: str, path: Path) -> Checkpoint:
    """Save `family`'s tiny random model to `path` the way transformers does; load it back."""
    torch.manual_seed(sorted(BUILDERS).index(family))
    hf = BUILDERS[family]()
    _perturb(hf, torch.Generator().manual_seed(7))
    hf.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    back = type(hf).from_pretrained(path, dtype=torch.float32)
    return Checkpoint(path, back.eval())


@pytest.fixture(scope="session")
def families() -> list[str]:
    """The families the checkpoint fixture builds."""
    return sorted(BUILDERS)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Checkpoint]:
    """checkpoint(family) -> Checkpoint, built once per session."""
    made: dict[str, Checkpoint] = {}

    def get(family: str) -> Checkpoint:
        if family not in made:
            made[family] = build(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def _last_logits(model: Any, ids: torch.Tensor, window: int = 64) -> torch.Tensor:
    """The engine's logits after `ids`, computed in aligned windows from the zero state."""
    n = ids.shape[0]
    cpu = torch.device("cpu")
    st = model.zero_state(cpu, torch.float32)
    kv = model.kv_buffers(-(-n // window) * window, cpu, torch.float32)
    h = None
    for e0 in range(0, n, window):
        hi = min(window, n - e0)
        w = torch.zeros(window, dtype=torch.long)
        w[:hi] = ids[e0:e0 + hi]
        h, st, _ = model.forward_window(w, e0, 0, hi, st, kv, set())
    assert h is not None
    return model.logits(h)[0]  # type: ignore[no-any-return]


@pytest.fixture(name="engine_last_logits")
def engine_last_logits_fixture() -> Callable[..., torch.Tensor]:
    """_last_logits(model, ids, window=64)."""
    return _last_logits


def _check_mid_window_resume(model: Any, ids: torch.Tensor, window: int,
                             points: tuple[int, ...]) -> None:
    """Windows of `window` rows over ids, run through from the zero state, then again from the
    grid state captured at each of `points` (inside the first window, so lo > 0; the KV before
    the point copied over): the same last hidden row and final state, bitwise."""
    n = ids.shape[0]
    cpu = torch.device("cpu")
    full_w = torch.zeros(-(-n // window) * window, dtype=torch.long)
    full_w[:n] = ids

    def run(start_state, lo, kv):  # type: ignore[no-untyped-def]
        st, h, caps = start_state, None, {}
        for e0 in range(0, n, window):
            a = lo if e0 == 0 else 0
            hi = min(window, n - e0)
            h, st, got = model.forward_window(full_w[e0:e0 + window], e0, a, hi, st, kv,
                                              set(points) if e0 == 0 else set())
            caps.update(got)
        return h, st, caps

    kv1 = model.kv_buffers(2 * window, cpu, torch.float32)
    h1, s1, caps = run(model.zero_state(cpu, torch.float32), 0, kv1)
    for r in points:
        kv2 = model.kv_buffers(2 * window, cpu, torch.float32)
        for (k1, v1), (k2, v2) in zip(kv1, kv2, strict=True):  # cached KV before the point
            k2[:r], v2[:r] = k1[:r], v1[:r]
        h2, s2, _ = run(caps[r], r, kv2)
        assert torch.equal(h1, h2), r
        assert torch.equal(s1.ssm, s2.ssm) and torch.equal(s1.conv, s2.conv), r


@pytest.fixture(name="mid_window_resume")
def mid_window_resume_fixture() -> Callable[..., None]:
    """_check_mid_window_resume(model, ids, window, points)."""
    return _check_mid_window_resume
