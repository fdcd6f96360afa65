# Shared set-up of the recipes in benchmarks/ (sourced, not run):
#
#   source "$(dirname "$0")/lib.sh"
#
#   sbrbench ARGS...  the CLI of the checkout this file sits in, not an installed copy, so a
#                     recipe measures the code beside it; each call is echoed to the log
#   out_dir DIR       creates DIR and prints its absolute path (the recipe's output folder)
#   gpu_setup         on a GPU machine: the wheels in $SBR_WHEELS (default: .whl/ in the
#                     checkout; e.g. fla for the kernel comparison, on a machine without a
#                     package index) installed into a private folder on PYTHONPATH, and the GPU
#                     named in the log

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$BENCH_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

sbrbench() {
  echo "+ sbrbench $*"
  "$PYTHON" -m sbrbench.cli "$@"
}

out_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd)
}

gpu_setup() {
  local wheels=${SBR_WHEELS:-$BENCH_ROOT/.whl}
  local site=${TMPDIR:-/tmp}/sbrbench-site
  if compgen -G "$wheels/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$BENCH_ROOT:$site"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
