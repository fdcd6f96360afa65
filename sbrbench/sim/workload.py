"""What `sim` and `sweep` simulate: a request stream, the model whose snapshot size and FLOPs
apply, the base cache settings and the cost model, built from a plain `Source` in any process
(a sweep's workers rebuild it from the same `Source`)."""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

from engine.errors import UserError
from sbrbench.costmodel import CostModel
from sbrbench.sim.oracle import FutureIndex
from sbrbench.sim.simulator import SimCache
from sbrbench.sim.streams import ListStream, Stream, load_trace

TRACE_KV_TOKENS = 4 * 1024 * 1024  # see docs/SIMULATOR.md "Budgets"


class Source(NamedTuple):
    """Everything that defines a workload, as plain picklable data (the CLI's flags)."""

    trace: str | None = None
    scenario: str | None = None
    scenario_file: str | None = None
    sets: tuple[str, ...] = ()
    limit: int = 0
    seed: int = 0
    preset: str = "a3b-proxy"
    dtype: str = "bfloat16"
    page_size: int = 16
    snapshot_interval: int | None = None
    kv_budget_tokens: int | None = None
    costmodel: str | None = None
    link_replies: bool = True
    branch_admission: bool = True

    @property
    def name(self) -> str:
        """A short name for tables: the trace's file stem or the scenario's name."""
        if self.trace is not None:
            from pathlib import Path

            return Path(self.trace).stem
        return f"scenario {self.scenario}"


class Workload:
    """The stream, the model, the base cache settings and the cost model of one `Source`."""

    def __init__(self, src: Source) -> None:
        from engine.cache.settings import CacheSettings, policy_flops
        from engine.config import dtype_bytes
        from sbrbench.costmodel import resolve
        from sbrbench.sim.target import model_config

        if (src.trace is None) == (src.scenario is None):
            raise UserError("give exactly one of --trace FILE or --scenario NAME")
        self.src = src
        self.model = model_config(src.preset)
        self.preset, self.dtype = src.preset, src.dtype
        self.cost: CostModel = resolve(src.costmodel, src.preset, "cuda")
        given: dict[str, Any] = {"page_size": src.page_size,
                                 "branch_admission": src.branch_admission}
        if src.snapshot_interval is not None:
            given["snapshot_interval"] = src.snapshot_interval
        given["kv_budget_tokens"] = src.kv_budget_tokens if src.kv_budget_tokens is not None \
            else (TRACE_KV_TOKENS if src.trace is not None else CacheSettings().kv_budget_tokens)
        self.settings = CacheSettings(policy="lru", **given)
        self.snapshot_bytes = self.model.snapshot_bytes(dtype_bytes(src.dtype))
        self.flops = policy_flops(self.model)
        t0 = time.perf_counter()
        if src.trace is not None:
            self.stream: Stream = load_trace(src.trace, src.limit, page_size=src.page_size,
                                             link_replies=src.link_replies)
        else:
            self.stream = self._scenario()
        self.stream_s = time.perf_counter() - t0
        self.future_s = 0.0
        self._future: FutureIndex | None = None

    def _scenario(self) -> Stream:
        from pathlib import Path

        from sbrbench.scenarios import load_config
        from sbrbench.sim.target import record_scenario

        src = self.src
        cfg = load_config(src.scenario or "", Path(src.scenario_file) if src.scenario_file
                          else None, list(src.sets))
        stream = record_scenario(cfg, src.seed, self.settings, preset_name=self.preset,
                                 dtype=self.dtype)
        if src.limit:
            stream = ListStream(stream.requests[:src.limit], stream.info)
        return stream

    @property
    def max_context(self) -> int:
        return int(self.model.max_position_embeddings)

    def base(self, *, slots: int | None = None, budget: int | None = None) -> SimCache:
        settings = self.settings.replace(snapshot_budget_bytes=budget)
        if slots is not None:
            settings = settings.replace(snapshot_slots=slots)
        return SimCache(settings, self.snapshot_bytes, self.flops)

    def future(self) -> FutureIndex:
        """The stream's future for the offline references (built once; it does not depend on
        the pool size)."""
        if self._future is None:
            t0 = time.perf_counter()
            self._future = FutureIndex(self.stream, self.base().config(),
                                       max_context=self.max_context)
            self.future_s = time.perf_counter() - t0
        return self._future

    def header(self) -> dict[str, Any]:
        return {
            "stream": self.stream.describe(),
            "model": {"preset": self.preset, "dtype": self.dtype,
                      "snapshot_bytes": self.snapshot_bytes},
            "costmodel": self.cost.describe(),
            "ttft": "modelled",
        }


@functools.lru_cache(maxsize=4)
def workload(src: Source) -> Workload:
    """The workload of ``src``, built once per process (a sweep's cells share it)."""
    return Workload(src)
