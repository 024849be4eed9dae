"""One pass of training and one of evaluation, and the data-parallel bookkeeping around them.

    >>> train_pass(batches, model, optimizer, lr_at=lambda step: 0.1, seed_at=lambda step: step)
    >>> evaluate_pass(test_batches, model)["accuracy"]

A pass reads the loss and the number of correct predictions back from the device only every
`sync_every` steps, in one copy: on a GPU a read per step stalls the queue of work.
"""
import contextlib
import io
import math
import time

import numpy as np
import paddle
import paddle.nn.functional as F

import utils
from harness import errors


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite at 0-based step `step` of the pass (on some rank)."""

    def __init__(self, step, value):
        super().__init__(f"loss is {value} at step {step}")
        self.step, self.value = step, value


def train_pass(batches, model, optimizer, lr_at, seed_at, first_step=0, after_step=None,
               sync_every=1, on_sync=None, context=None, totals=None, amp=None):
    """SGD over `batches` (cross-entropy, model.train(), one optimizer step per batch).

    Before batch `step` (counted from `first_step`) the rate is set to `lr_at(step)` and
    Paddle's generator (dropout) seeded with `seed_at(step)`. Every `sync_every` steps the
    losses and correct counts since the last read are copied to the host at once; a
    non-finite loss then raises `NonFiniteLoss` naming its step (0-based in this call), before
    that step's update (with sync_every=1 the weights stay those of the last good step;
    otherwise up to sync_every - 1 updates with a bad loss may have been applied, so the
    model must not be saved).

    Args:
        batches: iterable of `(x, y)` with integer labels y.
        model: the Layer (or DataParallel wrapper) to train.
        optimizer: a paddle optimizer.
        lr_at, seed_at: callables of the step number (see above).
        first_step: the number of the first batch (a resumed epoch's).
        after_step: optional callable() run after every optimizer step (train.py updates an
            EMA there).
        sync_every: steps between reads from the device (1 on CPU, where a read costs nothing).
        on_sync: optional callable(steps_done, sums) at each read; True asks to stop after the
            current step (agreed over all ranks with `context`).
        context: a distributed.Distributed for data-parallel runs (None: one process); its ranks
            agree at every read (stop, non-finite loss) and the sums are all-reduced.
        totals: sums of an interrupted pass to continue from (`local` of its result).
        amp: a `MixedPrecision`: the forward pass under its autocast, the step through its
            loss scaler; steps it skips (gradients overflowed) are counted in `skipped`.

    Returns:
        The sums and means as `Sums.result` gives them; `steps` is the batches run here
        (fewer than given if asked to stop); `data_wait` the seconds spent waiting for them
        (on this rank).
    """
    model.train()
    sums = Sums(totals)
    agree = context is not None and context.world_size > 1
    steps = 0
    batches = Waited(batches)
    with contextlib.closing(batches):  # a loader's threads stop here even on an error
        for i, (x, y) in enumerate(batches):
            optimizer.set_lr(lr_at(first_step + i))
            paddle.seed(seed_at(first_step + i))
            with amp.autocast() if amp else contextlib.nullcontext():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            sums.add(loss, logits, y)
            stop = False
            if (i + 1) % sync_every == 0:
                bad = sums.read(i + 1 - sums.unread())
                stop = bool(on_sync(i + 1, sums.totals)) if on_sync else False
                if agree:
                    any_bad, stop = context.agree_any(bad is not None, stop)
                    bad = bad or ((i, "non-finite on another rank") if any_bad else None)
                if bad is not None:
                    raise NonFiniteLoss(*bad)
            if amp:
                sums.totals["skipped"] += amp.step(loss, optimizer)
            else:
                loss.backward()
                optimizer.step()
            optimizer.clear_grad()
            if after_step is not None:
                after_step()
            steps += 1
            if stop:
                break
    bad = sums.read(steps - sums.unread())
    if agree:
        any_bad, = context.agree_any(bad is not None)
        bad = bad or ((steps - 1, "non-finite on another rank") if any_bad else None)
    if bad is not None:
        raise NonFiniteLoss(*bad)
    return dict(sums.result(steps, context), data_wait=batches.seconds)


class Waited:
    """An iterator over `batches` that adds up the seconds its caller waited for them in
    `seconds`: the time the steps stood still for data."""

    def __init__(self, batches):
        self.iterator, self.seconds = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        asked = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - asked

    def close(self):
        if hasattr(self.iterator, "close"):  # a generator: stops a loader's threads now
            self.iterator.close()


def evaluate_pass(batches, model, context=None, keep_logits=False, amp=None):
    """Loss and accuracy of `model` (model.eval(), no gradients) over `batches` of `(x, y)`.

    With `context` (data-parallel) the sums are all-reduced, so every rank returns the metrics
    over all ranks' batches. keep_logits: also return this process's `logits` and `labels`
    as numpy arrays. amp: a `MixedPrecision` whose autocast the forward pass runs under.
    """
    model.eval()
    sums, kept, steps = Sums(), [], 0
    with paddle.no_grad():
        for x, y in batches:
            with amp.autocast() if amp else contextlib.nullcontext():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            sums.add(loss, logits, y)
            if keep_logits:
                kept.append((logits.detach(), y.reshape([-1])))
            steps += 1
    sums.read(0)
    result = sums.result(steps, context)
    if keep_logits:
        result["logits"] = paddle.concat([k[0] for k in kept]).numpy() if kept else np.zeros((0, 0))
        result["labels"] = paddle.concat([k[1] for k in kept]).numpy() if kept else np.zeros(0, np.int64)
    return result


class Sums:
    """A pass's loss and correct-prediction sums, kept on the host in float64 (exactly as if
    read every step) and read from the device a batch of steps at a time."""

    def __init__(self, totals=None):
        self.totals = dict(loss_sum=0.0, correct=0, count=0, skipped=0)
        if totals:
            self.totals.update({key: totals.get(key, 0) for key in self.totals})
        self.pending = []

    def add(self, loss, logits, y):
        hits = (logits.argmax(axis=1) == y.reshape([-1])).astype("int64").sum()
        self.pending.append((loss.detach(), hits, int(y.shape[0])))

    def unread(self):
        return len(self.pending)

    def read(self, first_step):
        """Add the pending steps' values to the sums; returns (step, value) of the first
        non-finite loss among them, or None."""
        if not self.pending:
            return None
        losses = paddle.stack([p[0].reshape([]) for p in self.pending]).astype("float64")
        correct = paddle.stack([p[1].reshape([]) for p in self.pending]).astype("float64")
        values = paddle.concat([losses, correct]).numpy()
        count, bad = len(self.pending), None
        for i, (loss, hits, (_, _, size)) in enumerate(zip(values[:count], values[count:], self.pending)):
            if not math.isfinite(loss) and bad is None:
                bad = (first_step + i, float(loss))
            self.totals["loss_sum"] += float(loss) * size
            self.totals["correct"] += int(hits)
            self.totals["count"] += size
        self.pending.clear()
        return bad

    def result(self, steps, context=None):
        """dict with `loss` (mean cross-entropy), `accuracy` (percent), `count`, `steps`, the
        raw sums `loss_sum`, `correct` (over all ranks with `context`), `skipped` (optimizer
        steps the loss scaler skipped: the same on every rank, whose gradients are shared) and
        `local` (this rank's sums, which `train_pass(totals=...)` takes)."""
        local, sums = dict(self.totals), dict(self.totals)
        if context is not None and context.world_size > 1:
            loss_sum, correct, count = context.all_reduce_sum([sums["loss_sum"], sums["correct"],
                                                               sums["count"]])
            sums = dict(loss_sum=loss_sum, correct=int(round(correct)), count=int(round(count)),
                        skipped=sums["skipped"])
        count = max(sums["count"], 1)
        return dict(sums, loss=sums["loss_sum"] / count, accuracy=100.0 * sums["correct"] / count,
                    steps=steps, local=local)


def sync_bn_statistics(model, context, samples=None):
    """Set every rank's BatchNorm running statistics to their mean over all ranks, in one
    float64 all-reduce: the one place the project averages statistics over ranks.

    In data-parallel training each rank's running statistics follow its own batches, so
    the ranks' copies of the model differ there (and only there): call this on every rank
    before evaluating a sharded test set or averaging, so all ranks hold the same model.
    After a refresh from each rank's shard (`bn_update`), `samples` weights each rank by the
    samples it saw, which gives the statistics of the union of the shards.

    Args:
        model: the Layer (or DataParallel wrapper) whose statistics are averaged.
        context: the distributed.Distributed of the job.
        samples: this rank's sample count, the weight of its statistics; None: equal weights.

    Returns:
        The sum of the weights over the ranks (the world size when `samples` is None).
    """
    stats = utils.batch_norm_statistics(model)
    weight = 1.0 if samples is None else float(samples)
    if not context.enabled:
        return weight
    *sums, total = context.all_reduce_sum([t.astype("float64") * weight for t in stats] + [weight])
    if total > 0:
        with paddle.no_grad():
            for t, s in zip(stats, sums):
                paddle.assign((s / total).astype(t.dtype), output=t)
    return total


def bn_update(loader, average, context):
    """Recompute BatchNorm statistics in a (possibly) data-parallel job: every rank refreshes
    from its own shard of the data, then all take the sample-weighted mean over the ranks, so
    each ends with the statistics of the whole data (a single process refreshing over all the
    batches gives the same up to float32 rounding).

    The ranks agree on failure: if the refresh fails on any rank, every rank raises (its own
    error, or errors.OtherRankFailed) with its statistics as they were, and none is left
    waiting in a collective.

    Args:
        loader: this rank's batches, as `utils.bn_update` takes them.
        average: a `utils.SWA` (its average is refreshed and marked so) or a Layer.
        context: the distributed.Distributed of the job (one process: a plain refresh).

    Returns:
        The number of samples seen over all ranks.
    """
    swa = average if isinstance(average, utils.SWA) else None
    if swa is not None and not swa.n:
        return swa.bn_update(loader)  # refused alike on every rank: there is no average yet
    model = average if swa is None else swa.model
    stats = utils.batch_norm_statistics(model)
    saved, was_updated = [t.clone() for t in stats], swa is not None and swa.bn_updated
    refresh = (lambda: utils.bn_update(loader, model)) if swa is None else (lambda: swa.bn_update(loader))
    try:
        seen = context.together(refresh)
    except errors.OtherRankFailed:  # this rank's own refresh went through: undo it too
        with paddle.no_grad():
            for t, old in zip(stats, saved):
                paddle.assign(old, output=t)
        if swa is not None:
            swa.bn_updated = was_updated
        raise
    return int(round(sync_bn_statistics(model, context, samples=seen))) if stats else seen


class ScaleCollapsed(FloatingPointError):
    """The float16 loss scale fell below `MixedPrecision.SCALE_FLOOR`: every step overflows."""


class MixedPrecision:
    """Automatic mixed precision for a training pass: the forward pass under paddle.amp's
    autocast at `level` ("O1", "O2") and `dtype`, and for float16 a GradScaler with dynamic
    loss scaling (bfloat16 has float32's range and needs none).

    `step` scales the loss, steps the optimizer unless the gradients overflowed, updates the
    scale and says whether the step was skipped, read from the scaler's public state: after a
    skipped step its count of good steps is 0 and its scale did not grow. A scale below
    SCALE_FLOOR raises ScaleCollapsed.
    """

    SCALE_FLOOR = 2.0 ** -20

    def __init__(self, level, dtype="float16"):
        self.level, self.dtype = level, dtype
        self.scaler = paddle.amp.GradScaler() if dtype == "float16" else None
        self.scale = self._state()["scale"] if self.scaler is not None else None

    def autocast(self):
        return paddle.amp.auto_cast(level=self.level, dtype=self.dtype)

    def _state(self):
        state = self.scaler.state_dict()
        return dict(state, scale=float(np.asarray(state["scale"]).reshape(-1)[0]))

    def step(self, loss, optimizer):
        """Backward and optimizer step; returns 1 if the scaler skipped the step, else 0."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return 0
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        with contextlib.redirect_stdout(io.StringIO()):  # Paddle prints each scale decrease
            self.scaler.update()
        state = self._state()
        skipped = state["incr_count"] == 0 and state["scale"] <= self.scale
        self.scale = state["scale"]
        if self.scale < self.SCALE_FLOOR:
            raise ScaleCollapsed(f"the float16 loss scale fell to {self.scale:.3g}")
        return int(skipped)

    def state_dict(self):
        """The scaler's state (scale, good and bad step counts), for a checkpoint; None
        without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state):
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
            self.scale = self._state()["scale"]


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
