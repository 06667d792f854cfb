#!/usr/bin/env bash
# The GPU suite in one command, for an H100/H200 machine (about 8 minutes):
#   bash benchmarks/gpu_check.sh                      # on the GPU
#   TRITON_INTERPRET=1 bash benchmarks/gpu_check.sh --device interpret   # tiny sizes on CPU: checks this script
# Parts (each writes its JSON record under $GPU_CHECK_OUT, default benchmarks/results/):
#   1 triton_tests   the Triton kernel tests on the GPU (forward and every gradient against the reference, fp32
#                    and bf16, the multi-direction launch with window padding, compiles without spills)
#   2 bench_supernet bench_supernet.py --device cuda (supernet training steps, bf16 autocast)
#   3 bench_search   bench_search.py --device cuda (LocalVim-T search at batch 128, bf16: joint vs sampled memory)
#   4 search_run     20 steps of a real search.py (LocalVim-T supernet on the demo digits at 224, bf16 autocast)
#                    under torchrun with one process
#   5 bench_scan     bench_scan.py --device cuda (float64 correctness check, fused 8-direction launch vs 8 launches
#                    vs the torch backend, and vs mamba_ssm's kernel when MAMBA_SRC names an unpacked mamba_ssm
#                    source tree whose extension builds while parts 1-4 run: its build starts first)
# then one summary table (benchmarks/gpu_summary.py). Exit status: the number of parts that failed.
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
  SCAN_ARGS=(); SUPERNET_ARGS=(); SEARCH_ARGS=(--steps 20)
  RUN_ARGS=(--model local_vim_tiny_search --img_size 224 --data.images_per_class 64 --train.batch_size 32
            --train.amp bf16 --train.device cuda --train.workers 4)
  LIMIT=(150 90 60 90 180)  # seconds per part, in the order above
else
  TAG=interpret
  TESTS=(tests/ops/test_scan_triton.py -k "test_bf16_inputs_give_bf16_output or test_multi_direction_matches_loop")
  SCAN_ARGS=(--dtypes fp32 --reps 1 --batch 1); SUPERNET_ARGS=(--steps 1 --warmup 1); SEARCH_ARGS=(--steps 2)
  RUN_ARGS=(--model_args.depth 1 --model_args.embed_dim 8 --img_size 16 --data.images_per_class 8
            --train.batch_size 4 --train.amp none --train.device cpu)
  LIMIT=(300 120 120 120 300)
fi

MAMBA=()
if [ "$DEVICE" = cuda ] && [ -n "${MAMBA_SRC:-}" ]; then
  timeout 420 "$PY" benchmarks/bench_scan.py --build-mamba-only --mamba-src "$MAMBA_SRC" > "$TMP/mamba_build.log" 2>&1 &
  MAMBA_PID=$!
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

part triton_tests "${LIMIT[0]}" "$PY" -m pytest -q -m interpret -p no:cacheprovider "${TESTS[@]}" \
  --junitxml "$TMP/triton_tests.xml"
part bench_supernet "${LIMIT[1]}" "$PY" benchmarks/bench_supernet.py --device "$DEVICE" "${SUPERNET_ARGS[@]}" \
  --out "$OUT/bench_supernet_$TAG.json"
part bench_search "${LIMIT[2]}" "$PY" benchmarks/bench_search.py --device "$DEVICE" "${SEARCH_ARGS[@]}" \
  --out "$OUT/bench_search_$TAG.json"
part search_run "${LIMIT[3]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 search.py -c demo \
  "${RUN_ARGS[@]}" --epochs 1 --train.warmup_epochs 0 --log.progress false --out "$TMP/search_run"
if [ -n "${MAMBA_PID:-}" ]; then
  if wait "$MAMBA_PID"; then MAMBA=(--mamba-src "$MAMBA_SRC"); else echo "== mamba_ssm's extension did not build in time (see below); bench_scan runs without it"; tail -5 "$TMP/mamba_build.log"; fi
fi
part bench_scan "${LIMIT[4]}" "$PY" benchmarks/bench_scan.py --device "$DEVICE" "${SCAN_ARGS[@]}" "${MAMBA[@]}" \
  --out "$OUT/bench_scan_$TAG.json"

"$PY" benchmarks/gpu_summary.py --tag "$TAG" --results "$OUT" --status "$TMP/status" \
  --junit "$TMP/triton_tests.xml" --run "$TMP/search_run" || FAILED=$((FAILED + 1))
exit $FAILED
