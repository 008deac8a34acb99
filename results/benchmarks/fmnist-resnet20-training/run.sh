#!/usr/bin/env bash
# Issues 16 and 17's benchmark: training-time methods against one-shot ones on Fashion-MNIST ResNet-20, at
# equal training compute (4 epochs of images per answer). Issue 17 adds l0-anneal, prune-while-training,
# gradual-frs and bwcp (finished searches of issue 16 are served from the store); the snapshot-ensemble
# fine-tune arm is run-snapshot.sh. Resumable: run it again after a stop;
# finished searches are served from study.db, an interrupted resrep/greg run resumes after its
# last epoch (checkpoints/). Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
source "$(dirname "$0")/common.sh"  # BASE, and SHARED: the baseline and the pinned evaluation
[ -f $BASE/baseline.pt ] || automlprune train fmnist-resnet20 --set checkpoint=$BASE/baseline.pt
automlprune compare fmnist-resnet20 \
  --strategies uniform,tp-global,prunenet,resrep,greg1,greg2,gate-decorator,l0-anneal,prune-while-training,gradual-frs,bwcp \
  --budgets macs=0.5,0.2 --seeds 2 --train-budget 4 \
  --run-dir $BASE "${SHARED[@]}" "$@"
