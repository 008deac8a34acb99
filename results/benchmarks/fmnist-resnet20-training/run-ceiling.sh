#!/usr/bin/env bash
# Issue 17's goal at 20% MACs asks for 0.5 points above tp-global + the 4-epoch fine-tune (92.49 + 0.5).
# How far can more training take the anchor itself? tp-global's 20% answer fine-tuned for 12 epochs (three times
# the benchmark's budget), with the same distilled fine-tune, in its own run directory (same baseline). A ceiling
# for reading the goal, not an equal-compute arm. Resumable like run.sh. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # BASE, and SHARED: the baseline and the evaluation run.sh pins
automlprune compare fmnist-resnet20 \
  --strategies tp-global --budgets macs=0.2 --seeds 1 --finetune-epochs 12 \
  --run-dir $BASE/ceiling "${SHARED[@]}" "$@"
