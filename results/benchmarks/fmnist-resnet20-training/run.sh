#!/usr/bin/env bash
# Issue 16's benchmark: training-time methods against one-shot ones on Fashion-MNIST ResNet-20, at
# equal training compute (4 epochs of images per answer). Resumable: run it again after a stop;
# finished searches are served from study.db, an interrupted resrep/greg run resumes after its
# last epoch (checkpoints/). Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-resnet20-training
[ -f $DIR/baseline.pt ] || automlprune train fmnist-resnet20 --set checkpoint=$DIR/baseline.pt
automlprune compare fmnist-resnet20 \
  --strategies uniform,tp-global,prunenet,resrep,greg1,greg2,gate-decorator \
  --budgets macs=0.5,0.2 --seeds 2 --train-budget 4 \
  --run-dir $DIR --set checkpoint=$DIR/baseline.pt "$@"
