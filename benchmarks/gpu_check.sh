#!/usr/bin/env bash
# The GPU suite in one command, for an H100/H200 machine: at most SUITE_BUDGET (530) seconds in all.
#   bash benchmarks/fetch_mamba_src.sh                # once, on a machine with PyPI: mamba-ssm's source in .mamba_src/
#   bash benchmarks/gpu_check.sh                      # on the GPU (carry .mamba_src along: it is git-ignored)
#   TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh --device interpret   # tiny sizes on CPU: checks this script
# Parts (each writes its JSON record under $GPU_CHECK_OUT, default benchmarks/results/, row by row as it measures,
# so a part stopped at its time limit keeps what it measured and the summary names what is missing):
#   1 triton_tests   the Triton kernel tests on the GPU (forward and every gradient against the reference, fp32
#                    and bf16, the multi-direction launch with window padding) and the sm_90 compile tests
#   2 bench_supernet bench_supernet.py --device cuda (supernet training steps, bf16 autocast)
#   3 bench_search   bench_search.py --device cuda (LocalVim-T search at batch 128, bf16: joint vs sampled memory)
#   4 search_run     20 steps of a real search.py (LocalVim-T supernet on the demo digits at 224, bf16 autocast)
#                    under torchrun with one process, in its NCCL process group
#   5 train_compile  bench_inference.py --parts train --device cuda (the demo derived model and the demo supernet:
#                    a training step eager and under torch.compile, bf16 autocast: compile time, steady step,
#                    graphs and graph breaks)
#   6 bench_scan     bench_scan.py --device cuda (float64 correctness check, fused 8-direction launch vs mamba_ssm's
#                    kernel x 8 vs our single launch x 8 vs the torch backend). mamba_ssm: its selective-scan
#                    extension alone, for this GPU's architecture, builds from $MAMBA_SRC (default .mamba_src)
#                    in the background while parts 1-5 run, within the same budget.
# then one summary table (benchmarks/gpu_summary.py). Exit status: the number of parts that failed.
# GPU_CHECK_LIMITS="p1 p2 p3 p4 p5 p6" overrides the parts' time limits (seconds).
set -uo pipefail
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs cuda or interpret}; fi
case "$DEVICE" in cuda|interpret) ;; *) echo "gpu_check.sh: --device: expected cuda or interpret, got $DEVICE" >&2; exit 2;; esac
if [ "$DEVICE" = interpret ] && [ "${TRITON_INTERPRET:-}" != 1 ]; then
  echo "gpu_check.sh: --device interpret: set TRITON_INTERPRET=1 in the environment" >&2; exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT=${GPU_CHECK_OUT:-benchmarks/results}
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ "$DEVICE" = cuda ]; then
  TAG=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 2
  TESTS=(tests/ops/test_scan_triton.py tests/ops/test_scan_triton_compile.py)
  SCAN_ARGS=(); SUPERNET_ARGS=(); SEARCH_ARGS=(--steps 20); TRAIN_ARGS=(--reps 10)
  RUN_ARGS=(--model local_vim_tiny_search --img_size 224 --data.images_per_class 64 --train.batch_size 32
            --train.amp bf16 --train.device cuda --train.workers 4)
  # parts 1-5 add up to 390 s and the mamba build runs beside them (at most 360 s from the start); bench_scan
  # gets what is left of the budget, at most 150 s (125 s when every part before it ran to its limit), keeping
  # 15 s for the summary
  BUDGET=${SUITE_BUDGET:-530}; LIMIT=(100 80 70 80 60 150); MAMBA_LIMIT=360
  MAMBA_SRC=${MAMBA_SRC:-$([ -f .mamba_src/setup.py ] && echo .mamba_src)}
else
  TAG=interpret
  TESTS=(-m interpret tests/ops/test_scan_triton.py -k "test_bf16_inputs or test_gpu_tile_shape or test_multi_direction_matches_loop")
  SCAN_ARGS=(--dtypes fp32 --reps 1 --batch 1); SUPERNET_ARGS=(--steps 1 --warmup 1); SEARCH_ARGS=(--steps 2)
  TRAIN_ARGS=(--reps 1)
  RUN_ARGS=(--model_args.depth 1 --model_args.embed_dim 8 --img_size 16 --data.images_per_class 8
            --train.batch_size 4 --train.amp none --train.device cpu)
  BUDGET=${SUITE_BUDGET:-1200}; LIMIT=(300 120 120 120 120 300)
  MAMBA_SRC=
fi
if [ -n "${GPU_CHECK_LIMITS:-}" ]; then read -r -a LIMIT <<< "$GPU_CHECK_LIMITS"; fi
if [ "${#LIMIT[@]}" -ne 6 ]; then
  echo "gpu_check.sh: GPU_CHECK_LIMITS: expected 6 time limits in seconds (one per part), got '${GPU_CHECK_LIMITS:-}'" >&2
  exit 2
fi
echo "== GPU suite ($TAG): parts limited to ${LIMIT[*]} s, ${BUDGET} s in all"

if [ -n "$MAMBA_SRC" ]; then
  echo "== building mamba_ssm's selective-scan extension from $MAMBA_SRC in the background (at most ${MAMBA_LIMIT}s)"
  MAX_JOBS=${MAX_JOBS:-12} timeout "$MAMBA_LIMIT" "$PY" benchmarks/bench_scan.py --build-mamba-only \
    --mamba-src "$MAMBA_SRC" > "$TMP/mamba_build.log" 2>&1 &
  MAMBA_PID=$!
else
  echo "== mamba_ssm: no source (run benchmarks/fetch_mamba_src.sh, or set MAMBA_SRC): bench_scan runs without it"
fi

FAILED=0
# part NAME LIMIT COMMAND...: runs it under the time limit, records its status in $TMP/status
part() {
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >> "$TMP/status"
  if [ $rc -ne 0 ]; then FAILED=$((FAILED + 1)); echo "== $name failed (exit $rc)"; fi
}

part triton_tests "${LIMIT[0]}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  --junitxml "$TMP/triton_tests.xml"
part bench_supernet "${LIMIT[1]}" "$PY" benchmarks/bench_supernet.py --device "$DEVICE" "${SUPERNET_ARGS[@]}" \
  --out "$OUT/bench_supernet_$TAG.json"
part bench_search "${LIMIT[2]}" "$PY" benchmarks/bench_search.py --device "$DEVICE" "${SEARCH_ARGS[@]}" \
  --out "$OUT/bench_search_$TAG.json"
part search_run "${LIMIT[3]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 search.py -c demo \
  "${RUN_ARGS[@]}" --epochs 1 --train.warmup_epochs 0 --log.progress false --out "$TMP/search_run"
part train_compile "${LIMIT[4]}" "$PY" benchmarks/bench_inference.py --parts train --device "$DEVICE" \
  "${TRAIN_ARGS[@]}" --out "$OUT/bench_inference_train_$TAG.json"
MAMBA=()
if [ -n "${MAMBA_PID:-}" ]; then
  if wait "$MAMBA_PID"; then MAMBA=(--mamba-src "$MAMBA_SRC")
  else echo "== mamba_ssm's extension did not build within ${MAMBA_LIMIT}s of the start; bench_scan runs without it"
       tail -5 "$TMP/mamba_build.log"; fi
fi
LEFT=$((BUDGET - SECONDS - 15))
SCAN_LIMIT=$((LEFT < LIMIT[5] ? LEFT : LIMIT[5]))
part bench_scan "$((SCAN_LIMIT > 10 ? SCAN_LIMIT : 10))" "$PY" benchmarks/bench_scan.py --device "$DEVICE" \
  "${SCAN_ARGS[@]}" "${MAMBA[@]}" --out "$OUT/bench_scan_$TAG.json"

"$PY" benchmarks/gpu_summary.py --tag "$TAG" --results "$OUT" --status "$TMP/status" \
  --junit "$TMP/triton_tests.xml" --run "$TMP/search_run" || FAILED=$((FAILED + 1))
exit $FAILED
