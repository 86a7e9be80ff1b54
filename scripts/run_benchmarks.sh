#!/usr/bin/env bash
# `make bench`: every benchmark with its default budget; refreshes benchmarks/results/ (committed).
# Each table carries the machine description and the date. Leave some out with SKIP, e.g.
#   SKIP="objectives quant" make bench
# objectives is the long one (about 40 min on 2 idle cores; it resumes from benchmarks/.work).
# quant and model need the checkpoints and recordings of `make models BUDGET=standard` (1-2 h; built
# here first when missing).
set -euo pipefail

BIN=${VENV:-.venv}/bin
SKIP=" ${SKIP:-} "
run() {  # run NAME COMMAND...: skip when NAME is in $SKIP, time it otherwise
  local name=$1; shift
  if [[ "$SKIP" == *" $name "* ]]; then echo "=== $name: skipped (SKIP)"; return; fi
  echo "=== $name: $*"
  local started=$SECONDS
  "$@"
  echo "=== $name: done in $((SECONDS - started)) s"
}

run codecs    "$BIN/spar-bench" codecs --out benchmarks/results/codecs.md
run bandwidth "$BIN/spar-bench" bandwidth
run lossy     "$BIN/spar-bench" lossy
run latency   "$BIN/spar-bench" latency
run runtime   "$BIN/spar-bench" runtime
if [[ "$SKIP" != *" quant "* && ! -f build/models-standard/teacher.txt ]]; then
  echo "=== quant needs build/models-standard: running make models BUDGET=standard first"
  VENV=${VENV:-.venv} BUDGET=standard bash scripts/make_models.sh
fi
run quant      "$BIN/spar-bench" quant
run model      "$BIN/spar-bench" model
run objectives "$BIN/spar-bench" objectives
echo "results in benchmarks/results/"
