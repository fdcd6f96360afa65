"""sbrbench.decay: checkpoint reading, horizons, window fidelity, JSON and the CLI verb."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from engine.errors import UserError
from engine.model.gdn import GDNTrace
from sbrbench import cli_decay, decay

PREFIXES = {"qwen3-next": "model.", "qwen3.5": "model.language_model."}
EPS = 1e-3


# --------------------------------------------------------------------------- fixtures


def decay_params(n_layers: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(A_log) = a and softplus(dt_bias) = s with known products: g = -a * s."""
    rng = np.random.default_rng(7)
    a = np.exp(rng.uniform(-9, 2, (n_layers, heads)))
    s = rng.uniform(0.05, 3.0, (n_layers, heads))
    return a, s


def write_checkpoint(
    root: Path,
    scheme: str = "qwen3-next",
    *,
    n_layers: int = 8,
    heads: int = 6,
    shards: int = 3,
    config: bool = True,
    drop: tuple[str, ...] = (),
) -> tuple[Path, dict[int, np.ndarray]]:
    """A synthetic HF checkpoint: every 4th layer attention, the rest GDN with known decay.

    Returns the directory and the expected g per GDN layer. `drop` removes tensor names.
    """
    root.mkdir(parents=True, exist_ok=True)
    prefix = PREFIXES[scheme]
    a, s = decay_params(n_layers, heads)
    gdn = [i for i in range(n_layers) if (i + 1) % 4 != 0]
    tensors: dict[str, torch.Tensor] = {f"{prefix}embed_tokens.weight": torch.zeros(32, 16)}
    expected = {}
    for i in range(n_layers):
        base = f"{prefix}layers.{i}."
        tensors[base + "mlp.up_proj.weight"] = torch.zeros(16, 16)
        if i in gdn:
            tensors[base + "linear_attn.A_log"] = torch.tensor(np.log(a[i]), dtype=torch.float32)
            tensors[base + "linear_attn.dt_bias"] = torch.tensor(
                np.log(np.expm1(s[i])), dtype=torch.bfloat16 if i == 0 else torch.float32
            )
            tensors[base + "linear_attn.in_proj_ba.weight"] = torch.zeros(2 * heads, 16)
            expected[i] = None  # filled below from the stored (rounded) tensors
        else:
            tensors[base + "self_attn.q_proj.weight"] = torch.zeros(16, 16)
    for name in drop:
        tensors.pop(name)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(root / file))
            weight_map |= {n: file for n in part}
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    if config:
        text = {"num_hidden_layers": n_layers, "full_attention_interval": 4}
        cfg = {"text_config": text} if scheme == "qwen3.5" else text
        (root / "config.json").write_text(json.dumps(cfg))
    for i in list(expected):
        a_log = tensors.get(f"{prefix}layers.{i}.linear_attn.A_log")
        dt_b = tensors.get(f"{prefix}layers.{i}.linear_attn.dt_bias")
        if a_log is None or dt_b is None:
            expected.pop(i)
            continue
        expected[i] = -np.exp(a_log.double().numpy()) * np.log1p(np.exp(dt_b.double().numpy()))
    return root, expected


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    cli_decay.register(app)
    return app


def invoke(*args: str):
    return CliRunner().invoke(cli_app(), ["decay", "analyze", *args])


def strict_json(path: Path) -> dict:
    def no_constants(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("shards", [1, 3], ids=["single", "sharded"])
@pytest.mark.parametrize("scheme", sorted(PREFIXES))
def test_static_horizons_match_closed_form(tmp_path, scheme, shards):
    ckpt, expected = write_checkpoint(tmp_path / "ckpt", scheme, shards=shards)
    params = decay.read_gdn_params(ckpt)
    assert [p.layer for p in params] == [0, 1, 2, 4, 5, 6]
    report = decay.analyze_static(str(ckpt), params, [EPS], [64, 8192])
    for h in report.heads:
        g = expected[h.layer][h.head]
        assert h.g_static == pytest.approx(g, rel=1e-12)
        assert h.horizons[EPS].static == pytest.approx(math.log(1 / EPS) / -g, rel=1e-12)


def test_reads_only_the_decay_tensors(tmp_path, monkeypatch):
    ckpt, _ = write_checkpoint(tmp_path / "ckpt", "qwen3.5", shards=3)
    read: list[str] = []
    real_open = decay.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(decay, "safe_open", Spy)
    decay.read_gdn_params(ckpt)
    assert read and all(n.endswith((".A_log", ".dt_bias")) for n in read)
    assert len(read) == len(set(read)) == 12


def test_single_file_path_without_config(tmp_path):
    ckpt, expected = write_checkpoint(tmp_path / "c", shards=1, config=False)
    params = decay.read_gdn_params(ckpt / "model.safetensors")
    assert {p.layer for p in params} == set(expected)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("drop_dt_bias", "missing tensors layers.5.linear_attn.dt_bias"),
        ("drop_layer", "missing tensors layers.1.linear_attn.A_log"),
        ("no_gdn", "no GDN layers"),
        ("bin_only", "no safetensors"),
        ("missing_shard", "names shards that are not there"),
        ("not_there", "checkpoint not found"),
        ("corrupt", "unreadable safetensors"),
    ],
)
def test_checkpoint_errors_are_one_line_user_errors(tmp_path, setup, message):
    root = tmp_path / "ckpt"
    if setup == "drop_dt_bias":
        write_checkpoint(root, drop=("model.layers.5.linear_attn.dt_bias",))
    elif setup == "drop_layer":  # config.json says layer 1 is GDN, its tensors are gone
        write_checkpoint(
            root, drop=("model.layers.1.linear_attn.A_log", "model.layers.1.linear_attn.dt_bias")
        )
    elif setup == "no_gdn":
        root.mkdir()
        save_file(
            {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)},
            str(root / "model.safetensors"),
        )
    elif setup == "bin_only":
        root.mkdir()
        (root / "pytorch_model.bin").write_bytes(b"\0" * 16)
    elif setup == "missing_shard":
        write_checkpoint(root, shards=3)
        next(root.glob("model-00002-*.safetensors")).unlink()
    elif setup == "corrupt":
        root.mkdir()
        (root / "model.safetensors").write_bytes(b"garbage, not a header")
    with pytest.raises(UserError, match=message) as exc:
        decay.read_gdn_params(root)
    assert "\n" not in str(exc.value)


def test_activations_check_needs_in_proj_ba(tmp_path):
    ckpt, _ = write_checkpoint(
        tmp_path / "c", drop=("model.layers.2.linear_attn.in_proj_ba.weight",)
    )
    decay.read_gdn_params(ckpt)  # static mode does not need it
    with pytest.raises(UserError, match="layers.2.linear_attn.in_proj_ba"):
        decay.read_gdn_params(ckpt, need_projections=True)


# --------------------------------------------------------------------------- horizons


def naive_position_horizon(g: np.ndarray, t: int, eps: float) -> float | None:
    """Walk forward from t summing g; interpolate inside the crossing token; None if never."""
    total, target = 0.0, math.log(eps)
    for n, gj in enumerate(g[t + 1 :], start=1):
        if total + gj <= target:
            return n - 1 + (target - total) / gj
        total += gj
    return None


def test_position_horizons_constant_decay_equals_static():
    g = np.full(4000, -0.01)
    ph = decay.position_horizons(g, EPS)
    h = math.log(1 / EPS) / 0.01  # 690.8 tokens
    done = ph.observed
    assert done[: 4000 - 692].all() and not done[-691:].any()
    np.testing.assert_allclose(ph.times[done], h, rtol=1e-9)
    np.testing.assert_array_equal(ph.times[~done], 4000 - 1 - np.flatnonzero(~done))


def test_position_horizons_match_naive_walk():
    rng = np.random.default_rng(3)
    g = -rng.exponential(0.05, 600) * (rng.random(600) < 0.7)  # some tokens do not decay
    ph = decay.position_horizons(g, 1e-2)
    for t in range(600):
        want = naive_position_horizon(g, t, 1e-2)
        if want is None:
            assert not ph.observed[t] and ph.times[t] == 600 - 1 - t
        else:
            assert ph.observed[t] and ph.times[t] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_kaplan_meier_quantiles():
    times = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    observed = np.array([True, False, True, True, False])
    # S(1) = 4/5, S(3) = 0.8 * 2/3 = 0.533, S(4) = 0.533 * 1/2 = 0.267; never <= 0.1
    assert decay.km_quantile(times, observed, 0.2) == 1.0
    assert decay.km_quantile(times, observed, 0.5) == 4.0
    assert decay.km_quantile(times, observed, 0.9) == math.inf
    # without censoring it is the lower empirical quantile
    x = np.arange(1.0, 11.0)
    assert decay.km_quantile(x, np.ones(10, bool), 0.5) == 5.0
    assert decay.km_quantile(x, np.ones(10, bool), 0.9) == 9.0


def test_activation_horizon_censoring():
    fast = decay.activation_horizon(np.full(1000, -0.1), EPS)  # 69 tokens
    assert fast.median == pytest.approx(math.log(1000) / 0.1)
    assert fast.censored_share == pytest.approx(70 / 1000)
    slow = decay.activation_horizon(np.full(1000, -1e-4), EPS)  # 69,078 tokens >> 1000
    assert slow.median == math.inf and slow.censored_share == 1.0


# --------------------------------------------------------------------------- window fidelity


def naive_final_state(k, v, g, beta, start: int) -> torch.Tensor:
    """The gated delta rule, one head and token at a time, from zero at `start`."""
    T, H, K = k.shape
    out = torch.zeros(H, K, v.shape[-1], dtype=torch.float64)
    for h in range(H):
        S = torch.zeros(K, v.shape[-1], dtype=torch.float64)
        for t in range(start, T):
            S = math.exp(g[t, h]) * S
            kt = k[t, h].double()
            S = S + torch.outer(kt, beta[t, h].double() * (v[t, h].double() - S.T @ kt))
        out[h] = S
    return out


def random_gdn(T: int, H: int, K: int, V: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    v = torch.randn(T, H, V, generator=gen)
    g = -torch.rand(T, H, generator=gen) * 0.2
    beta = torch.rand(T, H, generator=gen)
    return k, v, g, beta


@pytest.mark.parametrize(
    "T,H,K,V", [(40, 3, 8, 5), (97, 2, 16, 16)], ids=["T40-H3-K8-V5", "T97-H2-K16-V16"]
)
def test_batched_recurrence_matches_naive(T, H, K, V):
    k, v, g, beta = random_gdn(T, H, K, V)
    starts = [T - 1, 0, T // 2, 5]
    got = decay.gated_delta_final_states(k, v, g, beta, starts)
    for i, s in enumerate(starts):
        torch.testing.assert_close(
            got[i], naive_final_state(k, v, g, beta, s), rtol=1e-12, atol=1e-12
        )


def test_window_covering_the_sequence_is_exact():
    k, v, g, beta = random_gdn(50, 4, 8, 8, seed=1)
    cos = decay.window_fidelity(k, v, g, beta, [10, 49, 50, 64, 8192])
    assert np.all(np.abs(cos[2:] - 1.0) <= 1e-12)
    assert np.all(cos[0] < 0.999) and np.all(cos[1] < 1.0)  # missing even token 0 shows


def test_constant_decay_window_follows_formula():
    """Orthonormal keys e_t (each used once, T <= K), unit values, constant g and beta: the
    state is sum_t a^(T-1-t) beta e_t v_t^T with orthogonal terms, so
    cos(tau) = sqrt((1 - a^(2 tau)) / (1 - a^(2 T))), a = exp(g)."""
    T = K = 64
    gs = torch.tensor([-0.1, -0.05, -0.01, -1e-3], dtype=torch.float64)
    H = gs.numel()
    k = torch.eye(K, dtype=torch.float64)[:T, None, :].expand(T, H, K).clone()
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(T, H, 7, generator=gen, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    g = gs[None].expand(T, H).clone()
    beta = torch.full((T, H), 0.7)
    taus = [1, 2, 4, 8, 16, 32, 48, 63, 64]
    cos = decay.window_fidelity(k, v, g, beta, taus)
    for i, tau in enumerate(taus):
        want = decay.predicted_window_cos(gs.numpy(), tau, seq_len=T)
        np.testing.assert_allclose(cos[i], want, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(cos, axis=0) > 0)  # fidelity falls monotonically as tau shrinks
    assert np.all(np.diff(cos[:-1], axis=1) < 0)  # slower-decaying heads keep less in the window


def test_predicted_window_cos_limits():
    g = np.array([-0.1, -1e-3])
    inf_T = decay.predicted_window_cos(g, 100)
    np.testing.assert_allclose(inf_T, np.sqrt(1 - np.exp(2 * g * 100)))
    np.testing.assert_allclose(decay.predicted_window_cos(g, 100, seq_len=10**7), inf_T, rtol=1e-12)
    assert np.all(decay.predicted_window_cos(g, 100, seq_len=100) == 1.0)


# --------------------------------------------------------------------------- summary and JSON


def test_tail_fit_picks_the_generating_family():
    rng = np.random.default_rng(11)
    lognormal = rng.lognormal(mean=5.0, sigma=1.5, size=800)
    pareto = (rng.pareto(1.2, size=800) + 1) * 20.0
    ln_fit = decay.tail_fit(lognormal)
    pa_fit = decay.tail_fit(pareto)
    assert ln_fit["best"] == "lognormal" and pa_fit["best"] == "pareto"
    assert ln_fit["lognormal"]["params"]["mu"] == pytest.approx(5.0, abs=0.2)
    assert ln_fit["lognormal"]["params"]["sigma"] == pytest.approx(1.5, abs=0.1)
    assert pa_fit["pareto"]["params"]["alpha"] == pytest.approx(1.2, abs=0.15)
    assert decay.tail_fit(np.array([1.0, 2.0])) is None


def test_summary_over_heads(tmp_path):
    ckpt, expected = write_checkpoint(tmp_path / "c", heads=16)
    report = decay.analyze_static("x", decay.read_gdn_params(ckpt), [EPS, 1e-6], [64, 8192])
    h = np.concatenate([math.log(1 / EPS) / -expected[i] for i in sorted(expected)])
    s = decay.summarize(report, EPS)
    assert s["n_heads"] == h.size == 96
    assert s["median_horizon_tokens"] == pytest.approx(np.median(h))
    assert s["p90_horizon_tokens"] == pytest.approx(np.quantile(h, 0.9))
    assert s["share_over_8192"] == pytest.approx(np.mean(h > 8192))
    assert 0 < s["share_over_8192"] < 1 and s["share_unresolved"] == 0
    s6 = decay.summarize(report, 1e-6)  # static horizons scale with ln(1/eps)
    assert s6["median_horizon_tokens"] == pytest.approx(2 * s["median_horizon_tokens"])


def test_cli_static_writes_json_and_plot(tmp_path):
    ckpt, expected = write_checkpoint(tmp_path / "c", "qwen3.5", heads=8)
    out, png = tmp_path / "r" / "decay.json", tmp_path / "hist.png"
    res = invoke(
        "--checkpoint",
        str(ckpt),
        "--eps",
        "1e-3,1e-6",
        "--eps",
        "1e-2",
        "--taus",
        "256,64",
        "--out",
        str(out),
        "--plot",
        str(png),
        "--top",
        "3",
    )
    assert res.exit_code == 0, res.output
    doc = strict_json(out)
    assert doc["schema"] == "sbrbench.decay/v1"
    assert doc["source"] == str(ckpt) and doc["mode"] == "static"
    assert doc["eps"] == [1e-3, 1e-6, 1e-2] and doc["taus"] == [64, 256]
    assert set(doc["by_eps"]) == {"0.001", "1e-06", "0.01"} and doc["summary"]["eps"] == 1e-3
    assert {"median_horizon_tokens", "p90_horizon_tokens", "share_over_8192", "tail_fit"} <= set(
        doc["summary"]
    )
    assert doc["summary"]["tail_fit"]["best"] in ("lognormal", "pareto")
    assert set(doc["window"]) == {"64", "256"}
    assert len(doc["heads"]) == 6 * 8 and len(doc["slowest_heads"]) == 3
    head = doc["heads"][0]
    assert head["layer"] == 0 and head["head"] == 0
    assert head["horizon_tokens"] == pytest.approx(math.log(1000) / -expected[0][0], rel=1e-12)
    # the slowest heads at tau=256 are the longest horizons
    longest = sorted(doc["heads"], key=lambda r: -r["horizon_tokens"])[:3]
    assert [(r["layer"], r["head"]) for r in longest] == [
        (r["layer"], r["head"]) for r in doc["slowest_heads"]
    ]
    assert {"env", "created", "argv"} <= set(doc) and doc["env"]["python"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "window fidelity" in res.output and "heads by horizon" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eps", "0"], "eps must lie strictly between 0 and 1"),
        (["--eps", "1e-3,2"], "eps must lie strictly between 0 and 1"),
        (["--eps", "abc"], "--eps: not a number"),
        (["--taus", "64,0"], "taus must be positive"),
        (["--taus", "64,x"], "--taus: expected a comma list"),
        (["--mode", "dynamic"], "--mode must be one of"),
        (["--corpus", "x.txt"], "need --mode activations"),
        (["--mode", "activations"], "needs exactly one of --corpus"),
    ],
)
def test_cli_bad_flags_are_user_errors(tmp_path, args, message):
    ckpt, _ = write_checkpoint(tmp_path / "c", shards=1)
    res = invoke("--checkpoint", str(ckpt), "--out", str(tmp_path / "o.json"), *args)
    assert isinstance(res.exception, UserError), res.output
    assert message in str(res.exception)
    assert not (tmp_path / "o.json").exists()


def test_cli_needs_exactly_one_source(tmp_path):
    res = invoke()
    assert isinstance(res.exception, UserError) and "exactly one of --checkpoint" in str(
        res.exception
    )


# --------------------------------------------------------------------------- activations


def test_analyze_activations_constant_decay_heads():
    """Synthetic traces: constant g per head gives the static horizon as median over positions
    (censored tail handled), and the window cosines of the recurrence."""
    T, H = 3000, 3
    gs = np.array([-0.05, -0.005, -1e-4])  # horizons 138, 1382, 69078 tokens
    k, v, _, beta = random_gdn(T, H, 8, 8, seed=5)
    g = torch.tensor(gs, dtype=torch.float32)[None].expand(T, H).clone()
    a_log = np.log(-gs / np.log1p(np.e))  # dt_bias = 1: softplus(1) = log(1 + e)
    params = [decay.GDNLayerParams(3, a_log, np.ones(H))]
    traces = [GDNTrace(3, k, k, v, g, beta)]
    report = decay.analyze_activations("synthetic", params, traces, [EPS], [64, 4096])
    hz = [h.horizons[EPS] for h in report.heads]
    for i in range(2):
        assert hz[i].median == pytest.approx(hz[i].static, rel=1e-5)
        assert hz[i].static == pytest.approx(math.log(1000) / -gs[i], rel=1e-9)
    assert hz[2].median == math.inf and hz[2].censored_share == 1.0
    assert [h.window_cos[4096] for h in report.heads] == pytest.approx([1.0] * 3, abs=1e-12)
    s = decay.summarize(report, EPS)
    assert s["share_unresolved"] == pytest.approx(1 / 3)  # 3000 tokens cannot show > 8192
    assert s["share_over_8192"] == 0.0


def test_trace_tokens_share_prefix_blocks(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        json.dumps(
            {"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1, 2]}
        )
        + "\n"
        + json.dumps({"timestamp": 1, "input_length": 700, "output_length": 1, "hash_ids": [0, 9]})
        + "\n"
    )
    a = decay.trace_tokens(trace, 0, 4096)
    b = decay.trace_tokens(trace, 1, 4096)
    assert len(a) == 1100 and len(b) == 700 and a[:512] == b[:512] and a[512:700] != b[512:]
    assert all(0 <= t < 256 for t in a)
    assert len(decay.trace_tokens(trace, 0, 100)) == 100
    with pytest.raises(UserError, match="no request 5"):
        decay.trace_tokens(trace, 5, 100)


def tiny_model(seed: int = 0):
    from engine.config import preset
    from engine.model.model import HybridModel
    from engine.weights import init_random

    model = HybridModel(preset("tiny"))
    init_random(model, seed)
    return model.eval()


def test_recurrence_on_engine_trace_reproduces_engine_state():
    """The float64 recurrence run over the traced k, v, g, beta ends in the state the engine's
    own (chunked, fp32) kernel reaches: the trace is what the model computed."""
    model = tiny_model()
    n, window = 150, 64
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        traces = model.trace_gdn(ids, window=window)
        state = model.zero_state(torch.device("cpu"), torch.float32)
        kv = model.kv_buffers(-(-n // window) * window, torch.device("cpu"), torch.float32)
        for e0 in range(0, n, window):
            hi = min(window, n - e0)
            w = torch.zeros(window, dtype=torch.long)
            w[:hi] = ids[e0 : e0 + hi]
            _, state, _ = model.forward_window(w, e0, 0, hi, state, kv, set())
    assert [tr.layer for tr in traces] == model.cfg.gdn_layers
    for j, tr in enumerate(traces):
        mine = decay.gated_delta_final_states(tr.k, tr.v, tr.g, tr.beta, [0])[0]
        torch.testing.assert_close(mine.float(), state.ssm[j], rtol=1e-4, atol=1e-5)


def test_cli_activations_on_tiny_preset_and_its_checkpoint(tmp_path):
    from engine.weights import save_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    common = [
        "--mode",
        "activations",
        "--corpus",
        str(corpus),
        "--max-tokens",
        "130",
        "--taus",
        "16,64,1024",
        "--eps",
        "1e-2",
    ]
    res = invoke("--preset", "tiny", *common, "--out", str(tmp_path / "p.json"))
    assert res.exit_code == 0, res.output
    doc = strict_json(tmp_path / "p.json")
    assert doc["mode"] == "activations" and doc["seq_len"] == 130
    assert doc["input"] == {"corpus": str(corpus), "tokens": 130}
    assert len(doc["heads"]) == 6 * 4  # tiny: 6 GDN layers x 4 value heads
    for h in doc["heads"]:
        assert {"horizon_median", "horizon_p90", "censored_share"} <= set(h)
        assert abs(h["window_cos"]["1024"] - 1.0) <= 1e-12  # window covers the sequence
        assert -1.0 <= h["window_cos"]["16"] <= h["window_cos"]["1024"]
        if h["horizon_median"] is not None and h["horizon_p90"] is not None:
            assert 0 < h["horizon_median"] <= h["horizon_p90"] < 130
    assert doc["slowest_heads"][0]["tau"] == 64  # the largest tau shorter than the sequence
    assert doc["window"]["1024"]["p10_cos"] == pytest.approx(1.0, abs=1e-12)

    # the same weights saved as a sharded checkpoint give the same analysis
    save_checkpoint(tiny_model(), tmp_path / "ckpt", shards=2)
    res = invoke("--checkpoint", str(tmp_path / "ckpt"), *common, "--out", str(tmp_path / "c.json"))
    assert res.exit_code == 0, res.output
    assert strict_json(tmp_path / "c.json")["heads"] == doc["heads"]


def test_static_preset_matches_its_checkpoint(tmp_path):
    from engine.weights import save_checkpoint

    save_checkpoint(tiny_model(seed=3), tmp_path / "ckpt", shards=3)
    from_ckpt = decay.read_gdn_params(tmp_path / "ckpt")
    from_preset = cli_decay.static_params(None, "tiny", seed=3)
    assert [p.layer for p in from_ckpt] == [p.layer for p in from_preset] == [0, 1, 2, 4, 5, 6]
    for a, b in zip(from_ckpt, from_preset, strict=True):
        np.testing.assert_array_equal(a.A_log, b.A_log)
        np.testing.assert_array_equal(a.dt_bias, b.dt_bias)


def test_cli_trace_input(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        json.dumps({"timestamp": 0, "input_length": 900, "output_length": 1, "hash_ids": [4, 5]})
        + "\n"
    )
    res = invoke(
        "--preset",
        "tiny",
        "--mode",
        "activations",
        "--trace",
        str(trace),
        "--max-tokens",
        "70",
        "--taus",
        "64",
        "--out",
        str(tmp_path / "t.json"),
    )
    assert res.exit_code == 0, res.output
    doc = strict_json(tmp_path / "t.json")
    assert doc["seq_len"] == 70 and doc["input"]["request"] == 0
