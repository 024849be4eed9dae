"""Train a model with SGD and keep its Stochastic Weight Average (SWA) beside it.

    python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05

Flags are those of the original PyTorch code (timgaripov/swa), so its recipes run
unchanged. Under `python -m paddle.distributed.launch` it trains data-parallel.
"""
import argparse
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass

import runtime  # first: sets the math library's path and quiets Paddle's import-time warnings
import numpy as np
import paddle

import checkpoints
import cli
import data as datasets
import engine
import models
import report
import rundir
import schedules
import utils

EXAMPLES = """examples:
  python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05 --dir runs/digits
  python train.py --dataset CIFAR100 --data_path data --model VGG16 --epochs 300 --lr_init 0.05 --wd 5e-4 --swa --swa_start 161 --swa_lr 0.01 --dir runs/vgg16
  python train.py --dir runs/vgg16 --resume auto ...same flags...   # continue an interrupted run
"""
# What defines a run: a resume with any of these changed is refused. The other flags may
# change on resume (--epochs only upward); so may the number of processes, at an epoch end.
IDENTITY = ("model", "dataset", "seed", "batch_size", "label_noise", "normalization", "lr_init",
            "momentum", "wd", "lr_schedule", "swa", "swa_start", "swa_lr", "swa_c_epochs",
            "ema_decay", "swag", "swag_rank")
MAY_CHANGE = ("--epochs (upward)", "--eval_freq", "--save_freq", "--dir", "--data_path",
              "--num_workers", "--no_download", "--no_visualdl", "--init", "--device", "--threads",
              "the number of processes (at an epoch's end)")
# Values of flags newer than a checkpoint, as the code that wrote it behaved.
LEGACY = {"ema_decay": None, "swag": False, "swag_rank": 20, "normalization": "dataset"}
STEP_SYNC_GPU = 10  # training steps between reads of the loss from a GPU (a CPU reads every step)


class Diverged(cli.RunFailed):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- arguments

def build_parser():
    p = cli.ArgumentParser(prog="train.py", description="SGD/SWA training (Izmailov et al., UAI 2018).",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--dir", default="out", metavar="DIR", type=cli.path_argument,
                     help="training directory for checkpoints and logs; one run per directory, "
                          "written by one process at a time (default: out)")
    run.add_argument("--resume", metavar="CKPT",
                     help="checkpoint to resume from, or 'auto' for the newest in --dir (a fresh "
                          "start if it has none). The flags must be the run's, except "
                          f"{', '.join(MAY_CHANGE)} (default: None)")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh in a --dir holding a previous run, deleting it; with "
                          "--resume, discard the checkpoints and rows after the one resumed "
                          "(default: off)")
    run.add_argument("--save_freq", type=cli.POSITIVE_INT, default=25, metavar="N",
                     help="save frequency in epochs (default: 25)")
    run.add_argument("--eval_freq", type=cli.POSITIVE_INT, default=5, metavar="N",
                     help="evaluation frequency in epochs (default: 5)")
    run.add_argument("--seed", type=cli.SEED, default=1, metavar="S",
                     help="random seed, 0 to 2^32-1 (default: 1)")
    run.add_argument("--no_visualdl", action="store_true",
                     help="do not write VisualDL logs to DIR/vdl (default: write them)")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="CIFAR10",
                      help=f"{', '.join(datasets.names())}; any case (default: CIFAR10)")
    data.add_argument("--data_path", default="data", metavar="PATH", type=cli.path_argument,
                      help="folder holding the official dataset files (default: data)")
    data.add_argument("--batch_size", type=cli.POSITIVE_INT, default=128, metavar="N",
                      help="input batch size per step, in total over all processes (default: 128)")
    data.add_argument("--num_workers", type=cli.NON_NEGATIVE_INT, default=0, metavar="N",
                      help="threads assembling batches ahead; 0 assembles them in the training "
                           "loop, which is already far faster than training (default: 0)")
    data.add_argument("--normalization", choices=["model", "dataset"], default="model",
                      help="per-channel input normalisation: 'model' uses the original code's "
                           "constants for the VGGs and ResNets on 3-channel images (the dataset's "
                           "statistics otherwise), 'dataset' the training set's own (default: model)")
    data.add_argument("--label_noise", type=cli.number(float, 0, 1, high_open=True), default=0.0,
                      metavar="P", help="give this fraction of training labels another class, at "
                                        "random (fixed by --seed); the test set is untouched (default: 0)")
    data.add_argument("--no_download", action="store_true",
                      help="never try Paddle's download when dataset files are missing (default: off)")

    model = p.add_argument_group("model and SGD")
    model.add_argument("--model", default="VGG16", metavar="MODEL",
                       help=f"{', '.join(models.names())} (default: VGG16)")
    model.add_argument("--epochs", type=cli.POSITIVE_INT, default=200, metavar="N",
                       help="number of epochs to train (default: 200)")
    model.add_argument("--lr_init", type=cli.POSITIVE_FLOAT, default=0.1, metavar="LR",
                       help="initial learning rate (default: 0.1)")
    model.add_argument("--momentum", type=cli.number(float, 0, 1, high_open=True), default=0.9,
                       metavar="M", help="SGD momentum, 0 <= M < 1 (default: 0.9)")
    model.add_argument("--wd", type=cli.NON_NEGATIVE_FLOAT, default=1e-4,
                       help="weight decay (default: 1e-4)")

    swa = p.add_argument_group("SWA")
    swa.add_argument("--swa", action="store_true", help="swa usage flag (default: off)")
    swa.add_argument("--swa_start", type=cli.number(int, 0), default=161, metavar="N",
                     help="SWA start epoch number (default: 161)")
    swa.add_argument("--swa_lr", type=cli.POSITIVE_FLOAT, default=0.05, metavar="LR",
                     help="SWA LR (default: 0.05)")
    swa.add_argument("--swa_c_epochs", type=cli.POSITIVE_INT, default=1, metavar="N",
                     help="SWA model collection frequency/cycle length in epochs (default: 1)")
    swa.add_argument("--lr_schedule", choices=schedules.SCHEDULES, default="linear",
                     help="linear: the original (constant, linear ramp to --swa_lr, constant); "
                          "cyclic: per-iteration cycles from --lr_init down to --swa_lr ending at "
                          "each average (needs --swa); descent: steps of /10 at 50%% and 75%% of "
                          "--swa_start, then --swa_lr (default: linear)")
    swa.add_argument("--ema_decay", type=cli.number(float, 0, 1, high_open=True), metavar="D",
                     help="keep an exponential moving average avg = D * avg + (1 - D) * model "
                          "instead of the equal average, updated after every step from epoch "
                          "--swa_start on (needs --swa; e.g. 0.999) (default: None, SWA's equal average)")
    swa.add_argument("--swag", action="store_true",
                     help="also fit SWA-Gaussian at the averaging epochs, for eval.py "
                          "--swag_samples (needs --swa); holds --swag_rank + 2 copies of the "
                          "weights (default: off)")
    swa.add_argument("--swag_rank", type=cli.number(int, 2), default=20, metavar="K",
                     help="deviations SWAG keeps for its low-rank covariance (default: 20)")
    swa.add_argument("--init", metavar="WEIGHTS",
                     help="start from these weights: a .pdparams state dict or a checkpoint of "
                          "this code (its SGD weights); with --swa_start 0, SWA fine-tunes them. "
                          "Ignored when --resume finds a checkpoint (default: None)")

    cli.add_hardware_flags(p.add_argument_group("hardware"))
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.lr_schedule == "cyclic" and not args.swa:
        raise cli.UsageError("--lr_schedule cyclic is SWA's schedule: add --swa (and --swa_start, --swa_lr)")
    for flag in ("ema_decay", "swag"):
        if getattr(args, flag) not in (None, False) and not args.swa:
            raise cli.UsageError(f"--{flag} needs --swa (it says when averaging starts: --swa_start)")
    if args.swag and args.ema_decay is not None:
        raise cli.UsageError("--swag fits a Gaussian around SWA's equal average: drop --ema_decay")
    try:
        args.model = models.canonical_name(args.model)
        args.dataset = datasets.canonical_name(args.dataset)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    check_epochs(args)
    return args


def check_epochs(args):
    if args.swa and args.swa_start > args.epochs:
        raise cli.UsageError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}: no "
                             "model would be averaged; lower --swa_start or raise --epochs")


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


def step_seed(seed, rank, epoch, step):
    """The seed of Paddle's generator (dropout) before a step: a function of where training
    is, so a resume draws the same masks on any device set."""
    words = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def scheduled(batches, optimizer, lr_at, seed_at, first_step):
    """Yield `batches`, setting the optimizer's rate and the generator's seed before each."""
    for step, batch in enumerate(batches, first_step):
        optimizer.set_lr(lr_at(step))
        paddle.seed(seed_at(step))
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


def load_data(args, env):
    """The dataset on every rank; a missing one is downloaded once: by rank 0 first, then by
    the first process of each other machine (which finds it there on a shared disk)."""
    def load(my_turn, download):
        return datasets.load_dataset(args.dataset, args.data_path, download=download) if my_turn else None

    download = not args.no_download
    ds = env.together(load, env.rank == 0, download)
    ds = env.together(load, ds is None and env.local_rank == 0, download) or ds
    ds = env.together(load, ds is None, False) or ds
    if args.normalization == "model" and ds.image_shape[0] == 3 and models.normalization(args.model):
        mean, std = models.normalization(args.model)
        ds = dataclasses.replace(ds, mean=np.array(mean, np.float32), std=np.array(std, np.float32))
    if args.label_noise:
        ds.train = datasets.with_label_noise(ds.train, args.label_noise, ds.num_classes, args.seed)
    return ds


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
    swa: utils.SWA | None           # the average: SWA's, an EMA, or SWAG (whose mean is SWA)
    plan: rundir.Plan
    sync_every: int = 1
    metrics: report.MetricsFile | None = None   # rank 0 only, like the two below
    visualdl: report.VisualDLLog | None = None
    progress: report.Progress | None = None
    lock: object = None

    @property
    def average(self):
        """The column prefix of the average ('swa', 'ema'), or None without one."""
        return None if self.swa is None else "ema" if self.args.ema_decay is not None else "swa"

    def log(self, *args, **kwargs):
        if self.env.is_master:
            print(*args, **kwargs)

    def record(self, row):
        """Print the epoch's table row and log it to metrics.csv and VisualDL (rank 0)."""
        self.log(report.format_row(row, report.columns(self.average)), flush=True)
        if self.metrics:
            self.metrics.append(row)
        if self.visualdl:
            self.visualdl.add(row)

    def averaging(self, epoch):
        """Whether the average takes the model after every step of 0-based `epoch` (an EMA)."""
        return self.average == "ema" and epoch + 1 >= self.args.swa_start

    def local_statistics(self):
        """The BatchNorm statistics that differ between ranks mid-epoch: the SGD model's, and
        an EMA's (updated from them every step); both are synchronised at epoch ends."""
        models_ = [self.model] + ([self.swa.model] if self.average == "ema" else [])
        return [t for m in models_ for t in engine.batch_norm_statistics(m)]

    def rank_state(self, partial):
        """What differs between ranks mid-epoch: their partial sums and BatchNorm statistics."""
        return {"partial": partial, "statistics": [t.numpy() for t in self.local_statistics()]}

    def save(self, epoch, step=0, partial=None):
        """Checkpoint on rank 0; mid-epoch, with every rank's own state. All ranks call it."""
        ranks = self.env.gather(self.rank_state(partial)) if step else None
        path = None
        if self.env.is_master:
            swa = self.swa.state_dict() if self.swa else {"swa_state_dict": None, "swa_n": None}
            path = checkpoints.save_checkpoint(
                self.args.dir, epoch, step, state_dict=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(), **swa, rng=checkpoints.get_rng_state(),
                rank_state=ranks, args=vars(self.args), run_id=self.plan.run_id,
                world_size=self.env.world_size, model_name=self.args.model, dataset=self.ds.name,
                num_classes=self.ds.num_classes, in_channels=self.ds.image_shape[0],
                normalization={"mean": [float(v) for v in self.ds.mean],
                               "std": [float(v) for v in self.ds.std]})
            if not step:  # step checkpoints before this epoch are superseded
                for (e, s), old in checkpoints.list_checkpoints(self.args.dir).items():
                    if s and e < epoch:
                        os.unlink(old)
        return path


def restore(run, path):
    """Load a checkpoint into the run; returns (epoch, step, this rank's partial sums)."""
    ckpt = checkpoints.load_checkpoint(path)
    try:
        checkpoints.load_weights(run.model, ckpt["state_dict"], source=path)
        run.optimizer.set_state_dict(ckpt["optimizer"])
        if run.swa is not None:
            run.swa.set_state_dict(ckpt)
    except (ValueError, KeyError) as e:
        raise checkpoints.CheckpointError(f"cannot resume from {path}: {e}") from None
    if ckpt.get("rng") is not None:
        checkpoints.set_rng_state(ckpt["rng"])
    partial = ckpt.get("partial")
    ranks = ckpt.get("rank_state")
    if ranks:  # mid-epoch: this rank's own sums and statistics (same world size, checked)
        mine = ranks[run.env.rank]
        partial = mine["partial"]
        with paddle.no_grad():
            for t, value in zip(run.local_statistics(), mine["statistics"]):
                t.set_value(value)
    return int(ckpt["epoch"]), int(ckpt.get("step") or 0), partial


def load_init(path, model):
    """Load starting weights from a plain state dict or a checkpoint's SGD weights."""
    if not os.path.isfile(path):
        raise cli.UsageError(f"--init {path} does not exist")
    try:
        weights = paddle.load(path)
    except Exception as e:  # paddle.load raises many types for bad bytes
        raise cli.UsageError(f"--init {path} is unreadable or not a Paddle file ({type(e).__name__})") from None
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    try:
        checkpoints.load_weights(model, weights if isinstance(weights, dict) else {},
                                 source=f"--init {path}")
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def build_average(args, model):
    if not args.swa:
        return None
    if args.swag:
        return utils.SWAG(model, max_rank=args.swag_rank)
    return utils.SWA(model, ema_decay=args.ema_decay)


def setup(args, command):
    """Build the run and restore --resume; returns (run, (epoch, step, partial sums)), or
    (None, message) when the run in --dir is already finished."""
    env = runtime.distributed_from_env()
    device = runtime.select_device(args.device, env.gpu_id)
    cpu = runtime.tune_cpu(args.threads, args.model, env.local_world_size) if device == "cpu" else ""
    if args.batch_size % env.world_size:
        raise cli.UsageError(f"--batch_size {args.batch_size} is the total over {env.world_size} "
                             "processes and must divide evenly between them")
    env.start()
    held = []  # rank 0's lock on --dir, kept until the run ends

    def decide():
        plan, lock = rundir.plan_start(args, IDENTITY, LEGACY)
        held.append(lock)
        return plan

    plan = env.on_master(decide)
    try:
        if plan.finished:
            return None, plan.finished
        run, start = env.together(build_run, args, env, plan, device)
        run.lock = held[0] if held else None
        if env.is_master:  # every check has passed on every rank: now --dir may change
            open_run(run, plan, start[0], command)
    except BaseException:
        if plan.created_dir and env.is_master:
            rundir.remove_created_dir(args.dir)  # only if nothing but the lock is in it
        raise
    finally:
        if held and (plan.finished or sys.exc_info()[0] is not None):
            held[0].close()
    if not plan.resume:
        run.save(0)
    run.log(describe(run, device, cpu))
    return run, start


def open_run(run, plan, epoch, command):
    """On rank 0: record the run in --dir and open its logs from `epoch` on."""
    args = run.args
    rundir.record_run(args, plan, run.env.world_size, command, IDENTITY)
    run.metrics = report.MetricsFile(args.dir, report.columns(run.average), epoch)
    run.visualdl = None if args.no_visualdl else report.VisualDLLog(args.dir, run.average)
    run.progress = report.Progress()


def build_run(args, env, plan, device):
    ds = load_data(args, env)
    paddle.seed(args.seed)
    model = models.build(args.model, ds.num_classes, ds.image_shape[0])
    if args.init and not plan.resume:
        load_init(args.init, model)
    optimizer = paddle.optimizer.Momentum(
        learning_rate=args.lr_init, momentum=args.momentum, weight_decay=args.wd or None,
        parameters=[p for p in model.parameters() if p.trainable])
    run = Run(args, env, ds, make_loaders(ds, args.batch_size, args.seed, args.num_workers, env),
              model, paddle.DataParallel(model) if env.enabled else model,  # never the average
              optimizer, build_average(args, model), plan,
              sync_every=1 if device == "cpu" else STEP_SYNC_GPU)
    start = restore(run, plan.resume) if plan.resume else (0, 0, None)
    return run, start


def describe(run, device, cpu):
    args, env, ds = run.args, run.env, run.ds
    kind = {"swa": "; SWA", "ema": f"; EMA (decay {args.ema_decay})", None: "; SGD"}[run.average]
    return (f"{args.model} on {ds.name} ({len(ds.train)} train / {len(ds.test)} test), {device}"
            + (f", {cpu}" if cpu else "") + f"; batch {args.batch_size} per step"
            + (f" = {env.world_size} processes x {args.batch_size // env.world_size}"
               if env.enabled else "")
            + kind + (f" + SWAG (rank {args.swag_rank})" if args.swag else "")
            + f", {args.lr_schedule} schedule"
            + (f"; resuming from {run.plan.resume}" if run.plan.resume else "")
            + (f"; starting from {args.init}" if args.init and not run.plan.resume else ""))


def train(args, command):
    """Train as `args` say; `command` is the command line to record. Returns the exit code."""
    # Optimizer state is saved under generated names (e.g. conv2d_0.w_0_velocity_0): a fresh
    # name scope makes them the same in every run, whatever ran before in this process.
    with paddle.utils.unique_name.guard():
        return _train(args, command)


def _train(args, command):
    run, start = setup(args, command)
    if run is None:
        print(start)
        return 0
    try:
        with StopFlag() as stop:
            code = train_loop(run, *start, stop)
    finally:
        if run.visualdl:
            run.visualdl.close()
        if run.lock:
            run.lock.close()
    if code == 0 and run.env.is_master:
        path = report.plot_runs([args.dir], os.path.join(args.dir, "convergence.png"))
        run.log(f"plot: {path}" + (f"; curves in VisualDL: {run.visualdl.command()}"
                                   if run.visualdl else ""))
    return code


def train_loop(run, start_epoch, start_step, partial, stop):
    """Epochs from `start_epoch` (batch `start_step`) to the end; returns the exit code."""
    args = run.args
    run.log(report.format_row({}, report.columns(run.average), header=True))
    for epoch in range(start_epoch, args.epochs):
        started = time.time()
        tr, lr = train_epoch(run, epoch, start_step, partial, stop)
        if start_step + tr["steps"] < len(run.loaders["train"]):
            # stopped by a signal here, or on another rank (then reported as SIGTERM)
            return interrupted(run, epoch, start_step + tr["steps"], tr, stop.signal or signal.SIGTERM)
        row = {"ep": epoch + 1, "lr": lr, "tr_loss": tr["loss"], "tr_acc": tr["accuracy"],
               "img_s": tr["steps"] * args.batch_size / max(time.time() - started, 1e-9)}
        row.update(evaluate_and_average(run, epoch))
        if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
            run.save(epoch + 1)
        row["time"] = time.time() - started
        run.record(row)
        stopping, = run.env.agree_any(stop.signal is not None)
        if stopping and epoch + 1 < args.epochs:
            return interrupted(run, epoch + 1, 0, None, stop.signal or signal.SIGTERM)
        start_step, partial = 0, None
    return 0


def train_epoch(run, epoch, start_step, partial, stop):
    """SGD over 0-based `epoch` from batch `start_step`, the rate set before every batch.

    Returns run_epoch's result (this rank's sums; fewer steps if a signal stopped it) and the
    rate at the epoch's first batch.
    """
    args, env = run.args, run.env
    steps = len(run.loaders["train"])

    def lr_at(step):
        return schedules.learning_rate(args.lr_schedule, epoch, step, steps, args.lr_init,
                                       args.epochs, args.swa_start if run.swa else None,
                                       args.swa_lr, args.swa_c_epochs)

    def on_sync(done, sums):
        if run.progress:
            run.progress.update(start_step + done, sums)
        return stop.signal is not None

    if run.progress:
        run.progress.start(f"epoch {epoch + 1}/{args.epochs}", steps, start_step)
    batches = scheduled(run.loaders["train"](epoch, start_step), run.optimizer, lr_at,
                        lambda step: step_seed(args.seed, env.rank, epoch, step), start_step)
    average_each_step = (lambda: run.swa.update(run.model)) if run.averaging(epoch) else None
    try:
        result = engine.run_epoch(batches, run.net, run.optimizer, sync_every=run.sync_every,
                                  on_sync=on_sync, after_step=average_each_step, totals=partial,
                                  context=run.env if env.enabled else None)
    except engine.NonFiniteLoss as e:
        raise Diverged(f"loss became {e.value} at epoch {epoch + 1} step {start_step + e.step + 1}; "
                       "training stopped and the checkpoints in --dir are those saved before; "
                       "lower --lr_init or --swa_lr") from None
    finally:
        if run.progress:
            run.progress.clear()
    return result, lr_at(0)


def evaluate_and_average(run, epoch):
    """After SGD epoch `epoch`: test the SGD model, add it to the average, test the average
    (after a BatchNorm refresh) when due. Returns the row's test columns."""
    args, env, swa = run.args, run.env, run.swa
    context = env if env.enabled else None
    if env.enabled:
        engine.sync_bn_statistics(run.model, env)
        if run.average == "ema":
            engine.sync_bn_statistics(swa.model, env)
    columns = {}
    evaluate = evaluation_epoch(epoch, args.eval_freq, args.epochs)
    if evaluate:
        te = engine.run_epoch(run.loaders["test"](), run.model, context=context)
        columns.update(te_loss=te["loss"], te_acc=te["accuracy"])
    averaged = run.average == "swa" and schedules.is_swa_epoch(epoch + 1, args.swa_start,
                                                               args.swa_c_epochs)
    if averaged:
        swa.update(run.model)
    due = averaged if run.average == "swa" else run.averaging(epoch)
    if swa and swa.n and (due and evaluate or epoch + 1 == args.epochs):
        swa.bn_update(run.loaders["bn"](epoch, stream=1), distributed=env.enabled)
        te = engine.run_epoch(run.loaders["test"](), swa.model, context=context)
        columns.update({f"{run.average}_te_loss": te["loss"], f"{run.average}_te_acc": te["accuracy"]})
    return columns


def interrupted(run, epoch, step, totals, signum):
    """Save where training stopped and say how to continue; returns the exit code."""
    partial = totals["local"] if totals else None  # this rank's own sums
    path = run.save(epoch, step, partial)
    run.env.barrier()  # no rank exits (and gets the job stopped) before rank 0 has saved
    if path:
        print(f"stopped by {signal.Signals(signum).name} at "
              f"{checkpoints.describe_position(epoch, step)}; saved {path}; continue with the same "
              "command plus --resume auto", file=sys.stderr, flush=True)
    return 128 + signum


def kept_checkpoints(argv):
    """What a failed run left in --dir, for the disk-full message."""
    try:
        directory = build_parser().parse_known_args(argv)[0].dir
    except SystemExit:
        return ""
    found = checkpoints.list_checkpoints(directory)
    if not found:
        return "no checkpoint was written"
    return f"the newest checkpoint is {found[max(found)]}"


def main(argv=None):
    command = sys.argv if argv is None else ["train.py"] + list(argv)
    with cli.tolerate_closed_stdout():
        return cli.main("train.py", lambda a: train(parse_args(a), command), command[1:],
                        kept=lambda: kept_checkpoints(command[1:]))


if __name__ == "__main__":
    sys.exit(main())
