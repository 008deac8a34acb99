#!/usr/bin/env bash
# Issue 22's latency half, on this machine's CPU:
# 1. profile/: where pruned ResNet-20, MobileNetV2 (x0.5) and VGG-11 spend their time, which channel alignment
#    the backend rewards, and the latency table's error (automlprune benchmark --suite latency);
# 2. <task>-b1/: latency budgets 0.7 / 0.5 / 0.3 at batch 1 beside MACs budgets 0.7 / 0.5 / 0.3;
# 3. <task>-b64/: the same latency budgets at batch 64 (evaluation.latency_batch=64).
# Searches: optuna-tpe (warm starts, repair) and uniform, 40 evaluations, seed 0, in the hardware-friendly space
# (widths in multiples of 8), scored with prunenet's channel order and the least-squares fold; every answer's
# exported network (materialized, batch norms folded) is timed at batch 1 and 64 in the reports. A budget the
# space cannot reach at a batch size is listed in unreached.txt with the reason and left out of the report.
# Resumable: rerun after a stop. Needs: apt-get install dataset-fashion-mnist.
set -uo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-latency
automlprune benchmark --suite latency --macs 0.5,0.3 --out $DIR/profile || exit 1
MOBILENET=$DIR/mobilenetv2-baseline.pt  # trained below, before its searches (8 epochs: about 40 min on 2 CPU cores)
COMMON=(--strategies uniform,optuna-tpe --seeds 1 --evals 40 --finetune-epochs 0 --space hw-friendly
        --set evaluation.criterion=prunenet --set evaluation.reconstruction=least_squares)

search() {  # task checkpoint batch budget...: each budget alone (an unreachable one is listed), then one report
  local task=$1 checkpoint=$2 batch=$3 out=$DIR/$1-b$3 reached=() code
  shift 3
  for budget in "$@"; do
    automlprune compare "$task" --budgets "$budget" "${COMMON[@]}" --run-dir "$out" --set checkpoint="$checkpoint" \
      --set evaluation.latency_batch="$batch" 2> >(tee "$out.err" >&2)
    code=$?
    if [ $code -eq 0 ]; then reached+=("$budget")
    elif [ $code -eq 2 ] && tail -1 "$out.err" | grep -q "is impossible"; then
      echo "$task, batch $batch, $budget: $(tail -1 "$out.err")" >> $DIR/unreached.txt
    else exit $code; fi
  done
  rm -f "$out.err"
  [ ${#reached[@]} -gt 0 ] && automlprune compare "$task" --budgets "$(IFS=,; echo "${reached[*]}")" "${COMMON[@]}" \
    --run-dir "$out" --set checkpoint="$checkpoint" --set evaluation.latency_batch="$batch"
}

rm -f $DIR/unreached.txt
for task in fmnist-resnet20 fmnist-mobilenetv2; do
  checkpoint=$([ $task = fmnist-resnet20 ] && echo results/benchmarks/fmnist-resnet20-training/baseline.pt || echo $MOBILENET)
  [ -f $checkpoint ] || automlprune train $task --set checkpoint=$checkpoint || exit 1
  search $task $checkpoint 1 latency=0.7 latency=0.5 latency=0.3 macs=0.7 macs=0.5 macs=0.3
  search $task $checkpoint 64 latency=0.7 latency=0.5 latency=0.3
done
