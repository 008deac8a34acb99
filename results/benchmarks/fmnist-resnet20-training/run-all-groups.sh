#!/usr/bin/env bash
# Issue 17, at 20% MACs: bwcp pruning every group (--option bwcp.groups=all: the residual streams too, one
# shared mask per group, App. A.6) instead of the internal groups alone, on its own 4-epoch schedule, at the
# same equal training compute as run.sh, in its own run directory (same baseline). tp-global and prunenet,
# the best answers at 20%, prune every group. Resumable like run.sh. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # BASE, and SHARED: the baseline and the evaluation run.sh pins
automlprune compare fmnist-resnet20 \
  --strategies bwcp --option bwcp.groups=all \
  --budgets macs=0.2 --seeds 2 --train-budget 4 \
  --run-dir $BASE/all-groups/bwcp "${SHARED[@]}" "$@"
