#!/usr/bin/env bash
# Issue 22, "judge what users keep": which search signal predicts the accuracy after a fine-tune.
# Resumable (finished measurements are kept in signals.json). Same baseline as the training-time benchmark.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-resnet20-signals
automlprune benchmark --suite signals --env fmnist-resnet20 --signals l1,l1+ls,prunenet+ls --candidates 5 --macs 0.5 \
  --finetune-steps 200 --out $DIR --set checkpoint=results/benchmarks/fmnist-resnet20-training/baseline.pt "$@"
