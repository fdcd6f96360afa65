# On the GPU machine, in the repository root: `source benchmarks/peers/unpack.sh` unpacks the
# .whl/peers-*.tar.xz carried by this call into $PEERS (default /tmp/peers, which outlives the
# call while the machine stays warm), puts the peers on PYTHONPATH, and says whether both
# halves are there (FlashInfer needs peers-a, the CuTe DSL compiler, as well as peers-b).
PEERS=${PEERS:-/tmp/peers}
mkdir -p "$PEERS"
for f in .whl/peers-*.tar.xz; do
  [ -e "$f" ] || continue
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
      "$f" "$PEERS"
  echo "unpacked $f"
done
export PYTHONPATH="$PEERS:$PEERS/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
if ls "$PEERS"/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir*.so \
    >/dev/null 2>&1 && [ -d "$PEERS/flashinfer" ]; then
  echo "peers complete in $PEERS"
else
  echo "peers incomplete in $PEERS: carry .whl/peers-a.tar.xz and .whl/peers-b.tar.xz" \
       "(one call each, back to back on a warm machine)"
fi
