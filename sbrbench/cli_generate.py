"""`sbrbench generate`: one prompt through the engine (cold path by default), tokens and timings."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.text import Text

from engine.errors import UserError
from sbrbench.cache_options import check_model_flags, positive


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UserError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UserError("--prompt-ids is empty")
    return ids


def load_engine(preset: str | None, checkpoint: Path | None, device: str, dtype: str, seed: int,
                cache=None):  # type: ignore[no-untyped-def]
    """Engine from --preset or --checkpoint (exactly one; preset defaults to tiny)."""
    from engine.runtime import Engine

    if checkpoint is not None and preset is not None:
        raise UserError("give either --preset or --checkpoint, not both")
    if checkpoint is not None:
        return Engine.from_checkpoint(checkpoint, device=device, dtype=dtype, cache=cache)
    return Engine.from_preset(preset or "tiny", device=device, dtype=dtype, seed=seed,
                              cache=cache)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        prompt: str = typer.Option(None, "--prompt", help="Prompt text (byte-level tokenizer "
                                   "unless the checkpoint has tokenizer.json)."),
        prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt as token ids: 1,2,3"),
        preset: str = typer.Option(None, "--preset", help="tiny | tiny-moe | small | "
                                   "a3b-proxy | qwen3.5-35b-a3b | qwen3-next-80b-a3b "
                                   "(random weights, seeded). Default: tiny."),
        checkpoint: Path = typer.Option(None, "--checkpoint", help="HF-style checkpoint dir "
                                        "(config.json + safetensors)."),
        max_tokens: int = typer.Option(16, "--max-tokens", min=1),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16"),
        seed: int = typer.Option(0, "--seed", min=0,
                                 help="Weight seed for presets; sampling seed."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0,
                                          help="0 = greedy."),
        top_p: float = typer.Option(1.0, "--top-p", max=1.0, callback=positive,
                                    help="Nucleus sampling: keep the top tokens of this "
                                    "probability mass, in (0, 1]."),
        ignore_eos: bool = typer.Option(False, "--ignore-eos"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON: tokens, text, timings."),
    ) -> None:
        """Generate from one prompt on the in-process engine (no prefix cache)."""
        from engine.runtime import SamplingParams

        if (prompt is None) == (prompt_ids is None):
            raise UserError("give exactly one of --prompt or --prompt-ids")
        check_model_flags(preset=preset, device=device, dtype=dtype)
        eng = load_engine(preset, checkpoint, device, dtype, seed)
        ids = parse_ids(prompt_ids) if prompt_ids is not None else eng.tokenizer.encode(prompt)
        res = eng.generate(ids, SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                                               max_tokens=max_tokens, ignore_eos=ignore_eos),
                           use_cache=False)
        st, t = res.stats, res.stats.timing
        timings = {"ttft_s": t.ttft_s, "decode_s": t.decode_s, "e2e_s": t.e2e_s,
                   "prefill_tok_s": len(ids) / t.ttft_s if t.ttft_s else None,
                   "decode_tok_s": (len(res.tokens) - 1) / t.decode_s if t.decode_s else None}
        out = {"tokens": res.tokens, "text": eng.tokenizer.decode(res.tokens),
               "finish_reason": res.finish_reason, "prompt_tokens": len(ids),
               "logits_sha256": st.logits_sha256, "timings": timings,
               "engine": eng.describe()}
        if as_json:
            typer.echo(json.dumps(out))
            return
        from sbrbench.render import make_console

        con = make_console()
        con.print(Text.assemble(("tokens ", "bold"), str(res.tokens)))
        con.print(Text.assemble(("text ", "bold"), repr(out["text"])))
        con.print(f"prompt {len(ids)} tok, TTFT {t.ttft_s * 1e3:.1f} ms (measured, cold: no "
                  f"prefix cache), e2e {t.e2e_s * 1e3:.1f} ms, finish {res.finish_reason}",
                  style="dim")
