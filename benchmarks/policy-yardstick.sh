#!/usr/bin/env bash
# The policy yardstick: every online policy, the offline references (belady, belady-gain) and
# the exact offline optimum (its LP bound, the unlimited-pool floor, and the optimum's schedule
# run through the manager as `opt-schedule`) at 16, 64 and 256 snapshot slots, on ten disjoint
# slices of each trace; per trace family, the gap each online policy closes between the best
# simple policy (lru, forecast, tail-pin, two-tier, marconi) and the optimum, as the mean and
# the minimum over its slices. All figures are replay tokens decided by the engine's own cache
# code in the simulator (sbrbench sweep); nothing is timed on an accelerator.
#
#   bash benchmarks/policy-yardstick.sh TRACE [OUT] [JOBS]
#
# TRACE: mooncake_conversation_trace.jsonl (the Mooncake FAST'25 conversation trace, 12,031
# requests; not in this repository). OUT defaults to ./sbr-results/policy-yardstick, JOBS (cells
# in parallel on this machine) to 2. Families:
#   conversation   TRACE cut into 10 slices of ~1,203 requests
#   chat-s0, agentic-s0   the synthetic traces of seed 0 (3,000 requests; 10 slices of 300)
#   chat-s7, agentic-s7   seed 7, 6,000 requests (10 slices of 600): never used to tune a rule
# Time: ~35 min for the conversation family and ~70 min for the four synthetic ones with JOBS=2
# on two busy cores (each slice's exact program solves in seconds).
#
#   OUT/<family>-sweep.json   the sweep (every cell; `digest` is the same on every backend)
#   OUT/<family>.json         the family summary; results/yardstick/<family>.json is a copy
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TRACE=${1:?usage: policy-yardstick.sh TRACE [OUT] [JOBS]}
OUT=${2:-sbr-results/policy-yardstick}
JOBS=${3:-2}
mkdir -p "$OUT/traces"
GEN="$ROOT/benchmarks/synthetic_traces.py"
[ -f "$GEN" ] || GEN="$ROOT/scripts/make_synthetic_traces.py"

slice() {  # slice FILE FAMILY: ten disjoint slices FAMILY@00..09 of FILE
  "$PYTHON" - "$1" "$OUT/traces/$2" <<'EOF'
import sys
lines = open(sys.argv[1]).readlines()
n = len(lines)
for j in range(10):
    with open(f"{sys.argv[2]}@{j:02d}.jsonl", "w") as f:
        f.writelines(lines[j * n // 10:(j + 1) * n // 10])
EOF
}

slice "$TRACE" conversation
"$PYTHON" "$GEN" --out-dir "$OUT/traces" --seed 0 >/dev/null
"$PYTHON" "$GEN" --out-dir "$OUT/traces" --seed 7 --requests 6000 >/dev/null
for kind in chat agentic; do
  slice "$OUT/traces/synthetic_${kind}_s0.jsonl" "$kind-s0"
  slice "$OUT/traces/synthetic_${kind}_s7.jsonl" "$kind-s7"
done

for family in conversation chat-s0 agentic-s0 chat-s7 agentic-s7; do
  args=()
  for t in "$OUT/traces/$family"@*.jsonl; do args+=(--trace "$t"); done
  echo "+ sbrbench sweep ($family, ${#args[@]} slices)"
  "$PYTHON" -m sbrbench.cli sweep "${args[@]}" --slots 16,64,256 --jobs "$JOBS" \
    --policy lru,forecast,tail-pin,two-tier,marconi,adaptive,adaptive-knows-returns \
    --out "$OUT/$family-sweep.json" --summary "$OUT/$family.json"
done
ls -l "$OUT"
