# Sourced by this folder's run scripts: the repository root as the working directory, this folder, and what every
# arm shares so that its answers compare with run.sh's: the trained baseline, and the evaluation of run.sh's time
# (channels by L1, no least-squares fold), pinned so a rerun resumes it as it was. (run-snapshot.sh predates this
# file and leaves the evaluation to its default, which for its strategies is the same L1 / no fold.)
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
BASE=results/benchmarks/fmnist-resnet20-training
SHARED=(--set checkpoint=$BASE/baseline.pt --set evaluation.criterion=l1 --set evaluation.reconstruction=none)
