#!/usr/bin/env bash
# The policy sweep in the simulator: the online policies (lru, forecast, tail-pin k=8, two-tier,
# marconi, adaptive) and the offline references (belady, belady-gain) at 16, 64 and 256
# snapshot slots, each request driven through the engine's own cache code and charged by the
# packaged H200 cost model; on the Mooncake conversation trace, then on the synthetic and
# hold-out traces that traces.sh makes from it.
#
#   bash benchmarks/policy_sweep.sh TRACE [OUT] [all|conversation]    (default: all)
#
# TRACE: mooncake_conversation_trace.jsonl (12,031 requests; not in this repository). OUT
# defaults to ./sbr-results/policy-sweep. Time, one process on two busy shared cores: ~18 min
# for the conversation trace, 10-20 min for each of the nine 3,000-request traces (adaptive at
# 256 slots is the longest cell).
#
#   conversation-sweep.json (+ .png)   the whole conversation trace
#   traces/*.jsonl, <trace>-sweep.json one sweep per trace of traces.sh
#
# Regenerates results/sim/conversation-sweep.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
TRACE=${1:?usage: policy_sweep.sh TRACE [OUT] [all|conversation]}
OUT=$(out_dir "${2:-sbr-results/policy-sweep}")
WHICH=${3:-all}
SLOTS=16,64,256

sbrbench sweep --trace "$TRACE" --slots "$SLOTS" --out "$OUT/conversation-sweep.json" \
  --plot "$OUT/conversation-sweep.png"
if [ "$WHICH" = all ]; then
  bash "$BENCH_ROOT/benchmarks/traces.sh" "$TRACE" "$OUT/traces"
  for t in "$OUT"/traces/*.jsonl; do
    name=$(basename "$t" .jsonl)
    sbrbench sweep --trace "$t" --slots "$SLOTS" --out "$OUT/$name-sweep.json"
  done
fi
ls -l "$OUT"
