"""Learning rates, and when to average, evaluate and reseed: pure functions of where training is.

    >>> [learning_rate("linear", e, 0, 100, 0.1, 200, swa_start=161, swa_lr=0.05) for e in (0, 100, 150)]
    [0.1, 0.08486024844720498, 0.05]
"""
import math
import numbers

import numpy as np


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


class SWASchedule:
    """When a fit averages and at what rates it trains: the fit callback's schedule, a pure
    function of where training is (1-based epochs for `swa_start`, as `is_swa_epoch`).

    Args:
        swa_start: the first averaged epoch (0: from the start), or a fraction f in (0, 1)
            of the fit's epochs E: then max(int(f * E), 1), as Lightning's swa_epoch_start
            counts (its 0-based first SWA epoch is max(int(f * E) - 1, 0)): 0.8 of 10 epochs
            gives the SWA rate from epoch 8, three models averaged, here those at the ends of
            epochs 8, 9 and 10; 0.8 of 1 epoch gives epoch 1, trained at the initial rates.
        swa_lr: the SWA rate, one for all parameter groups or a list of one per group; None
            leaves the rates alone.
        swa_freq: average every swa_freq epochs (the cycle length with "cyclic").
        kind: "constant": the initial rates until swa_start, then swa_lr, reached after
            `anneal_epochs` as torch's SWALR stepped once per epoch (the k-th averaged epoch,
            k = 0, 1, ..., trains at anneal_lr(k / anneal_epochs), so the first at the
            initial rate); "cyclic": `cyclic_lr` per batch.
        anneal_epochs, anneal_strategy: see `kind` and `anneal_lr`.

    Example:
        >>> schedule = SWASchedule(3, 0.02, anneal_epochs=2, anneal_strategy="linear")
        >>> [schedule.rates(epoch, 0, 4, [0.1])[0] for epoch in (1, 2, 4)]   # 0-based epochs
        [0.1, 0.1, 0.02]
    """

    def __init__(self, swa_start, swa_lr=None, swa_freq=1, kind="constant", anneal_epochs=0,
                 anneal_strategy="cos"):
        self.swa_start, self.swa_lr = _check_start(swa_start), _check_rates(swa_lr)
        self.swa_freq = check_count("swa_freq", swa_freq, minimum=1)
        self.anneal_epochs = check_count("anneal_epochs", anneal_epochs, minimum=0)
        if kind not in ("constant", "cyclic"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cyclic', not {kind!r}")
        if kind == "cyclic" and swa_lr is None:
            raise ValueError("lr_schedule='cyclic' needs swa_lr (the rate at the end of a cycle)")
        if self.anneal_epochs and (kind != "constant" or swa_lr is None):
            raise ValueError("anneal_epochs anneals into a constant swa_lr: give swa_lr and "
                             "lr_schedule='constant'")
        anneal_lr(0.0, 1.0, 1.0, anneal_strategy)  # refuses an unknown strategy
        self.kind, self.anneal_strategy = kind, anneal_strategy

    def first_epoch(self, epochs):
        """The first averaged (1-based) epoch of a fit of `epochs` epochs."""
        if isinstance(self.swa_start, float):
            return max(int(self.swa_start * epochs), 1)
        return self.swa_start

    def takeover_epoch(self, swa_start):
        """The 0-based epoch from which `rates` are this schedule's own, not the initial ones:
        the first cycle's with "cyclic", else the first averaged epoch's (`swa_start` resolved)."""
        return max(swa_start - (self.swa_freq if self.kind == "cyclic" else 1), 0)

    def swa_rates(self, groups):
        return list(self.swa_lr) if isinstance(self.swa_lr, list) else [self.swa_lr] * groups

    def rates(self, epoch, step, steps, initial, swa_start=None):
        """Each group's rate at batch `step` (of `steps`) of 0-based `epoch`; `initial`: the
        groups' initial rates; `swa_start`: the resolved first averaged epoch."""
        start = self.swa_start if swa_start is None else swa_start
        if self.swa_lr is None:
            return list(initial)
        ends = self.swa_rates(len(initial))
        if self.kind == "cyclic":
            if epoch < start - self.swa_freq:
                return list(initial)
            return [cyclic_lr(epoch, step, steps, a, b, start, self.swa_freq)
                    for a, b in zip(initial, ends)]
        into = epoch + 1 - start  # 0 at the first averaged epoch
        if into < 0:
            return list(initial)
        if into < self.anneal_epochs:
            return [anneal_lr(into / self.anneal_epochs, a, b, self.anneal_strategy)
                    for a, b in zip(initial, ends)]
        return ends


def _check_start(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"swa_start must be an epoch number or a fraction in (0, 1), got {value!r}")
    if value < 0:
        raise ValueError(f"swa_start must be >= 0, got {value}")
    if 0 < value < 1:
        return float(value)
    if value != int(value):
        raise ValueError(f"swa_start={value}: give a whole epoch number or a fraction in (0, 1)")
    return int(value)


def check_count(name, value, minimum):
    """`value` as an int if it is a whole number >= minimum; ValueError naming `name` if not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def _check_rates(value):
    if value is None:
        return None
    rates = list(value) if isinstance(value, (list, tuple)) else [value]
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) \
                or rate <= 0:
            raise ValueError(f"swa_lr must be > 0 (one rate, or one per parameter group), got {value!r}")
    return [float(r) for r in rates] if isinstance(value, (list, tuple)) else float(value)


def fge_lr(epoch, step, steps_per_epoch, start, cycle, lr1, lr2):
    """Fast Geometric Ensembling's triangular rate (Garipov et al., NeurIPS 2018), per
    iteration, for 0-based `epoch` >= `start` (the 1-based epochs after start form cycles of
    `cycle` epochs): t = ((epoch - start) mod cycle + step / steps) / cycle falls from lr1 to
    lr2 at the cycle's midpoint (t = 1/2) and climbs back to lr1 at its end:
    (1 - 2t) lr1 + 2t lr2 for t < 1/2, else (2t - 1) lr1 + (2 - 2t) lr2.

    Example:
        >>> [fge_lr(e, 0, 10, start=6, cycle=2, lr1=0.05, lr2=0.005) for e in (6, 7, 8)]
        [0.05, 0.005, 0.05]
    """
    t = ((epoch - start) % cycle + step / steps_per_epoch) / cycle
    if t < 0.5:
        return (1.0 - 2.0 * t) * lr1 + 2.0 * t * lr2
    return (2.0 * t - 1.0) * lr1 + (2.0 - 2.0 * t) * lr2


def is_fge_snapshot_epoch(epoch, start, cycle):
    """Whether FGE takes a snapshot after 1-based `epoch`: at each cycle's midpoint, the rate's
    low point, i.e. after epochs start + c/2, start + 3c/2, ... For an odd cycle the midpoint
    falls inside an epoch: the snapshot is taken at that epoch's end, start + ceil(c/2) + k c.

    Example:
        >>> [e for e in range(1, 13) if is_fge_snapshot_epoch(e, start=6, cycle=2)]
        [7, 9, 11]
    """
    into = epoch - start - (cycle + 1) // 2
    return into >= 0 and into % cycle == 0


def step_seed(seed, rank, epoch, step):
    """The seed of Paddle's generator (dropout) before a step: a function of where training
    is, so a resume draws the same masks on any device set."""
    words = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def evaluation_epoch(epoch, eval_freq, epochs):
    """Whether 0-based `epoch` evaluates (the original's rule: first, every eval_freq, last)."""
    return epoch == 0 or epoch % eval_freq == eval_freq - 1 or epoch == epochs - 1
