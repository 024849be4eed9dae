"""What train.py's loop works on: the run (model, optimizer, average, loaders, logs), built and
restored once by `setup`, saved by `Run.save`, and the helpers the loop calls by name.
"""
import argparse
import dataclasses
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import paddle

import models
import utils
from harness import checkpoints, engine, errors, report, rundir, runtime
from harness import data as datasets

STEP_SYNC_GPU = 10  # training steps between reads of the loss from a GPU (a CPU reads every step)


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


class Stopped(Exception):
    """SIGTERM or SIGINT arrived while `draw_plot` drew; `signum` is the signal."""

    def __init__(self, signum, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} while drawing {path}, which "
                         "was not written; the training is finished: draw the plot with the same "
                         "command plus --resume auto")
        self.signum = signum


PLOT = "convergence.png"


def draw_plot(directory):
    """Draw DIR/convergence.png from DIR/metrics.csv (atomically); returns its path. A signal
    meanwhile stops the drawing at once, raising Stopped: matplotlib cannot be asked to stop
    early, and the default handlers would kill the process or raise KeyboardInterrupt inside
    it. Nothing is written then, and a resume of the finished run draws it."""
    path = os.path.join(directory, PLOT)

    def stop(signum, frame):
        raise Stopped(signum, path)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return report.plot_runs([directory], path)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def draw_missing_plot(directory):
    """For a finished run: draw its plot if a stop or a full disk lost it. Returns a line
    saying so (after a newline), or ''."""
    if os.path.exists(os.path.join(directory, PLOT)) or \
            not os.path.exists(os.path.join(directory, "metrics.csv")):
        return ""
    return f"\nplot: {draw_plot(directory)} (it was missing: drawn again)"


def step_seed(seed, rank, epoch, step):
    """The seed of Paddle's generator (dropout) before a step: a function of where training
    is, so a resume draws the same masks on any device set."""
    words = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def evaluation_epoch(epoch, eval_freq, epochs):
    """Whether 0-based `epoch` evaluates (the original's rule: first, every eval_freq, last)."""
    return epoch == 0 or epoch % eval_freq == eval_freq - 1 or epoch == epochs - 1


@dataclass
class Start:
    """Where training starts: epochs done, batches done in the next one, and this rank's
    partial sums of that epoch (None at an epoch's start)."""
    epoch: int = 0
    step: int = 0
    partial: dict | None = None


@dataclass
class Run:
    """What a training run is made of, built once by `setup`."""
    args: argparse.Namespace
    env: runtime.Distributed
    ds: datasets.Data
    train_batches: datasets.Batches
    test_batches: datasets.Batches
    val_batches: datasets.Batches | None
    model: paddle.nn.Layer          # the SGD model
    net: paddle.nn.Layer            # the model as trained: DataParallel-wrapped when launched
    optimizer: paddle.optimizer.Optimizer
    swa: utils.SWA | None           # the average: SWA's, an EMA, or SWAG (whose mean is SWA)
    plan: rundir.Plan
    amp: engine.MixedPrecision | None = None
    snapshots: list = dataclasses.field(default_factory=list)   # FGE's, file names in --dir
    sync_every: int = 1
    metrics: report.MetricsFile | None = None   # rank 0 only, like the two below
    visualdl: report.VisualDLLog | None = None
    progress: report.Progress | None = None
    lock: object = None

    @property
    def average(self):
        """The column prefix of the average ('swa', 'ema'), or None without one."""
        return None if self.swa is None else "ema" if self.args.ema_decay is not None else "swa"

    @property
    def columns(self):
        """The epoch table's columns (see report.columns)."""
        return report.columns(self.average, "val" if self.val_batches else "te",
                              skipped=bool(self.amp and self.amp.scaler))

    @property
    def context(self):
        """The data-parallel job for passes that agree over ranks, or None in one process."""
        return self.env if self.env.enabled else None

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

    def refresh_batches(self, epoch):
        """This rank's share of the BatchNorm refresh after 0-based `epoch`."""
        return datasets.refresh_batches(self.ds, self.args.batch_size // self.env.world_size,
                                        self.args.seed, epoch, self.env.rank, self.env.world_size,
                                        self.args.num_workers)

    def local_statistics(self):
        """The BatchNorm statistics that differ between ranks mid-epoch: the SGD model's, and
        an EMA's once it is updated (from them, every step); both are synchronised at epoch
        ends. (A checkpoint's list is restored after its average, so the two lists agree.)"""
        models_ = [self.model] + ([self.swa.model] if self.average == "ema" and self.swa.n else [])
        return [t for m in models_ for t in utils.batch_norm_statistics(m)]

    def save(self, epoch, step=0, partial=None):
        """Checkpoint on rank 0; mid-epoch, with every rank's own state. All ranks call it."""
        ranks = self.env.gather({"partial": partial, "statistics": [
            t.numpy() for t in self.local_statistics()]}) if step else None
        path = None
        if self.env.is_master:
            swa = self.swa.state_dict() if self.swa else {}
            path = checkpoints.save_checkpoint(self.args.dir, checkpoints.Checkpoint(
                epoch=epoch, step=step, state_dict=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(), **swa, rng=checkpoints.get_rng_state(),
                rank_state=ranks, args=vars(self.args), run_id=self.plan.run_id,
                amp_scaler=self.amp.state_dict() if self.amp else None,
                fge_snapshots=list(self.snapshots),
                world_size=self.env.world_size, **checkpoints.setting_of(self.args.model, self.ds)))
            if not step:  # step checkpoints before this epoch are superseded
                for (e, s), old in checkpoints.list_checkpoints(self.args.dir).items():
                    if s and e < epoch:
                        os.unlink(old)
        return path

    def snapshot(self, epoch):
        """FGE's snapshot after `epoch`: DIR/fge-<epoch>.pdparams, a checkpoint of the SGD
        weights (with their BatchNorm statistics) that eval.py reads on its own. Rank 0 writes
        it; every rank lists it (a resume rewrites the same file, never a second one)."""
        name = f"fge-{epoch}.pdparams"
        if self.env.is_master:
            checkpoints.write_checkpoint(os.path.join(self.args.dir, name), checkpoints.Checkpoint(
                epoch=epoch, state_dict=self.model.state_dict(), optimizer={}, fge_snapshot=True,
                args=vars(self.args), run_id=self.plan.run_id,
                **checkpoints.setting_of(self.args.model, self.ds)))
        self.snapshots = [n for n in self.snapshots if n != name] + [name]

    def restore(self, path, ckpt=None):
        """Load checkpoint `path` (or `ckpt`, already read from it) into the run; returns the Start."""
        ckpt = ckpt if ckpt is not None else checkpoints.load_checkpoint(path)
        saved = ckpt.data
        if saved and saved != self.ds.fingerprint:
            now = self.ds.fingerprint
            change = (f"{saved['train']} training and {saved['test']} test images then, "
                      f"{now['train']} and {now['test']} now"
                      if (saved["train"], saved["test"]) != (now["train"], now["test"])
                      else "the same sizes, other contents")
            raise errors.CheckpointError(f"--resume {path}: the {self.ds.name} files in --data_path "
                                         f"changed since the run was trained ({change}); put the "
                                         "run's files back, or start a new run in another --dir")
        checkpoints.load_weights(self.model, ckpt.state_dict, source=path)
        checkpoints.check_finite(ckpt.swa_state_dict, source=f"{path} (the average)")
        checkpoints.check_variances(ckpt.swa_state_dict, source=f"{path} (the average)")
        check_finite_optimizer(ckpt.optimizer, path)
        try:
            self.optimizer.set_state_dict(ckpt.optimizer or {})
            if self.swa is not None:
                self.swa.set_state_dict(ckpt.average_state())
        except (ValueError, KeyError) as e:
            raise errors.CheckpointError(f"cannot resume from {path}: {e}") from None
        if self.amp:
            self.amp.load_state_dict(ckpt.amp_scaler)
        self.snapshots = list(ckpt.fge_snapshots or [])
        if ckpt.rng is not None:
            checkpoints.set_rng_state(ckpt.rng)
        partial = None
        if ckpt.rank_state:  # mid-epoch: this rank's own sums and statistics (same world size, checked)
            mine = ckpt.rank_state[self.env.rank]
            partial = mine["partial"]
            with paddle.no_grad():
                for t, value in zip(self.local_statistics(), mine["statistics"]):
                    t.set_value(value)
        return Start(ckpt.epoch, ckpt.step, partial)

    def interrupted(self, epoch, step, totals, signum):
        """Save where training stopped and say how to continue; returns the exit code."""
        partial = totals["local"] if totals else None  # this rank's own sums
        path = self.save(epoch, step, partial)
        self.env.barrier()  # no rank exits (and gets the job stopped) before rank 0 has saved
        if path:
            print(f"stopped by {signal.Signals(signum).name} at "
                  f"{checkpoints.describe_position(epoch, step)}; saved {path}; continue with the "
                  "same command plus --resume auto", file=sys.stderr, flush=True)
        return 128 + signum

    def close(self):
        if self.visualdl:
            self.visualdl.close()
        if self.lock:
            self.lock.close()


def check_finite_optimizer(state, path):
    """Refuse a checkpoint whose optimizer state (momentum buffers, O2's master weights) holds
    NaN or infinity: finite weights would be driven to NaN by the first step after resuming."""
    def walk(value, key):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (paddle.Tensor, np.ndarray, float)):
            yield key, value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)

    for key, array in walk(state or {}, ""):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise errors.CheckpointError(f"--resume {path}: the optimizer state {key} holds NaN or "
                                         "infinite values (the run diverged before it was saved?); "
                                         "resume from an earlier checkpoint")


def first_non_finite(named_models):
    """`<label> <tensor name>` of the first floating-point parameter or buffer (a BatchNorm
    running variance, say) of `named_models` ({label: Layer}) holding NaN or infinity, or None.
    One read from the device for all tensors: cheap enough once per epoch on a GPU."""
    named = [(f"{label} {key}", t) for label, model in named_models.items()
             for key, t in model.state_dict().items() if paddle.is_floating_point(t)]
    if not named:
        return None
    finite = paddle.stack([paddle.isfinite(t).all() for _, t in named]).numpy()
    bad = np.flatnonzero(~finite)
    return named[bad[0]][0] if len(bad) else None


# --------------------------------------------------------------------------- building

def load_data(args, env):
    """The dataset on every rank; a missing one is downloaded once: by rank 0 first, then by
    the first process of each other machine (which finds it there on a shared disk)."""
    def load(my_turn, download):
        return datasets.load_dataset(args.dataset, args.data_path, download=download) if my_turn else None

    download = not args.no_download
    ds = env.together(load, env.rank == 0, download)
    ds = env.together(load, ds is None and env.local_rank == 0, download) or ds
    ds = env.together(load, ds is None, False) or ds
    if args.val_size:  # before normalising: the statistics are the remaining images'
        ds = datasets.split_validation(ds, args.val_size, args.seed)
    if args.normalization == "model" and ds.image_shape[0] == 3 and models.normalization(args.model):
        mean, std = models.normalization(args.model)
        ds = dataclasses.replace(ds, mean=np.array(mean, np.float32), std=np.array(std, np.float32))
    if args.label_noise:
        ds.train = datasets.with_label_noise(ds.train, args.label_noise, ds.num_classes, args.seed)
    return ds


def build_average(args, model):
    if not args.swa:
        return None
    if args.swag:
        return utils.SWAG(model, max_rank=args.swag_rank)
    return utils.SWA(model, ema_decay=args.ema_decay, ema_warmup=args.ema_warmup)


def build_run(args, env, plan, device, ckpt=None):
    """The run on this rank, restored from the plan's checkpoint (`ckpt` if already read)."""
    ds = load_data(args, env)
    paddle.seed(args.seed)
    model = models.build(args.model, ds.num_classes, ds.image_shape[0])
    if args.init and not plan.resume:
        checkpoints.load_weights(model, checkpoints.read_weights(args.init), source=f"--init {args.init}")
    optimizer = paddle.optimizer.Momentum(
        learning_rate=args.lr_init, momentum=args.momentum, weight_decay=args.wd or None,
        parameters=[p for p in model.parameters() if p.trainable])
    if args.amp == "O2":  # half-precision weights, float32 master weights in the optimizer
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2",
                                               dtype=args.amp_dtype, master_weight=True)
    per_process = args.batch_size // env.world_size
    shard = dict(mean=ds.mean, std=ds.std, rank=env.rank, world_size=env.world_size,
                 num_workers=args.num_workers)
    run = Run(args, env, ds,
              datasets.Batches(ds.train, per_process, shuffle=True, augment=ds.augment,
                               seed=args.seed, even_shards=True, **shard),
              datasets.Batches(ds.test, per_process, **shard),
              datasets.Batches(ds.val, per_process, **shard) if ds.val is not None else None,
              model, paddle.DataParallel(model) if env.enabled else model,  # never the average
              optimizer, build_average(args, model), plan,
              amp=engine.MixedPrecision(args.amp, args.amp_dtype) if args.amp else None,
              sync_every=1 if device == "cpu" else STEP_SYNC_GPU)
    start = run.restore(plan.resume, ckpt) if plan.resume else Start()
    return run, start


def setup(args, command, identity, legacy):
    """Build the run and restore --resume; returns (run, Start), or (None, message) when the
    run in --dir is already finished. `identity`: the flags that define a run (see rundir)."""
    env = runtime.distributed_from_env()
    device = runtime.select_device(args.device, env.gpu_id)
    if args.amp:
        check_amp(args.amp, args.amp_dtype, device)
    cpu = runtime.tune_cpu(args.threads, args.model, env.local_world_size) if device == "cpu" else ""
    if args.batch_size % env.world_size:
        raise errors.UsageError(f"--batch_size {args.batch_size} is the total over {env.world_size} "
                                "processes and must divide evenly between them")
    env.start()
    held = {}  # rank 0's lock on --dir, kept until the run ends, and the checkpoint it read

    def decide():
        plan, held["lock"], held["ckpt"] = rundir.plan_start(args, identity, legacy)
        return plan

    plan = env.on_master(decide)
    if plan.finished:
        if "lock" not in held:  # not rank 0
            return None, plan.finished
        with held["lock"]:  # rank 0 holds --dir's lock while it draws
            return None, plan.finished + draw_missing_plot(args.dir)
    try:
        run, start = env.together(build_run, args, env, plan, device, held.get("ckpt"))
        run.lock = held.get("lock")
        if env.is_master:  # every check has passed on every rank: now --dir may change
            open_run(run, plan, start.epoch, command, identity)
    except BaseException:
        if "lock" in held:
            held["lock"].close()
        if plan.created_dir and env.is_master:
            rundir.remove_created_dir(args.dir)  # only if nothing but the lock is in it
        raise
    if not plan.resume:
        run.save(0)
    run.log(describe(run, device, cpu))
    return run, start


def check_amp(level, dtype, device):
    """Refuse --amp where it cannot run: Paddle's auto_cast on a CPU silently computes in
    float32 (measured with 3.3), so a CPU run would only pretend to be mixed precision."""
    if device != "gpu":
        raise errors.UsageError(f"--amp {level}: mixed precision needs a GPU; on the CPU Paddle "
                                "would silently train in float32. Drop --amp, or run on a GPU")
    supported = paddle.amp.is_float16_supported() if dtype == "float16" else \
        paddle.amp.is_bfloat16_supported()
    if not supported:
        other = "bfloat16" if dtype == "float16" else "float16"
        raise errors.UsageError(f"--amp_dtype {dtype}: this GPU has no {dtype} support; try "
                                f"--amp_dtype {other}, or drop --amp")


def open_run(run, plan, epoch, command, identity):
    """On rank 0: record the run in --dir and open its logs from `epoch` on."""
    args = run.args
    rundir.record_run(args, plan, run.env.world_size, command, identity)
    run.metrics = report.MetricsFile(args.dir, run.columns, epoch)
    run.visualdl = None if args.no_visualdl else report.VisualDLLog(args.dir, run.average)
    run.progress = report.Progress()


def describe(run, device, cpu):
    args, env, ds = run.args, run.env, run.ds
    ema = f"; EMA (decay {args.ema_decay}{', warmed up' if args.ema_warmup else ''})"
    kind = {"swa": "; SWA", "ema": ema, None: "; SGD"}[run.average]
    sizes = (f"train {len(ds.train)}, validation {len(ds.val)}, test {len(ds.test)}"
             if ds.val is not None else f"{len(ds.train)} train / {len(ds.test)} test")
    return (f"{args.model} on {ds.name} ({sizes}), {device}"
            + (f", {cpu}" if cpu else "") + f"; batch {args.batch_size} per step"
            + (f" = {env.world_size} processes x {args.batch_size // env.world_size}"
               if env.enabled else "")
            + (f"; AMP {args.amp} {args.amp_dtype}" if args.amp else "")
            + (f"; FGE from epoch {args.swa_start}, cycles of {args.fge_cycle}" if args.fge else "")
            + kind + (f" + SWAG (rank {args.swag_rank})" if args.swag else "")
            + f", {args.lr_schedule} schedule"
            + (f"; resuming from {run.plan.resume}" if run.plan.resume else "")
            + (f"; starting from {args.init}" if args.init and not run.plan.resume else ""))


def kept_checkpoints(directory):
    """What a failed run left in `directory`, for the disk-full message."""
    found = checkpoints.list_checkpoints(directory)
    if not found:
        return "no checkpoint was written"
    return f"the newest checkpoint is {found[max(found)]}"


def eval_columns(run, model, prefix="", split=None):
    """The loss and accuracy of `model` on the epoch's evaluation set (validation with
    --val_size, else test; or `split`: "te", "val") as row columns (`te_*`, `val_*`, or
    `<prefix>_te_*`...). The SGD model is evaluated as it trains (under --amp's autocast), an
    average in float32."""
    split = split or ("val" if run.val_batches else "te")
    batches = run.val_batches if split == "val" else run.test_batches
    amp = run.amp if model is run.model else None
    result = engine.evaluate_pass(batches(), model, context=run.context, amp=amp)
    start = f"{prefix}_" if prefix else ""
    return {f"{start}{split}_loss": result["loss"], f"{start}{split}_acc": result["accuracy"]}
