"""Engine warm path: exact across policies and cold/warm, budgets, checkpoints, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.cache.settings import CacheSettings, parse_bytes
from engine.errors import BudgetError, ConfigError, UserError
from engine.runtime import Engine, SamplingParams
from engine.settings import EngineSettings
from engine.weights import save_checkpoint


def _stream(engine: Engine, seed: int = 1, convs: int = 3, turns: int = 4) -> list[tuple]:
    """A multi-turn stream: each conversation grows by its reply and a new user turn."""
    rnd = random.Random(seed)
    hist = [[rnd.randrange(256) for _ in range(rnd.randrange(90, 200))] for _ in range(convs)]
    rows = []
    for _ in range(turns):
        for c in range(convs):
            r = engine.generate(hist[c], SamplingParams(max_tokens=12, ignore_eos=True))
            st = r.stats
            u = st.cache
            rows.append((u.cached_tokens, u.snapshot_pos, u.replay_tokens, st.logits_sha256,
                         tuple(r.tokens)))
            hist[c] = hist[c] + r.tokens + [rnd.randrange(256) for _ in range(rnd.randrange(20,
                                                                                          140))]
    return rows


def test_policies_restore_different_snapshots_yet_bitwise_identical() -> None:
    runs = {}
    for pol in ("forecast", "tail-pin"):
        eng = Engine.from_preset("tiny", cache=CacheSettings(policy=pol, snapshot_slots=3,
                                                               snapshot_interval=128))
        runs[pol] = _stream(eng)
    a, b = runs["forecast"], runs["tail-pin"]
    assert [r[1] for r in a] != [r[1] for r in b], "the policies should restore differently"
    assert [r[3:] for r in a] == [r[3:] for r in b]  # tokens and logits digests, bitwise
    assert any(r[0] > 0 for r in a)


def _warm_and_cold(eng: Engine, first_n: int, then_n: int, out: int) -> tuple[Any, Any]:
    """A turn of first_n tokens, then its continuation (the reply and then_n more) served warm
    and again without the cache."""
    rnd = random.Random(5)
    prompt = [rnd.randrange(256) for _ in range(first_n)]
    first = eng.generate(prompt, SamplingParams(max_tokens=out, ignore_eos=True))
    prompt2 = prompt + first.tokens + [rnd.randrange(256) for _ in range(then_n)]
    warm = eng.generate(prompt2, SamplingParams(max_tokens=out, ignore_eos=True))
    cold = eng.generate(prompt2, SamplingParams(max_tokens=out, ignore_eos=True),
                        use_cache=False)
    return warm, cold


def test_cold_and_warm_are_identical() -> None:
    eng = Engine.from_preset("tiny", cache=CacheSettings(policy="lru", snapshot_slots=2))
    warm, cold = _warm_and_cold(eng, 150, 70, 10)
    assert warm.stats.cache.cached_tokens > 0 and warm.stats.cache.snapshot_pos > 0
    assert warm.tokens == cold.tokens
    assert warm.stats.logits_sha256 == cold.stats.logits_sha256


def test_kv_budget_error_keeps_engine_serving() -> None:
    eng = Engine.from_preset("tiny", cache=CacheSettings(kv_budget_tokens=256))
    with pytest.raises(BudgetError, match="KV"):
        eng.generate(list(range(250)), SamplingParams(max_tokens=20))
    ok = eng.generate(list(range(100)), SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(ok.tokens) == 4
    assert eng.cm.active == 0


def test_snapshot_budget_smaller_than_one_snapshot() -> None:
    with pytest.raises(BudgetError, match="smaller than one snapshot"):
        Engine.from_preset("tiny", cache=CacheSettings(snapshot_budget_bytes=1000))
    eng = Engine.from_preset("tiny", cache=CacheSettings(snapshot_budget_bytes=parse_bytes(
        "1MiB")))
    assert eng.slots == (1 << 20) // eng.snapshot_bytes


def test_bad_requests_are_user_errors() -> None:
    eng = Engine.from_preset("tiny")
    with pytest.raises(UserError, match="outside the vocabulary"):
        eng.generate([1, 2, 9999])
    with pytest.raises(UserError, match="max_tokens"):
        eng.generate([1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(UserError, match="empty"):
        eng.generate([])
    assert eng.generate([1, 2, 3], SamplingParams(max_tokens=2)).stats.cache.prompt_tokens == 3


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes("500MB") == 500_000_000
    assert parse_bytes("1024") == 1024
    with pytest.raises(UserError):
        parse_bytes("lots")


def test_seeded_sampling_is_reproducible() -> None:
    eng = Engine.from_preset("tiny")
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, ignore_eos=True)
    assert eng.generate([5, 6, 7], p).tokens == eng.generate([5, 6, 7], p).tokens


def test_tiny_temperature_samples_the_argmax() -> None:
    """A valid but tiny temperature (schemathesis sent 1.46e-179) once divided the logits to
    inf and sampling failed on NaN probabilities; in the limit it is greedy decoding."""
    eng = Engine.from_preset("tiny")
    greedy = eng.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True)).tokens
    for t in (1.46e-179, 1e-30):
        p = SamplingParams(temperature=t, top_p=0.55, seed=1, max_tokens=6, ignore_eos=True)
        assert eng.generate([5, 6, 7], p).tokens == greedy


@pytest.mark.parametrize("shards,nested", [(1, False), (3, True)])
def test_checkpoint_roundtrip(tmp_path: Path, shards: int, nested: bool) -> None:
    eng = Engine.from_preset("tiny", seed=4)
    save_checkpoint(eng.model, tmp_path, shards=shards)
    if nested:  # Qwen3.5 naming: model.language_model.layers...
        from safetensors.torch import load_file, save_file

        idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        for f in set(idx["weight_map"].values()):
            sd = load_file(str(tmp_path / f))
            save_file({k.replace("model.", "model.language_model.", 1): v
                       for k, v in sd.items()}, str(tmp_path / f))
        idx["weight_map"] = {k.replace("model.", "model.language_model.", 1): v
                             for k, v in idx["weight_map"].items()}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    back = Engine.from_checkpoint(tmp_path)
    p = SamplingParams(max_tokens=6, ignore_eos=True)
    assert back.generate([9, 8, 7, 6], p, use_cache=False).tokens == \
        eng.generate([9, 8, 7, 6], p, use_cache=False).tokens
    for a, b in zip(back.model.parameters(), eng.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        Engine.from_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed"):
        Engine.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="qwen3_next|hybrid"):
        Engine.from_checkpoint(tmp_path)
    eng = Engine.from_preset("tiny")
    save_checkpoint(eng.model, tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.norm.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="lacks"):
        Engine.from_checkpoint(tmp_path)


def test_checkpoint_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|im_end|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    eng = Engine.from_preset("tiny")
    save_checkpoint(eng.model, tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    back = Engine.from_checkpoint(tmp_path)
    assert back.tokenizer.encode("hello world") == [1, 2]
    assert back.tokenizer.decode([2, 1]).split() == ["world", "hello"]
    assert back.tokenizer.eos_id == 257  # config's eos_token_id wins over the name lookup


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-moe"])
def test_sized_windows_give_every_window_size_the_same_bits(preset_name: str) -> None:
    """windows=sized: a window ends at the chunk after its last valid row and every op is
    row-invariant inside it, so engines of exec windows 64, 192 and 512 give the same tokens
    and logits bitwise, across policies (which restore different snapshots) and against the
    uncached computation."""
    runs = {}
    for w, pol in ((64, "lru"), (192, "forecast"), (512, "tail-pin")):
        eng = Engine.from_preset(preset_name, cache=CacheSettings(
            policy=pol, snapshot_slots=3, snapshot_interval=128),
            settings=EngineSettings(exec_window=w, windows="sized"))
        d = eng.describe()
        assert d["settings"]["windows"] == "sized" and d["attention"] == "invariant-reference"
        runs[w] = _stream(eng, turns=3)
    assert [r[3:] for r in runs[192]] == [r[3:] for r in runs[64]]
    assert [r[3:] for r in runs[512]] == [r[3:] for r in runs[64]]
    assert [r[1] for r in runs[64]] != [r[1] for r in runs[512]]  # restored differently
    eng = Engine.from_preset(preset_name, settings=EngineSettings(exec_window=512,
                                                                  windows="sized"))
    warm, cold = _warm_and_cold(eng, 300, 30, 6)
    assert warm.stats.cache.cached_tokens > 0
    assert (warm.tokens, warm.stats.logits_sha256) == (cold.tokens, cold.stats.logits_sha256)
