"""SGD against SWA (and SWAG) with the same budget over several seeds: mean +- std and a plot.

    python scripts/compare.py --seeds 1 2 3 4 5 --out_dir runs/compare
    python scripts/compare.py --seeds 1 2 3 4 5 --label_noise 0.3 --swag_samples 30 --out_dir runs/noisy
    python scripts/compare.py --dataset CIFAR10 --model PreResNet110 --epochs 150 \
        --swa_start 126 --swa_lr 0.05 --seeds 1 2 3 --out_dir runs/c10 -- --wd 3e-4

For each seed, train.py runs twice with the same number of epochs: SGD with the original
schedule (decaying to lr_init/100) and SWA (decaying to --swa_lr, then averaging; with
--swag_samples it also fits SWAG). eval.py then scores the final checkpoints on the test set:
accuracy, NLL and ECE of SGD and SWA, and with --swag_samples of SWAG-diagonal and SWAG's
Bayesian model averages of that many samples, at eval.py's covariance scales (the SWAG
authors': 0.5 for SWAG, 1 for SWAG-diagonal), printed with the results. Flags after `--` go
to every train.py run.
Every run's command is checked by train.py's own flag checks before anything is trained or
--out_dir is made: a run train.py would refuse is one line, exit 2.

Run again into the same --out_dir (after Ctrl-C, or with more --seeds or --methods), it goes on
from there: finished runs and their scores are reused, interrupted ones resumed (train.py
--resume auto, which refuses a run whose flags differ), new ones trained; --overwrite trains
everything again. A line per finished run says which it was and how long it took.
"""
import contextlib
import csv
import io
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import cli, errors, files  # noqa: E402

METRICS = ("accuracy", "nll", "ece")
# method -> (what eval.py prints: the name in the results)
METHODS = {"sgd": {"SGD": "SGD"}, "swa": {"SWA": "SWA"}, "fge": {"FGE": "FGE"},
           "swa1.5": {"SWA": "SWA 1.5 budgets"}}
ORDER = ("SGD", "FGE", "SWA", "SWA 1.5 budgets", "SWAG-diag", "SWAG")
LABELS = {"accuracy": "test accuracy (%)", "nll": "test NLL", "ece": "test ECE (%)"}


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
    p.add_argument("--swag_samples", type=cli.NON_NEGATIVE_INT, default=0, metavar="S",
                   help="also fit SWAG in the SWA runs and score SWAG-diagonal and SWAG with S "
                        "samples each (default: 0, off)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["sgd", "swa"],
                   help="what to train and score: sgd, swa (with SWAG when --swag_samples), fge "
                        "(eval.py --ensemble of its snapshots), swa1.5 (SWA trained 1.5 budgets, "
                        "as the paper reports) (default: sgd swa)")
    p.add_argument("--fge_cycle", type=cli.number(int, 2), default=2,
                   help="FGE's cycle in epochs (default: 2)")
    p.add_argument("--fge_lr1", type=cli.POSITIVE_FLOAT, default=0.05,
                   help="FGE's rate at a cycle's ends (default: 0.05)")
    p.add_argument("--fge_lr2", type=cli.POSITIVE_FLOAT, default=0.005,
                   help="FGE's rate at a cycle's midpoint (default: 0.005)")
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
    import harness  # Paddle is imported only here: the CPU path starts fast

    harness.prepare()  # before Paddle loads
    from harness import runtime

    if not runtime.has_gpu():
        if choice == "gpu":
            raise errors.UsageError("--device gpu: this Paddle has no usable GPU; use --device cpu")
        return []
    import paddle

    return list(range(paddle.device.cuda.device_count()))


def epochs_of(args, method):
    return int(round(1.5 * args.epochs)) if method == "swa1.5" else args.epochs


def train_command(args, method, seed, extra, device):
    epochs = epochs_of(args, method)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", args.dataset,
               "--model", args.model, "--epochs", str(epochs), "--seed", str(seed),
               "--label_noise", str(args.label_noise), "--eval_freq", str(epochs),
               "--save_freq", str(epochs), "--no_visualdl", "--device", device,
               "--dir", run_dir(args, method, seed)]
    if device == "cpu":
        command += ["--threads", "1"]
    if method in ("swa", "swa1.5"):
        command += ["--swa", "--swa_start", str(args.swa_start), "--swa_lr", str(args.swa_lr)]
        command += ["--swag"] if args.swag_samples and method == "swa" else []
    if method == "fge":
        command += ["--fge", "--swa_start", str(args.swa_start), "--swa_lr", str(args.swa_lr),
                    "--fge_cycle", str(args.fge_cycle), "--fge_lr1", str(args.fge_lr1),
                    "--fge_lr2", str(args.fge_lr2)]
    # a run already in --out_dir is continued (or found finished); train.py refuses, naming the
    # flag, one whose flags differ
    return command + (["--overwrite"] if args.overwrite else ["--resume", "auto"]) + extra


def eval_commands(args, method, seed, device):
    """eval.py calls scoring a finished run: ({weights eval.py prints: method}, command)."""
    path = os.path.join(run_dir(args, method, seed), f"checkpoint-{epochs_of(args, method)}.pdparams")
    base = [sys.executable, os.path.join(ROOT, "eval.py"), "--model_path", path, "--device", device]
    if method == "fge":
        return [(METHODS[method], base + ["--ensemble"])]
    if method != "swa" or not args.swag_samples:
        return [(METHODS[method], base)]
    swag = base + ["--swag_samples", str(args.swag_samples)]
    return [({"SWA": "SWA", "SWAG": "SWAG"}, swag), ({"SWAG": "SWAG-diag"}, swag + ["--swag_diag"])]


def check_runs(args, extra):
    """Refuse, before anything is trained or created, a run that train.py would refuse: each
    run's command goes through train.py's own parsing and checks of its flags."""
    from harness import config  # Paddle with it: only once compare.py's own flags have passed

    for method in args.methods:
        for seed in args.seeds:
            argv = train_command(args, method, seed, extra, "cpu")[2:]  # past python train.py
            problem = _refusal(config.parse_args, argv)
            if problem:
                raise errors.UsageError(f"train.py would refuse the {method} run with seed {seed}: "
                                        f"{problem}")


def _refusal(parse, argv):
    """What `parse(argv)` refuses, as one line, or None. argparse prints its own errors and
    exits: they are caught here, so that compare.py says which run it was."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            parse(argv)
    except errors.UsageError as e:
        return str(e)
    except SystemExit as e:  # argparse: "train.py: error: ...", or --help after --
        if not e.code:
            return "--help is no training flag; see python train.py --help"
        lines = printed.getvalue().strip().splitlines() or ["see python train.py --help"]
        return lines[-1].removeprefix("train.py: error: ")
    return None


def run_dir(args, method, seed):
    return os.path.join(args.out_dir, f"{method}-seed{seed}")


def parse_scores(output):
    """{weights: {accuracy, nll, ece}} from eval.py's lines; SWAG's also holds the covariance
    `scale` eval.py says it sampled at."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"(SGD|SWA|SWAG|FGE)\b.*: accuracy ([\d.]+)%  NLL ([\d.]+)  ECE ([\d.]+)%", line)
        if match:
            found[match[1]] = dict(zip(METRICS, map(float, match.groups()[1:])))
            scale = re.match(r"SWAG \(\d+ samples, scale ([^,]+),", line)
            if scale:
                found[match[1]]["scale"] = float(scale[1])
    return found


def run_all(args, extra):
    """Train and score every (method, seed), at most one per GPU or --jobs on a CPU at a time.
    Returns {method: {seed: {metric: value}}}."""
    gpus = visible_gpus(args.device)
    slots = queue.Queue()
    for slot in gpus or range(args.jobs or os.cpu_count() or 1):
        slots.put(slot)
    device = "gpu" if gpus else "cpu"

    jobs = [(method, seed) for seed in args.seeds for method in args.methods]
    progress = Progress(len(jobs))

    def run(job):
        method, seed = job
        slot = slots.get()
        try:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(slot)) if gpus else None
            started = time.time()
            trained = run_command(train_command(args, method, seed, extra, device), env, job)
            scores = {}
            for names, command in eval_commands(args, method, seed, device):
                printed = scored(run_dir(args, method, seed), command, env, job)
                scores.update({name: printed[weights] for weights, name in names.items()})
            progress.done(job, trained, time.time() - started)
            return job, scores
        finally:
            slots.put(slot)

    results = {}
    with ThreadPoolExecutor(slots.qsize()) as pool:
        for (_, seed), scores in pool.map(run, jobs):
            for name, values in scores.items():
                results.setdefault(name, {})[seed] = values
    return {name: results[name] for name in ORDER if name in results}


class Progress:
    """One line per finished run on stderr: which, how its training went, how long."""

    def __init__(self, total):
        self.total, self.count, self.lock = total, 0, threading.Lock()

    def done(self, job, trained, seconds):
        how = ("already trained" if "is finished" in trained else
               "resumed and trained" if "resuming from" in trained else "trained")
        with self.lock:
            self.count += 1
            print(f"[{self.count}/{self.total}] {job[0]} seed {job[1]}: {how} and scored in "
                  f"{seconds:.0f} s", file=sys.stderr, flush=True)


def run_command(command, env, job):
    """Run `command`; its stdout, or RunFailed naming the run and the command's last line."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise errors.RunFailed(f"the {job[0]} run with seed {job[1]} failed: {message}")
    return done.stdout


SCORES = "compare-scores.json"  # in each run's folder: eval.py's scores of its checkpoint


def scored(directory, command, env, job):
    """eval.py's scores for `command`, reused from `directory`'s record while the checkpoint
    it scores is the one scored then (same size and time), else computed and recorded."""
    path = os.path.join(directory, SCORES)
    checkpoint = command[command.index("--model_path") + 1]
    stat = os.stat(checkpoint)
    key, stamp = " ".join(command[2:]), [stat.st_size, stat.st_mtime_ns]
    record = files.read_json_dict(path) or {}
    if record.get(key, {}).get("checkpoint") == stamp:
        return record[key]["scores"]
    scores = parse_scores(run_command(command, env, job))
    record[key] = {"checkpoint": stamp, "scores": scores}
    files.write_json(path, record)
    return scores


def summary(values):
    """(mean, std) of `values`; std is None for a single value (there is no spread to show)."""
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)


def spread(mean, std, width, digits):
    """`mean +- std`, or the mean alone (padded alike) when there is one seed."""
    text = f"{mean:{width}.{digits}f}"
    return text + (f" +- {std:{digits + 2}.{digits}f}" if std is not None else " " * (digits + 6))


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"SGD": "tab:blue", "SWA": "tab:red", "SWAG-diag": "tab:olive", "SWAG": "tab:green",
               "FGE": "tab:purple", "SWA 1.5 budgets": "tab:orange"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for axis, metric in zip(axes, METRICS):
        for x, (method, by_seed) in enumerate(results.items()):
            values = [v[metric] for v in by_seed.values()]
            mean, std = summary(values)
            axis.scatter([x] * len(values), values, color="gray", s=14, zorder=2)
            axis.errorbar([x + 0.15], [mean], yerr=None if std is None else [std], fmt="o",
                          capsize=5, zorder=3, color=colours[method])
        # "SWA 1.5 budgets" beside "SWA" overlapped on one line
        axis.set_xticks(range(len(results)), [m.replace(" ", "\n", 1) for m in results], fontsize=8)
        axis.set_xlim(-0.5, len(results) - 0.4)
        axis.set_ylabel(LABELS[metric])
        axis.grid(alpha=0.3)
    seeds = len(next(iter(results.values())))
    fig.suptitle(f"{seeds} seeds, mean +- std (dots: single runs)" if seeds > 1 else "1 seed")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def compare(argv):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.swag_samples and "swa" not in args.methods:
        raise errors.UsageError("--swag_samples fits SWAG in the swa runs: add swa to --methods")
    if len(set(args.seeds)) != len(args.seeds):
        raise errors.UsageError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give "
                                "each seed once")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise errors.UsageError(f"--out_dir {args.out_dir} is a file; choose a folder")
    check_runs(args, extra)
    os.makedirs(args.out_dir, exist_ok=True)
    results = run_all(args, extra)
    with open(os.path.join(args.out_dir, "compare.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "test_acc", "test_nll", "test_ece"])
        for method, by_seed in results.items():
            for seed, values in sorted(by_seed.items()):
                writer.writerow([method, seed] + [values[m] for m in METRICS])
    noise = f", {args.label_noise:.0%} of training labels replaced" if args.label_noise else ""
    swag = ""
    if args.swag_samples:  # the scales eval.py used (its defaults: the SWAG authors' values)
        scales = {name: sorted({v["scale"] for v in results[name].values()})
                  for name in ("SWAG", "SWAG-diag") if name in results}
        swag = f"; SWAG from {args.swag_samples} samples" + "".join(
            f", {name} at scale {'/'.join(f'{s:g}' for s in values)}" for name, values in scales.items())
    print(f"{args.model} on {args.dataset}, {args.epochs} epochs each{noise}; SWA from epoch "
          f"{args.swa_start} at lr {args.swa_lr}{swag}; seeds {' '.join(map(str, args.seeds))}")
    print(f"{'method':16s} {'test accuracy (%)':>20s} {'test NLL':>18s} {'test ECE (%)':>16s}")
    for method, by_seed in results.items():
        cells = [summary([v[m] for v in by_seed.values()]) for m in METRICS]
        print(f"{method:16s} {spread(*cells[0], 12, 2)} {spread(*cells[1], 10, 4)} "
              f"{spread(*cells[2], 9, 2)}")
    out = os.path.join(args.out_dir, "compare.png")
    plot(results, out)
    print(f"per-seed results: {os.path.join(args.out_dir, 'compare.csv')}; plot: {out}")
    return 0


def main(argv=None):
    return cli.main("compare.py", compare, argv)


if __name__ == "__main__":
    sys.exit(main())
