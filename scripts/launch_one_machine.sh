#!/usr/bin/env bash
# Data-parallel SWA on one machine: one process per GPU, or N CPU processes.
#
#   scripts/launch_one_machine.sh N train.py-flags...
#   scripts/launch_one_machine.sh 4 --dataset CIFAR100 --model PreResNet164 --epochs 225 \
#       --lr_init 0.1 --wd 3e-4 --swa --swa_start 126 --swa_lr 0.05 --dir runs/prn164
#
# --batch_size is the total per step over the N processes (each runs batch_size / N).
# Resume after an interruption with the same command plus --resume auto.
# Paddle's launcher writes each process's output to $LAUNCH_LOG_DIR (default: launch_logs);
# rank 0 also prints the table here.
set -euo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 NUM_PROCESSES train.py-flags..." >&2
    exit 2
fi
processes=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
# Run from the caller's folder, so that relative --dir and --data_path mean what they say.
exec python -m paddle.distributed.launch --nproc_per_node "$processes" \
    --log_dir "${LAUNCH_LOG_DIR:-launch_logs}" "$repo/train.py" "$@"
