#!/usr/bin/env bash
# The GPU measurements of one session, as run through the device tool (a copy of the tree, no .git,
# processed Beauty carried in .carry/processed). Usage: bash gbla/bench/device_session.sh PART OUT
#   PART = kernels : compiled-kernel tests, layer/encoder benchmark (SWEEP=1: launch-parameter sweep)
#          steps   : training-step timings (MODES; COMPARE=1 adds no-buckets and fp32-math-SDPA rows)
#          concurrency : PROCS processes sharing one GPU, EPOCHS-epoch runs each
#          pilot   : Beauty sa and hybrid to early stopping, one process per GPU per variant (seeds in
#                    $SEEDS, one after another until PART_SECONDS are used)
# Several parts: bash device_session.sh "kernels steps" OUT.
# Every command's output lands in OUT; each part is bounded by `timeout` so the call ends in time.
set -uo pipefail
parts=$1; out=$2; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=. GBLA_PROCESSED_DIR=${GBLA_PROCESSED_DIR:-.carry/processed}
export GBLA_COMMIT=${GBLA_COMMIT:-unknown} GBLA_DIRTY=${GBLA_DIRTY:-unknown}
for part in $parts; do
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.mem --format=csv > "$out/nvidia_smi_$part.txt"
case $part in
kernels)
  GBLA_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_ops_conv.py \
    tests/test_ops_triton.py -k "conv or 257 or 17 or partials or independently" > "$out/gpu_tests.log" 2>&1
  tail -2 "$out/gpu_tests.log"
  timeout ${LAYER_TIMEOUT:-420} python3 -m gbla.bench.layer_speed ${SWEEP:+--sweep} ${SWEEP_CONV:+--sweep-conv} --commit "$GBLA_COMMIT" \
    --out "$out/layer_speed.json" > "$out/layer_speed.log" 2>&1
  grep -v "^  sweep" "$out/layer_speed.log" | tail -45
  ;;
steps)
  timeout 110 python3 -m gbla.bench.train_speed steps --variants sa,hybrid --backends auto \
    --modes ${MODES:-cuda_graph} --steps 150 --out "$out/steps_buckets" > "$out/steps.log" 2>&1
  [ -n "${COMPARE:-}" ] && timeout 60 python3 -m gbla.bench.train_speed steps --variants sa,hybrid \
    --backends auto --modes cuda_graph --steps 100 --length-buckets none --out "$out/steps_nobuckets" >> "$out/steps.log" 2>&1
  [ -n "${COMPARE:-}" ] && timeout 40 python3 -m gbla.bench.train_speed steps --variants sa --backends auto \
    --modes cuda_graph --steps 150 --sdpa-math-fp32 --out "$out/steps_sdpa_fp32" >> "$out/steps.log" 2>&1
  grep -h "ms_per_step\|valid_eval_s" "$out/steps.log" | cut -c1-400
  ;;
concurrency)
  timeout ${CONC_TIMEOUT:-300} python3 -m gbla.bench.train_speed concurrency --procs ${PROCS:-1,2,4} \
    --epochs ${EPOCHS:-3} --variant ${VARIANT:-hybrid} --out "$out" > "$out/concurrency.log" 2>&1
  tail -5 "$out/concurrency.log"
  ;;
pilot)
  # one process per GPU per variant; seeds run one after another while time is left: each run gets
  # --time-limit (the part's deadline minus a margin for its test evaluation) so it ends cleanly
  deadline=$(( $(date +%s) + ${PART_SECONDS:-540} ))
  i=0
  for variant in ${VARIANTS:-sa hybrid}; do
    (for seed in ${SEEDS:-0}; do
       left=$(( deadline - $(date +%s) - 30 ))
       [ "$left" -lt 120 ] && break
       CUDA_VISIBLE_DEVICES=$i timeout $(( left + 25 )) python3 -m gbla.bench.train_speed run \
         --variant "$variant" --seed "$seed" --no-progress --time-limit "$left" --out "$out" \
         ${RUN_ARGS:-} > "$out/log_${variant}_seed${seed}.txt" 2>&1
     done) &
    i=$(( (i + 1) % $(nvidia-smi -L | wc -l) ))
  done
  wait
  tail -n 2 "$out"/log_*.txt
  ;;
esac
done
