"""engine.weights: random presets built in place equal the fp32-then-cast construction."""

from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.model.model import HybridModel
from engine.weights import build_random, init_random


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_build_random_equals_fp32_init_then_cast(name: str, dtype: torch.dtype) -> None:
    """Committed results and parity runs depend on a preset's seeded weights: building the
    model in its dtype on its device must give the tensors of an fp32 init cast afterwards."""
    old = HybridModel(preset(name))
    init_random(old, 3)
    old = old.to(dtype=dtype)
    new = build_random(preset(name), "cpu", dtype, 3)
    a, b = dict(old.named_parameters()), dict(new.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k


def test_build_random_seeds_differ() -> None:
    a = build_random(preset("tiny"), "cpu", torch.float32, 0)
    b = build_random(preset("tiny"), "cpu", torch.float32, 1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
