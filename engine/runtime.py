"""Engine: one request at a time through the hybrid model with an exact prefix cache.

Warm path of a request with prompt length L (see docs/INTERFACES.md and engine/cache/manager.py):

1. match the prompt in the radix tree (m tokens of cached KV), pick the deepest snapshot s <= m;
2. restore it and run aligned windows over [s, L): replay [s, m) and prefill [m, L) in one pass
   (attention reads cached KV for positions before each window's valid range);
3. sample the first token (TTFT), cache the prompt's KV pages, admit snapshots;
4. decode token by token (recurrent step + single-query attention);
5. finalize: recompute the generated tokens in aligned windows from the prompt's last grid state,
   so the KV that gets cached for them and the end-of-generation snapshot are the canonical
   (window-computed) values; then cache prompt + reply so the next turn matches through it.

Because every number is computed by the same fixed-shape window code (engine/model/model.py),
tokens and logits do not depend on what was cached: cold, warm and any two eviction policies
give bitwise-identical results.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.cache.manager import CacheConfig, CacheManager, Plan
from engine.cache.settings import EngineCacheArgs
from engine.config import CHUNK, ModelConfig, preset
from engine.errors import BudgetError, ConfigError, UserError
from engine.kernels.ops import gdn_config, glue_enabled, impl_name
from engine.model.attention import attention_impl, warm_pieces
from engine.model.graphs import DecodeGraphs
from engine.model.model import HybridModel, RecurrentState
from engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from engine.weights import build_random, load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, '1024' -> 1024."""
    if isinstance(text, int):
        return text
    mt = _SIZE.match(str(text))
    if not mt:
        raise UserError(f"bad size {text!r} (use e.g. 2GiB, 512MiB, 1e9 bytes as 1000000000)")
    num, unit, binary = float(mt.group(1)), mt.group(2).upper(), mt.group(3)
    base = 1024 if binary or unit == "" else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    return int(num * base ** power)


class SamplingParams(NamedTuple):
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_ids: tuple[int, ...] = ()


class RequestStats(NamedTuple):
    prompt_tokens: int
    cached_tokens: int
    snapshot_pos: int
    replay_tokens: int
    new_tokens: int
    generated_tokens: int
    logits_sha256: str
    match_s: float
    restore_s: float
    replay_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float
    finalize_s: float
    e2e_s: float


class GenerateResult(NamedTuple):
    tokens: list[int]
    stats: RequestStats
    finish_reason: str  # "stop" | "length" | "cancelled"


class _Clock:
    """Wall time that waits for the device first, so GPU work lands in the right bucket."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Engine:
    """A hybrid model, its tokenizer, the KV page pool, the snapshot pool and the cache logic."""

    def __init__(self, model: HybridModel, tokenizer: ByteTokenizer | HFTokenizer,
                 device: str, dtype: torch.dtype, cache: EngineCacheArgs | None = None,
                 source: str = "preset", seed: int = 0) -> None:
        self.model = model.eval().requires_grad_(False)
        if torch.device(device).type == "cpu" and model.cfg.hidden_size <= 256:
            # Tiny matmuls gain nothing from threads; on a busy machine the thread sync costs
            # up to 20x (measured on 2 cores at load 7: 0.87 s vs 19.8 s for a 2k prefill).
            torch.set_num_threads(int(os.environ.get("SBR_CPU_THREADS", "1")))
        self.config: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.seed = seed
        self.args = cache or EngineCacheArgs()
        a = self.args
        self.window = a.exec_window or (2048 if self.device.type == "cuda" else 64)
        self.cuda_graphs = (self.device.type == "cuda"
                            and os.environ.get("SBR_CUDA_GRAPHS", "1") != "0")
        self._graphs: DecodeGraphs | None = None
        if self.window % CHUNK or self.window <= 0:
            raise UserError(f"exec window must be a positive multiple of {CHUNK}")
        if CHUNK % a.page_size:
            raise UserError(f"page size must divide {CHUNK}")
        dbytes = torch.empty((), dtype=dtype).element_size()
        self.snapshot_bytes = self.config.snapshot_bytes(dbytes)
        if a.snapshot_budget_bytes is not None:
            slots = a.snapshot_budget_bytes // self.snapshot_bytes
            if slots < 1:
                raise BudgetError(
                    f"snapshot budget {a.snapshot_budget_bytes} B is smaller than one snapshot "
                    f"({self.snapshot_bytes} B for {len(self.config.gdn_layers)} GDN layers)")
        else:
            slots = a.snapshot_slots if a.snapshot_slots is not None else 16
        if slots < 0:
            raise UserError("snapshot slots must be >= 0")
        self.slots = slots
        kv_pages = max(1, a.kv_budget_tokens // a.page_size)
        self.cm = CacheManager(CacheConfig(
            page_size=a.page_size, chunk=CHUNK, kv_pages=kv_pages, snapshot_slots=slots,
            snapshot_bytes=self.snapshot_bytes, snapshot_interval=a.snapshot_interval,
            policy=a.policy, policy_opts=dict(a.policy_opts, **self._policy_model_opts())))
        c = self.config
        # torch.empty: pages and slots cost memory only once written.
        self.k_pool = [torch.empty(kv_pages, a.page_size, c.num_key_value_heads, c.head_dim,
                                   dtype=dtype, device=self.device) for _ in c.attn_layers]
        self.v_pool = [torch.empty_like(k) for k in self.k_pool]
        nG = len(c.gdn_layers)
        self.snap_ssm = torch.empty(slots, nG, c.linear_num_value_heads, c.linear_key_head_dim,
                                    c.linear_value_head_dim, dtype=torch.float32,
                                    device=self.device)
        self.snap_conv = torch.empty(slots, nG, c.linear_conv_kernel_dim - 1, c.conv_dim,
                                     dtype=dtype, device=self.device)
        self.clock = _Clock(self.device)
        self.requests = 0
        # cuDNN attention graphs for every key-piece shape the windows can meet, built now
        # rather than on the first request at each depth (engine.model.attention.warm_pieces)
        with torch.no_grad():
            warm_pieces(self.config, self.window, dtype, self.device, a.kv_budget_tokens)

    def _policy_model_opts(self) -> dict[str, Any]:
        # Marconi-style policies value a snapshot by the FLOPs it saves; give them the model's.
        name = self.args.policy
        if name not in ("marconi", "adaptive"):
            return {}
        c = self.config
        opts = {"flops_per_token": c.flops_per_token() + c.gdn_flops_per_token(),
                "attn_flops_coeff": 0.5 * c.attn_flops(0)}
        return {k: v for k, v in opts.items() if k not in self.args.policy_opts}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "tiny", *, device: str = "cpu", dtype: str = "float32",
                    seed: int = 0, cache: EngineCacheArgs | None = None) -> Engine:
        cfg = preset(name)
        dt = _dtype(dtype)
        dev = _device(device)
        # built where it runs, in its dtype (a 35B preset has no fp32 copy anywhere)
        model = build_random(cfg, dev, dt, seed)
        tok = ByteTokenizer(cfg.vocab_size, cfg.eos_token_id)
        return cls(model, tok, dev, dt, cache, source=f"preset:{name}", seed=seed)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                        cache: EngineCacheArgs | None = None) -> Engine:
        dt = _dtype(dtype)
        dev = _device(device)
        model = load_checkpoint(path, dev, dt)
        tok = load_tokenizer(Path(path), model.cfg.vocab_size, model.cfg.eos_token_id)
        return cls(model, tok, dev, dt, cache, source=f"checkpoint:{path}")

    # ---- introspection -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        a = self.args
        return {
            "preset": self.config.name, "source": self.source, "seed": self.seed,
            "policy": self.cm.policy.name if a.enabled else "off",
            "policy_opts": dict(a.policy_opts),
            "tail_pin_k": a.policy_opts.get("k", a.policy_opts.get("tail_pin_k", 8)),
            "snapshot_slots": self.slots, "snapshot_bytes": self.snapshot_bytes,
            "snapshot_budget_bytes": self.slots * self.snapshot_bytes,
            "snapshot_interval": a.snapshot_interval, "chunk": CHUNK,
            "page_size": a.page_size, "kv_budget_tokens": a.kv_budget_tokens,
            "exec_window": self.window, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "kernels": impl_name(self.device),
            "gdn_config": gdn_config(self.device),
            "glue_kernels": impl_name(self.device) == "triton" and glue_enabled(),
            "attention": attention_impl(self.device),
            "cuda_graphs": self.cuda_graphs,
            "cache_enabled": a.enabled, "branch_admission": self.cm.cfg.branch_admission,
            "params": sum(p.numel() for p in self.model.parameters()),
        }

    def cache_stats(self) -> dict[str, Any]:
        st = dict(self.cm.stats())
        st["snapshot_pool_bytes"] = st.get("snapshots_in_use", 0) * self.snapshot_bytes
        st["kv_pool_bytes"] = st.get("pages_in_use", 0) * self.args.page_size \
            * self.config.kv_bytes_per_token(torch.empty((), dtype=self.dtype).element_size())
        return st

    # ---- the request path ------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 session: str | None = None, on_token: Callable[[int], bool] | None = None,
                 use_cache: bool = True) -> GenerateResult:
        """Generate up to params.max_tokens tokens after prompt_ids (see module docstring)."""
        p = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        self._validate(prompt, p)
        use_cache = use_cache and self.args.enabled
        t0 = self.clock.now()
        plan: Plan | None = self.cm.begin(prompt, session) if use_cache else None
        try:
            res = self._run(prompt, p, plan, on_token, t0)
        except BaseException:
            if plan is not None:
                self.cm.abort(plan)
            raise
        self.requests += 1
        return res

    def _validate(self, prompt: list[int], p: SamplingParams) -> None:
        v = self.config.vocab_size
        if not prompt:
            raise UserError("empty prompt: at least one token is needed")
        bad = next((t for t in prompt if not 0 <= t < v), None)
        if bad is not None:
            raise UserError(f"prompt token id {bad} is outside the vocabulary (0..{v - 1})")
        if p.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {p.max_tokens}")
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        limit = self.config.max_position_embeddings
        if len(prompt) + p.max_tokens > limit:
            raise BudgetError(f"prompt ({len(prompt)}) + max_tokens ({p.max_tokens}) exceeds "
                              f"the context of {limit} tokens")
        need = -(-(len(prompt) + p.max_tokens) // self.args.page_size)
        if self.args.enabled and need > self.cm.cfg.kv_pages:
            raise BudgetError(f"request needs {need * self.args.page_size} KV tokens; the KV "
                              f"budget is {self.cm.cfg.kv_pages * self.args.page_size} tokens")

    def _run(self, prompt: list[int], p: SamplingParams, plan: Plan | None,
             on_token: Callable[[int], bool] | None, t0: float) -> GenerateResult:
        L, ps, dev = len(prompt), self.args.page_size, self.device
        m = plan.matched if plan else 0
        s = plan.restore_pos if plan else 0
        n_max = L + p.max_tokens
        pages: list[int] = []
        if plan is not None:
            pages = plan.kv_pages + self.cm.alloc_pages(-(-n_max // ps) - m // ps, plan)
        cap = -(-n_max // self.window) * self.window + self.window
        kv = self.model.kv_buffers(cap, dev, self.dtype)
        if m:
            self._gather_kv(pages, m, kv)
        t_match = self.clock.now()

        if plan is not None and plan.snapshot is not None:
            slot = plan.snapshot.slot
            state = RecurrentState(self.snap_ssm[slot].clone(), self.snap_conv[slot].clone())
        else:
            state = self.model.zero_state(dev, self.dtype)
        t_restore = self.clock.now()

        g0 = L // CHUNK * CHUNK
        want = set(plan.admit_positions) if plan else set()
        if g0 > s:
            want.add(g0)
        ids = torch.tensor(prompt, dtype=torch.long, device=dev)
        hidden, state_L, caps, replay_s, prefill_s = self._windows(ids, s, L, m, state, kv, want)
        logits = self.model.logits(hidden)[0]
        digest = hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()
        gen = torch.Generator().manual_seed(p.seed if p.seed is not None else 0)
        tok = _sample(logits, p, gen)
        t_first = self.clock.now()
        grid_state = caps.get(g0, state) if g0 > s else state

        out = [tok]
        finish = "length"
        cancelled = on_token is not None and on_token(tok) is False
        if plan is not None:
            self._scatter_kv(pages, kv, m, L)
            pages = self.cm.insert(plan, prompt[:L // ps * ps], pages)
            self._admit(plan, prompt, plan.admit_positions, caps)
        if cancelled:
            finish = "cancelled"
        elif self._stops(tok, p):
            finish = "stop"
        else:
            graphs = self._decode_graphs()
            if graphs is not None:
                graphs.start(state_L)
            state_cur = state_L
            for i in range(1, p.max_tokens):
                if graphs is not None:
                    logits = graphs.step(out[-1], L + i - 1, kv)
                else:
                    h, state_cur = self.model.step(out[-1], L + i - 1, state_cur, kv)
                    logits = self.model.logits(h)
                tok = _sample(logits[0], p, gen)
                out.append(tok)
                if on_token is not None and on_token(tok) is False:
                    finish = "cancelled"
                    break
                if self._stops(tok, p):
                    finish = "stop"
                    break
        t_dec = self.clock.now()

        full = prompt + out
        if plan is not None:
            # Also after a cancel (a stop string, a client gone): the tokens generated so far
            # are valid, and the next turn may match through them.
            self._finalize(plan, full, g0, grid_state, kv, pages)
            self.cm.finish(plan, full)
        t_end = self.clock.now()
        st = RequestStats(
            prompt_tokens=L, cached_tokens=m, snapshot_pos=s, replay_tokens=m - s,
            new_tokens=L - m, generated_tokens=len(out), logits_sha256=digest,
            match_s=t_match - t0, restore_s=t_restore - t_match, replay_s=replay_s,
            prefill_s=prefill_s, ttft_s=t_first - t0, decode_s=t_dec - t_first,
            finalize_s=t_end - t_dec, e2e_s=t_end - t0)
        return GenerateResult(out, st, finish)

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The captured decode step (CUDA only; SBR_CUDA_GRAPHS=0 turns it off), built on
        first use."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None:
            self._graphs = DecodeGraphs(self.model, self.device, self.dtype)
        return self._graphs

    def _stops(self, tok: int, p: SamplingParams) -> bool:
        eos = self.tokenizer.eos_id
        return (not p.ignore_eos and eos is not None and tok == eos) or tok in p.stop_ids

    def _windows(self, ids: torch.Tensor, a: int, b: int, m: int, state: RecurrentState,
                 kv: list[tuple[torch.Tensor, torch.Tensor]], want: set[int],
                 ) -> tuple[torch.Tensor, RecurrentState, dict[int, RecurrentState], float, float]:
        """Aligned windows over [a, b) from `state` at a (a on the grid). Window time counts as
        replay while the window's valid rows all lie before m, as prefill otherwise."""
        E = self.window
        caps: dict[int, RecurrentState] = {}
        replay_s = prefill_s = 0.0
        hidden = None
        t = self.clock.now()
        for e0 in range(a // E * E, b, E):
            lo, hi = max(a - e0, 0), min(b - e0, E)
            w = torch.zeros(E, dtype=torch.long, device=ids.device)
            w[lo:hi] = ids[e0 + lo:e0 + hi]
            rows = {r - e0 for r in want if e0 + lo < r <= e0 + hi}
            hidden, state, got = self.model.forward_window(w, e0, lo, hi, state, kv, rows)
            caps.update(got)
            t2 = self.clock.now()
            if e0 + hi <= m:
                replay_s += t2 - t
            else:
                prefill_s += t2 - t
            t = t2
        assert hidden is not None
        return hidden, state, caps, replay_s, prefill_s

    def _finalize(self, plan: Plan, full: list[int], g0: int, grid_state: RecurrentState,
                  kv: list[tuple[torch.Tensor, torch.Tensor]], pages: list[int]) -> None:
        """Recompute the reply in aligned windows from the prompt's last grid state: canonical
        KV for the reply's pages, and the end-of-generation snapshot."""
        n, ps, L = len(full), self.args.page_size, plan.prompt_len
        end = n // CHUNK * CHUNK
        ids = torch.tensor(full, dtype=torch.long, device=self.device)
        want = {end} if end > g0 else set()
        _, _, caps, _, _ = self._windows(ids, g0, n, n, grid_state, kv, want)
        self._scatter_kv(pages, kv, L, n)
        self.cm.insert(plan, full[:n // ps * ps], pages)
        if want:
            self._admit(plan, full, [end], caps)

    def _admit(self, plan: Plan, tokens: list[int], positions: Sequence[int],
               caps: dict[int, RecurrentState]) -> None:
        for pos in positions:
            if pos not in caps:
                continue
            entry = self.cm.admit(plan, tokens, pos)
            if entry is not None:
                self.snap_ssm[entry.slot].copy_(caps[pos].ssm)
                self.snap_conv[entry.slot].copy_(caps[pos].conv)

    def _page_index(self, pages: list[int], a: int, b: int) -> torch.Tensor:
        """Flat pool row of every position in [a, b)."""
        ps = self.args.page_size
        pos = torch.arange(a, b)
        pg = torch.tensor(pages, dtype=torch.long)[pos // ps]
        return (pg * ps + pos % ps).to(self.device)

    def _gather_kv(self, pages: list[int], m: int,
                   kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        idx = self._page_index(pages, 0, m)
        for (kb, vb), kp, vp in zip(kv, self.k_pool, self.v_pool, strict=True):
            kb[:m] = kp.view(-1, *kp.shape[2:]).index_select(0, idx)
            vb[:m] = vp.view(-1, *vp.shape[2:]).index_select(0, idx)

    def _scatter_kv(self, pages: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]],
                    a: int, b: int) -> None:
        if b <= a:
            return
        idx = self._page_index(pages, a, b)
        for (kb, vb), kp, vp in zip(kv, self.k_pool, self.v_pool, strict=True):
            kp.view(-1, *kp.shape[2:]).index_copy_(0, idx, kb[a:b])
            vp.view(-1, *vp.shape[2:]).index_copy_(0, idx, vb[a:b])


def _sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    if p.temperature <= 0:
        return int(torch.argmax(logits).item())
    # float64 and shifted by the max: a tiny temperature (1.46e-179 is valid input) is 0 in
    # fp32, and inf - inf = nan; this way the largest logit goes to 0 and the others to -inf,
    # i.e. greedy decoding in the limit
    lf = logits.double().cpu()
    probs = torch.softmax((lf - lf.max()) / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = sp.cumsum(0) - sp < p.top_p
        keep[0] = True  # the most likely token always survives, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen).item())


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose float32, bfloat16, float16)")
    return DTYPES[name]


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"unknown device {name!r} (cpu or cuda)")
    return name


__all__ = ["Engine", "EngineCacheArgs", "SamplingParams", "RequestStats", "GenerateResult",
           "parse_bytes", "ConfigError"]
