#!/usr/bin/env bash
# Data-parallel SWA on several machines. Run the same command on every machine, each with
# its own RANK (0 on the machine at MASTER, which prints the table and writes checkpoints).
#
#   scripts/launch_machines.sh MASTER_IP:PORT NUM_MACHINES RANK PROCESSES_PER_MACHINE train.py-flags...
#   # machine 0 (10.0.0.1):
#   scripts/launch_machines.sh 10.0.0.1:29500 2 0 8 --dataset CIFAR100 --model WideResNet28x10 ... --dir /shared/runs/wrn
#   # machine 1:
#   scripts/launch_machines.sh 10.0.0.1:29500 2 1 8 --dataset CIFAR100 --model WideResNet28x10 ... --dir /shared/runs/wrn
#
# --batch_size is the total per step over all processes of all machines. To resume, every
# machine must see the same checkpoint (keep --dir on a shared file system, or copy it) and
# run the same command plus --resume auto.
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 MASTER_IP:PORT NUM_MACHINES RANK PROCESSES_PER_MACHINE train.py-flags..." >&2
    exit 2
fi
master=$1 machines=$2 rank=$3 processes=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
# Run from the caller's folder, so that relative --dir and --data_path mean what they say.
exec python -m paddle.distributed.launch --master "$master" --nnodes "$machines" --rank "$rank" \
    --nproc_per_node "$processes" --log_dir "${LAUNCH_LOG_DIR:-launch_logs}" "$repo/train.py" "$@"
