#!/usr/bin/env bash
# Issue 18's benchmark: at 1/4, 1/8 and 1/16 of the float32 size, the best network of channels
# only, weight sparsity only (unstructured, 2:4, 1x4 blocks, PCONV, DARB), bits only and all three jointly,
# after the same 1-epoch fine-tune, with measured CPU latency and the packed file's size.
# Same baseline as the training-time benchmark. Resumable: run it again after a stop (finished
# searches and fine-tunes are served from each arm's run store). Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# Measured with the evaluation of its time (channels by L1, no least-squares fold), pinned so a rerun resumes it as it was.
PLAIN=(--set evaluation.criterion=l1 --set evaluation.reconstruction=none)
DIR=results/benchmarks/fmnist-resnet20-sparsity
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
automlprune benchmark --suite sparsity --env fmnist-resnet20 --sizes 0.25,0.125,0.0625 --evals 40 --finetune-epochs 1 \
  --set checkpoint=$BASE --out $DIR "${PLAIN[@]}" "$@"
