"""Train a model with SGD and keep its Stochastic Weight Average (SWA) beside it.

    python train.py --dataset digits --model SimpleCNN --epochs 30 --swa --swa_start 20 --swa_lr 0.05

Flags are those of the original PyTorch code (timgaripov/swa), so its recipes run
unchanged. Under `python -m paddle.distributed.launch` it trains data-parallel.
"""
import signal
import sys
import time

import harness

harness.prepare()  # before Paddle loads: the math library's path, Paddle's import-time warnings
import paddle  # noqa: E402

from harness import checkpoints, cli, engine, errors, report, schedules, session  # noqa: E402
from harness.config import parse_args  # noqa: E402


# --------------------------------------------------------------------------- training

def train(config, command):
    """Train as `config` (a harness.config.Config) says; `command` is the command line to
    record. Returns the exit code."""
    # Optimizer state is saved under generated names (e.g. conv2d_0.w_0_velocity_0): a fresh
    # name scope makes them the same in every run, whatever ran before in this process.
    try:
        with paddle.utils.unique_name.guard():
            run, start = session.setup(config, command)
            if run is None:
                print(start)
                return 0
            try:
                with session.StopFlag() as stop:
                    code = train_loop(config, run, start, stop)
                    if code == 0 and run.env.is_master:  # still under StopFlag: no unguarded gap
                        plot(config, run)
            finally:
                run.close()  # the lock last: the plot is written by the run's one writer
    except report.Stopped as e:
        print(e, file=sys.stderr, flush=True)
        return 128 + e.signum
    except OSError as e:  # a full disk: say which checkpoint survived
        message = cli.disk_error_message(e)
        if message is None:
            raise
        raise errors.RunFailed(f"{message}; {checkpoints.kept_checkpoints(config.dir)}; free some "
                               "space and run again") from None
    return code


def plot(config, run):
    path = report.draw_plot(config.dir)
    run.log(f"plot: {path}" + (f"; curves in VisualDL: {run.visualdl.command()}"
                               if run.visualdl else ""))


def train_loop(config, run, start, stop):
    """Epochs from `start` to the end: for each, train (rate and seed set before every batch),
    average, evaluate when due, save when due, record. Returns the exit code."""
    c, swa = config, run.swa
    steps = len(run.train_batches)
    run.log(report.format_row({}, run.columns, header=True))
    for epoch in range(start.epoch, c.epochs):
        started = time.time()
        lr_at = epoch_rate(c, epoch, steps)
        averaging = averaging_epoch(c, run, epoch)
        tr = train_epoch(c, run, epoch, start, lr_at, stop, averaging)
        if start.step + tr["steps"] < steps:  # stopped by a signal here or on another rank
            check_weights(run, epoch)
            return run.interrupted(epoch, start.step + tr["steps"], tr, stop.signal or signal.SIGTERM)
        trained = max(time.time() - started, 1e-9)
        row = {"ep": epoch + 1, "lr": lr_at(0), "tr_loss": tr["loss"], "tr_acc": tr["accuracy"],
               "skipped": tr["skipped"], "img_s": tr["steps"] * c.batch_size / trained,
               "wait_pct": 100 * tr["data_wait"] / trained}
        synchronise(run)
        check_weights(run, epoch)
        if c.fge and schedules.is_fge_snapshot_epoch(epoch + 1, c.swa_start, c.fge_cycle):
            run.snapshot(epoch + 1)
        evaluate = schedules.evaluation_epoch(epoch, c.eval_freq, c.epochs)
        if evaluate:
            row.update(session.eval_columns(run, run.model))
        if averaging and run.average == "swa":  # an EMA was updated after every step
            update_average(run)
        if swa and swa.n and (averaging and evaluate or epoch + 1 == c.epochs):
            engine.bn_update(run.refresh_batches(epoch), swa, run.env)
            row.update(session.eval_columns(run, swa.model, run.average))
        if swa is not None:  # updated or refreshed since the check above: check before saving
            check_weights(run, epoch, sgd=False)
        if (epoch + 1) % c.save_freq == 0 or epoch + 1 == c.epochs:
            run.save(epoch + 1)
        row["time"] = time.time() - started
        run.record(row)
        stopping, = run.env.agree_any(stop.signal is not None)
        if stopping and epoch + 1 < c.epochs:
            return run.interrupted(epoch + 1, 0, None, stop.signal or signal.SIGTERM)
        start = session.Start(epoch + 1)
    if run.val_batches:
        test_once(run)
    return 0


def update_average(run):
    """The one place the average takes in the SGD model: after every step for an EMA, after
    an averaging epoch for SWA (and SWAG, FGE's snapshots)."""
    run.swa.update(run.model)


def test_once(run):
    """With a validation split: the test set, evaluated once, after the last epoch."""
    scored = [("SGD", run.model)]
    if run.swa and run.swa.n:
        scored.append((report.AVERAGES[run.average], run.swa.model))
    parts = []
    for name, model in scored:
        columns = session.eval_columns(run, model, split="te")
        parts.append(f"{name} loss {columns['te_loss']:.4f} accuracy {columns['te_acc']:.4f}%")
    run.log(f"test set ({len(run.ds.test)} images): " + "; ".join(parts))


def epoch_rate(c, epoch, steps):
    """The rate of each batch of 0-based `epoch`, as a function of the batch: FGE's cycles from
    --swa_start on with --fge, else --lr_schedule (towards --swa_lr with --swa or --fge)."""
    if c.fge and epoch >= c.swa_start:
        return lambda step: schedules.fge_lr(epoch, step, steps, c.swa_start, c.fge_cycle,
                                             c.fge_lr1, c.fge_lr2)
    start = c.swa_start if c.swa or c.fge else None
    return lambda step: schedules.learning_rate(c.lr_schedule, epoch, step, steps, c.lr_init,
                                                c.epochs, start, c.swa_lr, c.swa_c_epochs)


def averaging_epoch(c, run, epoch):
    """Whether 0-based `epoch` adds to the average: SWA's averaging epochs (FGE's snapshot
    epochs with --fge), or, for an EMA (updated after every step), every epoch from
    --swa_start on."""
    if run.swa is None:
        return False
    if run.average == "ema":
        return epoch + 1 >= c.swa_start
    if c.fge:
        return schedules.is_fge_snapshot_epoch(epoch + 1, c.swa_start, c.fge_cycle)
    return schedules.is_swa_epoch(epoch + 1, c.swa_start, c.swa_c_epochs)


def train_epoch(c, run, epoch, start, lr_at, stop, averaging):
    """SGD over 0-based `epoch` from batch `start.step`; an EMA is updated after every step
    once averaging has begun. Returns engine.train_pass's result (fewer steps if a signal
    stopped it)."""
    def on_sync(done, sums):
        if run.progress:
            run.progress.update(start.step + done, sums)
        return stop.signal is not None

    if run.progress:
        run.progress.start(f"epoch {epoch + 1}/{c.epochs}", len(run.train_batches), start.step)
    every_step = averaging and run.average == "ema"
    try:
        return engine.train_pass(
            run.train_batches(epoch, start.step), run.net, run.optimizer, lr_at,
            lambda step: schedules.step_seed(c.seed, run.env.rank, epoch, step), start.step,
            after_step=(lambda: update_average(run)) if every_step else None,
            sync_every=run.sync_every, on_sync=on_sync, context=run.context,
            totals=start.partial, amp=run.amp)
    except engine.NonFiniteLoss as e:
        raise errors.Diverged(f"loss became {e.value} at epoch {epoch + 1} step "
                              f"{start.step + e.step + 1}; training stopped and the checkpoints "
                              "in --dir are those saved before; lower --lr_init, --swa_lr or --wd") from None
    except engine.ScaleCollapsed as e:
        raise errors.RunFailed(f"{e} at epoch {epoch + 1}: float16 gradients overflow at any "
                               "scale; training stopped and the checkpoints in --dir are those "
                               "saved before; use --amp_dtype bfloat16 or lower --lr_init") from None
    finally:
        if run.progress:
            run.progress.clear()


def check_weights(run, epoch, sgd=True):
    """Stop as for a NaN loss when the weights (the SGD model's with `sgd`, the average's once
    it holds a model) hold NaN or infinity, before they are saved. The loss does not always
    show it: in training BatchNorm normalises with the batch's statistics, so an overflowed
    running variance leaves the loss finite and the saved model predicting nonsense."""
    named = {"the SGD model's": run.model} if sgd else {}
    if run.swa is not None and run.swa.n:
        named["the average's"] = run.swa.model
    bad = engine.first_non_finite(named)
    any_bad, = run.env.agree_any(bad is not None)  # every rank stops, none waits for the others
    if any_bad:
        raise errors.Diverged(f"the weights became NaN or infinite at epoch {epoch + 1} "
                              f"({bad or 'on another rank'}) while the loss stayed finite; training "
                              "stopped and the checkpoints in --dir are those saved before; lower "
                              "--lr_init, --swa_lr or --wd")


def synchronise(run):
    """At an epoch's end, give every rank the same BatchNorm statistics (the mean of the
    ranks'), of the SGD model and of an EMA, so that all ranks evaluate and average one model."""
    if run.env.enabled:
        engine.sync_bn_statistics(run.model, run.env)
        if run.average == "ema" and run.swa.n:
            engine.sync_bn_statistics(run.swa.model, run.env)


def main(argv=None):
    command = sys.argv if argv is None else ["train.py"] + list(argv)
    with cli.tolerate_closed_stdout():
        return cli.main("train.py", lambda a: train(parse_args(a), command), command[1:])


if __name__ == "__main__":
    sys.exit(main())
