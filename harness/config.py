"""train.py's configuration: its flags parsed and checked once into a frozen `Config`, with
which of them define a run.

    >>> config = parse_args(["--dataset", "digits", "--swa", "--swa_start", "20"])
    >>> config.swa_start, config.identity()[:3]      # the flags a resume may not change
    (20, ('model', 'dataset', 'seed'))

compare.py checks the commands it would run with the same `parse_args`.
"""
import argparse
import dataclasses
from dataclasses import dataclass

import models
import utils
from harness import cli, errors, schedules
from harness import data as datasets

EXAMPLES = """examples:
  python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05 --dir runs/digits
  python train.py --dataset CIFAR100 --data_path data --model VGG16 --epochs 300 --lr_init 0.05 --wd 5e-4 --swa --swa_start 161 --swa_lr 0.01 --dir runs/vgg16
  python train.py --dir runs/vgg16 --resume auto ...same flags...   # continue an interrupted run
"""
# The flags a resume may change, in words (the others define the run: see Config).
MAY_CHANGE = ("--epochs (upward)", "--eval_freq", "--save_freq", "--dir", "--data_path",
              "--num_workers", "--no_download", "--no_visualdl", "--init", "--init_optimizer",
              "--device", "--threads", "the number of processes (at an epoch's end)")
# Values of flags newer than a checkpoint, as the code that wrote it behaved.
LEGACY = {"ema_decay": None, "ema_warmup": False, "swag": False, "swag_rank": 20,
          "normalization": "dataset", "val_size": 0, "amp": None, "amp_dtype": "float16",
          "fge": False, "fge_cycle": 4, "fge_lr1": 0.05, "fge_lr2": 0.0005}
# Flags that do something only beside another, and their defaults: the parser's default is
# None, so that one given without the other is refused (it would do nothing), and these are
# filled in after parsing.
DEPENDENT = {"swa_start": 161, "swa_lr": 0.05, "swa_c_epochs": 1, "swag_rank": 20, "fge_cycle": 4,
             "fge_lr1": 0.05, "fge_lr2": 0.0001, "amp_dtype": "float16", "init_optimizer": False}
# What each works with: (in words, the fix, whether this run has it).
NEEDS = {
    "swa_start": ("--swa or --fge", "--swa (or --fge)", lambda a: a.swa or a.fge),
    "swa_lr": ("--swa or --fge", "--swa (or --fge)", lambda a: a.swa or a.fge),
    "swa_c_epochs": ("--swa", "--swa", lambda a: a.swa and not a.fge),  # --fge: refused before
    "swag_rank": ("--swag", "--swa --swag", lambda a: a.swag),
    "fge_cycle": ("--fge", "--fge", lambda a: a.fge),
    "fge_lr1": ("--fge", "--fge", lambda a: a.fge),
    "fge_lr2": ("--fge", "--fge", lambda a: a.fge),
    "amp_dtype": ("--amp", "--amp O1 (or O2)", lambda a: a.amp),
    "init_optimizer": ("--init", "--init CHECKPOINT", lambda a: a.init),
}


# --------------------------------------------------------------------------- the configuration

def _defines(): return dataclasses.field(metadata={"role": "identity"})     # noqa: E704
def _may_change(): return dataclasses.field(metadata={"role": "may_change"})  # noqa: E704
def _starts(): return dataclasses.field(metadata={"role": "start"})         # noqa: E704


@dataclass(frozen=True)
class Config:
    """train.py's flags, parsed and checked: built once by `parse_args`, never changed. Each
    field is one flag, in one of three roles: it defines the run (a resume with it changed is
    refused), it may change on resume, or it says how this command starts."""
    model: str = _defines()
    dataset: str = _defines()
    seed: int = _defines()
    batch_size: int = _defines()
    label_noise: float = _defines()
    normalization: str = _defines()
    lr_init: float = _defines()
    momentum: float = _defines()
    wd: float = _defines()
    lr_schedule: str = _defines()
    swa: bool = _defines()
    swa_start: int = _defines()
    swa_lr: float = _defines()
    swa_c_epochs: int = _defines()
    ema_decay: float | None = _defines()
    ema_warmup: bool = _defines()
    swag: bool = _defines()
    swag_rank: int = _defines()
    val_size: int = _defines()
    amp: str | None = _defines()
    amp_dtype: str = _defines()
    fge: bool = _defines()
    fge_cycle: int = _defines()
    fge_lr1: float = _defines()
    fge_lr2: float = _defines()
    epochs: int = _may_change()
    eval_freq: int = _may_change()
    save_freq: int = _may_change()
    dir: str = _may_change()
    data_path: str = _may_change()
    num_workers: int = _may_change()
    no_download: bool = _may_change()
    no_visualdl: bool = _may_change()
    init: str | None = _may_change()
    init_optimizer: bool = _may_change()
    device: str = _may_change()
    threads: int = _may_change()
    resume: str | None = _starts()
    overwrite: bool = _starts()

    def as_dict(self):
        """Every flag by name: what a run records (args.json, checkpoints)."""
        return dataclasses.asdict(self)

    def identity(self):
        """The names of the flags that define this run: those of the role, but not those that
        do nothing in it (a run of an older version may have recorded any value there, which
        a resume could not repeat now)."""
        idle = {flag for flag, (_, _, active) in NEEDS.items() if not active(self)}
        return tuple(name for name in IDENTITY if name not in idle)

    def differences(self, recorded):
        """`--flag (run: X, now: Y)` for each flag that defines this run and differs from
        `recorded` (a run's flags by name; flags newer than the run read as LEGACY says)."""
        recorded = dict(LEGACY, **recorded)
        return [f"--{name} (run: {_shown(recorded.get(name))}, now: {_shown(getattr(self, name))})"
                for name in self.identity() if recorded.get(name) != getattr(self, name)]


# The flags that define a run (a resume with one changed is refused), in the Config's order.
IDENTITY = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["role"] == "identity")


def _shown(value):
    """A flag value as a user typed it: on/off for switches."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


# --------------------------------------------------------------------------- the parser

def ema_decay(text):
    """--ema_decay's value: a finite number, then the SWA core's own check of a decay."""
    value = cli.number(float)(text)
    try:
        return utils.check_ema_decay(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser():
    p = cli.ArgumentParser(prog="train.py", description="SGD/SWA training (Izmailov et al., UAI 2018).",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--dir", default="out", metavar="DIR", type=cli.path_argument,
                     help="training directory for checkpoints and logs; one run per directory, "
                          "written by one process at a time (default: out)")
    run.add_argument("--resume", metavar="CKPT", type=cli.path_argument,
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
                      help="threads assembling batches ahead; 0 chooses: one thread ahead on a "
                           "GPU, in the training loop on a CPU, where a thread would compete with "
                           "the step for the cores (default: 0)")
    data.add_argument("--normalization", choices=["model", "dataset"], default="model",
                      help="per-channel input normalisation: 'model' uses the original code's "
                           "constants for the VGGs and ResNets on 3-channel images (the dataset's "
                           "statistics otherwise), 'dataset' the training set's own (default: model)")
    data.add_argument("--label_noise", type=cli.number(float, 0, 1, high_open=True), default=0.0,
                      metavar="P", help="give this fraction of training labels another class, at "
                                        "random (fixed by --seed); the test set is untouched (default: 0)")
    data.add_argument("--val_size", type=cli.NON_NEGATIVE_INT, default=0, metavar="N",
                      help="hold out N training images (chosen by --seed, stratified by class) and "
                           "report them per epoch as val_* instead of the test set, which is "
                           "evaluated once at the end; 0 keeps all for training (default: 0)")
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
    swa.add_argument("--swa_start", type=cli.number(int, 0), metavar="N",
                     help=f"SWA start epoch number (default: {DEPENDENT['swa_start']})")
    swa.add_argument("--swa_lr", type=cli.POSITIVE_FLOAT, metavar="LR",
                     help="SWA LR; with --fge, the rate the schedule decays to before the cycles "
                          f"(default: {DEPENDENT['swa_lr']})")
    swa.add_argument("--swa_c_epochs", type=cli.POSITIVE_INT, metavar="N",
                     help="SWA model collection frequency/cycle length in epochs; not with --fge, "
                          f"whose snapshots are averaged (default: {DEPENDENT['swa_c_epochs']})")
    swa.add_argument("--lr_schedule", choices=schedules.SCHEDULES, default="linear",
                     help="linear: the original (constant, linear ramp to --swa_lr, constant); "
                          "cyclic: per-iteration cycles from --lr_init down to --swa_lr ending at "
                          "each average (needs --swa); descent: steps of /10 at 50%% and 75%% of "
                          "--swa_start, then --swa_lr (default: linear)")
    swa.add_argument("--ema_decay", type=ema_decay, metavar="D",
                     help="keep an exponential moving average avg = D * avg + (1 - D) * model "
                          "instead of the equal average, updated after every step from epoch "
                          "--swa_start on (needs --swa; e.g. 0.999) (default: None, SWA's equal average)")
    swa.add_argument("--ema_warmup", action="store_true",
                     help="warm the EMA's decay up as timm's ModelEmaV3(use_warmup=True): after n "
                          "updates min(D, 1 - (1 + n) ** (-2/3)), so an EMA from the first steps "
                          "is not dominated by the initial weights (needs --ema_decay) (default: off)")
    swa.add_argument("--swag", action="store_true",
                     help="also fit SWA-Gaussian at the averaging epochs, for eval.py "
                          "--swag_samples (needs --swa); holds --swag_rank + 2 copies of the "
                          "weights (default: off)")
    swa.add_argument("--swag_rank", type=cli.number(int, 2), metavar="K",
                     help="deviations SWAG keeps for its low-rank covariance "
                          f"(default: {DEPENDENT['swag_rank']})")
    fge = p.add_argument_group("FGE (Garipov et al., NeurIPS 2018)")
    fge.add_argument("--fge", action="store_true",
                     help="Fast Geometric Ensembling: from --swa_start on, cycles of --fge_cycle "
                          "epochs with a triangular rate per iteration (--fge_lr1 down to --fge_lr2 "
                          "at each cycle's midpoint and back), a snapshot DIR/fge-<epoch>.pdparams at "
                          "each midpoint, for eval.py --ensemble; with --swa the same snapshots are "
                          "averaged (default: off)")
    fge.add_argument("--fge_cycle", type=cli.number(int, 2), metavar="C",
                     help="cycle length in epochs, 2 or 4 in the paper; an odd one snapshots at the "
                          f"end of the epoch holding the midpoint (default: {DEPENDENT['fge_cycle']})")
    fge.add_argument("--fge_lr1", type=cli.POSITIVE_FLOAT, metavar="LR",
                     help=f"the rate at each cycle's start and end (default: {DEPENDENT['fge_lr1']})")
    fge.add_argument("--fge_lr2", type=cli.POSITIVE_FLOAT, metavar="LR",
                     help="the rate at each cycle's midpoint, where the snapshot is taken; the "
                          "default is that of the FGE authors' fge.py "
                          f"(default: {DEPENDENT['fge_lr2']})")
    swa.add_argument("--init", metavar="WEIGHTS", type=cli.path_argument,
                     help="start from these weights: a .pdparams state dict or a checkpoint of "
                          "this code (its SGD weights); with --swa_start 0, SWA fine-tunes them. "
                          "Ignored when --resume finds a checkpoint (default: None)")
    swa.add_argument("--init_optimizer", action="store_true", default=None,
                     help="with --init CHECKPOINT, also take its optimizer state (the momentum), "
                          "so SGD continues as it would have in that run, e.g. FGE or SWA "
                          "from an SGD checkpoint; refused when the checkpoint has none or it "
                          "does not fit this model (default: off)")

    hardware = p.add_argument_group("hardware")
    cli.add_hardware_flags(hardware)
    hardware.add_argument("--amp", choices=["O1", "O2"],
                          help="mixed precision on a GPU: O1 runs the forward pass in half "
                               "precision where safe, O2 keeps half-precision weights with "
                               "float32 master weights; float16 uses dynamic loss scaling, its "
                               "skipped steps counted (default: None, float32)")
    hardware.add_argument("--amp_dtype", choices=["float16", "bfloat16"],
                          help=f"the half-precision type of --amp (default: {DEPENDENT['amp_dtype']})")
    return p


def parse_args(argv=None):
    """The Config of train.py's command line `argv`; UsageError (one line) for flags that do
    not go together or would do nothing."""
    args = build_parser().parse_args(argv)
    if args.fge and args.swa_c_epochs is not None:
        raise errors.UsageError(f"--swa_c_epochs {args.swa_c_epochs}: with --fge the average takes "
                                "FGE's snapshots, one per --fge_cycle epochs; drop --swa_c_epochs")
    check_dependent(args)
    if args.lr_schedule == "cyclic" and not args.swa:
        raise errors.UsageError("--lr_schedule cyclic is SWA's schedule: add --swa (and --swa_start, --swa_lr)")
    for flag in ("ema_decay", "swag"):
        if getattr(args, flag) not in (None, False) and not args.swa:
            raise errors.UsageError(f"--{flag} needs --swa (it says when averaging starts: --swa_start)")
    if args.ema_warmup and args.ema_decay is None:
        raise errors.UsageError("--ema_warmup warms up an EMA's decay: add --ema_decay D")
    if args.fge and (args.ema_decay is not None or args.swag):
        raise errors.UsageError("--fge snapshots at its cycles' midpoints, which an EMA or SWAG does "
                                "not follow: drop --ema_decay/--swag, or --fge")
    if args.fge and args.lr_schedule == "cyclic":
        raise errors.UsageError("--fge brings its own cyclic rate from --swa_start on: drop "
                                "--lr_schedule cyclic")
    if args.init_optimizer and args.amp == "O2":
        raise errors.UsageError("--init_optimizer does not carry --amp O2's float32 master weights "
                                "over (not built: no GPU to test it); drop --init_optimizer or use "
                                "--amp O1")
    if args.swag and args.ema_decay is not None:
        raise errors.UsageError("--swag fits a Gaussian around SWA's equal average: drop --ema_decay")
    try:
        args.model = models.canonical_name(args.model)
        args.dataset = datasets.canonical_name(args.dataset)
    except ValueError as e:
        raise errors.UsageError(str(e)) from None
    check_epochs(args)
    return Config(**vars(args))


def check_dependent(args):
    """Refuse a flag of DEPENDENT given without the flag it works with, as --ema_decay without
    --swa is; fill in the defaults of those not given."""
    for flag, (needs, fix, active) in NEEDS.items():
        value = getattr(args, flag)
        if value is None:
            setattr(args, flag, DEPENDENT[flag])
        elif not active(args):
            given = f"--{flag}" if value is True else f"--{flag} {value}"
            raise errors.UsageError(f"{given} needs {needs} (without, it does nothing): "
                                    f"add {fix}, or drop --{flag}")


def check_epochs(args):
    first = args.swa_start + (args.fge_cycle + 1) // 2  # FGE's first snapshot
    if args.fge and first > args.epochs:
        raise errors.UsageError(f"--fge: the first snapshot is after epoch {first}, beyond "
                                f"--epochs {args.epochs}; lower --swa_start or raise --epochs")
    if args.swa and args.swa_start > args.epochs:
        raise errors.UsageError(f"--swa_start {args.swa_start} is beyond --epochs {args.epochs}: no "
                                "model would be averaged; lower --swa_start or raise --epochs")
