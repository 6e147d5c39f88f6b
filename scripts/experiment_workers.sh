#!/usr/bin/env bash
# A chunked experiment (flux-engine experiment ... --resume) run to the end in the background, by several workers:
#
#   nohup bash scripts/experiment_workers.sh bench/configs/tta.toml 2 > /dev/null 2>&1 &
#
# Arguments: the experiment config, the number of workers (default: the CPU count). Each worker is one process
# with one torch thread (OMP_NUM_THREADS=1) at nice 19, calling `flux-engine experiment --config CONFIG --resume`
# again and again: a call trains the runs no other worker holds for [experiment] chunk-minutes, rewrites the
# report and ends. A worker stops when a call fails, when the report lists no run as not measured yet, when a call
# trained nothing (the runs left are all held by other workers), or when the file STOP appears in the log folder.
# Logs: $LOGS/worker-<i>.log (LOGS default: flux-state/logs). Finished runs land as records in the config's
# [experiment] records folder: commit them as they come. PYTHON (default: python) is the interpreter that has
# flux_engine.
set -uo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: experiment_workers.sh CONFIG [WORKERS]}
workers=${2:-$(nproc)}
logs=${LOGS:-flux-state/logs}
py=${PYTHON:-python}
[ -f "$config" ] || { echo "no such config: $config" >&2; exit 2; }
code='import sys; from flux_engine import experiment; print(experiment.load(sys.argv[1])[1].markdown)'
report=$("$py" -c "$code" "$config") || exit 2
[ -n "$report" ] || { echo "$config: the workers need [experiment] markdown (they read it to know when to stop)" >&2; exit 2; }
mkdir -p "$logs"

worker() {
  local log="$logs/worker-$1.log" rc
  while [ ! -e "$logs/STOP" ]; do
    echo "=== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)" >> "$log"
    OMP_NUM_THREADS=1 nice -n 19 "$py" -m flux_engine.cli experiment --config "$config" --resume >> "$log" 2>&1
    rc=$?
    echo "=== $(date -u +%FT%TZ) exit $rc" >> "$log"
    [ $rc -eq 0 ] || return $rc
    grep -q '^\*\*Not measured yet\*\*' "$report" || return 0
    # Runs are left, but this call trained none: other workers hold every one of them and will finish them.
    tail -n 5 "$log" | grep -q '^trained 0 rounds in this call$' && return 0
  done
}

for i in $(seq 1 "$workers"); do
  worker "$i" &
  [ "$i" -lt "$workers" ] && sleep "${STAGGER:-30}"  # each claims its run before the next one looks
done
wait
