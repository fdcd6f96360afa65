"""`--target sim`: scenarios through the simulator (the engine's cache decisions, modelled TTFT),
and the recording of a scenario's request stream for replay under every policy."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.cache.driver import check_request
from engine.cache.settings import CacheSettings, policy_flops
from engine.chat import ChatML, ChatTemplate
from engine.config import ModelConfig, dtype_bytes, preset
from engine.errors import UserError
from engine.record import RequestStats
from engine.tokenizer import ByteTokenizer
from sbrbench.costmodel import CostModel
from sbrbench.sim.simulator import SimCache, Simulator
from sbrbench.sim.streams import ListStream, SimRequest
from sbrbench.targets.base import Request, Response


def model_config(preset_name: str = "tiny", checkpoint: str | None = None) -> ModelConfig:
    """The model whose snapshot size and FLOPs a simulation uses: a preset or a checkpoint's."""
    if checkpoint:
        return ModelConfig.from_file(Path(checkpoint) / "config.json")
    return preset(preset_name)


def ids_to_text(ids: Sequence[int]) -> str:
    """Byte-level decode of synthetic replies: id i < 256 is byte i; others are dropped."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def reply_tokens(prompt: Sequence[int], n: int, seed: int = 0, eos: int | None = None) -> list[int]:
    """Deterministic 'generated' tokens, a function of the prompt (as a greedy model's reply):
    printable ASCII, never `eos`."""
    tail = ",".join(map(str, prompt[-256:]))
    h = hashlib.blake2b(f"{seed}|{len(prompt)}|{tail}".encode(), digest_size=16).digest()
    rnd = random.Random(h)
    out: list[int] = []
    while len(out) < n:
        t = rnd.randrange(32, 127)
        if t != eos:
            out.append(t)
    return out


class SimTarget:
    """`--target sim`: the engine's cache decisions and modelled TTFT, no model.

    Replies are deterministic tokens (`reply_tokens`), `max_tokens` of them, so a scenario's
    conversations grow as with the engine (not with the same text: the engine's replies are real
    model output). Rows have the engine's shape; every timing is modelled.
    """

    kind = "sim"
    max_concurrency = 1

    def __init__(self, cache: CacheSettings, model: ModelConfig, cost: CostModel, *,
                 dtype: str = "float32", seed: int = 0, preset_name: str | None = None,
                 device: str = "cpu") -> None:
        self.settings = cache
        self.model = model
        self.cost = cost
        self.seed = seed
        self.dtype = dtype
        self.device = device
        self.preset = preset_name
        self.cache = SimCache(cache, model.snapshot_bytes(dtype_bytes(dtype)), policy_flops(model))
        self.cfg = self.cache.config()
        self.sim = Simulator(self.cfg, cost, max_context=model.max_position_embeddings)
        # the same template an engine of this model renders with (the presets' byte tokenizer)
        self.template: ChatTemplate = ChatML(ByteTokenizer(model.vocab_size, model.eos_token_id))
        # what was sent, in order, for replay under other policies (None: refused by the
        # vocabulary check, which a replay of label streams does not make)
        self.sent: list[SimRequest | None] = []

    @classmethod
    def build(cls, *, cache: CacheSettings, preset: str = "tiny", checkpoint: str | None = None,
              device: str = "cpu", dtype: str = "float32", seed: int = 0,
              costmodel: str | Path | None = None) -> SimTarget:
        from sbrbench.costmodel import resolve

        model = model_config(preset, checkpoint)
        name = None if checkpoint else preset
        cost = resolve(costmodel, name or "a3b-proxy", device)
        return cls(cache, model, cost, dtype=dtype, seed=seed, preset_name=name, device=device)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def send(self, req: Request) -> Response:
        prompt = tuple(int(t) for t in req.prompt_ids)
        try:
            check_request(None, prompt, req.max_tokens, max_context=1 << 62,
                          vocab_size=self.model.vocab_size)
        except UserError as e:
            self.sent.append(None)
            return Response(prompt_tokens=len(prompt), error=f"{type(e).__name__}: {e}")
        out = reply_tokens(prompt, req.max_tokens, self.seed, self.model.eos_token_id)
        sreq = SimRequest(prompt, tuple(out), req.max_tokens, req.session)
        row = self.sim.step(sreq)
        self.sent.append(sreq)
        if row.error is not None:
            return Response(prompt_tokens=len(prompt), error=row.error)
        u = row.use
        timing = self.cost.timing(u.snapshot_pos, u.cached_tokens, u.prompt_tokens, len(out))
        return Response.of(RequestStats(u, len(out), None, timing), out, ids_to_text(out))

    @property
    def requests(self) -> list[SimRequest]:
        """The requests the simulator saw, in order."""
        return [r for r in self.sent if r is not None]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ttft": "modelled",
            "e2e": "modelled",
            "costmodel": self.cost.describe(),
            "tokens": "synthetic replies (sbrbench.sim.target.reply_tokens), not model output",
        }

    def engine_info(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "preset": self.model.name,
            "source": "sim",
            "seed": self.seed,
            "policy": self.sim.cm.policy.name,
            "policy_opts": dict(self.settings.policy_opts),
            "snapshot_slots": cfg.snapshot_slots,
            "snapshot_bytes": cfg.snapshot_bytes,
            "snapshot_budget_bytes": cfg.snapshot_slots * cfg.snapshot_bytes,
            "snapshot_interval": cfg.snapshot_interval,
            "chunk": cfg.chunk,
            "page_size": cfg.page_size,
            "kv_budget_tokens": cfg.kv_pages * cfg.page_size,
            "branch_admission": cfg.branch_admission,
            "cache_settings": self.settings.describe(),
            "chat_template": self.template.name,
            "device": "sim",
            "modelled_device": self.device,
            "dtype": self.dtype,
            "cache_enabled": True,
        }

    def cache_stats(self) -> dict[str, Any]:
        return dict(self.sim.cm.stats())

    def close(self) -> None:
        pass


def record_scenario(
    cfg: Any,
    seed: int,
    cache: CacheSettings,
    *,
    preset_name: str = "tiny",
    dtype: str = "float32",
    costmodel: str | Path | None = None,
    phases: bool = True,
) -> ListStream:
    """Run a scenario once through a SimTarget and keep its request stream.

    The stream does not depend on the policy (replies are a function of the prompt), so it can be
    replayed under every policy and budget, and gives Belady its future.
    """
    from sbrbench.scenarios import make_scenario, run_scenario

    target = SimTarget.build(
        cache=cache, preset=preset_name, dtype=dtype, seed=seed, costmodel=costmodel
    )
    scenario = make_scenario(cfg, seed)
    got: list[str] = []

    def on_row(row: dict[str, Any]) -> None:
        got.append(str(row.get("phase", "")))

    run_scenario(scenario, target, on_row)
    reqs = [
        r._replace(phase=p) if phases else r
        for r, p in zip(target.sent, got, strict=True)
        if r is not None
    ]
    return ListStream(
        reqs,
        {
            "kind": "scenario",
            "scenario": cfg.name,
            "seed": seed,
            "params": cfg.params,
            "requests": len(reqs),
            "sessions": "explicit (the scenario's)",
        },
    )
