"""Learning-rate schedules of SWA and when to average: pure functions of their arguments.

    >>> [learning_rate("linear", e, 0, 100, 0.1, 200, swa_start=161, swa_lr=0.05) for e in (0, 100, 150)]
    [0.1, 0.08486024844720498, 0.05]
"""
import math


def is_swa_epoch(epoch, swa_start, swa_c_epochs=1):
    """Whether the model is added to the average after 1-based epoch `epoch`.

    As in the original code: epochs swa_start, swa_start + c, swa_start + 2c, ...

    Example:
        >>> [k for k in range(1, 9) if is_swa_epoch(k, swa_start=4)]
        [4, 5, 6, 7, 8]
    """
    return epoch >= swa_start and (epoch - swa_start) % swa_c_epochs == 0


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
        0.08486024844720498
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



def anneal_lr(t, lr_start, lr_end, strategy="cos"):
    """The rate a fraction `t` (0..1) of the way through annealing from lr_start to lr_end.

    "linear": (1 - t) * lr_start + t * lr_end (exactly lr_end at t = 1); "cos": the same with
    (1 - cos(pi t)) / 2 in place of t, as torch's SWALR and Lightning's SWA anneal.

    Example:
        >>> round(anneal_lr(0.5, 0.1, 0.02, "cos"), 12), anneal_lr(1.0, 0.1, 0.02, "linear")
        (0.06, 0.02)
    """
    if strategy not in ("cos", "linear"):
        raise ValueError(f"anneal strategy must be 'cos' or 'linear', not {strategy!r}")
    t = min(max(t, 0.0), 1.0)
    shape = t if strategy == "linear" else (1.0 - math.cos(math.pi * t)) / 2.0
    return (1.0 - shape) * lr_start + shape * lr_end
