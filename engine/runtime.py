"""Engine: one request at a time through the hybrid model with an exact prefix cache.

Warm path of a request with prompt length L (engine/cache/driver.py makes the cache's calls;
`_Request` below is the model's side of them):

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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.cache.driver import check_request, run_request
from engine.cache.manager import CacheManager, Plan
from engine.cache.settings import CacheSettings, policy_flops
from engine.cache.snapshots import SnapshotEntry
from engine.chat import ChatML, ChatTemplate, load_template
from engine.config import CHUNK, ModelConfig, preset
from engine.errors import ConfigError, UserError
from engine.kernels import ops
from engine.kernels.ops import gdn_config, glue_enabled, impl_name
from engine.model.attention import attention_impl, warm_pieces
from engine.model.graphs import DecodeGraphs
from engine.model.model import HybridModel, RecurrentState
from engine.record import CacheUse, RequestStats, Timing
from engine.settings import EngineSettings
from engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from engine.weights import build_random, load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

KV = list[tuple[torch.Tensor, torch.Tensor]]


class SamplingParams(NamedTuple):
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_ids: tuple[int, ...] = ()


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
                 device: str, dtype: torch.dtype, cache: CacheSettings | None = None,
                 source: str = "preset", seed: int = 0,
                 settings: EngineSettings | None = None,
                 template: ChatTemplate | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.config: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.template: ChatTemplate = template or ChatML(tokenizer)
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.seed = seed
        self.settings = settings or EngineSettings.from_env()
        self.kernels = ops.Kernels.of(self.settings)  # held by every op while this engine runs
        if self.kernels.sized and self.device.type == "cuda" and model.cfg.moe_layers:
            raise ConfigError("windows=sized on CUDA needs a dense model: the grouped expert "
                              "GEMM is not shown window-invariant (use windows=fixed)")
        threads = self.settings.cpu_threads
        if self.device.type == "cpu" and model.cfg.hidden_size <= 256 and threads is not None:
            torch.set_num_threads(threads)
        self.cache_settings = cache or CacheSettings()
        cs = self.cache_settings
        self.window = self.settings.window(self.device.type)
        self.cuda_graphs = self.device.type == "cuda" and self.settings.cuda_graphs
        self._graphs: DecodeGraphs | None = None
        dbytes = torch.empty((), dtype=dtype).element_size()
        self.snapshot_bytes = self.config.snapshot_bytes(dbytes)
        cfg = cs.resolve(self.snapshot_bytes, policy_flops(self.config))
        self.cm: CacheManager | None = CacheManager(cfg) if cs.enabled else None
        self.cache_config = cfg
        self.slots = slots = cfg.snapshot_slots
        c = self.config
        # torch.empty: pages and slots cost memory only once written.
        self.k_pool = [torch.empty(cfg.kv_pages, cfg.page_size, c.num_key_value_heads,
                                   c.head_dim, dtype=dtype, device=self.device)
                       for _ in c.attn_layers]
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
        if not self.kernels.sized:  # sized windows attend with the window-invariant kernel
            with torch.no_grad(), ops.using(self.kernels):
                warm_pieces(self.config, self.window, dtype, self.device, cs.kv_budget_tokens)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "tiny", *, device: str = "cpu", dtype: str = "float32",
                    seed: int = 0, cache: CacheSettings | None = None,
                    settings: EngineSettings | None = None) -> Engine:
        cfg = preset(name)
        dt = _dtype(dtype)
        dev = _device(device)
        # built where it runs, in its dtype (a 35B preset has no fp32 copy anywhere)
        model = build_random(cfg, dev, dt, seed)
        tok = ByteTokenizer(cfg.vocab_size, cfg.eos_token_id)
        return cls(model, tok, dev, dt, cache, source=f"preset:{name}", seed=seed,
                   settings=settings)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                        cache: CacheSettings | None = None,
                        settings: EngineSettings | None = None) -> Engine:
        dt = _dtype(dtype)
        dev = _device(device)
        model = load_checkpoint(path, dev, dt)
        tok = load_tokenizer(Path(path), model.cfg.vocab_size, model.cfg.eos_token_id)
        return cls(model, tok, dev, dt, cache, source=f"checkpoint:{path}", settings=settings,
                   template=load_template(tok, Path(path)))

    def release(self) -> None:
        """Free the device memory of the model and the pools (the engine is unusable after)."""
        self.model = None  # type: ignore[assignment]
        self.k_pool = self.v_pool = []
        self.snap_ssm = self.snap_conv = torch.empty(0)
        self._graphs = None
        if self.device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    # ---- introspection -------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The result JSON's "engine" block: the model, how it computes, what it caches."""
        with ops.using(self.kernels):
            return self._describe()

    def _describe(self) -> dict[str, Any]:
        cs, cfg = self.cache_settings, self.cache_config
        return {
            "preset": self.config.name, "source": self.source, "seed": self.seed,
            "policy": cfg.policy if self.cm is not None else "off",
            "policy_opts": dict(cs.policy_opts),
            "snapshot_slots": self.slots, "snapshot_bytes": self.snapshot_bytes,
            "snapshot_budget_bytes": self.slots * self.snapshot_bytes,
            "snapshot_interval": cfg.snapshot_interval, "chunk": CHUNK,
            "page_size": cfg.page_size, "kv_budget_tokens": cfg.kv_pages * cfg.page_size,
            "exec_window": self.window, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "kernels": impl_name(self.device),
            "gdn_config": gdn_config(self.device),
            "glue_kernels": impl_name(self.device) == "triton" and glue_enabled(),
            "attention": attention_impl(self.device),
            "cuda_graphs": self.cuda_graphs,
            "cache_enabled": self.cm is not None, "branch_admission": cfg.branch_admission,
            "cache_settings": cs.describe(), "settings": self.settings.describe(),
            "chat_template": self.template.name,
            "kernel_failures": list(self.kernels.failures),
            "params": sum(p.numel() for p in self.model.parameters()),
            "active_params": self.config.active_param_count(),
        }

    def cache_stats(self) -> dict[str, Any]:
        if self.cm is None:
            return {"cache_enabled": False}
        st = dict(self.cm.stats())
        st["snapshot_pool_bytes"] = st.get("snapshots_in_use", 0) * self.snapshot_bytes
        st["kv_pool_bytes"] = st.get("pages_in_use", 0) * self.cache_config.page_size \
            * self.config.kv_bytes_per_token(torch.empty((), dtype=self.dtype).element_size())
        return st

    # ---- the request path ------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 session: str | None = None, on_token: Callable[[int], bool] | None = None,
                 use_cache: bool = True) -> GenerateResult:
        """Generate up to params.max_tokens tokens after prompt_ids (see module docstring)."""
        p = params or SamplingParams()
        prompt = tuple(int(t) for t in prompt_ids)
        if p.temperature < 0 or not 0 < p.top_p <= 1:
            raise UserError("temperature must be >= 0 and top_p in (0, 1]")
        cm = self.cm if use_cache else None
        check_request(self.cache_config if self.cm is not None else None, prompt, p.max_tokens,
                      max_context=self.config.max_position_embeddings,
                      vocab_size=self.config.vocab_size)
        t0 = self.clock.now()
        run = _Request(self, prompt, p, on_token, t0)
        with ops.using(self.kernels):
            served = run_request(cm, prompt, p.max_tokens, session, run)
        t_end = self.clock.now()
        self.requests += 1
        return GenerateResult(list(served.reply), run.stats(served.use, t_end), run.finish)

    def _decode_graphs(self) -> DecodeGraphs | None:
        """The captured decode step (CUDA only, unless settings.cuda_graphs is off), built on
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
                 kv: KV, want: set[int],
                 ) -> tuple[torch.Tensor, RecurrentState, dict[int, RecurrentState], float, float]:
        """Aligned windows over [a, b) from `state` at a (a on the grid). Window time counts as
        replay while the window's valid rows all lie before m, as prefill otherwise. With sized
        windows each window ends at the chunk boundary after its last valid row."""
        E = self.window
        caps: dict[int, RecurrentState] = {}
        replay_s = prefill_s = 0.0
        hidden = None
        t = self.clock.now()
        for e0 in range(a // E * E, b, E):
            lo, hi = max(a - e0, 0), min(b - e0, E)
            rows_n = -(-hi // CHUNK) * CHUNK if self.kernels.sized else E
            w = torch.zeros(rows_n, dtype=torch.long, device=ids.device)
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

    def _page_index(self, pages: list[int], a: int, b: int) -> torch.Tensor:
        """Flat pool row of every position in [a, b)."""
        ps = self.cache_config.page_size
        pos = torch.arange(a, b)
        pg = torch.tensor(pages, dtype=torch.long)[pos // ps]
        return (pg * ps + pos % ps).to(self.device)

    def _gather_kv(self, pages: list[int], m: int, kv: KV) -> None:
        idx = self._page_index(pages, 0, m)
        for (kb, vb), kp, vp in zip(kv, self.k_pool, self.v_pool, strict=True):
            kb[:m] = kp.view(-1, *kp.shape[2:]).index_select(0, idx)
            vb[:m] = vp.view(-1, *vp.shape[2:]).index_select(0, idx)

    def _scatter_kv(self, pages: list[int], kv: KV, a: int, b: int) -> None:
        if b <= a:
            return
        idx = self._page_index(pages, a, b)
        for (kb, vb), kp, vp in zip(kv, self.k_pool, self.v_pool, strict=True):
            kp.view(-1, *kp.shape[2:]).index_copy_(0, idx, kb[a:b])
            vp.view(-1, *vp.shape[2:]).index_copy_(0, idx, vb[a:b])


class _Request:
    """The model's side of one request (engine.cache.driver.Executor): the windows, the
    sampling, the decode and the finalize, with the phase timings."""

    def __init__(self, eng: Engine, prompt: tuple[int, ...], p: SamplingParams,
                 on_token: Callable[[int], bool] | None, t0: float) -> None:
        self.eng, self.ids, self.p, self.on_token, self.t0 = eng, prompt, p, on_token, t0
        self.finish = "length"
        self.out: list[int] = []
        self.times: dict[str, float] = {}
        self.digest = ""
        self.cancelled = False

    def prompt(self, plan: Plan | None, pages: list[int]) -> Mapping[int, RecurrentState]:
        eng, prompt, p = self.eng, self.ids, self.p
        L, dev = len(prompt), eng.device
        m = plan.matched if plan else 0
        s = plan.restore_pos if plan else 0
        n_max = L + p.max_tokens
        cap = -(-n_max // eng.window) * eng.window + eng.window
        self.kv = kv = eng.model.kv_buffers(cap, dev, eng.dtype)
        if m:
            eng._gather_kv(pages, m, kv)
        t_match = eng.clock.now()
        if plan is not None and plan.snapshot is not None:
            slot = plan.snapshot.slot
            state = RecurrentState(eng.snap_ssm[slot].clone(), eng.snap_conv[slot].clone())
        else:
            state = eng.model.zero_state(dev, eng.dtype)
        t_restore = eng.clock.now()
        self.g0 = g0 = L // CHUNK * CHUNK
        want = set(plan.admit_positions) if plan else set()
        if g0 > s:
            want.add(g0)
        ids = torch.tensor(prompt, dtype=torch.long, device=dev)
        hidden, self.state_L, caps, replay_s, prefill_s = eng._windows(ids, s, L, m, state, kv,
                                                                       want)
        logits = eng.model.logits(hidden)[0]
        self.digest = hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()
        self.gen = torch.Generator().manual_seed(p.seed if p.seed is not None else 0)
        tok = _sample(logits, p, self.gen)
        t_first = eng.clock.now()
        self.grid_state = caps.get(g0, state) if g0 > s else state
        self.out = [tok]
        self.cancelled = self.on_token is not None and self.on_token(tok) is False
        if plan is not None:
            eng._scatter_kv(pages, kv, m, L)
        self.times = {"match_s": t_match - self.t0, "restore_s": t_restore - t_match,
                      "replay_s": replay_s, "prefill_s": prefill_s, "ttft_s": t_first - self.t0}
        return caps

    def store(self, entry: SnapshotEntry, state: RecurrentState) -> None:
        self.eng.snap_ssm[entry.slot].copy_(state.ssm)
        self.eng.snap_conv[entry.slot].copy_(state.conv)

    def generate(self) -> list[int]:
        eng, p, out = self.eng, self.p, self.out
        L = len(self.ids)
        if self.cancelled:
            self.finish = "cancelled"
        elif eng._stops(out[0], p):
            self.finish = "stop"
        else:
            graphs = eng._decode_graphs()
            if graphs is not None:
                graphs.start(self.state_L)
            state_cur = self.state_L
            for i in range(1, p.max_tokens):
                if graphs is not None:
                    logits = graphs.step(out[-1], L + i - 1, self.kv)
                else:
                    h, state_cur = eng.model.step(out[-1], L + i - 1, state_cur, self.kv)
                    logits = eng.model.logits(h)
                tok = _sample(logits[0], p, self.gen)
                out.append(tok)
                if self.on_token is not None and self.on_token(tok) is False:
                    self.finish = "cancelled"
                    break
                if eng._stops(tok, p):
                    self.finish = "stop"
                    break
        self.t_dec = eng.clock.now()
        return out

    def reply(self, full: tuple[int, ...], pages: list[int],
              end: int | None) -> Mapping[int, RecurrentState]:
        """Recompute the reply in aligned windows from the prompt's last grid state: canonical
        KV for the reply's pages (also after a cancel: the tokens so far are valid and the next
        turn may match through them), and the state at `end`."""
        eng = self.eng
        n = len(full)
        ids = torch.tensor(full, dtype=torch.long, device=eng.device)
        want = {end} if end is not None else set()
        _, _, caps, _, _ = eng._windows(ids, self.g0, n, n, self.grid_state, self.kv, want)
        eng._scatter_kv(pages, self.kv, len(self.ids), n)
        return caps

    def stats(self, use: CacheUse, t_end: float) -> RequestStats:
        t_dec = self.t_dec
        timing = Timing(**self.times, decode_s=t_dec - self.t0 - self.times["ttft_s"],
                        finalize_s=t_end - t_dec, e2e_s=t_end - self.t0)
        return RequestStats(use, len(self.out), self.digest, timing)


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


__all__ = ["Engine", "GenerateResult", "SamplingParams"]
