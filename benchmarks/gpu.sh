#!/usr/bin/env bash
# The step-cost, LM-step, compile-against-depth, accumulation, conv-memory and language-model
# benchmarks on an accelerator, in under 8 minutes, results under benchmarks/results/gpu/
# (issue 32).
#
# Usage (in the repository root, with a Python whose JAX sees a GPU or TPU):
#
#     bash benchmarks/gpu.sh [OUT]        # OUT: the results folder (default benchmarks/results/gpu)
#
# Each benchmark runs under its own time limit (their sum: 7.5 minutes); one that runs past it is
# stopped and named in OUT/gpu.log, and the others still run. The CPU numbers of the same
# benchmarks are in benchmarks/results/*.md: compare ratios (each against AdamW measured side by
# side in the same process), not milliseconds, across machines.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"

if ! "$PYTHON" -c "import jax, sys; print(jax.devices()); sys.exit(jax.default_backend() == 'cpu')" \
    >> "$LOG" 2>&1; then
  echo "no accelerator visible to JAX (see $LOG): nothing run" | tee -a "$LOG"
  exit 1
fi

run() {  # run SECONDS NAME ARGS...: one benchmark under its limit, its output in the log
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$PYTHON" "$@" --out "$OUT" >> "$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
}

run 80 stages -m benchmarks.step_cost --stages
run 100 step_goals -m benchmarks.step_goals
run 100 depth -m benchmarks.depth --methods AdamW,EKFAC-ra,KFE-Adam,"EKFAC-ra stacked"
run 45 accumulate -m benchmarks.accumulate
run 60 conv_memory -m benchmarks.conv_memory
run 65 modern_lm -m benchmarks.modern_lm
ls "$OUT" | tee -a "$LOG"
