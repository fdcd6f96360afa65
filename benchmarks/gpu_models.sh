#!/usr/bin/env bash
# The real-shape MoE preset on one GPU: the GPU tests (MoE invariance, parity, kernels), then
# deep-resume under forecast, tail-pin and adaptive and `bench prefill` on qwen3.5-35b-a3b
# (34.7B parameters, 3.5B active per token; random weights, bf16; MFU counted on active
# parameters), each baseline in the same call.
#
#   bash benchmarks/gpu_models.sh [OUT] [tests|deep|prefill|decode|windows ...]  (default: all)
#
# OUT defaults to ./sbr-results/gpu-models. Every part is bounded (timeout) so one slow part
# leaves the others their time; each writes its log beside its JSON.
#
#   tests    python -m pytest -m gpu tests/engine            -> gpu-tests.log
#   deep     deep-resume, depth 8192, 32 one-shots per idle period, 3 cycles, 16 slots
#            -> deep-resume-35b-{forecast,tail-pin,adaptive}.json, comparisons vs tail-pin
#   prefill  bench prefill at 4k and 16k tokens, windows 2048 and 4096 -> bench-prefill-35b.json
#   decode   bench decode after 4096 tokens, batch 1, against the bandwidth roofline, on the
#            dense a3b-proxy (128 tokens x 3) and the 35B MoE (64 tokens x 2)
#            -> bench-decode.json, bench-decode-35b.json
#   windows  bench resume on the a3b-proxy with fixed and with sized windows, back to back
#            -> bench-resume-windows-fixed.json, bench-resume-windows-sized.json
#
# Regenerates results/h200/deep-resume-35b-*.json, results/h200/bench-prefill-35b.json and
# results/h200/bench-decode*.json and results/h200/bench-resume-windows-*.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(out_dir "${1:-sbr-results/gpu-models}")
shift $(($# > 0 ? 1 : 0))
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests deep prefill decode windows)
gpu_setup

P=(--preset qwen3.5-35b-a3b --device cuda --dtype bfloat16 --no-progress)
for part in "${parts[@]}"; do
  case $part in
    tests)
      (cd "$BENCH_ROOT" && timeout "${SBR_TESTS_S:-240}" "$PYTHON" -m pytest -m gpu \
        -p no:cacheprovider --continue-on-collection-errors tests/engine 2>&1 | tee "$OUT/gpu-tests.log") || echo "tests: $?"
      ;;
    deep)
      timeout "${SBR_DEEP_S:-300}" "$PYTHON" -m sbrbench.cli run deep-resume "${P[@]}" \
        --snapshot-slots 16 --set depth=8192 --set pressure=32 --set cycles=3 \
        --policy forecast,tail-pin,adaptive --out "$OUT/deep-resume-35b.json" 2>&1 \
        | tee "$OUT/deep-resume-35b.log" || true
      for pol in forecast adaptive; do
        [ -f "$OUT/deep-resume-35b-$pol.json" ] && [ -f "$OUT/deep-resume-35b-tail-pin.json" ] && \
          (cd "$OUT" && sbrbench compare "deep-resume-35b-$pol.json" deep-resume-35b-tail-pin.json \
            --json "deep-resume-35b-$pol-vs-tail-pin.json") || true
      done
      ;;
    prefill)
      timeout "${SBR_PREFILL_S:-150}" "$PYTHON" -m sbrbench.cli bench prefill \
        --preset qwen3.5-35b-a3b --lengths 4096,16384 --windows 2048,4096 --reps 2 \
        --out "$OUT/bench-prefill-35b.json" 2>&1 | tee "$OUT/bench-prefill-35b.log" || true
      ;;
    decode)
      timeout "${SBR_DECODE_S:-100}" "$PYTHON" -m sbrbench.cli bench decode --preset a3b-proxy \
        --depth 4096 --tokens 128 --reps 3 --out "$OUT/bench-decode.json" 2>&1 \
        | tee "$OUT/bench-decode.log" || true
      timeout "${SBR_DECODE_S:-160}" "$PYTHON" -m sbrbench.cli bench decode \
        --preset qwen3.5-35b-a3b --depth 4096 --tokens 64 --reps 2 \
        --out "$OUT/bench-decode-35b.json" 2>&1 | tee "$OUT/bench-decode-35b.log" || true
      ;;
    windows)
      for w in fixed sized; do
        timeout "${SBR_WINDOWS_S:-80}" "$PYTHON" -m sbrbench.cli bench resume --preset a3b-proxy \
          --windows "$w" --out "$OUT/bench-resume-windows-$w.json" 2>&1 \
          | tee "$OUT/bench-resume-windows-$w.log" || true
      done
      ;;
    *) echo "unknown part $part (tests, deep, prefill, decode, windows)" >&2; exit 2 ;;
  esac
done
