#!/usr/bin/env bash
# Issue 22, first measurement: the black-box searches (optuna-tpe, random) plain, with the
# budget-aware repair, and with repair and warm starts (the defaults), 40 evaluations at
# 50/30% MACs (the budgets of the issue's goals), one seed, no fine-tune; prunenet's one-shot answer beside them. Same
# baseline as the training-time benchmark. Resumable: run it again after a stop.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DIR=results/benchmarks/fmnist-resnet20-repair
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
run() {  # run-dir strategies options...
  local dir=$1 strategies=$2; shift 2
  automlprune compare fmnist-resnet20 --strategies "$strategies" --budgets macs=0.5,0.3 --seeds 1 --evals 40 \
    --finetune-epochs 0 --run-dir "$DIR/$dir" --set checkpoint=$BASE \
    --set evaluation.criterion=l1 --set evaluation.reconstruction=none "$@"  # what the arms measured then; arms override it
}
run plain optuna-tpe,random --option repair=false --option warm_start=none
run repair optuna-tpe,random --option warm_start=none
run repair-warm prunenet,optuna-tpe,random
# Better signals: the same searches (repair + warm starts) evaluating every candidate with the
# least-squares reconstruction, with the l1 criterion and with prunenet's.
run signal-l1-ls optuna-tpe,random --set evaluation.reconstruction=least_squares
run signal-prunenet-ls optuna-tpe,random --set evaluation.reconstruction=least_squares --set evaluation.criterion=prunenet
# The same on a 1/32 ratio grid: the samplers can refine an allocator's (off-grid) answer.
run signal-prunenet-ls-fine optuna-tpe,random --space fine --set evaluation.reconstruction=least_squares --set evaluation.criterion=prunenet
# RL at 50% MACs over 3 seeds (issue 22's DDPG spread): AMC as before (no warm start, no repair),
# with warm starts and repair (the defaults), and with AMC's per-step reward assignment too.
rl() {  # run-dir strategies options...
  local dir=$1 strategies=$2; shift 2
  automlprune compare fmnist-resnet20 --strategies "$strategies" --budgets macs=0.5 --seeds 3 --evals 40 --finetune-epochs 0 \
    --run-dir "$DIR/$dir" --set checkpoint=$BASE --space fine --set evaluation.reconstruction=least_squares \
    --set evaluation.criterion=prunenet "$@"
}
rl rl-plain ddpg,ppo --option warm_start=none --option repair=false
rl rl-default ddpg,ppo
rl rl-every-step ddpg --option reward_assignment=every_step
# Multi-fidelity: signal-prunenet-ls-fine's searches again, each proposal screened on a quarter of
# the validation and BN batches first, the top third of screenings evaluated in full; beside them the
# same searches without screening, run just before on the same otherwise idle machine, for evaluations per minute.
run no-screening optuna-tpe,random --space fine --set evaluation.reconstruction=least_squares --set evaluation.criterion=prunenet
run screening optuna-tpe,random --space fine --set evaluation.reconstruction=least_squares --set evaluation.criterion=prunenet \
  --set evaluation.screening=0.25
