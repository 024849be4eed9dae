"""Train a model with SGD and keep its Stochastic Weight Average (SWA) beside it.

    python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05

Flags are those of the original PyTorch code (timgaripov/swa), so its recipes run
unchanged. Under `python -m paddle.distributed.launch` it trains data-parallel.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import runtime  # first: quiets Paddle's import-time warnings
import paddle
import paddle.distributed as dist

import data as datasets
import models
import report
import utils

EXAMPLES = """examples:
  python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05 --dir runs/digits
  python train.py --dataset CIFAR100 --data_path data --model VGG16 --epochs 300 --lr_init 0.05 --wd 5e-4 --swa --swa_start 161 --swa_lr 0.01 --dir runs/vgg16
  python train.py --dir runs/vgg16 --resume auto ...same flags...   # continue an interrupted run
"""
RUN_FILES = ["checkpoint-*.pdparams", "metrics.csv", "command.sh", "args.json", "vdl",
             "convergence.png"]


class UsageError(Exception):
    """Bad input, reported as one line with exit code 2."""


class Diverged(Exception):
    """The loss became NaN or infinite; reported as one line with exit code 1."""


# --------------------------------------------------------------------------- arguments

def _number(kind, minimum, inclusive):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if kind is float and value != value:
            raise argparse.ArgumentTypeError("expected a number, got nan")
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    return parse


def _epoch_number(text):
    """A non-negative whole number of epochs; '161.0' is accepted, as the original took floats."""
    value = _number(float, 0, True)(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole epoch number, got {text}")
    return int(value)


def _fraction(text):
    value = _number(float, 0, True)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


POSITIVE_INT, NON_NEGATIVE_INT = _number(int, 0, False), _number(int, 0, True)
POSITIVE_FLOAT, NON_NEGATIVE_FLOAT = _number(float, 0, False), _number(float, 0, True)


def build_parser():
    p = report.ArgumentParser(prog="train.py", description="SGD/SWA training (Izmailov et al., UAI 2018).",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--dir", default="out", metavar="DIR",
                     help="training directory for checkpoints and logs (default: out)")
    run.add_argument("--resume", metavar="CKPT",
                     help="checkpoint to resume training from, or 'auto' for the newest in --dir "
                          "(a fresh start if it has none) (default: None)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a --dir holding a previous run, deleting that run's "
                          "checkpoints and logs (default: off)")
    run.add_argument("--save_freq", type=POSITIVE_INT, default=25, metavar="N",
                     help="save frequency in epochs (default: 25)")
    run.add_argument("--eval_freq", type=POSITIVE_INT, default=5, metavar="N",
                     help="evaluation frequency in epochs (default: 5)")
    run.add_argument("--seed", type=int, default=1, metavar="S", help="random seed (default: 1)")
    run.add_argument("--no_visualdl", action="store_true",
                     help="do not write VisualDL logs to DIR/vdl (default: write them)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="CIFAR10",
                      help=f"{', '.join(datasets.names())}; any case (default: CIFAR10)")
    data.add_argument("--data_path", default="data", metavar="PATH",
                      help="folder holding the official dataset files (default: data)")
    data.add_argument("--batch_size", type=POSITIVE_INT, default=128, metavar="N",
                      help="input batch size per step, in total over all processes (default: 128)")
    data.add_argument("--num_workers", type=NON_NEGATIVE_INT, default=0, metavar="N",
                      help="threads assembling batches ahead; 0 assembles them in the training "
                           "loop, which is already far faster than training (default: 0)")
    data.add_argument("--label_noise", type=_fraction, default=0.0, metavar="P",
                      help="give this fraction of training labels another class, at random "
                           "(fixed by --seed); the test set is untouched (default: 0)")
    data.add_argument("--no_download", action="store_true",
                      help="never try Paddle's download when dataset files are missing (default: off)")

    model = p.add_argument_group("model and SGD")
    model.add_argument("--model", default="VGG16", metavar="MODEL",
                       help=f"{', '.join(models.names())} (default: VGG16)")
    model.add_argument("--epochs", type=POSITIVE_INT, default=200, metavar="N",
                       help="number of epochs to train (default: 200)")
    model.add_argument("--lr_init", type=POSITIVE_FLOAT, default=0.1, metavar="LR",
                       help="initial learning rate (default: 0.1)")
    model.add_argument("--momentum", type=NON_NEGATIVE_FLOAT, default=0.9, metavar="M",
                       help="SGD momentum (default: 0.9)")
    model.add_argument("--wd", type=NON_NEGATIVE_FLOAT, default=1e-4,
                       help="weight decay (default: 1e-4)")

    swa = p.add_argument_group("SWA")
    swa.add_argument("--swa", action="store_true", help="swa usage flag (default: off)")
    swa.add_argument("--swa_start", type=_epoch_number, default=161, metavar="N",
                     help="SWA start epoch number (default: 161)")
    swa.add_argument("--swa_lr", type=POSITIVE_FLOAT, default=0.05, metavar="LR",
                     help="SWA LR (default: 0.05)")
    swa.add_argument("--swa_c_epochs", type=POSITIVE_INT, default=1, metavar="N",
                     help="SWA model collection frequency/cycle length in epochs (default: 1)")
    swa.add_argument("--lr_schedule", choices=utils.SCHEDULES, default="linear",
                     help="linear: the original (constant, linear ramp to --swa_lr, constant); "
                          "cyclic: per-iteration cycles from --lr_init down to --swa_lr ending at "
                          "each average (needs --swa); descent: steps of /10 at 50%% and 75%% of "
                          "--swa_start, then --swa_lr (default: linear)")
    swa.add_argument("--init", metavar="WEIGHTS",
                     help="start from these weights: a .pdparams state dict or a checkpoint of "
                          "this code (its SGD weights); with --swa_start 0, SWA fine-tunes them. "
                          "Ignored when --resume finds a checkpoint (default: None)")

    hw = p.add_argument_group("hardware")
    hw.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                    help="auto uses the GPU when Paddle has one (default: auto)")
    hw.add_argument("--threads", type=NON_NEGATIVE_INT, default=0, metavar="N",
                    help="CPU threads per process; 0 chooses from the model and the cores "
                         "(default: 0)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.lr_schedule == "cyclic" and not args.swa:
        raise UsageError("--lr_schedule cyclic is SWA's schedule: add --swa (and --swa_start, --swa_lr)")
    if args.swa and args.swa_start > args.epochs:
        raise UsageError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}: no model "
                         "would be averaged; lower --swa_start or raise --epochs")
    try:
        args.model = models.canonical_name(args.model)
        args.dataset = datasets.canonical_name(args.dataset)
    except (ValueError, datasets.DataError) as e:
        raise UsageError(str(e)) from None
    return args


# --------------------------------------------------------------------------- run directory

def _checkpoints(directory):
    """Checkpoints in `directory` as {(epoch, step): path}."""
    found = {}
    for path in glob.glob(os.path.join(directory, "checkpoint-*.pdparams")):
        match = re.fullmatch(r"checkpoint-(\d+)(?:-step(\d+))?\.pdparams", os.path.basename(path))
        if match:
            found[(int(match[1]), int(match[2] or 0))] = path
    return found


def resolve_resume(args):
    """The checkpoint to resume from (`--resume auto`: the newest in --dir), or None."""
    if args.resume != "auto":
        return args.resume
    found = _checkpoints(args.dir)
    return found[max(found)] if found else None


def check_dir(args, resume_path):
    """Refuse an unwritable --dir, or one holding a run we would clobber; changes nothing."""
    existing = os.path.abspath(args.dir)
    while not os.path.exists(existing):  # --dir is created later, once every check passed
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "not a folder" if not os.path.isdir(existing) else "not writable"
        raise UsageError(f"cannot write to --dir {args.dir} ({existing} is {problem}); "
                         "choose another --dir")
    previous = [p for pattern in RUN_FILES for p in glob.glob(os.path.join(args.dir, pattern))]
    if previous and resume_path is None and not args.overwrite:
        raise UsageError(f"--dir {args.dir} holds a previous run ({os.path.basename(previous[0])}); "
                         "resume it with --resume auto, choose another --dir, or pass --overwrite")
    return previous


def record_run(args, resume_path, previous):
    """Create --dir, clear a run replaced by --overwrite, save the command and arguments."""
    os.makedirs(args.dir, exist_ok=True)
    if resume_path is None:
        for path in previous:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    for stale in glob.glob(os.path.join(args.dir, "checkpoint-*.pdparams.*.tmp")):
        os.unlink(stale)  # left by a save that was killed; never a complete checkpoint
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)
    with open(os.path.join(args.dir, "command.sh"), "a" if resume_path else "w") as f:
        f.write(("# resumed from " + resume_path + "\n" if resume_path else "") + command + "\n")
    with open(os.path.join(args.dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


# --------------------------------------------------------------------------- training

class StopFlag:
    """Set by SIGTERM/SIGINT while installed (`with StopFlag() as stop:`); training then
    finishes its step, saves and exits. The previous handlers come back on exit."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def __call__(self, signum, frame):
        self.signal = signum

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, distributed):
        if not distributed:
            return self.signal is not None
        # Every rank must stop at the same step or the next gradient all-reduce hangs.
        flag = paddle.to_tensor(1.0 if self.signal is not None else 0.0)
        dist.all_reduce(flag)
        if flag.item() > 0 and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was signalled
        return flag.item() > 0


def with_learning_rate(batches, optimizer, lr_at, first_step):
    """Yield `batches`, setting the optimizer's rate to lr_at(step) before each one."""
    for step, batch in enumerate(batches, first_step):
        optimizer.set_lr(lr_at(step))
        yield batch


def evaluation_epoch(epoch, eval_freq, epochs):
    """Whether 0-based `epoch` evaluates (the original's rule: first, every eval_freq, last)."""
    return epoch == 0 or epoch % eval_freq == eval_freq - 1 or epoch == epochs - 1


def make_loaders(ds, batch_size, seed, num_workers, env):
    per_process = batch_size // env.world_size
    common = dict(mean=ds.mean, std=ds.std, rank=env.rank, world_size=env.world_size,
                  num_workers=num_workers)
    return {
        "train": datasets.Batches(ds.train, per_process, shuffle=True, augment=ds.augment,
                                  seed=seed, even_shards=True, **common),
        # The BatchNorm refresh sees each training sample once over all ranks (another draw
        # of order and augmentation than training's), evaluation each test sample once.
        "bn": datasets.Batches(ds.train, per_process, shuffle=True, augment=ds.augment,
                               seed=seed, **common),
        "test": datasets.Batches(ds.test, per_process, **common),
    }


@dataclass
class Run:
    """What a training run is made of, built once by `setup`."""
    args: argparse.Namespace
    env: runtime.Distributed
    ds: datasets.Data
    loaders: dict
    model: paddle.nn.Layer          # the SGD model
    net: paddle.nn.Layer            # the model as trained: DataParallel-wrapped when launched
    optimizer: paddle.optimizer.Optimizer
    swa: utils.SWA | None
    metrics: report.MetricsFile | None   # rank 0 only, like the two below
    visualdl: report.VisualDLLog | None
    progress: report.Progress | None

    @property
    def columns(self):
        """The table's columns: the SWA ones only when averaging."""
        return report.COLUMNS if self.swa else report.COLUMNS[:6] + report.COLUMNS[-1:]

    def log(self, *args, **kwargs):
        if self.env.is_master:
            print(*args, **kwargs)

    def record(self, row):
        """Print the epoch's table row and log it to metrics.csv and VisualDL (rank 0)."""
        self.log(report.format_row(row, self.columns), flush=True)
        if self.metrics:
            self.metrics.append(row)
        if self.visualdl:
            self.visualdl.add(row)

    def save(self, epoch, step=0, partial=None):
        """Checkpoint on rank 0 (the other ranks hold the same weights)."""
        if not self.env.is_master:
            return None
        swa = self.swa.state_dict() if self.swa else {"swa_state_dict": None, "swa_n": None}
        return utils.save_checkpoint(
            self.args.dir, epoch, step, state_dict=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), **swa, rng=utils.get_rng_state(),
            partial=partial, args=vars(self.args), model_name=self.args.model,
            dataset=self.ds.name, num_classes=self.ds.num_classes,
            in_channels=self.ds.image_shape[0])


def restore(path, model, optimizer, swa):
    """Load a checkpoint into the run; returns (epoch, step, partial sums)."""
    ckpt = utils.load_checkpoint(path)
    try:
        utils.load_weights(model, ckpt["state_dict"], source=path)
        optimizer.set_state_dict(ckpt["optimizer"])
        if swa is not None and ckpt.get("swa_state_dict") is not None:
            swa.set_state_dict(ckpt)
    except (ValueError, KeyError) as e:
        raise utils.CheckpointError(f"cannot resume from {path}: {e}") from None
    if ckpt.get("rng") is not None:
        utils.set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), int(ckpt.get("step") or 0), ckpt.get("partial")


def load_init(path, model):
    """Load starting weights from a plain state dict or a checkpoint's SGD weights."""
    if not os.path.isfile(path):
        raise UsageError(f"--init {path} does not exist")
    try:
        weights = paddle.load(path)
    except Exception as e:  # paddle.load raises many types for bad bytes
        raise UsageError(f"--init {path} is unreadable or not a Paddle file ({type(e).__name__})") from None
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    try:
        utils.load_weights(model, weights if isinstance(weights, dict) else {}, source=f"--init {path}")
    except ValueError as e:
        raise UsageError(str(e)) from None


def setup(args):
    """Build the run and restore --resume; returns (run, (epoch, step, partial sums))."""
    env = runtime.distributed_from_env()
    device = runtime.select_device(args.device, env.gpu_id)
    cpu = runtime.tune_cpu(args.threads, args.model, env.local_world_size) if device == "cpu" else ""
    if args.batch_size % env.world_size:
        raise UsageError(f"--batch_size {args.batch_size} is the total over {env.world_size} "
                         "processes and must divide evenly between them")
    if env.enabled:
        dist.init_parallel_env()
    resume_path = resolve_resume(args) if args.resume else None
    if env.enabled:
        dist.barrier()  # every rank has chosen its checkpoint before rank 0 writes one
    previous = check_dir(args, resume_path) if env.is_master else []

    ds = datasets.load_dataset(args.dataset, args.data_path, download=not args.no_download)
    if args.label_noise:
        ds.train = datasets.with_label_noise(ds.train, args.label_noise, ds.num_classes, args.seed)
    paddle.seed(args.seed)
    model = models.build(args.model, ds.num_classes, ds.image_shape[0])
    if args.init and not resume_path:
        load_init(args.init, model)
    optimizer = paddle.optimizer.Momentum(
        learning_rate=args.lr_init, momentum=args.momentum, weight_decay=args.wd or None,
        parameters=[p for p in model.parameters() if p.trainable])
    swa = utils.SWA(model) if args.swa else None
    start = restore(resume_path, model, optimizer, swa) if resume_path else (0, 0, None)

    metrics = visualdl = progress = None
    if env.is_master:  # every check has passed: now --dir may change
        record_run(args, resume_path, previous)
        metrics = report.MetricsFile(args.dir, start[0])
        visualdl = None if args.no_visualdl else report.VisualDLLog(args.dir)
        progress = report.Progress()
    run = Run(args, env, ds, make_loaders(ds, args.batch_size, args.seed, args.num_workers, env),
              model, paddle.DataParallel(model) if env.enabled else model,  # never the average
              optimizer, swa, metrics, visualdl, progress)
    if not resume_path:
        run.save(0)
    run.log(f"{args.model} on {ds.name} ({len(ds.train)} train / {len(ds.test)} test), {device}"
            + (f", {cpu}" if cpu else "") + f"; batch {args.batch_size} per step"
            + (f" = {env.world_size} processes x {args.batch_size // env.world_size}"
               if env.enabled else "")
            + ("; SWA" if swa else "; SGD") + f", {args.lr_schedule} schedule"
            + (f"; resuming from {resume_path}" if resume_path else "")
            + (f"; starting from {args.init}" if args.init and not resume_path else ""))
    return run, start


def train(args):
    run, (start_epoch, start_step, partial) = setup(args)
    try:
        with StopFlag() as stop:
            code = train_loop(run, start_epoch, start_step, partial, stop)
    finally:
        if run.visualdl:
            run.visualdl.close()
    if code == 0 and run.env.is_master:
        path = report.plot_runs([args.dir], os.path.join(args.dir, "convergence.png"))
        run.log(f"plot: {path}" + ("" if args.no_visualdl else
                                   f"; curves in VisualDL: visualdl --logdir {os.path.join(args.dir, 'vdl')}"))
    return code


def train_loop(run, start_epoch, start_step, partial, stop):
    """Epochs from `start_epoch` (batch `start_step`) to the end; returns the exit code."""
    args = run.args
    run.log(report.format_row({}, run.columns, header=True))
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        tr, lr = train_epoch(run, epoch, start_step, partial, stop)
        if start_step + tr["steps"] < len(run.loaders["train"]):
            return interrupted(run, epoch, start_step + tr["steps"], tr, stop.signal)
        row = {"ep": epoch + 1, "lr": lr, "tr_loss": tr["loss"], "tr_acc": tr["accuracy"],
               "img_s": tr["steps"] * args.batch_size / max(time.time() - started, 1e-9)}
        row.update(evaluate_and_average(run, epoch))
        if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
            run.save(epoch + 1)
        row["time"] = time.time() - started
        run.record(row)
        if stop.signal is not None and epoch + 1 < args.epochs:
            return interrupted(run, epoch + 1, 0, None, stop.signal)
        start_step, partial = 0, None
    return 0


def train_epoch(run, epoch, start_step, partial, stop):
    """SGD over 0-based `epoch` from batch `start_step`, the rate set before every batch.

    Returns run_epoch's result (fewer steps if a signal stopped it) and the rate at the
    epoch's first batch.
    """
    args, env = run.args, run.env
    steps = len(run.loaders["train"])
    if start_step == 0:
        paddle.seed(args.seed * 100_003 + env.rank * 1_009 + epoch)  # dropout; epoch-exact resume

    def lr_at(step):
        return utils.learning_rate(args.lr_schedule, epoch, step, steps, args.lr_init, args.epochs,
                                   args.swa_start if run.swa else None, args.swa_lr,
                                   args.swa_c_epochs)

    def on_step(step, sums):
        if run.progress:
            run.progress.update(start_step + step + 1, sums)
        return stop.requested(env.enabled)

    if run.progress:
        run.progress.start(epoch + 1, args.epochs, steps, start_step)
    batches = with_learning_rate(run.loaders["train"](epoch, start_step), run.optimizer, lr_at,
                                 start_step)
    try:
        result = utils.run_epoch(batches, run.net, run.optimizer, on_step=on_step,
                                 distributed=env.enabled, totals=partial)
    except utils.NonFiniteLoss as e:
        raise Diverged(f"loss became {e.value} at epoch {epoch + 1} step {start_step + e.step + 1}")
    finally:
        if run.progress:
            run.progress.clear()
    return result, lr_at(0)


def evaluate_and_average(run, epoch):
    """After SGD epoch `epoch`: test the SGD model, add it to the average, test the average
    (after a BatchNorm refresh) when due. Returns the row's test columns."""
    args, env, swa = run.args, run.env, run.swa
    if env.enabled:
        utils.sync_bn_statistics(run.model)
    columns = {}
    evaluate = evaluation_epoch(epoch, args.eval_freq, args.epochs)
    if evaluate:
        te = utils.run_epoch(run.loaders["test"](), run.model, distributed=env.enabled)
        columns.update(te_loss=te["loss"], te_acc=te["accuracy"])
    averaged = swa is not None and utils.is_swa_epoch(epoch + 1, args.swa_start, args.swa_c_epochs)
    if averaged:
        swa.update(run.model)
    if swa and swa.n and (averaged and evaluate or epoch + 1 == args.epochs):
        swa.bn_update(run.loaders["bn"](epoch, stream=1), distributed=env.enabled)
        te = utils.run_epoch(run.loaders["test"](), swa.model, distributed=env.enabled)
        columns.update(swa_te_loss=te["loss"], swa_te_acc=te["accuracy"])
    return columns


def interrupted(run, epoch, step, totals, signum):
    """Save where training stopped and say how to continue; returns the exit code."""
    partial = {k: totals[k] for k in ("loss_sum", "correct", "count")} if totals else None
    path = run.save(epoch, step, partial)
    if path:
        print(f"stopped by {signal.Signals(signum).name} at epoch {epoch + (1 if step else 0)}"
              f"{f' step {step}' if step else ''}; saved {path}; continue with the same command "
              "plus --resume auto", file=sys.stderr, flush=True)
    return 128 + signum


def main(argv=None):
    try:
        return train(parse_args(argv))
    except (UsageError, datasets.DataError, utils.CheckpointError, runtime.DeviceError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"train.py: error: {e}; training stopped and the checkpoints in --dir are those "
              "saved before; lower --lr_init or --swa_lr", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
