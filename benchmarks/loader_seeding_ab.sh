#!/usr/bin/env bash
# The loader's rate with and without per-sample augmentation seeding (pretrain/data/stream.py, _seed_each_sample),
# and at an older commit: benchmarks/loader_throughput.py on the MAE transform, the three trees in turn, RUNS times.
#   bash benchmarks/loader_seeding_ab.sh OLD_TREE [RUNS]    (OLD_TREE: e.g. a `git archive` of 600cee3 unpacked)
# The tree without seeding is a copy of this one with the _seed_each_sample call replaced by `pass`. Writes one
# line per case and tree to stdout (results of 2026-12-08: benchmarks/results/loader_seeding_ab_h100.txt).
set -euo pipefail
OLD=$1
RUNS=${2:-2}
export OMP_NUM_THREADS=1
[ -f /tmp/demo/train/sizes.json ] || python3 -m pretrain.data demo --out /tmp/demo --source digits --no-progress
NOSEED=$(mktemp -d)
cp -r pretrain vig benchmarks "$NOSEED"/
sed -i 's/shuffled = _seed_each_sample(shuffled, config.seed, self.epoch)/pass/' "$NOSEED/pretrain/data/stream.py"
grep -q "_seed_each_sample(shuffled" "$NOSEED/pretrain/data/stream.py" && { echo "the seeding call was not found"; exit 1; }
rate() {  # name, tree
  (cd "$2" && PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/loader_throughput.py /tmp/demo/train \
     --task mae --workers 14 --batch 512 --skip 8 --batches 60 --pin-memory --device cuda --out "$(mktemp)") \
     | grep "^| uint8\|^| float32" | sed "s/^/$1: /"
}
for _ in $(seq "$RUNS"); do
  rate base "$OLD"
  rate head "$PWD"
  rate noseed "$NOSEED"
done
