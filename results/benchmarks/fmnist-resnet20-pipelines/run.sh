#!/usr/bin/env bash
# Issue 19's benchmark: at 1/8 and 1/16 of the float32 size of ResNet-20 on Fashion-MNIST, the
# two-stage DRL pipeline (AMC channels, information-dropout kernels, HAQ bits), joint single-episode
# search (ddpg mode=joint, and Optuna's TPE in the same joint space for reference) and the non-RL
# and RL channels-then-bits pipelines (PruneNet then TPE / HAQ), each with 3 epochs of training
# after its searches (joint: a 3-epoch fine-tune; pipelines: as their files say, 3 epochs in all).
# Same baseline as the training-time and sparsity benchmarks. Resumable: run it again after a stop
# (finished searches, stages and fine-tunes are served from the run store).
# Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# Measured with the evaluation of its time (channels by L1, no least-squares fold), pinned so a rerun resumes it as it was.
PLAIN=(--set evaluation.criterion=l1 --set evaluation.reconstruction=none)
DIR=results/benchmarks/fmnist-resnet20-pipelines
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
automlprune compare fmnist-resnet20 --space joint \
  --strategies ddpg,optuna-tpe,pipeline:two-stage-drl,pipeline:channels-then-bits,pipeline:channels-then-haq \
  --option ddpg.mode=joint --budgets bytes=0.125,0.0625 --evals 60 --finetune-epochs 3 \
  --notes $DIR/notes.md --set checkpoint=$BASE --run-dir $DIR "${PLAIN[@]}" "$@"
