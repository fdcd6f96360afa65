#!/usr/bin/env bash
# Exactness on the CPU: the parity stream (30 requests on the embedded tiny model, float32)
# under forecast, tail-pin and adaptive; every request's tokens and logits digest must match
# forecast's bitwise, although the policies restore from different snapshots.
#
#   bash benchmarks/cpu_parity.sh [OUT]
#
# OUT defaults to ./sbr-results/cpu-parity. Time: ~1 min on one CPU core.
#
#   parity-{forecast,tail-pin,adaptive}.json, parity-forecast-vs-{tail-pin,adaptive}.json
#   (the `parity` block of a comparison: token_match_rate, digest_match_rate, replay_differs)
#
# Regenerates results/cpu/.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(out_dir "${1:-sbr-results/cpu-parity}")

for pol in forecast tail-pin adaptive; do
  sbrbench run parity --policy "$pol" --no-progress --out "$OUT/parity-$pol.json"
done
for pol in tail-pin adaptive; do
  (cd "$OUT" && sbrbench compare parity-forecast.json "parity-$pol.json" \
    --json "parity-forecast-vs-$pol.json")
done
ls -l "$OUT"
