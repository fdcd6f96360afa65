"""Checkpoints: HF-named safetensors (single file or sharded with an index), seeded random init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model.model import HybridModel

INDEX = "model.safetensors.index.json"


def init_random(model: HybridModel, seed: int) -> None:
    """Seeded init on the model's device (a CPU and a CUDA init of one seed differ):
    N(0, 0.02) matrices, HF-style GDN decay parameters."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("A_log"):
                a = torch.empty(p.shape, device=dev).uniform_(1.0, 16.0, generator=gen)
                p.copy_(torch.log(a))
            elif name.endswith("dt_bias"):
                # inverse-softplus of dt ~ logU(1e-3, 1e-1), as Mamba2/GDN initialise it
                lo, hi = math.log(1e-3), math.log(1e-1)
                dt = torch.exp(torch.empty(p.shape, device=dev).uniform_(lo, hi, generator=gen))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith("norm.weight") and ".linear_attn." in name:
                p.fill_(1.0)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=dev) * 0.05)
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn(p.shape, generator=gen, device=dev) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=dev) * 0.02)


def _canonical(name: str) -> str:
    # Qwen3.5 checkpoints nest the text model: model.language_model.layers... -> model.layers...
    return name.replace("model.language_model.", "model.")


def _files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        try:
            idx = json.loads((path / INDEX).read_text())
            files = sorted(set(idx["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path / INDEX}: malformed index ({e})") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ConfigError(f"{path}: index names missing shards {missing[:3]}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files (only safetensors checkpoints load)")
    return files


def load_checkpoint(path: str | Path, device: str, dtype: torch.dtype) -> HybridModel:
    """Load config.json + safetensors with HF Qwen3-Next (or Qwen3.5) tensor names."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint {p} is not a directory")
    cfg = ModelConfig.from_file(p / "config.json")
    model = HybridModel(cfg)
    want = dict(model.named_parameters())
    got: set[str] = set()
    with torch.no_grad():
        for f in _files(p):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    cname = _canonical(name)
                    if cname not in want:
                        continue
                    t = sf.get_tensor(name)
                    if tuple(t.shape) != tuple(want[cname].shape):
                        raise ConfigError(f"{name}: shape {tuple(t.shape)} != expected "
                                          f"{tuple(want[cname].shape)}")
                    want[cname].copy_(t.to(torch.float32))
                    got.add(cname)
    missing = sorted(set(want) - got)
    if missing and cfg.tie_word_embeddings and missing == ["lm_head.weight"]:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = []
    if missing:
        raise ConfigError(f"{p}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    return model.to(device=device, dtype=dtype)


def save_checkpoint(model: HybridModel, path: str | Path, shards: int = 1) -> None:
    """Write config.json + safetensors (sharded with an index when shards > 1)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    if shards <= 1:
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    wmap = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(p / fname), metadata={"format": "pt"})
        wmap.update({k: fname for k in part})
    (p / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wmap}, indent=2))
