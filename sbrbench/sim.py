"""Policy simulator: the engine's own cache decisions (`engine.cache.CacheManager`) on a request
stream, with a cost model in place of the model forward, and offline (Belady) references.

`Simulator.step` makes exactly the engine's calls (engine/runtime.py): begin -> alloc_pages ->
insert the prompt's whole pages -> admit the plan's positions -> insert prompt + reply -> admit
the end-of-generation snapshot at floor((L + generated) / 64) * 64 -> finish. So a policy decides
in simulation what it decides in the engine, request for request.

Streams come from Mooncake traces (`TraceStream`: hash ids become token labels, see
docs/SIMULATOR.md) or from scenarios (`record_scenario`, through `SimTarget`, the `--target sim`
of every scenario). `FutureIndex` gives the `belady` policy its `next_use` from the stream.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from engine.cache.manager import CacheConfig, CacheManager
from engine.cache.policies import POLICIES
from engine.cache.radix import RadixNode
from engine.cache.settings import EngineCacheArgs
from engine.cache.snapshots import SnapshotEntry
from engine.config import CHUNK, ModelConfig, preset
from engine.errors import BudgetError, ConfigError, UserError
from sbrbench.costmodel import CostModel
from sbrbench.targets import CacheSpec, Request, Response, ids_to_text

SIM_SCHEMA = "sbrbench.sim/v1"
SWEEP_SCHEMA = "sbrbench.sweep/v1"
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


# ----------------------------------------------------------------------------- configuration


# The engine's own settings class (torch-free), so both start from the same defaults.
SimCacheArgs = EngineCacheArgs


def args_from_spec(spec: CacheSpec) -> SimCacheArgs:
    """What `EngineTarget.build` makes of a CacheSpec (0 / None = the engine default)."""
    kw: dict[str, Any] = {
        "policy": spec.policy,
        "policy_opts": spec.policy_opts(),
        "snapshot_slots": spec.snapshot_slots or None,
        "snapshot_budget_bytes": spec.snapshot_budget_bytes,
        "snapshot_interval": spec.snapshot_interval or None,
        "page_size": spec.page_size or None,
        "kv_budget_tokens": spec.kv_budget_tokens or None,
    }
    return SimCacheArgs(**{k: v for k, v in kw.items() if v is not None})


def model_policy_opts(policy: str, cfg: ModelConfig, given: dict[str, Any]) -> dict[str, Any]:
    """The model FLOPs the engine hands FLOP-valuing policies (Engine._policy_model_opts)."""
    if policy not in ("marconi", "adaptive"):
        return {}
    opts = {
        "flops_per_token": cfg.flops_per_token() + cfg.gdn_flops_per_token(),
        "attn_flops_coeff": 0.5 * cfg.attn_flops(0),
    }
    return {k: v for k, v in opts.items() if k not in given}


def cache_config(
    args: SimCacheArgs, model: ModelConfig, dtype: str = "float32", **extra: Any
) -> CacheConfig:
    """The CacheConfig `Engine.__init__` builds from the same settings and model.

    `extra`: CacheConfig fields the engine leaves at their defaults (e.g. branch_admission), for
    studies of manager options before the engine adopts them."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r} (choose float32, bfloat16, float16)")
    if CHUNK % args.page_size:
        raise UserError("page size must divide 64")
    snap_bytes = model.snapshot_bytes(DTYPE_BYTES[dtype])
    if args.snapshot_budget_bytes is not None:
        slots = args.snapshot_budget_bytes // snap_bytes
        if slots < 1:
            raise BudgetError(
                f"snapshot budget {args.snapshot_budget_bytes} B is smaller than one snapshot "
                f"({snap_bytes} B for {len(model.gdn_layers)} GDN layers)"
            )
    else:
        slots = args.snapshot_slots if args.snapshot_slots is not None else 16
    if slots < 0:
        raise UserError("snapshot slots must be >= 0")
    return CacheConfig(
        page_size=args.page_size,
        chunk=CHUNK,
        kv_pages=max(1, args.kv_budget_tokens // args.page_size),
        snapshot_slots=slots,
        snapshot_bytes=snap_bytes,
        snapshot_interval=args.snapshot_interval,
        policy=args.policy,
        policy_opts=dict(
            args.policy_opts, **model_policy_opts(args.policy, model, args.policy_opts)
        ),
        **extra,
    )


def model_config(preset_name: str = "tiny", checkpoint: str | None = None) -> ModelConfig:
    if checkpoint:
        return ModelConfig.from_file(Path(checkpoint) / "config.json")
    return preset(preset_name)


# ----------------------------------------------------------------------------- one request


class SimRequest(NamedTuple):
    prompt: tuple[int, ...]
    reply: tuple[int, ...]  # the generated tokens (cached with the prompt after the request)
    max_tokens: int  # the engine allocates KV pages for prompt + max_tokens
    session: str | None = None  # None: the cache infers it from the matched prefix
    phase: str = ""  # scenario phase, for per-phase summaries


class SimRow(NamedTuple):
    """The cache decision for one request and its modelled cost (tick -1: rejected)."""

    tick: int
    session: str | None
    prompt_tokens: int
    cached_tokens: int
    snapshot_pos: int
    replay_tokens: int
    new_tokens: int
    generated_tokens: int
    ttft_s: float | None
    error: str | None = None


class AdmitHook(Protocol):
    def __call__(self, entry: SnapshotEntry, tokens: Sequence[int], pos: int) -> None: ...


class Simulator:
    """One CacheManager driven request by request exactly as `Engine.generate` drives it."""

    def __init__(
        self,
        cfg: CacheConfig,
        cost: CostModel,
        *,
        max_context: int = 262144,
        on_admit: AdmitHook | None = None,
    ) -> None:
        self.cm = CacheManager(cfg)
        self.cost = cost
        self.max_context = max_context
        self.on_admit = on_admit

    def step(self, req: SimRequest) -> SimRow:
        cm, ps, chunk = self.cm, self.cm.cfg.page_size, self.cm.cfg.chunk
        prompt, L = req.prompt, len(req.prompt)
        n_max = L + req.max_tokens
        err = self._validate(L, req.max_tokens)
        if err is not None:
            return SimRow(-1, req.session, L, 0, 0, 0, L, 0, None, err)
        plan = cm.begin(prompt, req.session)
        m, s = plan.matched, plan.restore_pos
        try:
            pages = plan.kv_pages + cm.alloc_pages(-(-n_max // ps) - m // ps, plan)
            pages = cm.insert(plan, prompt[: L // ps * ps], pages)
            for pos in plan.admit_positions:
                self._admit(plan, prompt, pos)
            full = prompt + req.reply
            n = len(full)
            end = n // chunk * chunk
            cm.insert(plan, full[: n // ps * ps], pages)
            if end > L // chunk * chunk:
                self._admit(plan, full, end)
        except BudgetError as e:
            cm.abort(plan)
            return SimRow(
                plan.tick, plan.session, L, m, s, m - s, L - m, 0, None, f"BudgetError: {e}"
            )
        cm.finish(plan, full)
        return SimRow(
            plan.tick, plan.session, L, m, s, m - s, L - m, len(req.reply), self.cost.ttft(s, m, L)
        )

    def _admit(self, plan: Any, tokens: Sequence[int], pos: int) -> None:
        entry = self.cm.admit(plan, tokens, pos)
        if entry is not None and self.on_admit is not None:
            self.on_admit(entry, tokens, pos)

    def _validate(self, L: int, max_tokens: int) -> str | None:
        """The engine's pre-checks (Engine._validate) that reject a request before `begin`."""
        if L == 0:
            return "UserError: empty prompt: at least one token is needed"
        if max_tokens < 1:
            return f"UserError: max_tokens must be >= 1, got {max_tokens}"
        if L + max_tokens > self.max_context:
            return (
                f"BudgetError: prompt ({L}) + max_tokens ({max_tokens}) exceeds the context "
                f"of {self.max_context} tokens"
            )
        ps = self.cm.cfg.page_size
        need = -(-(L + max_tokens) // ps)
        if need > self.cm.cfg.kv_pages:
            return (
                f"BudgetError: request needs {need * ps} KV tokens; the KV budget is "
                f"{self.cm.cfg.kv_pages * ps} tokens"
            )
        return None


# ----------------------------------------------------------------------------- streams


class Stream(Protocol):
    """A request stream that can be replayed any number of times (one pass per policy)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[SimRequest]: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass
class ListStream:
    """Requests held in memory (scenario recordings, tests)."""

    requests: list[SimRequest]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[SimRequest]:
        return iter(self.requests)

    def describe(self) -> dict[str, Any]:
        return dict(self.info)


_Runs = list[tuple[int, int]]  # (first label, count): labels first, first + 1, ... in order
_REPLY_BASE = 1 << 44  # reply labels live above every block label (hash id * 512 + offset)
_REPLY_STRIDE = 1 << 21


def _take(runs: _Runs, lo: int, hi: int) -> _Runs:
    """The runs covering positions [lo, hi) of the sequence `runs` spells."""
    out: _Runs = []
    pos = 0
    for a, n in runs:
        if pos >= hi:
            break
        b0, b1 = max(lo, pos), min(hi, pos + n)
        if b0 < b1:
            out.append((a + b0 - pos, b1 - b0))
        pos += n
    return out


def _label_tokens(runs: _Runs) -> tuple[int, ...]:
    """The sequence `runs` spells, one label per position (the uncompressed reference)."""
    return tuple(itertools.chain.from_iterable(range(a, a + n) for a, n in runs))


def _page_tokens(runs: _Runs, page: int) -> tuple[int, ...]:
    """The sequence `runs` spells, compressed for speed: in each page, the label of its first
    position at offset 0 and of its last at offset page - 1, the small int `offset` between.

    Whole pages compare equal iff their first and last labels do: exact for `TraceStream`, where a
    label names one source position and a block's runs are fixed by its hash-id prefix. The radix
    tree compares whole pages only, and the shared small ints make most element compares identity
    checks (CPython caches them), which is most of the simulator's time on long prompts.
    """
    import numpy as np

    counts = np.fromiter((n for _, n in runs), dtype=np.int64, count=len(runs))
    firsts = np.fromiter((a for a, _ in runs), dtype=np.int64, count=len(runs))
    starts = np.zeros(len(runs), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    n = int(counts.sum())
    z: list[int] = list(range(page)) * (n // page + 1)
    del z[n:]
    for off, cut in ((0, n), (page - 1, n)):
        p = np.arange(off, cut, page, dtype=np.int64)
        if p.size:
            k = np.searchsorted(starts, p, side="right") - 1
            z[off::page] = (firsts[k] + (p - starts[k])).tolist()
    return tuple(z)


class TraceItem(NamedTuple):
    prompt: _Runs
    reply: _Runs
    output_length: int
    line: int
    parent: int  # index of the request whose reply this one continues, -1 if none


class TraceStream:
    """A Mooncake trace as token-label sequences, with replies linked into the next turn.

    Block k of a request is a run of 512 labels fixed by its hash-id prefix `hash_ids[:k+1]`
    (first request to show that prefix defines it): equal hash ids at equal positions give equal
    tokens, as the trace says. A reply is `output_length` labels unique to its request. With
    `link_replies`, a request whose hash ids extend request j's full blocks and diverge exactly at
    j's last (partial) block is j's next turn: its new blocks start with j's prompt tail and reply,
    so the cache matches through j's reply as it would in a real conversation (and infers the
    session from j's end-of-sequence marker). `min_link_blocks` (default 2) keeps a shared system
    block alone from linking unrelated requests. Labels are not vocabulary ids: the simulator needs
    only their equality.
    """

    def __init__(
        self,
        records: Sequence[Any],
        *,
        page_size: int = 16,
        link_replies: bool = True,
        min_link_blocks: int = 2,
        block: int = 512,
        path: str | None = None,
    ) -> None:
        self.page_size = page_size
        self.block = block
        self.link_replies = link_replies
        self.min_link_blocks = min_link_blocks
        self.path = path
        self.items: list[TraceItem] = []
        self.linked = 0
        self._build(records)

    def _build(self, records: Sequence[Any]) -> None:
        B = self.block
        block_runs: dict[int, _Runs] = {}  # hash of hash_ids[:k+1] -> runs of block k
        full_owner: dict[int, tuple[int, int]] = {}  # hash of hash_ids[:n-1] -> (request, last id)
        full_runs: dict[int, _Runs] = {}
        for i, rec in enumerate(records):
            H, L, G = rec.hash_ids, rec.input_length, rec.output_length
            if G >= _REPLY_STRIDE:
                raise ConfigError(f"trace line {rec.line}: output_length {G} is too large")
            chain = []
            h = 0
            for x in H:
                h = hash((h, x))
                chain.append(h)
            parent, pfull = -1, 0
            if self.link_replies:
                for k in range(len(H) - 1, self.min_link_blocks - 1, -1):
                    own = full_owner.get(chain[k - 1])
                    if own is not None and own[1] != H[k]:
                        parent = own[0]
                        pfull = sum(n for _, n in full_runs[parent])
                        break
            prompt: _Runs = []
            for k, x in enumerate(H):
                lo, hi = k * B, min((k + 1) * B, L)
                if hi <= lo:
                    break
                runs = block_runs.get(chain[k])
                have = sum(n for _, n in runs) if runs is not None else 0
                if runs is None or have < hi - lo:
                    new = list(runs) if runs is not None else []
                    start = lo + have
                    if parent >= 0 and start < pfull:
                        cut = min(hi, pfull)
                        new += _take(full_runs[parent], start, cut)
                        start = cut
                    if start < hi:
                        new.append((x * B + start - lo, hi - start))
                    block_runs[chain[k]] = runs = new
                prompt += _take(runs, 0, hi - lo)
            reply: _Runs = [(_REPLY_BASE + i * _REPLY_STRIDE, max(1, G))]  # the engine makes >= 1
            if len(H) - 1 >= self.min_link_blocks:
                full_owner[chain[len(H) - 2]] = (i, H[-1])
                full_runs[i] = prompt + reply
            self.linked += parent >= 0
            self.items.append(TraceItem(prompt, reply, G, rec.line, parent))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SimRequest]:
        for it in self.items:
            full = _page_tokens(it.prompt + it.reply, self.page_size)
            L = len(full) - it.reply[0][1]
            yield SimRequest(full[:L], full[L:], max(1, it.output_length))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "trace",
            "path": self.path,
            "records": len(self.items),
            "block_tokens": self.block,
            "page_size": self.page_size,
            "link_replies": self.link_replies,
            "min_link_blocks": self.min_link_blocks,
            "linked_requests": self.linked,
            "sessions": "inferred by the cache from matched prefixes",
        }


def load_trace(path: str | Path, limit: int | None = None, **kw: Any) -> TraceStream:
    """Read a Mooncake JSONL trace (sbrbench.tracefile) into a TraceStream."""
    from sbrbench.tracefile import read_trace

    return TraceStream(read_trace(path, limit or None), path=str(path), **kw)


# ----------------------------------------------------------------------------- Belady


def _grid_keys(tokens: Sequence[int], upto: int, chunk: int = CHUNK) -> array:
    """Chained hashes of tokens[:p], p = chunk, 2 chunk, ... <= upto (entry k-1 is p = k chunks)."""
    out = array("q")
    h = 0
    t = tokens if isinstance(tokens, tuple) else tuple(tokens)
    for p in range(chunk, upto + 1, chunk):
        h = hash((h, t[p - chunk : p]))
        out.append(h)
    return out


class FutureIndex:
    """For each possible snapshot (a grid prefix of some request), the requests that could resume
    from it: those whose prompt extends that prefix within its matchable part (whole pages, at
    least one token left to compute). `next_use(entry)` is the first such request after now.

    Built in one pass over the stream: chained hashes of every request's 64-token grid prefixes
    (O(total tokens)); only prefixes where the manager could admit a snapshot are indexed, so a
    lookup is a dict access and a bisect, memoised until the current request passes it.
    """

    def __init__(self, stream: Stream, cfg: CacheConfig, *, max_context: int = 262144) -> None:
        ps, chunk, every = cfg.page_size, cfg.chunk, cfg.snapshot_interval
        # With branch admission a snapshot may sit at any grid position a match ends near:
        # index every grid prefix then (more memory) instead of the foreseeable ones.
        every_grid = bool(getattr(cfg, "branch_admission", False))
        self.now = -1  # index (in the stream) of the request being simulated
        keys: list[array] = []
        ok: list[bool] = []
        self._admit_key: dict[tuple[int, int], int] = {}  # (request, pos) -> prefix key
        for i, req in enumerate(stream):
            L = len(req.prompt)
            fits = (
                0 < L
                and req.max_tokens >= 1
                and L + req.max_tokens <= max_context
                and -(-(L + req.max_tokens) // ps) <= cfg.kv_pages
            )
            ok.append(fits)
            full = req.prompt + req.reply
            end = len(full) // chunk * chunk
            k = _grid_keys(full, end, chunk)
            keys.append(k[: (L - 1) // ps * ps // chunk] if L else array("q"))
            if not fits:
                continue
            # every position the manager could admit a snapshot at for this request
            cand = {L // chunk * chunk, end}
            if every > 0:
                cand.update(range(every, L + 1, every))
            for p in cand:
                if p >= chunk:
                    self._admit_key[(i, p)] = k[p // chunk - 1]
        candidates = set(self._admit_key.values())
        self._uses: dict[int, list[int]] = {}
        for i, ks in enumerate(keys):
            if ok[i]:
                for h in ks:
                    if every_grid or h in candidates:
                        self._uses.setdefault(h, []).append(i)
        self._key: dict[int, int] = {}  # snapshot entry id -> prefix key
        self._memo: dict[int, float] = {}  # entry id -> next use (valid while > now)
        self.requests = len(keys)

    def on_admit(self, entry: SnapshotEntry, tokens: Sequence[int], pos: int) -> None:
        key = self._admit_key.get((self.now, pos))
        if key is None:  # not foreseen (cannot happen for streams this index was built from)
            key = _grid_keys(tokens, pos)[-1]
        self._key[entry.id] = key
        self._memo.pop(entry.id, None)

    def next_use(self, entry: SnapshotEntry, tick: int) -> float:
        """Stream index of the next request that could resume from `entry` (inf: never)."""
        v = self._memo.get(entry.id)
        if v is not None and v > self.now:
            return v
        uses = self._uses.get(self._key.get(entry.id, 0))
        nxt: float = math.inf
        if uses:
            j = bisect.bisect_right(uses, self.now)
            if j < len(uses):
                nxt = uses[j]
        self._memo[entry.id] = nxt
        return nxt

    def _next_of_key(self, key: int) -> float:
        uses = self._uses.get(key)
        if uses:
            j = bisect.bisect_right(uses, self.now)
            if j < len(uses):
                return uses[j]
        return math.inf

    def admission_rule(self, oracle: str) -> Callable[..., bool]:
        """A `Policy.should_admit` for the references (bypass): admit the newcomer only if it
        ranks better than the victim by the same key, so a snapshot never used again does not
        push out one that will be."""

        def should_admit(
            node: RadixNode, pos: int, session: str, tick: int, victim: SnapshotEntry
        ) -> bool:
            key = self._admit_key.get((self.now, pos))
            if key is None:
                return True
            u = self._next_of_key(key)
            if oracle != "gain":
                return u < self.next_use(victim, tick)
            new = u if u == math.inf else (u - self.now) / max(pos - _shallower(node), 1)
            return new < self.gain_rank(victim, tick)

        return should_admit

    def gain_rank(self, entry: SnapshotEntry, tick: int) -> float:
        """`belady-gain`'s key (larger = evict first): requests until the next use, per replay
        token that use saves over the next shallower live snapshot on the entry's path (which
        any request resuming from the entry could fall back to: it extends that prefix too)."""
        u = self.next_use(entry, tick)
        if u == math.inf:
            return u
        return (u - self.now) / max(entry.pos - _shallower(entry.node), 1)


def _shallower(node: RadixNode) -> int:
    """Position of the deepest snapshot strictly above `node` on its radix path (0 if none)."""
    p = node.parent
    while p is not None and p.snapshot is None:
        p = p.parent
    return p.snapshot.pos if p is not None and p.snapshot is not None else 0


# ----------------------------------------------------------------------------- running policies


class PolicyVariant(NamedTuple):
    """One column of results: a registered policy with options, under a display name."""

    name: str
    policy: str
    opts: dict[str, Any]


def variants(
    policies: Sequence[str],
    *,
    tail_pin_k: Sequence[int] = (8,),
    marconi_alpha: Sequence[float] = (),
) -> list[PolicyVariant]:
    """Policy names -> variants: tail-pin once per K, marconi once per alpha (default: its own)."""
    out: list[PolicyVariant] = []
    refs = {**ORACLES, **EXTRA_ORACLES}
    known = [*POLICIES, *refs]
    for p in policies:
        if p in refs:
            out.append(refs[p])
            continue
        if p not in POLICIES:
            raise UserError(f"--policy: unknown policy {p!r} (known: {', '.join(known)})")
        if p == "tail-pin":
            ks = list(tail_pin_k) or [8]
            out += [
                PolicyVariant(p if len(ks) == 1 else f"tail-pin(k={k})", p, {"k": k}) for k in ks
            ]
        elif p == "marconi" and marconi_alpha:
            out += [
                PolicyVariant(
                    p if len(marconi_alpha) == 1 else f"marconi(a={a:g})", p, {"alpha": float(a)}
                )
                for a in marconi_alpha
            ]
        else:
            out.append(PolicyVariant(p, p, {}))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise UserError(f"--policy: a policy is listed twice ({', '.join(names)})")
    return out


# Offline references, both the registry's `belady` policy fed by a FutureIndex: `belady` ranks
# by next use (the classic rule), `belady-gain` by next use per replay token saved.
ORACLES = {
    "belady": PolicyVariant("belady", "belady", {"oracle": "next_use"}),
    "belady-gain": PolicyVariant("belady-gain", "belady", {"oracle": "gain"}),
}
# On request only: belady-gain that also refuses a newcomer ranked below its victim (bypass).
EXTRA_ORACLES = {
    "belady-gain-bypass": PolicyVariant(
        "belady-gain-bypass", "belady", {"oracle": "gain", "bypass": True}
    ),
}
REFERENCES = (*ORACLES, *EXTRA_ORACLES)


def with_belady(vs: list[PolicyVariant]) -> list[PolicyVariant]:
    """The variants plus both offline references (always reported beside online policies)."""
    have = {v.name for v in vs}
    return [*vs, *(v for name, v in ORACLES.items() if name not in have)]


@dataclass
class PolicyRun:
    """Per-request decisions of one policy on one stream, and the manager's counters."""

    variant: PolicyVariant
    rows: list[SimRow]
    stats: dict[str, Any]
    phases: list[str]
    wall_s: float
    slots: int

    def summary(self, warmup: int = 0) -> dict[str, Any]:
        """Totals over the requests after the first `warmup` (which still drive the cache: a
        slice of a longer trace then starts with a filled pool and learned session statistics).
        The manager's counters (hits, evictions, admits) cover the whole stream."""
        if not 0 <= warmup < max(len(self.rows), 1):
            raise UserError(
                f"warm-up of {warmup} requests leaves none of {len(self.rows)} to count")
        out = summarize(self.rows[warmup:], self.stats, self.wall_s, self.phases[warmup:])
        if warmup:
            out["warmup_requests"] = warmup
        return out


def run_policy(
    stream: Stream,
    base: CacheConfig,
    variant: PolicyVariant,
    cost: CostModel,
    *,
    model: ModelConfig | None = None,
    future: FutureIndex | None = None,
    max_context: int = 262144,
    progress: Callable[[int], None] | None = None,
) -> PolicyRun:
    """Simulate the whole stream under one policy (a fresh cache; `base` gives the budgets)."""
    opts = dict(variant.opts)
    oracle, bypass = "next_use", False
    if variant.policy == "belady":
        if future is None:
            future = FutureIndex(stream, base, max_context=max_context)
        oracle = opts.pop("oracle", "next_use")
        bypass = opts.pop("bypass", False)
        opts["next_use"] = future.gain_rank if oracle == "gain" else future.next_use
    else:
        future = None
        if model is not None:
            opts.update(model_policy_opts(variant.policy, model, opts))
    cfg = base._replace(policy=variant.policy, policy_opts=opts)
    sim = Simulator(
        cfg, cost, max_context=max_context, on_admit=future.on_admit if future is not None else None
    )
    if future is not None and bypass:
        # instance attribute: the registry's Belady with the references' admission rule
        sim.cm.policy.should_admit = future.admission_rule(oracle)  # type: ignore[method-assign]
    rows: list[SimRow] = []
    phases: list[str] = []
    t0 = time.perf_counter()
    for i, req in enumerate(stream):
        if future is not None:
            future.now = i
        rows.append(sim.step(req))
        phases.append(req.phase)
        if progress is not None and i % 256 == 255:
            progress(i + 1)
    wall = time.perf_counter() - t0
    return PolicyRun(variant, rows, sim.cm.stats(), phases, wall, cfg.snapshot_slots)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    # numpy's default (linear) percentile
    x = (len(v) - 1) * q / 100.0
    lo = math.floor(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "mean": sum(values) / len(values),
        "p50": _pct(values, 50),
        "p90": _pct(values, 90),
        "p99": _pct(values, 99),
        "max": max(values),
    }


def summarize(
    rows: Sequence[SimRow], stats: dict[str, Any], wall_s: float, phases: Sequence[str] = ()
) -> dict[str, Any]:
    """The `summary.policies.<name>` object of a sim result."""
    ok = [r for r in rows if r.error is None]
    replay = [float(r.replay_tokens) for r in ok]
    ttft = [float(r.ttft_s) for r in ok if r.ttft_s is not None]
    out: dict[str, Any] = {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "replay_tokens": int(sum(r.replay_tokens for r in ok)),
        "hit_tokens": int(sum(r.cached_tokens for r in ok)),
        "new_tokens": int(sum(r.new_tokens for r in ok)),
        "prompt_tokens": int(sum(r.prompt_tokens for r in ok)),
        "snapshot_hits": stats["hits"],
        "snapshot_misses": stats["misses"],
        "cold": stats["cold"],
        "evictions": stats["evictions_policy"],
        "evictions_kv": stats["evictions_kv"],
        "admits": stats["admits"],
        "admit_refused": stats["admit_refused"],
        "kv_evicted_pages": stats["kv_evicted_pages"],
        "sessions": stats["sessions"],
        "resumable_sessions": stats["resumable_sessions"],
        "replay_per_request": _dist(replay),
        "ttft_model_s": _dist(ttft),
        "ttft_model_total_s": sum(ttft),
        "sim_wall_s": round(wall_s, 3),
    }
    if phases and any(phases):
        per: dict[str, Any] = {}
        for ph in dict.fromkeys(phases):
            prs = [r for r, p in zip(rows, phases, strict=True) if p == ph and r.error is None]
            per[ph] = {
                "n": len(prs),
                "replay_tokens": int(sum(r.replay_tokens for r in prs)),
                "replay_per_request": _dist([float(r.replay_tokens) for r in prs]),
                "ttft_model_s": _dist([float(r.ttft_s) for r in prs if r.ttft_s is not None]),
            }
        out["phases"] = per
    return out


def versus_belady(summaries: dict[str, dict[str, Any]]) -> None:
    """Add, in place, `replay_vs_belady` (replay tokens / classic Belady's) and
    `replay_vs_oracle` (/ the best offline reference's: min of belady and belady-gain)."""
    refs = [summaries[n]["replay_tokens"] for n in REFERENCES if n in summaries]
    if not refs:
        return
    bel = summaries.get("belady", {}).get("replay_tokens")
    best = min(refs)
    for s in summaries.values():
        r = s["replay_tokens"]
        s["replay_vs_belady"] = r / bel if bel else None
        s["replay_vs_oracle"] = r / best if best else None


def rows_json(run: PolicyRun) -> dict[str, list[Any]]:
    """Per-request decisions as columns (compact JSON)."""
    return {
        "tick": [r.tick for r in run.rows],
        "cached_tokens": [r.cached_tokens for r in run.rows],
        "snapshot_pos": [r.snapshot_pos for r in run.rows],
        "replay_tokens": [r.replay_tokens for r in run.rows],
        "ttft_model_s": [None if r.ttft_s is None else round(r.ttft_s, 6) for r in run.rows],
        "error": [r.error for r in run.rows],
    }


# ----------------------------------------------------------------------------- --target sim


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
    model output). Rows have the engine's shape; `ttft_s` and `e2e_s` are modelled.
    """

    kind = "sim"
    max_concurrency = 1

    def __init__(
        self,
        args: SimCacheArgs,
        model: ModelConfig,
        cost: CostModel,
        *,
        dtype: str = "float32",
        seed: int = 0,
        preset_name: str | None = None,
        device: str = "cpu",
    ) -> None:
        self.args = args
        self.model = model
        self.cost = cost
        self.seed = seed
        self.dtype = dtype
        self.device = device
        self.preset = preset_name
        self.cfg = cache_config(args, model, dtype)
        self.sim = Simulator(self.cfg, cost, max_context=model.max_position_embeddings)
        # what was sent, in order, for replay under other policies (None: rejected by the
        # vocabulary check, which the simulator itself does not repeat)
        self.sent: list[SimRequest | None] = []

    @classmethod
    def build(
        cls,
        *,
        spec: CacheSpec,
        preset: str = "tiny",
        checkpoint: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        costmodel: str | Path | None = None,
    ) -> SimTarget:
        from sbrbench.costmodel import resolve

        model = model_config(preset, checkpoint)
        name = None if checkpoint else preset
        cost = resolve(costmodel, name or "a3b-proxy", device)
        return cls(
            args_from_spec(spec),
            model,
            cost,
            dtype=dtype,
            seed=seed,
            preset_name=name,
            device=device,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def send(self, req: Request) -> Response:
        prompt = tuple(int(t) for t in req.prompt_ids)
        bad = next((t for t in prompt if not 0 <= t < self.model.vocab_size), None)
        if bad is not None:
            self.sent.append(None)
            return Response(
                prompt_tokens=len(prompt),
                error=(
                    f"UserError: prompt token id {bad} is outside the vocabulary "
                    f"(0..{self.model.vocab_size - 1})"
                ),
            )
        out = reply_tokens(prompt, req.max_tokens, self.seed, self.model.eos_token_id)
        sreq = SimRequest(prompt, tuple(out), req.max_tokens, req.session)
        row = self.sim.step(sreq)
        self.sent.append(sreq)
        if row.error is not None:
            return Response(prompt_tokens=len(prompt), error=row.error)
        t = self.cost.timing(row.snapshot_pos, row.cached_tokens, row.prompt_tokens)
        return Response(
            ttft_s=t.ttft_s,
            e2e_s=self.cost.e2e(t.ttft_s, len(out)),
            prompt_tokens=row.prompt_tokens,
            cached_tokens=row.cached_tokens,
            snapshot_pos=row.snapshot_pos,
            replay_tokens=row.replay_tokens,
            new_tokens=row.new_tokens,
            tokens=out,
            text=ids_to_text(out),
            generated_tokens=len(out),
            timings={
                "restore_s": t.restore_s,
                "replay_s": t.replay_s,
                "prefill_s": t.prefill_s,
                "overhead_s": t.overhead_s,
                "decode_s": self.cost.decode * max(0, len(out) - 1),
            },
        )

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
            "tokens": "synthetic replies (sbrbench.sim.reply_tokens), not model output",
        }

    def engine_info(self) -> dict[str, Any]:
        a, cfg = self.args, self.cfg
        return {
            "preset": self.model.name,
            "source": "sim",
            "seed": self.seed,
            "policy": self.sim.cm.policy.name,
            "policy_opts": dict(a.policy_opts),
            "tail_pin_k": a.policy_opts.get("k", 8),
            "snapshot_slots": cfg.snapshot_slots,
            "snapshot_bytes": cfg.snapshot_bytes,
            "snapshot_budget_bytes": cfg.snapshot_slots * cfg.snapshot_bytes,
            "snapshot_interval": cfg.snapshot_interval,
            "chunk": cfg.chunk,
            "page_size": cfg.page_size,
            "kv_budget_tokens": a.kv_budget_tokens,
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
    spec: CacheSpec,
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
        spec=spec, preset=preset_name, dtype=dtype, seed=seed, costmodel=costmodel
    )
    scenario = make_scenario(cfg, seed)
    scenario.prepare(target)
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
