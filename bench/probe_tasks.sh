#!/usr/bin/env bash
# The task probe behind bench/results/tasks.md: one `flux-engine probe` process per candidate task (a task whose
# result file exists is skipped, so an interrupted run resumes), then the report. Sized for a shared 2-core CPU: 128
# test records per task, rows and scored records cut to the demo's seq-len 64, 16 LoRA steps of 8 rows.
#   bash bench/probe_tasks.sh [EXTRA_PROBE_ARGS...] > bench/results/tasks.md
# Then every suggestive task again on fresh held-out records (flux-engine probe --follow-up), and the report.
set -u
PY=${PY:-.venv/bin/python}
# One thread: on a shared, oversubscribed CPU, two-thread torch ops lose most of their time waiting for each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-bench/results/probe}
TASKS=(
  bigbench:intent_recognition olmo:sst2 olmo:boolq olmo:piqa olmo:arc_easy olmo:mrpc olmo:rte olmo:sciq
  olmo:socialiqa olmo:winogrande olmo:openbookqa olmo:csqa olmo:hellaswag olmo:mmlu/high_school_psychology
  olmo:mmlu/miscellaneous olmo:arc_challenge olmo:basic_arithmetic bigbench:epistemic_reasoning
  bigbench:logical_fallacy_detection bigbench:presuppositions_as_nli bigbench:sports_understanding
  bigbench:vitaminc_fact_verification bigbench:winowhy bigbench:social_iqa
)
for task in "${TASKS[@]}"; do
  "$PY" -m flux_engine.cli probe --task "$task" --out "$OUT" --test-records 128 --seq-len 64 --steps 16 \
    --batch-size 8 "$@" >&2 || echo "probe of $task failed (exit $?)" >&2
done
# Suggestive first results (0.01 <= p < 0.1, accuracy up) again on 256 fresh held-out records: independent tests.
FOLLOW=${FOLLOW:-bench/results/probe_followup}
"$PY" -m flux_engine.cli probe --follow-up "$OUT" --out "$FOLLOW" --test-records 256 "$@" >&2 \
  || echo "follow-up probes failed (exit $?)" >&2
"$PY" -m flux_engine.cli probe --report "$OUT" --followed-up "$FOLLOW"
