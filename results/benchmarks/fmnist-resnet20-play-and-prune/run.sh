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
# Measured with the evaluation of its time (channels by L1, no least-squares fold), pinned so a rerun resumes it as it was.
PLAIN=(--set evaluation.criterion=l1 --set evaluation.reconstruction=none)
DIR=results/benchmarks/fmnist-resnet20-play-and-prune
BASE=results/benchmarks/fmnist-resnet20-training/baseline.pt
automlprune compare fmnist-resnet20 --strategies play-and-prune,uniform,prunenet,tp-global \
  --budgets accuracy_drop=0.25,0.5,1,2 --finetune-epochs 0 --run-dir $DIR/tolerance --set checkpoint=$BASE "${PLAIN[@]}" "$@"
MACS=$(python3 -c "
import json
rows = json.load(open('$DIR/tolerance/results.json'))['rows']
print(','.join(sorted({f\"{r['macs_fraction']:.4f}\" for r in rows if r['strategy'] == 'play-and-prune' and r['macs_fraction'] == r['macs_fraction']})))")
automlprune compare fmnist-resnet20 --strategies uniform,prunenet,tp-global \
  --budgets macs=$MACS --train-budget 4 --run-dir $DIR/at-its-macs --set checkpoint=$BASE "${PLAIN[@]}" "$@"
# 3. table.md: tolerance -> MACs play-and-prune reached -> each strategy's test accuracy at those MACs (equal training).
python3 - "$DIR" <<'PY'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
tolerance = json.loads((folder / "tolerance/results.json").read_text())["rows"]
at_macs = json.loads((folder / "at-its-macs/results.json").read_text())["rows"]
others = sorted({r["strategy"] for r in at_macs})
lines = ["| tolerance (points) | play-and-prune MACs | play-and-prune val / test | "
         + " | ".join(f"{s} test at those MACs" for s in others) + " | cheapest one-shot within the tolerance (no training) |",
         "|---:|---:|---:|" + "---:|" * len(others) + "---|"]
for row in sorted((r for r in tolerance if r["strategy"] == "play-and-prune"), key=lambda r: float(r["budget"].split("=")[1])):
    label = f"macs={row['macs_fraction']:.4f}"
    cells = []
    for s in others:
        match = [r for r in at_macs if r["strategy"] == s and r["budget"] == label]
        cells.append(f"{100 * match[0]['test_accuracy']:.2f} ({match[0]['macs_fraction']:.1%})" if match else "-")
    one_shot = [r for r in tolerance if r["budget"] == row["budget"] and r["strategy"] != "play-and-prune"
                and r["macs_fraction"] == r["macs_fraction"]]
    best = min(one_shot, key=lambda r: r["macs_fraction"]) if one_shot else None
    lines.append(f"| {row['budget'].split('=')[1]} | {row['macs_fraction']:.1%} | {100 * row['val_accuracy']:.2f} / "
                 f"{100 * row['test_accuracy']:.2f} | " + " | ".join(cells) + " | "
                 + (f"{best['strategy']} at {best['macs_fraction']:.1%} MACs ({100 * best['test_accuracy']:.2f} test)" if best else "-") + " |")
(folder / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
