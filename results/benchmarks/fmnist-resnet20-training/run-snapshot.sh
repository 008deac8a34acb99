#!/usr/bin/env bash
# Issue 17's snapshot-ensemble arm: the best one-shot answers (uniform, tp-global) and the best
# training-time method at 20% MACs (l0-anneal, given 2 of the 4 epochs so that a fine-tune remains) of
# the training benchmark, fine-tuned by snapshot-ensemble distillation instead of the standard
# fine-tune, at the same 4-epoch training budget, in their own run directory (same baseline).
# Resumable like run.sh. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
BASE=results/benchmarks/fmnist-resnet20-training
DIR=$BASE/snapshot-ensemble
automlprune compare fmnist-resnet20 \
  --strategies uniform,tp-global,l0-anneal --option l0-anneal.epochs=2 \
  --budgets macs=0.5,0.2 --seeds 2 --train-budget 4 \
  --run-dir $DIR --set checkpoint=$BASE/baseline.pt --set finetune.method=snapshot_ensemble "$@"
