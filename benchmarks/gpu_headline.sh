#!/usr/bin/env bash
# The README's GPU headline on one GPU: deep-resume, round-robin and parity on the real engine
# (a3b-proxy shapes, random weights, bf16), every baseline rerun in the same call, on the same
# machine, as the policies it is compared with.
#
#   bash benchmarks/gpu_headline.sh [OUT] [deep|rr|parity ...]    (default: all three parts)
#
# OUT defaults to ./sbr-results/gpu-headline. Time on one H200: deep ~11 min, rr ~6 min,
# parity ~3.5 min (parts run in the order given; each part is self-contained: its baseline
# runs within it).
#
#   deep    deep-resume (16 snapshot slots, depth 24,000, 128 one-shot pressure requests per
#           idle period, 6 cycles) under forecast, tail-pin, adaptive; compared with tail-pin
#           -> deep-resume-{forecast,tail-pin,adaptive}.json,
#              deep-resume-{forecast,adaptive}-vs-tail-pin.json
#   rr      round-robin (16 slots, 8 conversations, 20 rounds), forecast then adaptive, twice
#           (interleaved, so host drift hits both), compared pooled over the two repetitions
#           -> round-robin-{forecast,adaptive}-{1,2}.json, round-robin-adaptive-vs-forecast.json
#   parity  the parity stream (30 requests, the scenario's 6 slots) under forecast, tail-pin,
#           adaptive; the comparisons' `parity` block says whether tokens and logits digests
#           match bitwise (they must)
#           -> parity-{forecast,tail-pin,adaptive}.json,
#              parity-forecast-vs-{tail-pin,adaptive}.json
#
# Regenerates results/h200/: deep-resume-*-vs-tail-pin.json, round-robin-*.json, parity-*.json
# (results/README.md says which of these outputs are kept there).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(out_dir "${1:-sbr-results/gpu-headline}")
shift $(($# > 0 ? 1 : 0))
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(deep rr parity)
gpu_setup

M=(--preset a3b-proxy --device cuda --dtype bfloat16 --no-progress)
compare() { (cd "$OUT" && sbrbench compare "$1" "$2" --json "$3"); }

for part in "${parts[@]}"; do
  case $part in
    deep)
      for pol in forecast tail-pin adaptive; do
        sbrbench run deep-resume "${M[@]}" --snapshot-slots 16 --set depth=24000 \
          --set pressure=128 --set cycles=6 --policy "$pol" --out "$OUT/deep-resume-$pol.json"
      done
      for pol in forecast adaptive; do
        compare "deep-resume-$pol.json" deep-resume-tail-pin.json "deep-resume-$pol-vs-tail-pin.json"
      done
      ;;
    rr)
      for rep in 1 2; do
        for pol in forecast adaptive; do
          sbrbench run round-robin "${M[@]}" --snapshot-slots 16 --set convs=8 --set rounds=20 \
            --policy "$pol" --out "$OUT/round-robin-$pol-$rep.json"
        done
      done
      compare round-robin-adaptive-1.json,round-robin-adaptive-2.json \
        round-robin-forecast-1.json,round-robin-forecast-2.json round-robin-adaptive-vs-forecast.json
      ;;
    parity)
      for pol in forecast tail-pin adaptive; do
        sbrbench run parity "${M[@]}" --policy "$pol" --out "$OUT/parity-$pol.json"
      done
      for pol in tail-pin adaptive; do
        compare parity-forecast.json "parity-$pol.json" "parity-forecast-vs-$pol.json"
      done
      ;;
    *) echo "unknown part '$part' (deep, rr, parity)" >&2; exit 2 ;;
  esac
done
ls -l "$OUT"
