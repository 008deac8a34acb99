#!/usr/bin/env bash
# Issue 17's Play and Prune table on Fashion-MNIST ResNet-20 (the training-time benchmark's baseline).
# 1. tolerance/: play-and-prune (4 epochs of training) under accuracy_drop=0.25,0.5,1,2 beside the one-shot
#    allocators' cheapest answer within each tolerance (bisection over their MACs budget, no training);
# 2. at-its-macs/: uniform, prunenet and tp-global at the MACs play-and-prune reached, at equal training compute
#    (--train-budget 4: a 4-epoch fine-tune each; play-and-prune's answers have trained their 4 epochs), so the
#    table reads: tolerance -> MACs reached -> what the others reach at those MACs.
# Resumable: rerun after a stop (finished searches and fine-tunes are served from each run store).
# About 1.5 h on 2 idle CPU cores. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-resnet20-play-and-prune
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
automlprune compare fmnist-resnet20 --strategies play-and-prune,uniform,prunenet,tp-global \
  --budgets accuracy_drop=0.25,0.5,1,2 --finetune-epochs 0 --run-dir $DIR/tolerance --set checkpoint=$BASE "$@"
MACS=$(python3 -c "
import json
rows = json.load(open('$DIR/tolerance/results.json'))['rows']
print(','.join(sorted({f\"{r['macs_fraction']:.4f}\" for r in rows if r['strategy'] == 'play-and-prune' and r['macs_fraction'] == r['macs_fraction']})))")
automlprune compare fmnist-resnet20 --strategies uniform,prunenet,tp-global \
  --budgets macs=$MACS --train-budget 4 --run-dir $DIR/at-its-macs --set checkpoint=$BASE "$@"
