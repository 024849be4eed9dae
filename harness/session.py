"""One training run's state, built once: `setup` makes the `Run` train.py's loop works on (its
model, optimizer, average, batches and logs) on every rank and restores --resume into it.

    >>> run, start = setup(config, command)     # config: a harness.config.Config
    >>> run.save(epoch=3)                       # a checkpoint of the run (rank 0 writes it)
"""
import dataclasses
import functools
import os
import shlex
import signal
import sys
from dataclasses import dataclass

import paddle

import models
import utils
from harness import checkpoints, distributed, engine, errors, report, rundir, runtime
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


@dataclass
class Start:
    """Where training starts: epochs done, batches done in the next one, and this rank's
    partial sums of that epoch (None at an epoch's start)."""
    epoch: int = 0
    step: int = 0
    partial: dict | None = None


@dataclass
class Run:
    """What a training run is made of, built once by `setup`; the loop reads and updates it."""
    env: distributed.Distributed
    ds: datasets.Data
    train_batches: datasets.Batches
    test_batches: datasets.Batches
    val_batches: datasets.Batches | None
    refresh: object                 # epoch -> this rank's BatchNorm refresh batches (data.refresh_batches)
    model: paddle.nn.Layer          # the SGD model
    net: paddle.nn.Layer            # the model as trained: DataParallel-wrapped when launched
    optimizer: paddle.optimizer.Optimizer
    swa: utils.SWA | None           # the average: SWA's, an EMA, or SWAG (whose mean is SWA)
    plan: rundir.Plan
    directory: str                  # --dir
    flags: dict                     # train.py's flags by name, recorded in every checkpoint
    setting: dict                   # what the model was trained on (checkpoints.setting_of)
    command: list = dataclasses.field(default_factory=list)  # train.py's argv, to say how to resume
    amp: engine.MixedPrecision | None = None
    snapshots: list = dataclasses.field(default_factory=list)   # FGE's, file names in --dir
    sync_every: int = 1
    metrics: report.MetricsFile | None = None   # rank 0 only, like the three below
    visualdl: report.VisualDLLog | None = None
    progress: report.Progress | None = None
    lock: object = None

    @property
    def average(self):
        """The column prefix of the average ('swa', 'ema'), or None without one."""
        return None if self.swa is None else "ema" if self.swa.ema_decay is not None else "swa"

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
        return self.refresh(epoch)

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
            path = checkpoints.save_checkpoint(self.directory, checkpoints.Checkpoint(
                epoch=epoch, step=step, state_dict=self.model.state_dict(),
                optimizer=self.optimizer.state_dict(), **swa, rng=checkpoints.get_rng_state(),
                rank_state=ranks, args=self.flags, run_id=self.plan.run_id,
                amp_scaler=self.amp.state_dict() if self.amp else None,
                fge_snapshots=list(self.snapshots), world_size=self.env.world_size,
                **self.setting))
            if not step:  # step checkpoints before this epoch are superseded
                for (e, s), old in checkpoints.list_checkpoints(self.directory).items():
                    if s and e < epoch:
                        os.unlink(old)
        return path

    def snapshot(self, epoch):
        """FGE's snapshot after `epoch`: DIR/fge-<epoch>.pdparams, a checkpoint of the SGD
        weights (with their BatchNorm statistics) that eval.py reads on its own. Rank 0 writes
        it; every rank lists it (a resume rewrites the same file, never a second one)."""
        name = f"fge-{epoch}.pdparams"
        if self.env.is_master:
            checkpoints.write_checkpoint(os.path.join(self.directory, name), checkpoints.Checkpoint(
                epoch=epoch, state_dict=self.model.state_dict(), optimizer={}, fge_snapshot=True,
                args=self.flags, run_id=self.plan.run_id, **self.setting))
        self.snapshots = [n for n in self.snapshots if n != name] + [name]

    def restore(self, path, ckpt=None):
        """Load checkpoint `path` (`ckpt`, if this process has read it) into the run; returns
        the Start."""
        ckpt = ckpt if ckpt is not None else checkpoints.load_checkpoint(path)
        checkpoints.resume(ckpt, path, self.model, self.optimizer, self.swa, self.amp,
                           self.ds.fingerprint, self.ds.name)
        self.snapshots = list(ckpt.fge_snapshots or [])
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
            again = ("the same launch command plus --resume auto" if self.env.enabled
                     else resume_command(self.command))
            print(f"stopped by {signal.Signals(signum).name} at "
                  f"{checkpoints.describe_position(epoch, step)}; saved {path}; continue with: "
                  f"{again}", file=sys.stderr, flush=True)
        return 128 + signum

    def close(self):
        if self.visualdl:
            self.visualdl.close()
        if self.lock:
            self.lock.close()


def resume_command(command):
    """The shell command that continues `command` (train.py's argv): the same, with any
    --resume replaced by --resume auto."""
    kept, skip = [], False
    for token in command[1:]:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    return shlex.join(["python", command[0], *kept, "--resume", "auto"])


# --------------------------------------------------------------------------- building

def load_data(config, env):
    """The dataset on every rank; a missing one is downloaded once: by rank 0 first, then by
    the first process of each other machine (which finds it there on a shared disk)."""
    def load(my_turn, download):
        return datasets.load_dataset(config.dataset, config.data_path, download=download) \
            if my_turn else None

    download = not config.no_download
    ds = env.together(load, env.rank == 0, download)
    ds = env.together(load, ds is None and env.local_rank == 0, download) or ds
    ds = env.together(load, ds is None, False) or ds
    ds = datasets.as_trained(ds, config.val_size, config.seed,
                             models.normalization(config.model) if config.normalization == "model"
                             else None)
    if config.label_noise:
        ds.train = datasets.with_label_noise(ds.train, config.label_noise, ds.num_classes, config.seed)
    return ds


def build_average(config, model):
    if not config.swa:
        return None
    if config.swag:
        return utils.SWAG(model, max_rank=config.swag_rank)
    return utils.SWA(model, ema_decay=config.ema_decay, ema_warmup=config.ema_warmup)


def build_run(config, env, plan, device, ckpt=None):
    """The run on this rank, restored from the plan's checkpoint (`ckpt` if already read)."""
    ds = load_data(config, env)
    paddle.seed(config.seed)
    model = models.build(config.model, ds.num_classes, ds.image_shape[0])
    started = None  # --init's optimizer state, with --init_optimizer
    if config.init and not plan.resume:
        weights, started = checkpoints.read_start(config.init, optimizer=config.init_optimizer)
        checkpoints.load_weights(model, weights, source=f"--init {config.init}")
    optimizer = paddle.optimizer.Momentum(
        learning_rate=config.lr_init, momentum=config.momentum, weight_decay=config.wd or None,
        parameters=[p for p in model.parameters() if p.trainable])
    if started is not None:  # the momentum carries on (Paddle takes it up at the first step)
        checkpoints.load_optimizer_state(optimizer, model, started, f"--init {config.init}")
    if config.amp == "O2":  # half-precision weights, float32 master weights in the optimizer
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2",
                                               dtype=config.amp_dtype, master_weight=True)
    per_process = config.batch_size // env.world_size
    shard = dict(mean=ds.mean, std=ds.std, rank=env.rank, world_size=env.world_size,
                 num_workers=config.num_workers or None)  # 0: Batches decides (ahead on a GPU)
    run = Run(env, ds,
              datasets.Batches(ds.train, per_process, shuffle=True, augment=ds.augment,
                               seed=config.seed, even_shards=True, **shard),
              datasets.Batches(ds.test, per_process, **shard),
              datasets.Batches(ds.val, per_process, **shard) if ds.val is not None else None,
              functools.partial(datasets.refresh_batches, ds, per_process, config.seed,
                                rank=env.rank, world_size=env.world_size,
                                num_workers=shard["num_workers"]),
              model, paddle.DataParallel(model) if env.enabled else model,  # never the average
              optimizer, build_average(config, model), plan, config.dir, config.as_dict(),
              checkpoints.setting_of(config.model, ds),
              amp=engine.MixedPrecision(config.amp, config.amp_dtype) if config.amp else None,
              sync_every=1 if device == "cpu" else STEP_SYNC_GPU)
    start = run.restore(plan.resume, ckpt) if plan.resume else Start()
    return run, start


def setup(config, command):
    """Build the run on every rank and restore --resume; returns (run, Start), or (None,
    message) when the run in --dir is already finished."""
    env = distributed.distributed_from_env()
    device = runtime.select_device(config.device, env.gpu_id)
    if config.amp:
        check_amp(config.amp, config.amp_dtype, device)
    cpu = runtime.tune_cpu(config.threads, config.model, env.local_world_size) if device == "cpu" else ""
    if config.batch_size % env.world_size:
        raise errors.UsageError(f"--batch_size {config.batch_size} is the total over "
                                f"{env.world_size} processes and must divide evenly between them")
    env.start()
    request = rundir.Request(config.dir, config.resume, config.overwrite, config.epochs,
                             env.world_size, config.differences)
    # Rank 0 checks --dir and takes its lock (kept until the run ends) and reads the checkpoint;
    # every rank gets the plan.
    opened = env.first(rundir.plan_start, request)
    plan = env.broadcast(opened.plan if opened else None)
    if plan.finished:
        return None, plan.finished + (finish_plot(opened) if opened else "")
    try:
        run, start = env.together(build_run, config, env, plan, device, opened and opened.checkpoint)
        if opened:  # every check has passed on every rank: now --dir may change
            run.lock = opened.lock
            open_run(run, config, start.epoch, command)
        run.command = list(command)
    except BaseException:
        if opened:
            opened.lock.close()
            if plan.created_dir:
                rundir.remove_created_dir(config.dir)  # only if nothing but the lock is in it
        raise
    if not plan.resume:
        run.save(0)
    run.log(describe(config, run, device, cpu))
    return run, start


def finish_plot(opened):
    """For a finished run, on rank 0 (holding --dir's lock): its plot drawn again if missing."""
    with opened.lock:
        return report.draw_missing_plot(opened.directory)


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


def open_run(run, config, epoch, command):
    """On rank 0: record the run in --dir and open its logs from `epoch` on."""
    rundir.record_run(config.dir, run.plan, run.env.world_size, command, config.as_dict(),
                      config.identity())
    run.metrics = report.MetricsFile(config.dir, run.columns, epoch)
    run.visualdl = None if config.no_visualdl else report.VisualDLLog(config.dir, run.average)
    run.progress = report.Progress()


def describe(config, run, device, cpu):
    c, env, ds = config, run.env, run.ds
    ema = f"; EMA (decay {c.ema_decay}{', warmed up' if c.ema_warmup else ''})"
    kind = {"swa": "; SWA", "ema": ema, None: "; SGD"}[run.average]
    sizes = (f"train {len(ds.train)}, validation {len(ds.val)}, test {len(ds.test)}"
             if ds.val is not None else f"{len(ds.train)} train / {len(ds.test)} test")
    return (f"{c.model} on {ds.name} ({sizes}), {device}"
            + (f", {cpu}" if cpu else "") + f"; batch {c.batch_size} per step"
            + (f" = {env.world_size} processes x {c.batch_size // env.world_size}"
               if env.enabled else "")
            + (f"; AMP {c.amp} {c.amp_dtype}" if c.amp else "")
            + (f"; FGE from epoch {c.swa_start}, cycles of {c.fge_cycle} (the lr column: each "
               "epoch's first batch)" if c.fge else "")
            + kind + (f" + SWAG (rank {c.swag_rank})" if c.swag else "")
            + f", {c.lr_schedule} schedule"
            + (f"; resuming from {run.plan.resume}" if run.plan.resume else "")
            + (f"; starting from {c.init}" + (" with its momentum" if c.init_optimizer else "")
               if c.init and not run.plan.resume else ""))


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
