#!/usr/bin/env bash
# The GPU machine's run: build moeyard for the visible GPU only (all cores), then the stages named
# on the command line (default: all, in this order):
#   test       the GPU tests (pytest -m gpu)
#   sanitize   compute-sanitizer memcheck and racecheck on tests/sanitizer_suite.py
#   routing    benchmarks/bench_routing.py
#   experts    benchmarks/bench_experts.py (BENCH_EXPERTS_ARGS, BENCH_EXPERTS_TIMEOUT, default 480 s)
#   layers     benchmarks/bench_layers.py (BENCH_LAYERS_ARGS, BENCH_LAYERS_TIMEOUT, default 300 s)
#   hf         benchmarks/bench_hf.py, a Qwen3-MoE-like transformers model (BENCH_HF_ARGS,
#              BENCH_HF_TIMEOUT, default 300 s; --compile needs more)
#   summary    the short table of whatever JSON is in $OUT (benchmarks/summary.py)
# The device tool allows 600 s per command and keeps a warm machine's build between commands, so a
# whole run is several calls, e.g. `gpu_run.sh test sanitize`, then `gpu_run.sh experts`, then
# `gpu_run.sh routing layers hf summary`; the build step is a no-op when nothing changed.
# Logs and JSON go to $OUT (default ./out). The device tool gives each call a fresh, empty $OUT, so
# over several calls write to the repository's out/ (kept on a warm machine) and copy it back:
#   OUT=out bash benchmarks/gpu_run.sh experts; cp -r out/. "$OUT"/
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"; mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(test sanitize routing experts layers hf summary)
status=0
step() { echo "== $1"; }
# bench NAME LIMIT_S TAIL [ARGS...]: benchmarks/bench_NAME.py under a timeout, its log in $OUT
bench() {
  local name=$1 limit=$2 lines=$3; shift 3
  step "bench_$name"
  timeout "$limit" python3 "benchmarks/bench_$name.py" "$@" 2>&1 | tee "$OUT/bench_$name.log" \
    | tail -"$lines"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "bench_$name rc=$rc"; status=1; }
}

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
python3 -m moeyard info

for stage in "${stages[@]}"; do
  # word splitting of BENCH_*_ARGS below is intended (several options)
  # shellcheck disable=SC2086
  case "$stage" in
  test)
    step "GPU tests"
    # Only the GPU tests here: on the GPU machine's image (g++ 13.3, torch 2.11.0+cu130) any torch
    # extension built there, a plain torch.utils.cpp_extension one included, segfaults when a C++
    # exception (TORCH_CHECK) crosses into torch, so the bad-input tests cannot run there. A
    # library built with g++ 12 raises correctly on the same machine; CI runs every CPU test.
    python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
    [ "${PIPESTATUS[0]}" = 0 ] || status=1 ;;
  sanitize)
    for tool in memcheck racecheck; do
      step "compute-sanitizer $tool"
      timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 tests/sanitizer_suite.py \
        > "$OUT/sanitizer_$tool.log" 2>&1
      rc=$?; tail -3 "$OUT/sanitizer_$tool.log"; echo "rc=$rc"; [ $rc = 0 ] || status=1
    done ;;
  routing)
    step "bench_routing"
    python3 benchmarks/bench_routing.py 2>&1 | tee "$OUT/bench_routing.log" | tail -30
    rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { echo "bench_routing rc=$rc"; status=1; } ;;
  experts) bench experts "${BENCH_EXPERTS_TIMEOUT:-480}" 65 ${BENCH_EXPERTS_ARGS:-} ;;
  layers) bench layers "${BENCH_LAYERS_TIMEOUT:-300}" 40 ${BENCH_LAYERS_ARGS:-} ;;
  hf) bench hf "${BENCH_HF_TIMEOUT:-300}" 30 ${BENCH_HF_ARGS:-} ;;
  summary)
    python3 benchmarks/summary.py "$OUT" ;;
  *)
    echo "unknown stage $stage (test sanitize routing experts layers hf summary)"; exit 2 ;;
  esac
done
exit $status
