# Sourced by the scripts/gpu_*.sh device scripts: $OUT, unbuffered output, and the carried
# wheels (.whl/, e.g. fla-core) installed into /tmp/site ahead of the repository on PYTHONPATH.
OUT=${OUT:-/tmp/sbr-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
