#!/usr/bin/env bash
# Issue-5 check: the ViG-S MAE recipe (recipes/bench_2gpu_mae_vig_s.yaml) for 100 updates at a global batch of 512
# on 1 GPU (batch 512), 2-GPU DDP, 2-GPU DeepSpeed ZeRO-2 in DeepSpeed's bf16 mode (zero2.yaml) and, optionally,
# ZeRO-2 with fp32 weights + autocast (zero2_autocast.yaml), 256 per GPU, one seed; then the summary table.
#   bash benchmarks/two_gpu_mae.sh [results_dir]        (needs 2 GPUs; writes <results_dir>/two_gpu_mae_seed<S>.json)
#   SEED=1 CONFIGS="1gpu ddp zero2 zero2_autocast" bash benchmarks/two_gpu_mae.sh
set -u
RESULTS=${1:-benchmarks/results}
SEED=${SEED:-0}
CONFIGS=${CONFIGS:-1gpu ddp zero2}
RUNS=${RUNS:-runs/bench_2gpu}/seed$SEED
RECIPE=recipes/bench_2gpu_mae_vig_s.yaml
LIMIT=${LIMIT:-180}   # seconds per run
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_NUM_THREADS=1   # torchrun sets OMP_NUM_THREADS=1 too
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # no NVLink multicast
[ -f /tmp/demo/train/sizes.json ] || python3 -m pretrain.data demo --out /tmp/demo --source digits
LAUNCH="python3 -m accelerate.commands.launch --num_processes 2 --config_file"
RUN_DIRS=(); NAMES=()
for config in $CONFIGS; do
  rm -rf "$RUNS/$config"
  echo "== $config, seed $SEED"
  case $config in
    1gpu)  # 28 loader workers: the two ranks' 2 x 14
      CUDA_VISIBLE_DEVICES=0 timeout "$LIMIT" python3 pretrain/mae.py "$RECIPE" optim.batch_size=512 data.num_workers=28 \
          train.seed="$SEED" train.output_dir="$RUNS/$config"; name="1 GPU" ;;
    ddp) timeout "$LIMIT" $LAUNCH recipes/accelerate/ddp.yaml pretrain/mae.py "$RECIPE" \
          train.seed="$SEED" train.output_dir="$RUNS/$config"; name="2-GPU DDP" ;;
    zero2) timeout "$LIMIT" $LAUNCH recipes/accelerate/zero2.yaml pretrain/mae.py "$RECIPE" \
          train.seed="$SEED" train.output_dir="$RUNS/$config"; name="2-GPU ZeRO-2 (bf16 mode)" ;;
    zero2_autocast) timeout "$LIMIT" $LAUNCH recipes/accelerate/zero2_autocast.yaml pretrain/mae.py "$RECIPE" \
          train.seed="$SEED" train.output_dir="$RUNS/$config"; name="2-GPU ZeRO-2 (fp32 weights + autocast)" ;;
    *) echo "unknown config $config"; continue ;;
  esac
  status=$?; [ $status -ne 0 ] && echo "$config run failed: $status"
  RUN_DIRS+=("$RUNS/$config"); NAMES+=("$name, seed $SEED")
done
mkdir -p "$RESULTS"
python3 benchmarks/two_gpu_mae.py "${RUN_DIRS[@]}" --names "${NAMES[@]}" --out "$RESULTS/two_gpu_mae_seed$SEED.json"
