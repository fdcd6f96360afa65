"""Every family on checkpoints transformers saved: config parsing, loading, logits and greedy
tokens against transformers' own model, parity across policies, and loader errors."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from engine.cache.settings import CacheSettings
from engine.config import ModelConfig, preset
from engine.errors import ConfigError
from engine.model.model import HybridModel
from engine.model.moe import SparseMoE
from engine.runtime import Engine, SamplingParams
from engine.weights import empty_model, load_checkpoint

FAMILIES = ["qwen3-next-dense", "qwen3-next-moe", "qwen3.5-dense", "qwen3.5-dense-vl",
            "qwen3.5-moe", "qwen3.5-moe-vl"]
MOE_FAMILIES = ("qwen3-next-moe", "qwen3.5-moe", "qwen3.5-moe-vl")
# fp32 on both sides, same weights: the engine and transformers differ only in summation order
# (chunked GDN, SDPA vs eager attention, blocked vs per-expert GEMMs); observed max |diff|
# <= 2e-7 on last-token logits of magnitude ~0.5 over 100 tokens.
LOGIT_ATOL = 2e-5
WINDOW = 64  # the engine's CPU window


def _text_model(hf: object) -> torch.nn.Module:
    """The transformers decoder stack of a causal-LM or a multimodal model."""
    inner = hf.model  # type: ignore[attr-defined]
    return inner.language_model if hasattr(inner, "language_model") else inner


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_transformers(checkpoint: Callable[[str], Any],
                                     family: str) -> None:
    ck = checkpoint(family)
    cfg = ModelConfig.from_file(ck.path / "config.json")
    layers = _text_model(ck.hf).layers
    assert cfg.layer_types == [lyr.layer_type if hasattr(lyr, "layer_type") else lyr.block_type
                               for lyr in layers]
    sparse = [i for i, lyr in enumerate(layers) if hasattr(lyr.mlp, "experts")]
    assert cfg.moe_layers == sparse
    assert (family in MOE_FAMILIES) == bool(sparse)
    n_hf = sum(p.numel() for name, p in ck.hf.named_parameters() if ".visual." not in name)
    assert cfg.param_count() == n_hf
    model = load_checkpoint(ck.path, "cpu", torch.float32)
    assert [isinstance(lyr.mlp, SparseMoE) for lyr in model.decoder] == \
        [i in sparse for i in range(len(layers))]
    assert sum(p.numel() for p in model.parameters()) == n_hf


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoint: Callable[[str], Any], family: str,
                                   engine_last_logits: Callable[..., torch.Tensor]) -> None:
    ck = checkpoint(family)
    model = load_checkpoint(ck.path, "cpu", torch.float32)
    ids = torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ck.hf(input_ids=ids[None], use_cache=False).logits[0].float()
    for n in (1, 17, 64, 65, 100):
        err = (engine_last_logits(model, ids[:n], WINDOW) - want[n - 1]).abs().max().item()
        assert err < LOGIT_ATOL, f"{family} n={n}: max |diff| {err}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_generate_matches_transformers_greedy(checkpoint: Callable[[str], Any],
                                                  family: str) -> None:
    """`sbrbench generate --checkpoint DIR --dtype float32` gives transformers' greedy tokens
    (transformers re-runs the whole sequence for each token: no cache on its side)."""
    from sbrbench.cli import app

    ck = checkpoint(family)
    rnd = random.Random(2)
    prompt = [rnd.randrange(320) for _ in range(90)]
    res = CliRunner().invoke(app, [
        "generate", "--checkpoint", str(ck.path), "--dtype", "float32", "--prompt-ids",
        ",".join(map(str, prompt)), "--max-tokens", "8", "--ignore-eos", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["tokens"]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(ck.hf(input_ids=torch.tensor([seq]), use_cache=False)
                           .logits[0, -1].argmax()))
    assert got == seq[len(prompt):]


def _stream(engine: Engine, seed: int = 1, convs: int = 3, turns: int = 4) -> list[tuple]:
    """A multi-turn stream: each conversation grows by its reply and a new user turn."""
    rnd = random.Random(seed)
    hist = [[rnd.randrange(320) for _ in range(rnd.randrange(90, 200))] for _ in range(convs)]
    rows = []
    for _ in range(turns):
        for c in range(convs):
            r = engine.generate(hist[c], SamplingParams(max_tokens=8, ignore_eos=True))
            st = r.stats
            u = st.cache
            rows.append((u.cached_tokens, u.snapshot_pos, st.logits_sha256, tuple(r.tokens)))
            hist[c] = hist[c] + r.tokens + [rnd.randrange(320)
                                            for _ in range(rnd.randrange(20, 140))]
    return rows


def test_policies_bitwise_identical_on_a_moe_checkpoint(
        checkpoint: Callable[[str], Any]) -> None:
    """forecast, tail-pin and adaptive restore different snapshots of a Qwen3.5-MoE checkpoint
    (so the MoE blocks see differently padded windows) yet give bitwise-identical logits."""
    path = checkpoint("qwen3.5-moe").path
    runs = {}
    for pol in ("forecast", "tail-pin", "adaptive"):
        eng = Engine.from_checkpoint(path, cache=CacheSettings(
            policy=pol, snapshot_slots=3, snapshot_interval=128))
        runs[pol] = _stream(eng)
    a = runs["forecast"]
    assert any(r[0] > 0 for r in a)
    assert len({tuple(r[1] for r in run) for run in runs.values()}) > 1, \
        "the policies should restore differently"
    for pol in ("tail-pin", "adaptive"):
        assert [r[2:] for r in runs[pol]] == [r[2:] for r in a], pol


def test_decay_activations_on_a_multimodal_moe_checkpoint(
        checkpoint: Callable[[str], Any], tmp_path: Path) -> None:
    from sbrbench.cli import app

    ck = checkpoint("qwen3.5-moe-vl")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 5)
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, [
        "decay", "analyze", "--checkpoint", str(ck.path), "--mode", "activations",
        "--corpus", str(corpus), "--max-tokens", "100", "--taus", "16,64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["mode"] == "activations" and doc["seq_len"] == 100
    assert len(doc["heads"]) == 3 * 4  # 3 GDN layers x 4 value heads
    a_log = _text_model(ck.hf).layers[0].linear_attn.A_log.detach()
    first = [h for h in doc["heads"] if h["layer"] == 0]
    # the checkpoint's stored decay parameters (bf16 on disk), read back through the engine
    assert [h["A_log"] for h in first] == pytest.approx(a_log.tolist(), rel=1e-6)


# ---- presets with real shapes ----------------------------------------------------------------


@pytest.mark.parametrize("name,total,active", [
    ("qwen3.5-35b-a3b", 34.66e9, 3.455e9), ("qwen3-next-80b-a3b", 79.67e9, 3.875e9)])
def test_real_shape_presets_count_like_transformers(name: str, total: float,
                                                    active: float) -> None:
    """Parameter counts from the config equal those of transformers' model of that config
    (built on the meta device: no memory), and the active count leaves out the unrouted
    experts only."""
    cfg = preset(name)
    hd = cfg.to_hf_dict()
    for k in ("model_type", "architectures", "rope_theta", "partial_rotary_factor"):
        hd.pop(k)
    with torch.device("meta"):
        hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**hd))
        ours = HybridModel(cfg)
    n = sum(p.numel() for p in hf.parameters())
    assert cfg.param_count() == n == sum(p.numel() for p in ours.parameters())
    assert cfg.param_count() == pytest.approx(total, rel=1e-3)
    assert cfg.active_param_count() == pytest.approx(active, rel=1e-3)
    unrouted = (cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size \
        * cfg.moe_intermediate_size * len(cfg.moe_layers)
    assert cfg.param_count() - cfg.active_param_count() == unrouted
    # matmul FLOPs per token: 2 x active weights, less embeddings, lm_head and small vectors
    assert cfg.flops_per_token() < 2 * cfg.active_param_count()
    assert cfg.flops_per_token() > 2 * (cfg.active_param_count() - 2 * cfg.vocab_size
                                        * cfg.hidden_size) * 0.99


def test_dense_presets_keep_their_flops() -> None:
    """Dense presets: MoE-aware counting leaves flops_per_token as it was (policies and the
    cost model use it)."""
    cfg = preset("a3b-proxy")
    h = cfg.hidden_size
    gdn = h * (2 * cfg.key_dim + 2 * cfg.value_dim) + h * 2 * cfg.linear_num_value_heads \
        + cfg.value_dim * h
    att = h * cfg.num_attention_heads * cfg.head_dim * 2 + 2 * h * cfg.num_key_value_heads \
        * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim * h
    want = 2.0 * (36 * gdn + 12 * att + 3 * h * cfg.intermediate_size * 48)
    assert cfg.flops_per_token() == want
    assert cfg.active_param_count() == cfg.param_count()


# ---- config and loader errors ----------------------------------------------------------------


def _copy(ck: Any, dst: Path) -> Path:
    shutil.copytree(ck.path, dst)
    return dst


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    for f in sorted(path.glob("*.safetensors")):
        sd = load_file(str(f))
        edit(sd)
        save_file(sd, str(f), metadata={"format": "pt"})


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dict({"model_type": "llama"})
    msg = str(e.value)
    assert "\n" not in msg and "'llama'" in msg
    for mt in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"):
        assert mt in msg
    with pytest.raises(ConfigError, match="jamba"):
        ModelConfig.from_hf_dict({"model_type": "qwen3_5", "text_config": {"model_type":
                                                                           "jamba"}})


def test_cli_unsupported_model_type_is_one_red_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sbrbench.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "1,2"])
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "mamba2" in err[0] and "qwen3_5_moe" in err[0]


@pytest.mark.parametrize("kw,match", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_experts": 4, "num_experts_per_tok": 5, "moe_intermediate_size": 8,
      "shared_expert_intermediate_size": 8}, "num_experts_per_tok"),
    ({"num_experts": 4, "num_experts_per_tok": 2}, "moe_intermediate_size"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints.*'fp8'"),
])
def test_bad_configs_are_config_errors(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf_dict({"model_type": "qwen3_next", **kw})


def test_family_rules_of_qwen35(checkpoint: Callable[[str], Any]) -> None:
    """Qwen3.5 dense ignores MoE fields; Qwen3.5-MoE makes every layer sparse and always
    renormalises (its config class has no such fields: transformers ignores them too)."""
    d = json.loads((checkpoint("qwen3.5-moe").path / "config.json").read_text())
    cfg = ModelConfig.from_hf_dict({**d, "mlp_only_layers": [0], "norm_topk_prob": False,
                                    "decoder_sparse_step": 2})
    assert cfg.moe_layers == [0, 1, 2, 3] and cfg.norm_topk_prob
    dense = json.loads((checkpoint("qwen3.5-dense").path / "config.json").read_text())
    assert ModelConfig.from_hf_dict({**dense, "num_experts": 8}).moe_layers == []


def test_qwen3_next_sparse_step_follows_transformers() -> None:
    for step, only in ((2, []), (1, [0, 3]), (3, [2])):
        cfg = ModelConfig.from_hf_dict({
            "model_type": "qwen3_next", "num_hidden_layers": 6, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 8, "decoder_sparse_step": step,
            "mlp_only_layers": only})
        with torch.device("meta"):
            hf = transformers.Qwen3NextModel(transformers.Qwen3NextConfig(
                num_hidden_layers=6, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=8, shared_expert_intermediate_size=8,
                decoder_sparse_step=step, mlp_only_layers=only, hidden_size=64,
                num_attention_heads=4, head_dim=16))
        assert cfg.moe_layers == [i for i, lyr in enumerate(hf.layers)
                                  if hasattr(lyr.mlp, "experts")], (step, only)


def test_missing_part_of_a_split_projection(checkpoint: Callable[[str], Any],
                                            tmp_path: Path) -> None:
    path = _copy(checkpoint("qwen3.5-dense-vl"), tmp_path / "c")
    _edit_tensors(path, lambda sd: sd.pop("model.language_model.layers.1.linear_attn."
                                          "in_proj_z.weight", None))
    idx = json.loads((path / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop("model.language_model.layers.1.linear_attn.in_proj_z.weight")
    (path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ConfigError, match=r"lacks 1 tensors, e\.g\. model\.layers\.1\."
                                          r"linear_attn\.in_proj_qkvz\.weight"):
        load_checkpoint(path, "cpu", torch.float32)


def test_missing_expert(checkpoint: Callable[[str], Any], tmp_path: Path) -> None:
    path = _copy(checkpoint("qwen3-next-moe"), tmp_path / "c")
    _edit_tensors(path, lambda sd: sd.pop("model.layers.0.mlp.experts.5.up_proj.weight", None))
    with pytest.raises(ConfigError, match="lacks 1 tensors.*experts.gate_up_proj"):
        load_checkpoint(path, "cpu", torch.float32)


def test_shape_mismatch_and_foreign_tensors(checkpoint: Callable[[str], Any],
                                            tmp_path: Path) -> None:
    ck = checkpoint("qwen3.5-moe")
    bad_shape = _copy(ck, tmp_path / "shape")

    def widen(sd: dict[str, torch.Tensor]) -> None:
        name = "model.layers.2.linear_attn.in_proj_b.weight"
        if name in sd:
            sd[name] = torch.zeros(5, 64, dtype=sd[name].dtype)

    _edit_tensors(bad_shape, widen)
    with pytest.raises(ConfigError, match=r"in_proj_b\.weight: shape \(5, 64\) != expected "
                                          r"\(4, 64\)"):
        load_checkpoint(bad_shape, "cpu", torch.float32)
    foreign = _copy(ck, tmp_path / "foreign")

    def add(sd: dict[str, torch.Tensor]) -> None:
        if "model.norm.weight" in sd:
            sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)

    _edit_tensors(foreign, add)
    with pytest.raises(ConfigError, match=r"q_proj\.bias has no place"):
        load_checkpoint(foreign, "cpu", torch.float32)


def test_fused_expert_tensors_load_too(checkpoint: Callable[[str], Any],
                                       tmp_path: Path) -> None:
    """Experts stored as transformers' 3-D tensors (experts.gate_up_proj / down_proj) load
    to the same model as the per-expert layout."""
    ck = checkpoint("qwen3-next-moe")
    path = _copy(ck, tmp_path / "fused")
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
        f.unlink()
    (path / "model.safetensors.index.json").unlink()
    for i in (0, 1, 3):
        pre = f"model.layers.{i}.mlp.experts."
        gu = [torch.cat([sd.pop(f"{pre}{e}.gate_proj.weight"), sd.pop(f"{pre}{e}.up_proj.weight")])
              for e in range(8)]
        sd[pre + "gate_up_proj"] = torch.stack(gu)
        sd[pre + "down_proj"] = torch.stack([sd.pop(f"{pre}{e}.down_proj.weight")
                                             for e in range(8)])
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    a = load_checkpoint(ck.path, "cpu", torch.float32).state_dict()
    b = load_checkpoint(path, "cpu", torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loads_in_bf16_without_an_fp32_copy(checkpoint: Callable[[str], Any]) -> None:
    ck = checkpoint("qwen3.5-moe-vl")
    model = load_checkpoint(ck.path, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = empty_model(model.cfg, "cpu", torch.float32)
    ref.load_state_dict(load_checkpoint(ck.path, "cpu", torch.float32).state_dict())
    for (k, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16)), k  # bf16 on disk: exact both ways


def test_every_family_is_tested(families: list[str]) -> None:
    assert sorted(FAMILIES) == families and set(MOE_FAMILIES) <= set(families)
