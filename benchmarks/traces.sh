#!/usr/bin/env bash
# The traces of the policy sweep besides the full conversation trace: seeded synthetic workloads
# (chat and agentic, seeds 0, 2 and 3, 3,000 requests each; benchmarks/synthetic_traces.py) and
# three 3,000-request hold-out slices of the Mooncake conversation trace (its 1-based lines
# 3016-6015, 6016-9015 and 9016-12031). Every file is checked against benchmarks/traces.sha256:
# a slice that fails the check means TRACE is not the 12,031-request conversation trace.
#
#   bash benchmarks/traces.sh TRACE [OUT]
#
# TRACE: mooncake_conversation_trace.jsonl (the Mooncake FAST'25 conversation trace; not in this
# repository). OUT defaults to ./sbr-results/traces. Time: a few seconds.
#
#   synthetic_{chat,agentic}_s{0,2,3}.jsonl, mooncake-holdout-{3016-6015,6016-9015,9016-12031}.jsonl
set -euo pipefail
source "$(dirname "$0")/lib.sh"
TRACE=${1:?usage: traces.sh TRACE [OUT]}
OUT=$(out_dir "${2:-sbr-results/traces}")

for seed in 0 2 3; do
  "$PYTHON" "$BENCH_ROOT/benchmarks/synthetic_traces.py" --out-dir "$OUT" --seed "$seed"
done
for lines in 3016-6015 6016-9015 9016-12031; do
  sed -n "${lines%-*},${lines#*-}p" "$TRACE" >"$OUT/mooncake-holdout-$lines.jsonl"
done
(cd "$OUT" && sha256sum -c "$BENCH_ROOT/benchmarks/traces.sha256")
