"""Model configuration, compatible with Hugging Face `config.json` of the GDN-hybrid families
transformers defines: Qwen3-Next (`qwen3_next`) and Qwen3.5 dense and MoE (`qwen3_5`,
`qwen3_5_moe`, and their text-only `*_text` configs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, UserError

CHUNK = 64  # GDN chunk size; snapshots live on the absolute grid of multiples of CHUNK

# model_type -> family. A multimodal wrapper (`qwen3_5`, `qwen3_5_moe`) nests its language
# model's config under `text_config`; the vision tower and the MTP head are not loaded.
FAMILIES = {"qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5",
            "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"}


@dataclass(slots=True)
class ModelConfig:
    """Shapes of a Qwen3-Next-style hybrid decoder (HF field names). A layer's feed-forward is
    a sparse MoE block when num_experts > 0, the layer is not in mlp_only_layers and
    (layer + 1) % decoder_sparse_step == 0 (as transformers decides), else a dense SwiGLU MLP."""

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
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
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
                     "head_dim", "linear_key_head_dim", "linear_value_head_dim",
                     "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_experts < 0:
            problems.append("num_experts must be >= 0")
        if self.decoder_sparse_step > 0 and self.moe_layers:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                problems.append(f"num_experts_per_tok must be in 1..num_experts "
                                f"({self.num_experts}), got {self.num_experts_per_tok}")
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, name) <= 0:
                    problems.append(f"{name} must be positive for MoE layers")
        if problems:
            raise ConfigError("bad model config: " + "; ".join(problems))

    @property
    def gdn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def moe_layers(self) -> list[int]:
        """Layers whose feed-forward is the sparse MoE block (the others are dense MLPs)."""
        if self.num_experts <= 0:
            return []
        return [i for i in range(self.num_hidden_layers)
                if i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0]

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

    # ---- parameter and FLOP counts ---------------------------------------------------------
    def _mixer_weights(self, kind: str) -> int:
        """Matmul weights of one token mixer (GDN or gated attention)."""
        h, c = self.hidden_size, self
        if kind == "linear_attention":
            return h * (2 * c.key_dim + 2 * c.value_dim) + h * 2 * c.linear_num_value_heads \
                + c.value_dim * h
        return h * c.num_attention_heads * c.head_dim * 2 + 2 * h * c.num_key_value_heads \
            * c.head_dim + c.num_attention_heads * c.head_dim * h

    def _ffn_weights(self, layer: int, active: bool) -> int:
        """Matmul weights of one layer's feed-forward; for a MoE layer with `active`, only the
        router, the top-k routed experts, the shared expert and its gate."""
        h = self.hidden_size
        if layer not in self.moe_layers:
            return 3 * h * self.intermediate_size
        experts = self.num_experts_per_tok if active else self.num_experts
        return (h * self.num_experts + experts * 3 * h * self.moe_intermediate_size
                + 3 * h * self.shared_expert_intermediate_size + h)

    def param_count(self) -> int:
        """Parameters of the language model (the engine's; a checkpoint's vision tower and MTP
        head are not counted), embeddings and lm_head included (once when tied)."""
        c, h = self, self.hidden_size
        small = {"linear_attention": c.conv_dim * c.linear_conv_kernel_dim
                 + 2 * c.linear_num_value_heads + c.linear_value_head_dim,
                 "full_attention": 2 * c.head_dim}
        layers = sum(self._mixer_weights(t) + small[t] + 2 * h + self._ffn_weights(i, False)
                     for i, t in enumerate(c.layer_types))
        embed = c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
        return layers + embed + h

    def active_param_count(self) -> int:
        """Parameters one token touches: param_count with only the top-k routed experts of each
        MoE layer (equal to param_count for a dense model)."""
        return self.param_count() - sum(self._ffn_weights(i, False) - self._ffn_weights(i, True)
                                        for i in self.moe_layers)

    def flops_per_token(self) -> float:
        """Matmul FLOPs per token (2 x weights touched; a MoE layer counts its router, top-k
        experts and shared expert), attention score work and lm_head excluded."""
        per_layer = [self._mixer_weights(t) for t in self.layer_types]
        ffn = [self._ffn_weights(i, True) for i in range(self.num_hidden_layers)]
        return 2.0 * (sum(per_layer) + sum(ffn))

    def gdn_flops_per_token(self) -> float:
        """Chunked delta-rule FLOPs per token (state read/write + intra-chunk), all GDN layers."""
        kd, vd, hv = self.linear_key_head_dim, self.linear_value_head_dim, \
            self.linear_num_value_heads
        per_head = 2 * (4 * kd * vd + CHUNK * (kd + vd) + CHUNK * kd)
        return float(per_head * hv * len(self.gdn_layers))

    def attn_flops(self, q_pos: int) -> float:
        """Score + value FLOPs of one query at position q_pos (keys 0..q_pos), all attn layers."""
        return 4.0 * self.num_attention_heads * self.head_dim * (q_pos + 1) * len(self.attn_layers)

    # ---- HF config.json --------------------------------------------------------------------
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
        mt = d.get("model_type", "qwen3_next")
        tie = d.get("tie_word_embeddings")
        text = d.get("text_config")
        quant = d.get("quantization_config") or (
            text.get("quantization_config") if isinstance(text, dict) else None)
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
            raise ConfigError(f"quantized checkpoints are not supported (quant_method "
                              f"{method!r}); use the bf16 release")
        if isinstance(text, dict):  # multimodal wrapper: the language model's config
            # transformers ties lm_head by the wrapper's flag (absent: untied), not the text's
            tie = bool(tie)
            d = text
            mt = d.get("model_type", f"{mt}_text")
        if mt not in FAMILIES:
            raise ConfigError(f"model_type {mt!r} is not supported (supported: "
                              f"{', '.join(FAMILIES)})")
        family = FAMILIES[mt]
        known = {f for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
        kw: dict[str, Any] = {k: v for k, v in d.items()
                              if k in known and k != "name" and v is not None}
        if tie is not None:
            kw["tie_word_embeddings"] = bool(tie)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if isinstance(rope, dict):
            # text tokens carry equal (t, h, w) positions, so Qwen3.5's interleaved M-RoPE
            # sections give exactly the 1-D rotary embedding
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ConfigError(f"rope_type {kind!r} unsupported (only default)")
            if "rope_theta" in rope:
                kw["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                kw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if d.get("attention_bias"):
            raise ConfigError("attention_bias=true unsupported (these families have no biases)")
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if "head_dim" not in kw and "hidden_size" in kw and "num_attention_heads" in kw:
            kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
        if family == "qwen3_5":  # dense: the config class has no MoE fields
            kw.update(num_experts=0, mlp_only_layers=[])
        elif family == "qwen3_5_moe":  # every layer sparse, top-k always renormalised
            kw.update(mlp_only_layers=[], decoder_sparse_step=1, norm_topk_prob=True)
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


def _preset_tiny_moe() -> ModelConfig:
    # CPU tests of the sparse MoE path: tiny's mixers, every feed-forward a MoE block of 8
    # experts (top-2, renormalised) plus the gated shared expert, as Qwen3.5-MoE has it.
    return ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, full_attention_interval=4, num_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        eos_token_id=257, bos_token_id=256, name="tiny-moe",
    )


def _preset_small() -> ModelConfig:
    # GPU smoke: ~270M parameters, Qwen3-Next head shapes at reduced width and depth.
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


def _preset_qwen35_35b_a3b() -> ModelConfig:
    # Qwen/Qwen3.5-35B-A3B's text model (its config.json's text_config): 40 layers (30 GDN +
    # 10 gated attention), 256 experts top-8 of 512 plus a 512 shared expert per layer.
    # 34.7B parameters (3.5B active per token): ~69 GB in bf16, fits one 141 GB H200.
    # Token ids stay byte-level (eos 257) as for every random-weight preset.
    return ModelConfig(
        vocab_size=248320, hidden_size=2048, intermediate_size=512, num_hidden_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, full_attention_interval=4, rope_theta=10_000_000.0,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, eos_token_id=257, bos_token_id=256,
        name="qwen3.5-35b-a3b",
    )


def _preset_qwen3_next_80b_a3b() -> ModelConfig:
    # Qwen/Qwen3-Next-80B-A3B: 48 layers (36 GDN + 12 gated attention), 512 experts top-10
    # of 512 plus a 512 shared expert per layer. 79.7B parameters (3.9B active): ~159 GB in
    # bf16, which does NOT fit one H200 (141 GB); it needs two GPUs or a smaller dtype.
    return ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, full_attention_interval=4, rope_theta=10_000_000.0,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, eos_token_id=257, bos_token_id=256,
        name="qwen3-next-80b-a3b",
    )


PRESETS = {"tiny": _preset_tiny, "tiny-moe": _preset_tiny_moe, "small": _preset_small,
           "a3b-proxy": _preset_a3b_proxy, "qwen3.5-35b-a3b": _preset_qwen35_35b_a3b,
           "qwen3-next-80b-a3b": _preset_qwen3_next_80b_a3b}


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
