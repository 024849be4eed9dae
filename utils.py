"""Stochastic Weight Averaging for PaddlePaddle: the reusable core.

SWA (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018) trains with SGD and keeps an equal-weight running average of the weights visited
late in training; because BatchNorm running statistics of the averaged weights are not the
average of the statistics, they are recomputed with one pass over the training data.

    >>> swa = SWA(model)                      # holds the averaged copy and its count
    >>> for epoch in range(epochs):
    ...     optimizer.set_lr(piecewise_linear_lr(epoch, 0.1, epochs, swa_start=161, swa_lr=0.05))
    ...     run_epoch(train_batches(), model, optimizer)
    ...     if is_swa_epoch(epoch + 1, swa_start=161):
    ...         swa.update(model)
    >>> swa.bn_update(train_batches())        # BatchNorm statistics of the average
    >>> run_epoch(test_batches(), swa.model)  # {'loss': ..., 'accuracy': ..., 'count': ...}

Nothing here parses arguments, prints or touches files other than checkpoints.
"""
import copy
import math
import os
import random
import tempfile

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import _C_ops

CHECKPOINT_FORMAT = "swa-paddle/1"
# Keys of the original PyTorch code's checkpoints; every checkpoint has them.
CHECKPOINT_KEYS = ("epoch", "state_dict", "swa_state_dict", "swa_n", "optimizer")


# --------------------------------------------------------------------------- averaging

def _unwrap(model):
    """The Layer inside a paddle.DataParallel wrapper, or the model itself."""
    return getattr(model, "_layers", model) if isinstance(model, paddle.DataParallel) else model


def _named_state(model):
    """(name, tensor) for every parameter and buffer, BatchNorm statistics included."""
    model = _unwrap(model)
    yield from model.named_parameters()
    yield from model.named_buffers()


def _paired_state(swa_model, model):
    pairs = []
    for (name_a, a), (name_b, b) in zip(_named_state(swa_model), _named_state(model),
                                        strict=True):
        if name_a != name_b or a.shape != b.shape:
            raise ValueError(f"models differ: {name_a} {list(a.shape)} vs "
                             f"{name_b} {list(b.shape)}")
        pairs.append((a, b))
    return pairs


def moving_average(swa_model, model, alpha):
    """Move `swa_model` towards `model`: swa <- (1 - alpha) * swa + alpha * model, in place.

    Every floating-point parameter and buffer is averaged, the BatchNorm running mean and
    variance included (in Paddle they are non-trainable parameters). Averaged statistics
    are only an approximation of the statistics of the averaged weights, but a usable one
    for a caller who skips `bn_update`; `bn_update` replaces them with the exact values.
    Other tensors (integer buffers) are copied from `model`. `SWA.update` does the same
    with one fused kernel call, faster for models with many small tensors.

    Args:
        swa_model: the running average (a Layer), updated in place.
        model: a Layer of the same architecture (a paddle.DataParallel wrapper is fine).
        alpha: weight of `model`; 1 / (n + 1) keeps an equal-weight average of n + 1 models.

    Returns:
        `swa_model`.

    Example:
        >>> moving_average(swa_model, model, 1.0 / (swa_n + 1)); swa_n += 1
    """
    with paddle.no_grad():
        _lerp(_paired_state(swa_model, model), alpha)
    return swa_model


def _lerp(pairs, alpha):
    """avg <- avg + alpha * (new - avg) for each (avg, new) pair, in place."""
    weights = {}
    for avg, new in pairs:
        if not avg.is_floating_point():
            paddle.assign(new, output=avg)
            continue
        if avg.dtype not in weights:
            weights[avg.dtype] = paddle.full([], alpha, dtype=avg.dtype)
        # Through 1-D views: Paddle's lerp_ is ~9x slower on 4-D tensors than on the same
        # memory seen as 1-D (measured on CPU), and it reads each input once, writes once.
        avg.reshape([-1]).lerp_(new.reshape([-1]), weights[avg.dtype])


def _can_flatten():
    return all(hasattr(paddle.Tensor, name) for name in ("_share_buffer_to", "_is_shared_buffer_with")) \
        and hasattr(_C_ops, "coalesce_tensor") and hasattr(_C_ops, "merged_momentum_")


class _FlatTensors:
    """Float32 tensors kept as views into one contiguous buffer, so one kernel reaches them all.

    Paddle's own RNN layers keep their weights this way. The tensors stay the same Tensor
    objects, so optimizers, checkpoints and hooks see no difference; set_value,
    set_state_dict, assign and in-place kernels write into the buffer. Anything that gives
    a tensor new storage instead (a dtype or device change, another library re-packing
    it) is caught by `buffer()`, which then rebuilds the buffer from the current values.
    """

    def __init__(self, tensors):
        self.tensors = tensors
        self.flat = None

    def buffer(self):
        """The flat buffer, checked (one cheap call per tensor) and rebuilt if needed."""
        if self.flat is None or not all(map(self.flat._is_shared_buffer_with, self.tensors)):
            views, self.flat = _C_ops.coalesce_tensor(self.tensors, paddle.float32, True, False,
                                                      False, 0.0, False, -1, -1, [], [])
            for view, tensor in zip(views, self.tensors):
                view._share_buffer_to(tensor)
        return self.flat


class _FlatAverager:
    """avg <- avg + alpha * (new - avg) for every tensor pair of two models, in one kernel call.

    The float32 tensors of each model are viewed into one flat buffer per model
    (`_FlatTensors`), so the update is one pass over contiguous memory instead of one
    kernel launch per tensor, which dominated for models of hundreds of small tensors
    (PreResNet164: 820). Paddle has no lerp as fast as its multi-tensor momentum kernel,
    which computes v = mu * v + g + c * p (L2 decay c) and p = p - lr * v: with p the
    average, g the new weights, mu = 0, c = -1 and lr = -alpha that is
    p + alpha * (g - p). `v` is scratch memory the size of the model, allocated once.
    Other dtypes, or a Paddle without these kernels, take the per-tensor path.
    """

    def __init__(self, swa_model, model):
        self.model = _unwrap(model)
        self.float32, self.rest = [], []  # (average, new) tensor pairs
        for a, b in _paired_state(swa_model, self.model):
            (self.float32 if a.dtype == paddle.float32 == b.dtype else self.rest).append((a, b))
        self.fused = bool(self.float32) and _can_flatten()
        if self.fused:
            self.avg = _FlatTensors([a for a, _ in self.float32])
            self.new = _FlatTensors([b for _, b in self.float32])
            self.scratch = None

    def __call__(self, alpha):
        with paddle.no_grad():
            if self.fused:
                try:
                    avg, new = self.avg.buffer(), self.new.buffer()
                    if self.scratch is None:
                        self.scratch = paddle.zeros_like(avg)
                    rate = paddle.full([1], -alpha, dtype="float32")
                    _C_ops.merged_momentum_([avg], [new], [self.scratch], [rate], None, 0.0,
                                            False, ["l2_decay"], [-1.0], False, 1.0)
                except (TypeError, ValueError, RuntimeError):
                    # This Paddle's kernels differ: they reject the call before writing
                    # anything, so the per-tensor path is still exact.
                    self.fused = False
            if not self.fused:
                _lerp(self.float32, alpha)
            _lerp(self.rest, alpha)


# --------------------------------------------------------------------------- BatchNorm

def _batch_norm_layers(model):
    """BatchNorm layers (all variants) that track running statistics."""
    layers = []
    for layer in _unwrap(model).sublayers(include_self=True):
        if isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm)):
            # Layers told to always normalise with their stored statistics never update them,
            # so a reset would destroy them: leave them alone.
            if not getattr(layer, "_use_global_stats", False):
                layers.append(layer)
    return layers


def _batch_input(batch):
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(x)


def bn_update(loader, model, distributed=False):
    """Recompute the BatchNorm running statistics of `model` with one pass over `loader`.

    Each BatchNorm layer's running mean becomes the mean of its inputs over all samples,
    and its running variance the sample-weighted average of the (biased) batch variances,
    exactly, whatever the batch sizes: batch b, after n samples, is given momentum
    n / (n + b) in Paddle's convention (running = m * running + (1 - m) * batch). Runs
    without gradients, with every layer in training mode as the statistics are gathered,
    then restores each layer's momentum and train/eval mode (also if the pass fails, in
    which case the old statistics are restored too). A model without BatchNorm is returned
    untouched and no data is read.

    Args:
        loader: iterable of batches, each `(x, y, ...)` (list or tuple) or `x` alone.
        model: the Layer whose statistics are recomputed (a DataParallel wrapper is fine).
        distributed: if True, every process of the initialised paddle.distributed group
            must call this with its own shard of the data; the per-layer sums are
            all-reduced, so every rank ends with the statistics of the union of the shards.

    Returns:
        The number of samples seen (over all ranks when `distributed`).

    Example:
        >>> bn_update(train_loader, swa_model)
    """
    layers = _batch_norm_layers(model)
    if not layers:
        return 0
    stats = [t for layer in layers for t in (layer._mean, layer._variance)]
    saved_stats = [t.clone() for t in stats]
    saved_momenta = [layer._momentum for layer in layers]
    saved_modes = [(layer, layer.training) for layer in _unwrap(model).sublayers(include_self=True)]
    seen = 0
    try:
        with paddle.no_grad():
            model.train()
            for batch in loader:
                x = _batch_input(batch)
                size = x.shape[0]
                for layer in layers:
                    layer._momentum = seen / (seen + size)
                model(x)
                seen += size
        total = _all_reduce_statistics(stats, seen) if distributed else seen
        if total == 0:
            raise ValueError("bn_update: the loader yielded no samples")
    except BaseException:
        with paddle.no_grad():
            for t, old in zip(stats, saved_stats):
                paddle.assign(old, output=t)
        raise
    finally:
        for layer, momentum in zip(layers, saved_momenta):
            layer._momentum = momentum
        for layer, mode in saved_modes:
            layer.training = mode
    return total


def _all_reduce_sum(tensors):
    """Sums over all ranks of float64 copies of `tensors`, in one collective.

    Every rank receives the same sums, so values derived from them agree bit for bit.
    """
    import paddle.distributed as dist

    flat = paddle.concat([t.astype("float64").flatten() for t in tensors])
    dist.all_reduce(flat)
    sizes = [int(np.prod(t.shape)) for t in tensors]
    return [part.reshape(t.shape) for part, t in zip(paddle.split(flat, sizes), tensors)]


def _all_reduce_statistics(stats, seen):
    """Replace each rank's averages by the sample-weighted average over all ranks."""
    with paddle.no_grad():
        weighted = [t.astype("float64") * seen for t in stats]
        *sums, total = _all_reduce_sum(weighted + [paddle.full([1], seen, dtype="float64")])
        total = int(round(total.item()))
        if total:
            for t, s in zip(stats, sums):
                paddle.assign((s / total).astype(t.dtype), output=t)
    return total


def sync_bn_statistics(model):
    """Set every rank's BatchNorm running statistics to their mean over all ranks.

    In data-parallel training each rank's running statistics follow its own batches, so
    the ranks' copies of the model differ there (and only there). Call this on every rank
    before evaluating a sharded test set or averaging, so all ranks hold the same model.
    """
    import paddle.distributed as dist

    stats = [t for layer in _batch_norm_layers(model) for t in (layer._mean, layer._variance)]
    if stats:
        with paddle.no_grad():
            for t, s in zip(stats, _all_reduce_sum(stats)):
                paddle.assign((s / dist.get_world_size()).astype(t.dtype), output=t)


# --------------------------------------------------------------------------- SWA state

def is_swa_epoch(epoch, swa_start, swa_c_epochs=1):
    """Whether the model is added to the average after 1-based epoch `epoch`.

    As in the original code: epochs swa_start, swa_start + c, swa_start + 2c, ...

    Example:
        >>> [k for k in range(1, 9) if is_swa_epoch(k, swa_start=4)]
        [4, 5, 6, 7, 8]
    """
    return epoch >= swa_start and (epoch - swa_start) % swa_c_epochs == 0


class SWA:
    """The SWA state of a training run: the averaged model and how many models it holds.

    Args:
        model: the model being trained; the average starts as a copy of it, holding 0 models.

    Example:
        >>> swa = SWA(model)
        >>> swa.update(model)                 # after each averaging epoch
        >>> swa.bn_update(train_loader)       # before evaluating swa.model
        >>> state = swa.state_dict()          # {'swa_state_dict': ..., 'swa_n': ...}
        >>> swa.set_state_dict(state)
    """

    def __init__(self, model):
        self.model = copy.deepcopy(_unwrap(model))
        for p in self.model.parameters():
            p.stop_gradient = True
        self.n = 0
        # Whether the BatchNorm statistics are those of the current average (bn_update ran
        # after the last update), or only the average of the models' statistics.
        self.bn_updated = False
        self._averager = None

    def update(self, model):
        """Add `model` to the equal-weight average. Returns the new count.

        See `moving_average` for what is averaged. For speed, the first call views the
        float32 tensors of `model` and of the average into one flat buffer per model:
        the Tensor objects, their values and the optimizer's state are unchanged, and a
        tensor later given new storage is noticed and re-packed at the next call. The
        pairing is cached for the model last given.
        """
        if self._averager is None or self._averager.model is not _unwrap(model):
            self._averager = _FlatAverager(self.model, model)
        self._averager(1.0 / (self.n + 1))
        self.n += 1
        self.bn_updated = False
        return self.n

    def bn_update(self, loader, distributed=False):
        """Recompute the average's BatchNorm statistics; see `bn_update`."""
        seen = bn_update(loader, self.model, distributed=distributed)
        self.bn_updated = True
        return seen

    def state_dict(self):
        """The average, its count (the original checkpoint's key names) and `swa_bn_updated`."""
        return {"swa_state_dict": self.model.state_dict(), "swa_n": self.n,
                "swa_bn_updated": self.bn_updated}

    def set_state_dict(self, state):
        """Restore what `state_dict` returned; ValueError if the average does not fit the model."""
        load_weights(self.model, state["swa_state_dict"])
        self.n = int(state["swa_n"])
        self.bn_updated = bool(state.get("swa_bn_updated", False))


# --------------------------------------------------------------------------- schedules

def piecewise_linear_lr(epoch, lr_init, epochs, swa_start=None, swa_lr=None):
    """The original SWA code's learning rate at the start of 0-based epoch `epoch`.

    With SWA (swa_start given), t = epoch / swa_start and the rate ends at swa_lr;
    without, t = epoch / epochs and it ends at lr_init / 100. The factor is 1 for
    t <= 0.5, falls linearly to the end ratio r for 0.5 < t <= 0.9, and is r after.
    swa_start = 0 (averaging from the first epoch, e.g. from pretrained weights) gives
    swa_lr throughout.

    Args:
        epoch: 0-based epoch about to start.
        lr_init: initial learning rate.
        epochs: total epochs (used without SWA).
        swa_start: 1-based epoch of the first average, or None for plain SGD.
        swa_lr: the constant rate SWA settles at (required with swa_start).

    Returns:
        The learning rate (float).

    Example:
        >>> piecewise_linear_lr(100, 0.1, 200, swa_start=161, swa_lr=0.05)
        0.08757763975155279
    """
    if swa_start is None:
        t, ratio = epoch / epochs, 0.01
    else:
        t = epoch / swa_start if swa_start > 0 else math.inf
        ratio = swa_lr / lr_init
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    else:
        factor = ratio
    return lr_init * factor


def cyclic_lr(epoch, step, steps_per_epoch, lr_init, swa_lr, swa_start, swa_c_epochs=1):
    """The cyclic schedule of the SWA paper (section 3.1), per iteration.

    Cycles of `swa_c_epochs` epochs end at the averaging epochs (swa_start, swa_start + c,
    ...); within a cycle the rate falls linearly from lr_init to swa_lr, reaching swa_lr at
    the cycle's last iteration, where the model is averaged: lr = (1 - t) * lr_init + t *
    swa_lr with t = (iteration in cycle, 1-based) / (iterations per cycle). Before the first
    cycle the rate is lr_init.

    Args:
        epoch, step: 0-based epoch and batch within it.
        steps_per_epoch: batches per epoch.
        lr_init, swa_lr: the rates at the start (alpha1) and end (alpha2) of a cycle.
        swa_start: 1-based epoch of the first average; swa_c_epochs: cycle length in epochs.

    Returns:
        The learning rate (float).

    Example:
        >>> cyclic_lr(9, 99, 100, 0.1, 0.01, swa_start=10, swa_c_epochs=2)   # end of a cycle
        0.01
    """
    first = swa_start - swa_c_epochs  # 0-based epoch where the first cycle begins
    if epoch < first:
        return lr_init
    position = ((epoch - first) % swa_c_epochs) * steps_per_epoch + step + 1
    t = position / (swa_c_epochs * steps_per_epoch)
    return (1.0 - t) * lr_init + t * swa_lr


def step_decay_lr(epoch, lr_init, epochs, swa_start=None, swa_lr=None):
    """A step ("descent") schedule, then constant swa_lr in the SWA phase.

    With t = epoch / swa_start (epoch / epochs without SWA): lr_init for t < 0.5,
    lr_init / 10 for t < 0.75, lr_init / 100 for t < 1; from swa_start on (t >= 1), swa_lr,
    the exploring rate SWA averages at. swa_start = 0 gives swa_lr throughout.

    Example:
        >>> [step_decay_lr(e, 0.1, 20, swa_start=8, swa_lr=0.05) for e in (0, 4, 6, 8)]
        [0.1, 0.010000000000000002, 0.001, 0.05]
    """
    if swa_start is None:
        t = epoch / epochs
    else:
        t = epoch / swa_start if swa_start > 0 else math.inf
        if t >= 1:
            return swa_lr
    return lr_init * (1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01)


SCHEDULES = ("linear", "cyclic", "descent")


def learning_rate(schedule, epoch, step, steps_per_epoch, lr_init, epochs, swa_start=None,
                  swa_lr=None, swa_c_epochs=1):
    """The rate of `schedule` ("linear": `piecewise_linear_lr`, the original; "cyclic":
    `cyclic_lr`; "descent": `step_decay_lr`) at batch `step` of 0-based `epoch`.
    swa_start None means plain SGD (not allowed with "cyclic")."""
    if schedule == "linear":
        return piecewise_linear_lr(epoch, lr_init, epochs, swa_start, swa_lr)
    if schedule == "descent":
        return step_decay_lr(epoch, lr_init, epochs, swa_start, swa_lr)
    if schedule == "cyclic":
        if swa_start is None:
            raise ValueError("the cyclic schedule is defined by SWA's cycles: give swa_start")
        return cyclic_lr(epoch, step, steps_per_epoch, lr_init, swa_lr, swa_start, swa_c_epochs)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


# --------------------------------------------------------------------------- train / eval

def run_epoch(batches, model, optimizer=None, on_step=None, distributed=False, totals=None,
              keep_logits=False):
    """One pass over `batches`: trains when `optimizer` is given, otherwise evaluates.

    Training uses cross-entropy, model.train() and one optimizer step per batch;
    evaluation uses model.eval() without gradients. A non-finite loss raises
    `NonFiniteLoss` before the optimizer step, so the weights stay those of the last good
    step.

    Args:
        batches: iterable of `(x, y)` with integer labels y.
        model: the Layer (or DataParallel wrapper) to run.
        optimizer: a paddle optimizer to train with, or None to evaluate.
        on_step: optional callable(step, totals) called after each batch (0-based step);
            returning True stops the pass early (e.g. on a signal).
        distributed: if True, the sums are all-reduced, so every rank returns the metrics
            over all ranks' data.
        totals: sums from an interrupted pass to continue from (as returned).
        keep_logits: also return this process's outputs and labels as numpy arrays.

    Returns:
        dict with `loss` (mean cross-entropy), `accuracy` (percent), `count` (samples),
        `steps` (batches run in this call), the raw sums `loss_sum`, `correct`, and with
        keep_logits, `logits` and `labels`.

    Example:
        >>> run_epoch(test_batches, model)["accuracy"]
        93.2
    """
    training = optimizer is not None
    if training:
        model.train()
    else:
        model.eval()
    sums = dict(loss_sum=0.0, correct=0, count=0)
    if totals:
        sums.update({key: totals[key] for key in sums})
    steps, kept = 0, []
    with paddle.set_grad_enabled(training):
        for step, (x, y) in enumerate(batches):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            value = float(loss)
            if not math.isfinite(value):
                raise NonFiniteLoss(step, value)
            if training:
                loss.backward()
                optimizer.step()
                optimizer.clear_grad()
            size = int(y.shape[0])
            sums["loss_sum"] += value * size
            sums["correct"] += int((logits.argmax(axis=1) == y.reshape([-1])).sum())
            sums["count"] += size
            steps += 1
            if keep_logits:
                kept.append((logits.numpy(), y.numpy().reshape(-1)))
            if on_step is not None and on_step(step, sums):
                break
    if distributed:
        sums = _all_reduce_sums(sums)
    count = max(sums["count"], 1)
    result = dict(sums, loss=sums["loss_sum"] / count, accuracy=100.0 * sums["correct"] / count,
                  steps=steps)
    if keep_logits:
        result["logits"] = np.concatenate([k[0] for k in kept]) if kept else np.zeros((0, 0))
        result["labels"] = np.concatenate([k[1] for k in kept]) if kept else np.zeros(0, np.int64)
    return result


def _all_reduce_sums(sums):
    flat = paddle.to_tensor([sums["loss_sum"], sums["correct"], sums["count"]], dtype="float64")
    loss_sum, correct, count = _all_reduce_sum([flat])[0].tolist()
    return dict(loss_sum=loss_sum, correct=int(round(correct)), count=int(round(count)))


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite at 0-based step `step` of the pass."""

    def __init__(self, step, value):
        super().__init__(f"loss is {value} at step {step}")
        self.step, self.value = step, value


# --------------------------------------------------------------------------- checkpoints

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def checkpoint_path(directory, epoch, step=0):
    """`<directory>/checkpoint-<epoch>.pdparams`, or `...-<epoch>-step<step>...` mid-epoch."""
    suffix = f"-step{step}" if step else ""
    return os.path.join(directory, f"checkpoint-{epoch}{suffix}.pdparams")


def save_checkpoint(directory, epoch, step=0, **state):
    """Write a checkpoint atomically and return its path.

    The dict holds `epoch` (epochs completed), `step` (batches completed in the next epoch,
    0 at an epoch boundary), a format tag and everything in `state`; pass at least the
    original code's keys `state_dict`, `swa_state_dict`, `swa_n`, `optimizer`. It is
    written to a temporary file in `directory`, flushed to disk and renamed, so a crash
    never leaves a truncated checkpoint under the final name.

    Args:
        directory: run directory (must exist).
        epoch: epochs completed.
        step: batches completed in epoch `epoch` (0-based) when saved mid-epoch.
        **state: tensors, state dicts, numbers, strings, numpy arrays, nested dicts/lists.

    Returns:
        The checkpoint's path.

    Example:
        >>> save_checkpoint("runs/a", 10, state_dict=model.state_dict(),
        ...                 optimizer=optimizer.state_dict(), **swa.state_dict())
    """
    path = checkpoint_path(directory, epoch, step)
    return atomic_save(dict(format=CHECKPOINT_FORMAT, epoch=epoch, step=step, **state), path)


def atomic_save(obj, path):
    """paddle.save `obj` to `path` through a temporary file in the same folder, flushed to
    disk and renamed: `path` is either absent, its old content, or complete. Returns `path`."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        paddle.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path):
    """Read a checkpoint written by `save_checkpoint` (or the original code's layout).

    Args:
        path: checkpoint file.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, or not a checkpoint;
            the message names the file.

    Example:
        >>> ckpt = load_checkpoint("runs/a/checkpoint-10.pdparams"); ckpt["swa_n"]
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = paddle.load(path)
    except Exception as e:  # paddle.load raises many types for bad bytes
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or not a Paddle "
                              f"file ({type(e).__name__})") from None
    missing = [key for key in ("epoch", "state_dict") if not isinstance(data, dict) or key not in data]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (no {' or '.join(missing)} "
                              "entry); a plain weights file is not a checkpoint")
    return data


def load_weights(model, state_dict, source="state dict"):
    """Load `state_dict` into `model`, requiring the same names and shapes.

    Paddle's own `set_state_dict` skips mismatched entries with a warning; this refuses
    them, naming the first difference.

    Raises:
        ValueError: keys or shapes differ (e.g. a checkpoint of another model).
    """
    model = _unwrap(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: "
                         f"{len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    for key, value in expected.items():
        if list(value.shape) != list(state_dict[key].shape):
            raise ValueError(f"{source} does not match the model: {key} has shape "
                             f"{list(state_dict[key].shape)}, the model {list(value.shape)}")
    model.set_state_dict(state_dict)
    return model


def get_rng_state():
    """The states of Python's, numpy's and Paddle's global generators, for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "paddle": paddle.get_rng_state()}


def set_rng_state(state):
    """Restore what `get_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle"])


# --------------------------------------------------------------------------- paddle.Model.fit

class SWACallback(paddle.callbacks.Callback):
    """SWA for Paddle's high-level API: `paddle.Model.fit(..., callbacks=[SWACallback(...)])`.

    Adds the network to an equal-weight average after epochs swa_start, swa_start +
    swa_freq, ... (1-based, as `is_swa_epoch`), optionally driving the learning rate from the
    first averaged epoch on; when fit ends, the network holds the averaged weights with
    their BatchNorm statistics recomputed on `bn_data`. `restore_sgd()` puts the last SGD
    weights back; `swa` is the `SWA` state. The averaged network saves and loads with
    `paddle.Model.save` / `load` like any other.

    Args:
        swa_start: 1-based epoch of the first average (0: from the start, e.g. fine-tuning
            pretrained weights).
        swa_freq: average every swa_freq epochs (the cycle length with lr_schedule="cyclic").
        swa_lr: the SWA rate; None leaves the optimizer's rate alone.
        lr_schedule: "constant" (swa_lr from the first averaged epoch on) or "cyclic"
            (`cyclic_lr` per batch, from the optimizer's initial rate down to swa_lr).
        bn_data: the training data for the BatchNorm refresh: a DataLoader, an iterable of
            batches, or a paddle.io.Dataset (batched with fit's batch size). Required when the
            network has BatchNorm; False skips the refresh (averaged statistics are kept).

    Example:
        >>> swa = SWACallback(swa_start=15, swa_lr=0.01, bn_data=train_dataset)
        >>> model.fit(train_dataset, epochs=20, batch_size=64, callbacks=[swa])
        >>> model.evaluate(test_dataset)        # the averaged weights
        >>> swa.restore_sgd()                   # back to the last SGD weights
    """

    def __init__(self, swa_start, swa_freq=1, swa_lr=None, lr_schedule="constant", bn_data=None):
        super().__init__()
        if lr_schedule not in ("constant", "cyclic"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cyclic', not {lr_schedule!r}")
        if lr_schedule == "cyclic" and swa_lr is None:
            raise ValueError("lr_schedule='cyclic' needs swa_lr (the rate at the end of a cycle)")
        self.swa_start, self.swa_freq, self.swa_lr = swa_start, swa_freq, swa_lr
        self.lr_schedule, self.bn_data = lr_schedule, bn_data
        self.swa, self.sgd_state, self._epoch = None, None, 0

    def _optimizer(self):
        optimizer = self.model._optimizer
        if self.swa_lr is not None and not isinstance(optimizer._learning_rate, (int, float)):
            raise ValueError("SWACallback sets the learning rate itself (swa_lr): give the "
                             "optimizer a float learning rate, not an LRScheduler")
        return optimizer

    def on_train_begin(self, logs=None):
        network = self.model.network
        if self.bn_data is None and _batch_norm_layers(network):
            raise ValueError("SWACallback needs bn_data (the training data) to recompute the "
                             "average's BatchNorm statistics, or bn_data=False to skip that")
        self.lr_init = self._optimizer().get_lr()
        self.swa = SWA(network)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.lr_schedule == "constant" and self.swa_lr is not None and epoch + 1 >= self.swa_start:
            self._optimizer().set_lr(self.swa_lr)

    def on_train_batch_begin(self, step, logs=None):
        if self.lr_schedule == "cyclic" and self._epoch >= self.swa_start - self.swa_freq:
            self._optimizer().set_lr(cyclic_lr(self._epoch, step, self.params["steps"], self.lr_init,
                                               self.swa_lr, self.swa_start, self.swa_freq))

    def on_epoch_end(self, epoch, logs=None):
        if is_swa_epoch(epoch + 1, self.swa_start, self.swa_freq):
            self.swa.update(self.model.network)

    def on_train_end(self, logs=None):
        if not self.swa.n:
            return
        network = self.model.network
        self.sgd_state = {k: v.clone() for k, v in network.state_dict().items()}
        if self.bn_data is not False and _batch_norm_layers(network):
            self.swa.bn_update(self._bn_batches())
        load_weights(network, self.swa.model.state_dict())

    def _bn_batches(self):
        if isinstance(self.bn_data, paddle.io.Dataset):
            return paddle.io.DataLoader(self.bn_data, batch_size=self.params.get("batch_size") or 64,
                                        shuffle=True)
        return self.bn_data

    def restore_sgd(self):
        """Put the last SGD weights back into the network (after fit ended)."""
        if self.sgd_state is None:
            raise ValueError("no SGD weights to restore: fit has not ended with an average")
        load_weights(self.model.network, self.sgd_state)
