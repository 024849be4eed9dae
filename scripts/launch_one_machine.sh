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
logs=${LAUNCH_LOG_DIR:-launch_logs}
# Ctrl-C reaches the launcher and train.py (they save and stop); this shell waits for them,
# then says on this terminal what rank 0 saved and how to continue, which the launcher's own
# output buries (rank 0 writes it to $logs/workerlog.0).
trap ':' INT TERM
status=0
# Run from the caller's folder, so that relative --dir and --data_path mean what they say.
python -m paddle.distributed.launch --nproc_per_node "$processes" --log_dir "$logs" \
    "$repo/train.py" "$@" || status=$?
if [ "$status" -ne 0 ] && [ -f "$logs/workerlog.0" ]; then
    stopped=$(grep -E '^stopped by |^train.py: error' "$logs/workerlog.0" | tail -n 1 || true)
    if [ -n "$stopped" ]; then
        echo "${stopped%%; continue with:*}" >&2
    fi
    if [[ $stopped == "stopped by "* ]]; then
        again=()
        skip=0
        for arg in "$@"; do  # the same command, with any --resume replaced by --resume auto
            if [ $skip -eq 1 ]; then skip=0; continue; fi
            case $arg in
                --resume) skip=1 ;;
                --resume=*) ;;
                *) again+=("$arg") ;;
            esac
        done
        echo "continue with: $(printf '%q ' "$0" "$processes" "${again[@]}")--resume auto" >&2
    fi
    echo "each process's output: $logs/workerlog.<rank>" >&2
fi
exit "$status"
