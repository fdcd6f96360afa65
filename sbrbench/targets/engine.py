"""`--target engine`: the in-process engine, one request at a time: ids in, its record out."""

from __future__ import annotations

import time
from typing import Any

from engine.cache.settings import CacheSettings
from engine.chat import ChatTemplate
from engine.errors import UserError
from sbrbench.targets.base import Request, Response


class EngineTarget:
    """The in-process engine: sends the rendered prompt ids, reads the engine's record."""

    kind = "engine"
    max_concurrency = 1

    def __init__(self, engine: Any, *, preset: str | None = None) -> None:
        from engine.runtime import SamplingParams

        self.engine = engine
        self.preset = preset
        self.template: ChatTemplate = engine.template
        self._params_cls = SamplingParams

    @classmethod
    def build(cls, *, cache: CacheSettings, preset: str = "tiny", checkpoint: str | None = None,
              device: str = "cpu", dtype: str = "float32", seed: int = 0) -> EngineTarget:
        """Engine.from_preset / from_checkpoint with these cache settings."""
        from engine.runtime import Engine

        if checkpoint:
            # a checkpoint has its weights: the seed only drives the workload
            eng = Engine.from_checkpoint(checkpoint, device=device, dtype=dtype, cache=cache)
        else:
            eng = Engine.from_preset(preset, device=device, dtype=dtype, seed=seed, cache=cache)
        return cls(eng, preset=None if checkpoint else preset)

    @property
    def vocab_size(self) -> int | None:
        cfg = getattr(self.engine, "config", None)
        return getattr(cfg, "vocab_size", None)

    def send(self, req: Request) -> Response:
        params = self._params_cls(
            temperature=0.0, max_tokens=req.max_tokens, ignore_eos=req.ignore_eos
        )
        times: list[float] = []

        def on_token(token_id: int) -> bool:  # when each token was sampled: the ITL
            times.append(time.perf_counter())
            return True

        try:
            res = self.engine.generate(list(req.prompt_ids), params, session=req.session,
                                       on_token=on_token)
        except UserError as e:  # budget errors: the engine stays usable, the row records it
            return Response(prompt_tokens=len(req.prompt_ids), error=f"{type(e).__name__}: {e}")
        tokens = list(res.tokens)
        return Response.of(res.stats, tokens, self.engine.tokenizer.decode(tokens), times)

    def warmup(self) -> float | None:
        """One uncached request before the run (kernel compilation, allocator) so the first row
        measures the cache, not start-up; the cache state is untouched. Seconds."""
        vocab = self.vocab_size or 256
        prompt = [32 + k % min(95, max(vocab - 32, 1)) for k in range(200)]
        t0 = time.perf_counter()
        self.engine.generate(
            prompt,
            self._params_cls(temperature=0.0, max_tokens=4, ignore_eos=True),
            use_cache=False,
        )
        return time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def engine_info(self) -> dict[str, Any]:
        info = dict(self.engine.describe())
        if self.preset and "preset" not in info:
            info["preset"] = self.preset
        return info

    def cache_stats(self) -> dict[str, Any]:
        return dict(self.engine.cache_stats())

    def close(self) -> None:
        """Drop the engine (its weights, KV and snapshot pools): the next policy's engine of a
        large model must fit beside nothing."""
        self.engine.release()
