#!/usr/bin/env bash
# `make soak`: the long form of the reliability tests in `make test` (issue 9), about 6 min on 2 cores.
#   faults    150 s live trial, n08 joining the seven-node lot at 1.5 s, then 10 broker SIGKILLs, 3 aggregator
#             SIGKILLs, 3 more between a window's close and its commit, 3 graceful restarts (test: 2 + 1 + 1 + 1 in 40 s)
#   fuzz      100 000 hostile messages against the aggregator process (test: 10 000)
#   overload  64 nodes: 2 windows/s for 10 s, 20 windows/s for 30 s, 2 windows/s for 20 s (test: 3/5/8 s)
# Each writes its report to benchmarks/results/ and exits 1 when one of its checks fails; the script
# runs all three and fails at the end if any did.
set -uo pipefail

BIN=${VENV:-.venv}/bin
OUT=${OUT:-benchmarks/results}
failed=()
run() {  # run NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local started=$SECONDS
  if "$@"; then echo "=== $name: passed in $((SECONDS - started)) s"
  else echo "=== $name: FAILED (exit $?) after $((SECONDS - started)) s"; failed+=("$name"); fi
}

run faults   "$BIN/spar-bench" faults --duration 150 --broker-kills 10 --aggregator-kills 3 --gap-kills 3 --aggregator-restarts 3 --out "$OUT"
run fuzz     "$BIN/spar-bench" fuzz --messages 100000 --out "$OUT/fuzz" --no-progress
run overload "$BIN/spar-bench" overload --nodes 64 --nominal-rate 2 --phases 10,30,20 --out "$OUT"
if (( ${#failed[@]} )); then echo "soak: FAILED: ${failed[*]}"; exit 1; fi
echo "soak: every check passed; reports in $OUT/"
