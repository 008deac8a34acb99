#!/usr/bin/env bash
# Issue 17, at 20% MACs: a training-time method given half of the 4-epoch budget (its
# schedule run in 2 epochs), then the standard distilled fine-tune for the other 2, at the same
# equal training compute as run.sh, in its own run directory (same baseline). bwcp first, then
# l0-anneal. Resumable like run.sh. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # BASE, and SHARED: the baseline and the evaluation run.sh pins
DIR=$BASE/half-and-finetune
for strategy in bwcp l0-anneal; do
  automlprune compare fmnist-resnet20 \
    --strategies $strategy --option $strategy.epochs=2 \
    --budgets macs=0.2 --seeds 2 --train-budget 4 \
    --run-dir $DIR/$strategy "${SHARED[@]}" "$@"
done
# Added 2026-12-02 (second session): does the allocation hold l0-anneal back? The runs above prune the
# internal groups only, to one keep ratio; tp-global and prunenet prune every group. l0-anneal over every
# group to PruneNet's allocation (the allocation behind prunenet + fine-tune's 92.42), then a quarter of
# the budget for the anneal (1 epoch) against half.
for epochs in 2 1; do
  automlprune compare fmnist-resnet20 \
    --strategies l0-anneal --option l0-anneal.epochs=$epochs \
    --option l0-anneal.groups=all --option l0-anneal.widths=prunenet \
    --budgets macs=0.2 --seeds 2 --train-budget 4 \
    --run-dir $DIR/l0-anneal-prunenet-${epochs}ep "${SHARED[@]}" "$@"
done
