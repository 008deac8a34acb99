#!/bin/bash
# interleaved: old (git HEAD before the redesign, worktree /tmp/orig) and new, materialize then evaluate
for i in 1 2 3 4; do
  echo "old $(cd /tmp/orig && PYTHONPATH=/tmp/orig python results/benchmarks/redesign-15/mat.py)"
  echo "new $(cd . && python results/benchmarks/redesign-15/mat.py)"
done
for i in 1 2; do
  (cd /tmp/orig && PYTHONPATH=/tmp/orig python results/benchmarks/redesign-15/evaltime.py results/benchmarks/redesign-15/ev-old-$i.json > /dev/null 2>&1)
  (cd . && python results/benchmarks/redesign-15/evaltime.py results/benchmarks/redesign-15/ev-new-$i.json > /dev/null 2>&1)
done
echo done
