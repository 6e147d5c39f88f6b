#!/usr/bin/env bash
# GPU validation (issue 11), run in the repository root of a machine with an NVIDIA GPU:
#
#   bash scripts/gpu_validate.sh [build] [test] [bench] [memory]     (default: all four, in that order)
#
# build:  pip install --no-build-isolation --no-deps -e . (flux_engine._C with its CUDA kernels) and print
#         the stack (torch, CUDA, triton, GPU);
# test:   the test suite on the GPU (tests take the `device` fixture: the triton and cuda tiers run on CUDA
#         tensors), then the sm_90 compile check;
# bench:  every bench/bench_*.py through bench/report.py, one results file per benchmark;
# memory: the 24 GB client goal (bench/gpu_memory.py when present).
# Results and logs go to $OUT (default ./gpu_out): a summary.txt and one gpu_results.tgz holding every log and
# results file, so that few files come back from a machine that returns only a handful. Python packages the
# machine lacks can sit as wheels in .whl/ (installed into /tmp/site first). Each step's exit code is recorded
# and the script goes on, so one failing step does not hide the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME CMD...: run, log to $WORK/NAME.log, record the exit code and seconds
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $(($(date +%s) - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 3 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench memory)
for s in "${steps[@]}"; do
  case $s in
    build)
      step build $PY -m pip install -q --no-build-isolation --no-deps -e .
      step stack $PY -c "import torch, triton, flux_engine._C as C; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(), 'CUDA kernels built:', C.has_cuda())"
      ;;
    test)
      step tests $PY -m pytest -q -x -p no:cacheprovider tests
      step compile_sm90 $PY -m pytest -q -p no:cacheprovider tests/test_grouped_mlp_triton.py -k compile_for_sm90
      ;;
    bench)
      for b in bench/bench_*.py; do
        name=$(basename "$b" .py)
        step "$name" $PY bench/report.py "$b" "$WORK/${name#bench_}.md"
      done
      ;;
    memory)
      if [ -f bench/gpu_memory.py ]; then step memory $PY bench/gpu_memory.py --out "$WORK/gpu_memory.md"; fi
      ;;
    *) echo "unknown step: $s (build, test, bench, memory)" >&2; exit 2 ;;
  esac
done
tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
echo "results: $OUT/summary.txt, $OUT/gpu_results.tgz"
