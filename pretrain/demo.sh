#!/usr/bin/env bash
# The main job end to end on the embedded demo data, on a fresh machine: set up the environment, write the
# demo shards, MAE-pretrain ViG-T through accelerate, export the encoder, and linear-probe it next to the same
# architecture at random initialisation. Extra arguments are recipe overrides, e.g. model.mask_mode=mask_token.
set -euo pipefail
cd "$(dirname "$0")/.."
source pretrain/demo_data.sh
run=runs/demo_mae_vig_t
"$venv/bin/accelerate" launch --config_file recipes/accelerate/cpu.yaml pretrain/mae.py recipes/demo_mae_vig_t.yaml \
  train.output_dir="$run" "$@"
probe=("$PYTHON" -m eval.linear_probe --encoder "$run/encoder" --train-shards demo_data/train --val-shards demo_data/val
       --epochs 30 --warmup-epochs 3)
"${probe[@]}" --output "$run/probe_pretrained.json" >/dev/null
"${probe[@]}" --random-init --output "$run/probe_random_init.json" >/dev/null
"$PYTHON" - "$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
pretrained, random_init = (json.loads((run / f"probe_{kind}.json").read_text()) for kind in ("pretrained", "random_init"))
print(f"linear probe top-1 on the demo validation split: MAE-pretrained {pretrained['top1']:.2f} %, "
      f"random init {random_init['top1']:.2f} % ({pretrained['top1'] - random_init['top1']:+.2f} points)")
PY
