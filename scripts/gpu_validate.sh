#!/usr/bin/env bash
# GPU evidence in one call of at most 9.5 minutes (issue 19), run in the repository root:
#
#   bash scripts/gpu_validate.sh              # a machine with an NVIDIA GPU, its own image as it is
#   bash scripts/gpu_validate.sh --rehearse   # CPU, tiny shapes, flwr and gguf hidden: CI's check of this script
#
# The GPU image (Python 3.12, torch 2.11+cu130, triton 3.6, transformers, peft; no flwr, no gguf, no network, no
# package installs) runs the repository from its folder: flux_engine is imported from a staging folder of symlinks
# ($WORK/stage, first on PYTHONPATH), so nothing is installed and the Triton tests need not wait for a build.
#
# Stages, each with its own time limit (seconds, in brackets), each writing its log straight into $OUT:
#   build    [300]  background from the start: `setup.py build_ext` of flux_engine._C (CUDA kernels when nvcc is
#                   there) into the staging folder -> build.log;
#   stack           versions, GPU, which optional packages import, the triton tier -> summary.txt;
#   compile  [240]  background: every Triton kernel and config bucket compiled for sm_90 with this machine's
#                   Triton (tests/sm90_compile.py: registers, spills, shared memory, wgmma) -> compile.log;
#   tests    [150]  the kernel tests on the GPU (they force the triton tier; pytest-xdist when installed); tests
#                   needing flwr or gguf skip with their reason -> tests.log;
#   perf     [100]  bench/gpu_perf.py, the short performance table -> perf.md (rewritten per row), perf.log;
#   native   [ 50]  once the build is done: tests/test_native.py, the C++ and CUDA tiers -> appended to tests.log;
#   memory   [200]  bench/memory.py, deepseek-moe-16b capped at 24 GiB, with its own --time-limit-s
#                   -> memory.md, memory.log.
# A stage's limit shrinks to what is left of the whole budget (570 s) minus what the later stages need, so the
# call ends in time; a stage that fails or times out is recorded and the next one runs. $OUT (default ./gpu_out)
# holds 8 files, no folders: summary.txt (one line per stage, the exit codes), build.log, compile.log,
# tests.log, perf.md, perf.log, memory.md, memory.log. Exit status 1 when a stage failed.
#
# --rehearse: every stage on the CPU in under 3 minutes on 2 cores: flwr and gguf are made unimportable
# (scripts/hide_modules on PYTHONPATH), Triton runs interpreted, the tests are one fast case per kernel file, the
# compile stage compiles one kernel per family, the table and the memory run use tiny shapes. The build stage
# does not compile there (3 minutes of 2 shared cores): it evaluates setup.py's extension config and stages the
# flux_engine._C that `make install` built.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REHEARSE=0
case "${1:-}" in
  "") ;;
  --rehearse) REHEARSE=1 ;;
  *) echo "usage: bash scripts/gpu_validate.sh [--rehearse]" >&2; exit 2 ;;
esac
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
# PYTHONSAFEPATH: the repository root (the working directory of `python -m pytest`) is never on sys.path, so
# flux_engine always comes from the staging folder, with flux_engine.triton_kernels and the staged extension.
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY=$ROOT/.venv/bin/python
START=$(date +%s)
BUDGET=570
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# The staging folder: flux_engine's files and flux_engine.triton_kernels as symlinks to the sources.
STAGE=$WORK/stage
mkdir -p "$STAGE/flux_engine"
for f in "$ROOT"/flux_engine/*; do
  case $f in *.so) ;; *) ln -s "$f" "$STAGE/flux_engine/" ;; esac
done
ln -s "$ROOT/triton_kernels" "$STAGE/flux_engine/triton_kernels"
export PYTHONPATH=$STAGE${PYTHONPATH:+:$PYTHONPATH}
if [ $REHEARSE = 1 ]; then
  export PYTHONPATH=$ROOT/scripts/hide_modules:$PYTHONPATH FLUX_HIDE_MODULES=flwr,gguf
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi

left() { echo $((BUDGET - ($(date +%s) - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# collect NAME PID WAIT LOG: wait at most WAIT seconds for the background stage PID, stop it if still running;
# record its exit code (and the end of LOG). True when it finished.
collect() {
  local name=$1 pid=$2 wait_s=$3 log=$4 rc
  while kill -0 "$pid" 2>/dev/null && [ "$wait_s" -gt 0 ]; do sleep 1; wait_s=$((wait_s - 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    note "$name: still running at the end of its share of the budget, stopped"
    return 1
  fi
  wait "$pid"
  rc=$?
  note "$name: exit $rc"
  tail -n 4 "$log" | sed 's/^/    /' >>"$SUMMARY"
  return 0
}

# run NAME LIMIT RESERVE LOG CMD...: CMD with at most LIMIT seconds, and never into the last RESERVE seconds
# of the budget (kept for the stages after it); output straight to LOG; exit code and seconds to the summary.
run() {
  local name=$1 limit=$2 reserve=$3 log=$4 t0 rc
  shift 4
  local avail=$(($(left) - reserve))
  [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 5 ]; then
    note "$name: not run (budget spent)"
    return 0
  fi
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  [ $rc = 124 ] && note "$name: TIMED OUT after $limit s" || note "$name: exit $rc, $(($(date +%s) - t0)) s"
  tail -n "${TAIL_LINES:-4}" "$log" | sed 's/^/    /' >>"$SUMMARY"
  return 0
}

# ------------------------------------------------------------------------------------------------ build
note "gpu_validate $([ $REHEARSE = 1 ] && echo --rehearse) in $ROOT, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
if [ $REHEARSE = 1 ]; then
  (
    cd "$ROOT" && "$PY" setup.py --name --version \
      && for so in "$ROOT"/flux_engine/_C*.so; do [ -e "$so" ] && ln -s "$so" "$STAGE/flux_engine/"; done
  ) >"$OUT/build.log" 2>&1 &
else
  timeout -k 10 300 "$PY" setup.py build_ext --build-lib "$STAGE" --build-temp "$WORK/build" >"$OUT/build.log" 2>&1 &
fi
BUILD_PID=$!

# ------------------------------------------------------------------------------------------------ stack
TAIL_LINES=20 run stack 60 0 "$WORK/stack.log" "$PY" - <<'PY'
import importlib, platform
import torch, triton
import flux_engine
from flux_engine.backend import tier_unavailable_reason
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton",
      triton.__version__, "| flux_engine from", flux_engine.__file__)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if dev.type == "cuda":
    p = torch.cuda.get_device_properties(dev)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
for name in ("transformers", "peft", "xdist", "flwr", "gguf"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "importable"))
    except ImportError as e:
        print(name, "missing:", e)
print("triton tier on", dev.type, ":", tier_unavailable_reason("triton", dev) or "available")
PY

# ------------------------------------------------------------------------------------------------ compile (background)
compile_args=()
[ $REHEARSE = 1 ] && compile_args=(--quick)
env -u TRITON_INTERPRET timeout -k 10 240 "$PY" tests/sm90_compile.py "${compile_args[@]}" >"$OUT/compile.log" 2>&1 &
COMPILE_PID=$!

# ------------------------------------------------------------------------------------------------ tests
KERNEL_TESTS=(tests/test_grouped_mlp_triton.py tests/test_triton_kernels.py tests/test_sparse_lora.py
  tests/test_received_attention.py tests/test_quantized_mlp.py tests/test_dispatch.py tests/test_ops_reference.py
  tests/test_demo.py tests/test_federated.py)  # the last two need flwr: they must skip, not error
pytest_args=(-q -ra -p no:cacheprovider -m "not slow")  # the slow one is the compile check: its own stage
if [ $REHEARSE = 1 ]; then
  # One fast case per kernel family (the interpreter is slow), the dispatch tests, the flwr-only files.
  KERNEL_TESTS=("tests/test_grouped_mlp_triton.py::test_forward_backward_fp32[E3-k3-T7]"
    tests/test_grouped_mlp_triton.py::test_no_tokens tests/test_grouped_mlp_triton.py::test_no_host_sync_on_cuda
    "tests/test_triton_kernels.py::test_route_shapes[sigmoid-8-2]" tests/test_triton_kernels.py::test_route_strided_logits
    tests/test_triton_kernels.py::test_quantize_rounds_half_to_even
    "tests/test_sparse_lora.py::test_lora_one_projection[triton-down-only]"
    "tests/test_received_attention.py::test_triton_matches_explicit_softmax[1-2-2-8-24-True]"
    tests/test_quantized_mlp.py::test_quantized_mlp_bf16 tests/test_dispatch.py tests/test_demo.py tests/test_federated.py)
elif "$PY" -c "import xdist" 2>/dev/null; then
  pytest_args+=(-n 8)
fi
run tests 150 350 "$OUT/tests.log" "$PY" -m pytest "${pytest_args[@]}" "${KERNEL_TESTS[@]}"

# ------------------------------------------------------------------------------------------------ perf
perf_args=()
[ $REHEARSE = 1 ] && perf_args=(--rehearse --models deepseek-moe-16b)  # one row: the interpreter is slow
run perf 100 250 "$OUT/perf.log" "$PY" bench/gpu_perf.py --out "$OUT/perf.md" "${perf_args[@]}"

# ------------------------------------------------------------------------------------------------ native (after the build)
if collect build $BUILD_PID $(($(left) - 200)) "$OUT/build.log"; then
  note "    $(ls "$STAGE"/flux_engine/_C*.so 2>/dev/null | wc -l) extension(s) staged"
  echo "---------------------------------------------------------------- native" >>"$OUT/tests.log"
  run native 50 200 "$OUT/tests.log" "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_native.py
fi

# ------------------------------------------------------------------------------------------------ memory
mem_args=(--presets deepseek-moe-16b --time-limit-s 170 --reserve-s 0)
[ $REHEARSE = 1 ] && mem_args=(--presets deepseek-moe-16b --dry-run --time-limit-s 20 --reserve-s 0 --steps 1 --profile-seqs 1)
# Its report (memory.md, written when the preset ends; also printed into memory.log) is copied into $OUT; the
# JSON beside it stays behind (8 files).
run memory 200 5 "$OUT/memory.log" "$PY" bench/memory.py --out "$WORK/report/memory.md" --workdir "$WORK/memory" \
  "${mem_args[@]}"
[ -f "$WORK/report/memory.md" ] && cp "$WORK/report/memory.md" "$OUT/memory.md"

# ------------------------------------------------------------------------------------------------ compile (collect)
collect compile $COMPILE_PID $(($(left) - 2)) "$OUT/compile.log"

note "total: $(($(date +%s) - START)) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
failed=$(grep -cE "^[a-z]+: (exit [1-9]|TIMED OUT|still running|not run)" "$SUMMARY")
exit $((failed > 0))
