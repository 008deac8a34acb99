#!/usr/bin/env bash
# Issue 22's benchmark: every search strategy at 70/50/30% MACs, 3 seeds, 40 evaluations, beside
# prunenet's and Torch-Pruning's one-shot answers, all fine-tuned alike (3 x 150 SGD steps, as the
# first-wave benchmark in ../fmnist-resnet20). Everything else is the defaults: searches use warm starts,
# repair and the search signal measured best in ../fmnist-resnet20-repair and ../fmnist-resnet20-signals
# (prunenet's channel order with the least-squares fold); uniform and global keep L1 order, no fold.
# The 1/32 ratio grid (space "fine") lets the samplers refine an allocator's answer.
# Resumable: run it again after a stop. Needs: apt-get install dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-resnet20-search
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
automlprune compare fmnist-resnet20 --strategies prunenet,tp-global,uniform,optuna-tpe,ppo,ddpg,random,optuna-nsga2 \
  --budgets macs=0.7,0.5,0.3 --seeds 3 --evals 40 --finetune-epochs 3 --set finetune.steps_per_epoch=150 \
  --space fine --run-dir $DIR --set checkpoint=$BASE "$@"
