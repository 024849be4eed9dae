"""SGD against SWA with the same budget over several seeds: mean +- std and a plot.

    python scripts/compare.py --seeds 1 2 3 4 5 --out_dir runs/compare
    python scripts/compare.py --seeds 1 2 3 4 5 --label_noise 0.3 --out_dir runs/compare-noisy
    python scripts/compare.py --dataset CIFAR10 --model PreResNet110 --epochs 150 \
        --swa_start 126 --swa_lr 0.05 --seeds 1 2 3 --out_dir runs/c10 -- --wd 3e-4

For each seed, train.py runs twice with the same number of epochs: SGD with the original
schedule (decaying to lr_init/100) and SWA (decaying to --swa_lr, then averaging). The final
test accuracy and NLL of the SGD model and of the average are read from each run's
metrics.csv. Flags after `--` go to every train.py run.
"""
import csv
import os
import queue
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import report  # noqa: E402


def build_parser():
    p = cli.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=cli.SEED, nargs="+", default=[1, 2, 3, 4, 5],
                   help="seeds to run (default: 1 2 3 4 5)")
    p.add_argument("--dataset", default="digits", help="dataset (default: digits)")
    p.add_argument("--model", default="SimpleCNN", help="model (default: SimpleCNN)")
    p.add_argument("--epochs", type=cli.POSITIVE_INT, default=60,
                   help="budget in epochs for both (default: 60)")
    p.add_argument("--swa_start", type=cli.NON_NEGATIVE_INT, default=40,
                   help="SWA start epoch (default: 40)")
    p.add_argument("--swa_lr", type=cli.POSITIVE_FLOAT, default=0.05,
                   help="SWA learning rate (default: 0.05)")
    p.add_argument("--label_noise", type=cli.number(float, 0, 1, high_open=True), default=0.0,
                   help="fraction of training labels replaced at random (default: 0)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="auto uses the GPUs when Paddle has them: one run per visible GPU at a "
                        "time; on a CPU, --jobs runs of one thread each (default: auto)")
    p.add_argument("--jobs", type=cli.POSITIVE_INT,
                   help="runs at a time on a CPU (default: the CPU count; on GPUs, their count)")
    p.add_argument("--out_dir", default="runs/compare", type=cli.path_argument,
                   help="where runs and results go (default: runs/compare)")
    p.add_argument("--overwrite", action="store_true", help="replace runs in --out_dir (default: off)")
    return p


def visible_gpus(choice):
    """The GPU ids runs may use ([] for CPU runs); --device gpu without one is an error."""
    if choice == "cpu":
        return []
    import runtime  # Paddle is imported only here: the CPU path starts fast

    if not runtime.has_gpu():
        if choice == "gpu":
            raise cli.UsageError("--device gpu: this Paddle has no usable GPU; use --device cpu")
        return []
    import paddle

    return list(range(paddle.device.cuda.device_count()))


def train_command(args, method, seed, extra, device):
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", args.dataset,
               "--model", args.model, "--epochs", str(args.epochs), "--seed", str(seed),
               "--label_noise", str(args.label_noise), "--eval_freq", str(args.epochs),
               "--save_freq", str(args.epochs), "--no_visualdl", "--device", device,
               "--dir", os.path.join(args.out_dir, f"{method}-seed{seed}")]
    if device == "cpu":
        command += ["--threads", "1"]
    if method == "swa":
        command += ["--swa", "--swa_start", str(args.swa_start), "--swa_lr", str(args.swa_lr)]
    return command + (["--overwrite"] if args.overwrite else []) + extra


def final_scores(run_dir, method):
    last = report.read_metrics(run_dir)[-1]
    prefix = "swa_te" if method == "swa" else "te"
    return last[f"{prefix}_acc"], last[f"{prefix}_loss"]


def summary(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for axis, index, label in ((axes[0], 0, "test accuracy (%)"), (axes[1], 1, "test NLL")):
        for x, method in enumerate(("sgd", "swa")):
            values = [r[index] for r in results[method].values()]
            mean, std = summary(values)
            axis.scatter([x] * len(values), values, color="gray", s=14, zorder=2)
            axis.errorbar([x + 0.15], [mean], yerr=[std], fmt="o", capsize=5, zorder=3,
                          color="tab:blue" if method == "sgd" else "tab:red")
        axis.set_xticks([0, 1], ["SGD", "SWA"])
        axis.set_xlim(-0.5, 1.6)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    fig.suptitle(f"{len(results['sgd'])} seeds, mean +- std (dots: single runs)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run_all(args, extra):
    """Every (method, seed) run, at most one per GPU or --jobs on a CPU at a time."""
    gpus = visible_gpus(args.device)
    slots = queue.Queue()
    for slot in gpus or range(args.jobs or os.cpu_count() or 1):
        slots.put(slot)
    jobs = [(method, seed) for seed in args.seeds for method in ("sgd", "swa")]

    def run(job):
        method, seed = job
        slot = slots.get()
        try:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(slot)) if gpus else None
            command = train_command(args, method, seed, extra, "gpu" if gpus else "cpu")
            return job, subprocess.run(command, capture_output=True, text=True, env=env)
        finally:
            slots.put(slot)

    results = {"sgd": {}, "swa": {}}
    with ThreadPoolExecutor(slots.qsize()) as pool:
        for (method, seed), done in pool.map(run, jobs):
            if done.returncode != 0:
                message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise cli.RunFailed(f"the {method} run with seed {seed} failed: {message}")
            results[method][seed] = final_scores(os.path.join(args.out_dir, f"{method}-seed{seed}"), method)
    return results


def compare(argv):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise cli.UsageError(f"--out_dir {args.out_dir} is a file; choose a folder")
    os.makedirs(args.out_dir, exist_ok=True)
    results = run_all(args, extra)

    with open(os.path.join(args.out_dir, "compare.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "test_acc", "test_nll"])
        for method in ("sgd", "swa"):
            for seed, (acc, nll) in sorted(results[method].items()):
                writer.writerow([method, seed, acc, nll])
    noise = f", {args.label_noise:.0%} of training labels replaced" if args.label_noise else ""
    print(f"{args.model} on {args.dataset}, {args.epochs} epochs each{noise}; SWA from epoch "
          f"{args.swa_start} at lr {args.swa_lr}; seeds {' '.join(map(str, args.seeds))}")
    print(f"{'method':8s} {'test accuracy (%)':>20s} {'test NLL':>18s}")
    for method in ("sgd", "swa"):
        acc = summary([r[0] for r in results[method].values()])
        nll = summary([r[1] for r in results[method].values()])
        print(f"{method.upper():8s} {acc[0]:12.2f} +- {acc[1]:4.2f} {nll[0]:10.4f} +- {nll[1]:6.4f}")
    out = os.path.join(args.out_dir, "compare.png")
    plot(results, out)
    print(f"per-seed results: {os.path.join(args.out_dir, 'compare.csv')}; plot: {out}")
    return 0


def main(argv=None):
    return cli.main("compare.py", compare, argv)


if __name__ == "__main__":
    sys.exit(main())
