"""One pass of training or evaluation, and the data-parallel bookkeeping around it.

    >>> run_epoch(train_batches, model, optimizer)["loss"]
    >>> run_epoch(test_batches, model)["accuracy"]

A pass reads the loss and the number of correct predictions back from the device only every
`sync_every` steps, in one copy: on a GPU a read per step stalls the queue of work.
"""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

import utils


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite at 0-based step `step` of the pass (on some rank)."""

    def __init__(self, step, value):
        super().__init__(f"loss is {value} at step {step}")
        self.step, self.value = step, value


def run_epoch(batches, model, optimizer=None, sync_every=1, on_sync=None, after_step=None,
              context=None, totals=None, keep_logits=False):
    """One pass over `batches`: trains when `optimizer` is given, otherwise evaluates.

    Training uses cross-entropy, model.train() and one optimizer step per batch; evaluation
    uses model.eval() without gradients. Every `sync_every` training steps the losses and
    correct counts since the last read are copied to the host at once; a non-finite loss
    then raises `NonFiniteLoss` naming its step, before that step's update (with
    sync_every=1 the weights stay those of the last good step; otherwise up to
    sync_every - 1 updates with a bad loss may have been applied, so the model must not be
    saved). The sums are accumulated on the host in float64, exactly as if read every step.

    Args:
        batches: iterable of `(x, y)` with integer labels y.
        model: the Layer (or DataParallel wrapper) to run.
        optimizer: a paddle optimizer to train with, or None to evaluate.
        sync_every: training steps between reads from the device (1 on CPU, where a read
            costs nothing).
        on_sync: optional callable(steps_done, sums) at each read while training; True asks
            to stop after the current step (agreed over all ranks with `context`).
        after_step: optional callable() after each optimizer step (e.g. an EMA update).
        context: a runtime.Distributed for data-parallel runs (None: one process). Its ranks
            agree at every read (stop, non-finite loss) and the sums are all-reduced, so
            every rank returns the metrics over all ranks' data.
        totals: sums from an interrupted pass to continue from (as returned).
        keep_logits: also return this process's outputs and labels as numpy arrays.

    Returns:
        dict with `loss` (mean cross-entropy), `accuracy` (percent), `count` (samples),
        `steps` (batches run in this call), the raw sums `loss_sum`, `correct` (over all
        ranks), `local` (this rank's sums, which `totals` takes), and with keep_logits,
        `logits` and `labels`.
    """
    training = optimizer is not None
    model.train() if training else model.eval()
    sums = dict(loss_sum=0.0, correct=0, count=0)
    if totals:
        sums.update({key: totals[key] for key in sums})
    pending, kept, steps = [], [], 0
    agree = context is not None and context.world_size > 1

    def read(first_step):
        """Add the pending steps' values to `sums`; the first non-finite loss, if any."""
        if not pending:
            return None
        losses = paddle.stack([p[0].reshape([]) for p in pending]).astype("float64")
        correct = paddle.stack([p[1].reshape([]) for p in pending]).astype("float64")
        values = paddle.concat([losses, correct]).numpy()
        bad = None
        for i, (loss, hits, (_, _, size)) in enumerate(zip(values[:len(pending)],
                                                         values[len(pending):], pending)):
            if not math.isfinite(loss) and bad is None:
                bad = (first_step + i, float(loss))
            sums["loss_sum"] += float(loss) * size
            sums["correct"] += int(hits)
            sums["count"] += size
        pending.clear()
        return bad

    with paddle.set_grad_enabled(training):
        for step, (x, y) in enumerate(batches):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            hits = (logits.argmax(axis=1) == y.reshape([-1])).astype("int64").sum()
            pending.append((loss.detach(), hits, int(y.shape[0])))
            if keep_logits:
                kept.append((logits.detach(), y.reshape([-1])))
            stop = False
            if training and (step + 1) % sync_every == 0:
                bad = read(step + 1 - len(pending))
                stop = bool(on_sync(step + 1, sums)) if on_sync else False
                if agree:
                    any_bad, stop = context.agree_any(bad is not None, stop)
                    if any_bad and bad is None:
                        bad = (step, "non-finite on another rank")
                if bad is not None:
                    raise NonFiniteLoss(*bad)
            if training:
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
                if after_step is not None:
                    after_step()
            steps += 1
            if stop:
                break
    bad = read(steps - len(pending))
    if training:
        if agree:
            any_bad, = context.agree_any(bad is not None)
            bad = bad or ((steps - 1, "non-finite on another rank") if any_bad else None)
        if bad is not None:
            raise NonFiniteLoss(*bad)
    local = dict(sums)
    if context is not None and context.world_size > 1:
        loss_sum, correct, count = context.all_reduce_sum([sums["loss_sum"], sums["correct"],
                                                           sums["count"]])
        sums = dict(loss_sum=loss_sum, correct=int(round(correct)), count=int(round(count)))
    count = max(sums["count"], 1)
    result = dict(sums, loss=sums["loss_sum"] / count, accuracy=100.0 * sums["correct"] / count,
                  steps=steps, local=local)
    if keep_logits:
        result["logits"] = paddle.concat([k[0] for k in kept]).numpy() if kept else np.zeros((0, 0))
        result["labels"] = paddle.concat([k[1] for k in kept]).numpy() if kept else np.zeros(0, np.int64)
    return result


def batch_norm_statistics(model):
    """The running mean and variance tensors of every BatchNorm layer of `model`."""
    return utils._batch_norm_statistics(utils._batch_norm_layers(model))


def sync_bn_statistics(model, context):
    """Set every rank's BatchNorm running statistics to their mean over all ranks.

    In data-parallel training each rank's running statistics follow its own batches, so
    the ranks' copies of the model differ there (and only there). Call this on every rank
    before evaluating a sharded test set or averaging, so all ranks hold the same model.
    """
    stats = batch_norm_statistics(model)
    if stats:
        with paddle.no_grad():
            for t, s in zip(stats, context.all_reduce_sum(stats)):
                utils._assign(t, s / context.world_size)
