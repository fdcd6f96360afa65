"""Model configuration, compatible with Hugging Face `config.json` for `model_type: qwen3_next`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, UserError

CHUNK = 64  # GDN chunk size; snapshots live on the absolute grid of multiples of CHUNK


@dataclass(slots=True)
class ModelConfig:
    """Shapes of a Qwen3-Next-style hybrid decoder (HF field names)."""

    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    layer_types: list[str] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mlp_only_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    decoder_sparse_step: int = 1
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % self.full_attention_interval == 0
                else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append("layer_types length != num_hidden_layers")
        if any(t not in ("full_attention", "linear_attention") for t in self.layer_types):
            problems.append(f"unknown layer type in {sorted(set(self.layer_types))}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} unsupported (only silu)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "head_dim", "linear_key_head_dim", "linear_value_head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        moe = [i for i in range(self.num_hidden_layers)
               if i not in self.mlp_only_layers and self.num_experts > 0
               and (i + 1) % self.decoder_sparse_step == 0]
        if moe:
            problems.append(f"MoE layers {moe[:4]}... unsupported: list them in mlp_only_layers")
        if problems:
            raise ConfigError("bad model config: " + "; ".join(problems))

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def snapshot_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one recurrent snapshot: fp32 state + conv state of every GDN layer."""
        per_layer = (self.linear_num_value_heads * self.linear_key_head_dim
                     * self.linear_value_head_dim * 4
                     + self.conv_dim * (self.linear_conv_kernel_dim - 1) * dtype_bytes)
        return per_layer * len(self.gdn_layers)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes * len(self.attn_layers)

    def flops_per_token(self) -> float:
        """Dense matmul FLOPs per token (2 x weights touched), attention score work excluded."""
        h, c = self.hidden_size, self
        gdn = h * (2 * c.key_dim + 2 * c.value_dim) + h * 2 * c.linear_num_value_heads \
            + c.value_dim * h
        att = h * c.num_attention_heads * c.head_dim * 2 + 2 * h * c.num_key_value_heads \
            * c.head_dim + c.num_attention_heads * c.head_dim * h
        mlp = 3 * h * c.intermediate_size
        per_layer = [gdn if t == "linear_attention" else att for t in c.layer_types]
        return 2.0 * (sum(per_layer) + mlp * c.num_hidden_layers + h * c.vocab_size * 0)

    def gdn_flops_per_token(self) -> float:
        """Chunked delta-rule FLOPs per token (state read/write + intra-chunk), all GDN layers."""
        kd, vd, hv = self.linear_key_head_dim, self.linear_value_head_dim, \
            self.linear_num_value_heads
        per_head = 2 * (4 * kd * vd + CHUNK * (kd + vd) + CHUNK * kd)
        return float(per_head * hv * len(self.gdn_layers))

    def attn_flops(self, q_pos: int) -> float:
        """Score + value FLOPs of one query at position q_pos (keys 0..q_pos), all attn layers."""
        return 4.0 * self.num_attention_heads * self.head_dim * (q_pos + 1) * len(self.attn_layers)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("name")
        d["model_type"] = "qwen3_next"
        d["architectures"] = ["Qwen3NextForCausalLM"]
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "checkpoint") -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        mt = d.get("model_type")
        if "text_config" in d and isinstance(d["text_config"], dict):  # Qwen3.5-style wrapper
            d = {**d["text_config"], "model_type": d["text_config"].get("model_type", mt)}
            mt = d.get("model_type")
        if mt not in (None, "qwen3_next", "qwen3_5_text", "qwen3_5"):
            raise ConfigError(f"model_type {mt!r} is not a Qwen3-Next-style hybrid")
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known and k != "name"}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rope, dict):
            if "rope_theta" in rope:
                kw["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                kw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if kw.get("num_experts") and not kw.get("mlp_only_layers"):
            raise ConfigError("MoE checkpoints are not supported yet (dense MLP only)")
        try:
            return cls(**kw, name=name)
        except TypeError as e:
            raise ConfigError(f"bad model config: {e}") from None

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        return cls.from_hf_dict(d, name=Path(path).parent.name)


def _preset_tiny() -> ModelConfig:
    # CPU tests and the default run: 8 layers (6 GDN + 2 attention), seconds per thousand tokens.
    return ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, full_attention_interval=4, eos_token_id=257, bos_token_id=256,
        name="tiny",
    )


def _preset_small() -> ModelConfig:
    # GPU smoke: ~190M parameters, Qwen3-Next head shapes at reduced width and depth.
    return ModelConfig(
        vocab_size=384, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
        linear_value_head_dim=128, full_attention_interval=4, eos_token_id=257, bos_token_id=256,
        name="small",
    )


def _preset_a3b_proxy() -> ModelConfig:
    # Qwen3-Next-80B-A3B per-layer shapes; dense MLP = 10 routed + 1 shared expert x 512 = 5632,
    # so per-token cost matches the ~3B active parameters.
    return ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, full_attention_interval=4, eos_token_id=257, bos_token_id=256,
        name="a3b-proxy",
    )


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "a3b-proxy": _preset_a3b_proxy}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]()


DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (float32, bfloat16, float16 and their short forms)."""
    if name not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {name!r} (choose float32, bfloat16, float16)")
    return DTYPE_BYTES[name]
