"""Checkpoints: HF-named safetensors (single file or sharded with an index), seeded random init.

Loading reads the layouts transformers saves for each family into the engine's one layout:
Qwen3.5's split GDN projections (in_proj_qkv/z/b/a) go into the rows of the fused per-head
in_proj_qkvz/in_proj_ba that Qwen3-Next uses (a row permutation: the kernels read one
layout), per-expert MoE tensors (experts.N.gate_proj/up_proj/down_proj) into the 3-D
experts.gate_up_proj/down_proj, and `model.language_model.*` to `model.*`; a multimodal
checkpoint's vision tower and every MTP head are skipped. The model is built without memory,
materialised on the target device in the target dtype, and filled one memory-mapped tensor at
a time, so host memory never holds more than one tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.model.model import HybridModel

INDEX = "model.safetensors.index.json"

# tensors of a checkpoint that are not the language model's
_SKIPPED = re.compile(r"^(mtp\.|model\.mtp\.|model\.visual\.|visual\.)|\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def init_random(model: HybridModel, seed: int) -> None:
    """Seeded init on the model's device (a CPU and a CUDA init of one seed differ):
    N(0, 0.02) matrices, HF-style GDN decay parameters. Values are drawn in fp32 and rounded
    to the parameters' dtype, so a bf16 model gets its fp32 twin's weights, rounded."""
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


def empty_model(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype) -> HybridModel:
    """The model with uninitialised parameters allocated once, on `device` in `dtype` (no
    host-side fp32 copy: a 35B-parameter model is built straight on the GPU)."""
    with torch.device("meta"):
        model = HybridModel(cfg)
    return model.to(dtype=dtype).to_empty(device=device)


def build_random(cfg: ModelConfig, device: str | torch.device, dtype: torch.dtype,
                 seed: int) -> HybridModel:
    """A preset's random model on `device` in `dtype`: init_random's weights (the same tensors
    as initialising in fp32 and casting afterwards)."""
    model = empty_model(cfg, device, dtype)
    init_random(model, seed)
    return model


class _Part(NamedTuple):
    """Where (part of) a checkpoint tensor goes: rows [a, b) of it (all when b is None),
    reshaped, copied into view(param)."""

    param: str
    view: Callable[[torch.Tensor], torch.Tensor]
    a: int = 0
    b: int | None = None


class _Placement(NamedTuple):
    shape: tuple[int, ...]  # the checkpoint tensor's expected shape
    parts: list[_Part]


def _canonical(name: str) -> str:
    # Qwen3.5 checkpoints nest the text model: model.language_model.layers... -> model.layers...
    return name.replace("model.language_model.", "model.", 1)


def _split_gdn(cfg: ModelConfig, prefix: str, rest: str) -> _Placement | None:
    """Qwen3.5's split GDN projections into the fused per-key-head layouts: in_proj_qkvz rows
    are, per key head, [q (K) | k (K) | v (R V) | z (R V)]; in_proj_ba rows [b (R) | a (R)]."""
    hk, kd, h = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.hidden_size
    r = cfg.linear_num_value_heads // hk
    rv = r * cfg.linear_value_head_dim
    blk, key = 2 * kd + 2 * rv, cfg.key_dim

    def rows(param: str, width: int, lo: int, hi: int, a: int = 0,
             b: int | None = None) -> _Part:
        """Source rows [a, b) into columns [lo, hi) of every key head's block of `width`."""
        return _Part(prefix + param, lambda p: p.view(hk, width, h)[:, lo:hi], a, b)

    if rest == "in_proj_qkv.weight":
        return _Placement((2 * key + cfg.value_dim, h), [
            rows("in_proj_qkvz.weight", blk, 0, kd, 0, key),
            rows("in_proj_qkvz.weight", blk, kd, 2 * kd, key, 2 * key),
            rows("in_proj_qkvz.weight", blk, 2 * kd, 2 * kd + rv, 2 * key)])
    if rest == "in_proj_z.weight":
        return _Placement((cfg.value_dim, h), [rows("in_proj_qkvz.weight", blk, 2 * kd + rv, blk)])
    if rest == "in_proj_b.weight":
        return _Placement((cfg.linear_num_value_heads, h), [rows("in_proj_ba.weight", 2 * r, 0, r)])
    if rest == "in_proj_a.weight":
        return _Placement((cfg.linear_num_value_heads, h),
                          [rows("in_proj_ba.weight", 2 * r, r, 2 * r)])
    return None


def _expert(cfg: ModelConfig, prefix: str, e: int, proj: str) -> _Placement | None:
    """One expert's gate/up/down matrix into the 3-D expert tensors."""
    if e >= cfg.num_experts:
        return None
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if proj == "down_proj":
        return _Placement((h, inter), [_Part(prefix + "down_proj", lambda p: p[e])])
    lo = 0 if proj == "gate_proj" else inter
    return _Placement((inter, h), [_Part(prefix + "gate_up_proj",
                                         lambda p: p[e, lo:lo + inter])])


def _placement(cfg: ModelConfig, params: dict[str, torch.nn.Parameter],
               name: str) -> _Placement | None:
    """Where the checkpoint tensor `name` goes in the engine's model (None: nowhere)."""
    cname = _canonical(name)
    if cname in params:
        return _Placement(tuple(params[cname].shape), [_Part(cname, lambda p: p)])
    m = _LAYER.match(cname)
    if m is None:
        return None
    prefix, rest = f"model.layers.{m['i']}.", m["rest"]
    if rest.startswith("linear_attn.") and cfg.layer_types[int(m["i"])] == "linear_attention":
        return _split_gdn(cfg, prefix + "linear_attn.", rest[len("linear_attn."):])
    em = _EXPERT.match(rest)
    if em is not None and prefix + "mlp.experts.down_proj" in params:
        return _expert(cfg, prefix + "mlp.experts.", int(em["e"]), em["proj"])
    return None


def _files(path: Path) -> list[Path]:
    if (path / INDEX).exists():
        try:
            idx = json.loads((path / INDEX).read_text())
            files = sorted(set(idx["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path / INDEX}: malformed index ({e})") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise ConfigError(f"{path}: index names missing shards {missing[:3]}")
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files (only safetensors checkpoints load)")
    return files


def load_checkpoint(path: str | Path, device: str | torch.device,
                    dtype: torch.dtype) -> HybridModel:
    """Load config.json + safetensors of a Qwen3-Next, Qwen3.5 or Qwen3.5-MoE checkpoint
    (transformers' names; text-only or multimodal layout) onto `device` in `dtype`."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint {p} is not a directory")
    cfg = ModelConfig.from_file(p / "config.json")
    model = empty_model(cfg, device, dtype)
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    tied = cfg.tie_word_embeddings
    with torch.no_grad():
        for f in _files(p):
            try:
                sf_ctx = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
            with sf_ctx as sf:
                for name in sf.keys():
                    if _SKIPPED.search(name) or (tied and name == "lm_head.weight"):
                        continue
                    _load_tensor(cfg, params, filled, sf, name, f)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        filled["lm_head.weight"] = params["lm_head.weight"].numel()
    short = sorted(n for n, c in filled.items() if c < params[n].numel())
    if short:
        n = short[0]
        raise ConfigError(f"{p}: checkpoint lacks {len(short)} tensors, e.g. {n} "
                          f"({filled[n]} of {params[n].numel()} values found)")
    return model


def _load_tensor(cfg: ModelConfig, params: dict[str, torch.nn.Parameter],
                 filled: dict[str, int], sf: Any, name: str, file: Path) -> None:
    """Copy the checkpoint tensor `name` of the open file `sf` into the parameters."""
    place = _placement(cfg, params, name)
    if place is None:
        raise ConfigError(f"{file.name}: tensor {name} has no place in the model config.json "
                          f"describes (another architecture, or a config that does not match)")
    shape = tuple(sf.get_slice(name).get_shape())
    if shape != place.shape:
        raise ConfigError(f"{name}: shape {shape} != expected {place.shape}")
    t = sf.get_tensor(name)
    for part in place.parts:
        dst = part.view(params[part.param])
        src = t[part.a:part.b] if part.b is not None or part.a else t
        dst.copy_(src.reshape(dst.shape))
        filled[part.param] += dst.numel()
        if filled[part.param] > params[part.param].numel():
            raise ConfigError(f"{name}: {part.param} is given twice by the checkpoint")


def save_checkpoint(model: HybridModel, path: str | Path, shards: int = 1) -> None:
    """Write config.json + safetensors (sharded with an index when shards > 1)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
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
