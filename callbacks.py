"""SWA in Paddle's high-level API: `paddle.Model.fit(..., callbacks=[SWACallback(...)])`.

    >>> swa = SWACallback(swa_start=15, swa_lr=0.01, bn_data=train_dataset)
    >>> model.fit(train_dataset, epochs=20, batch_size=64, callbacks=[swa])
    >>> model.evaluate(test_dataset)          # the averaged weights
    >>> swa.restore_sgd()                     # back to the last SGD weights
"""
import math
import numbers
import os

import paddle

from harness import checkpoints
from harness import schedules
import utils


class SWACallback(paddle.callbacks.Callback):
    """Averages the network from an epoch on, drives the SWA learning rate, and leaves the
    averaged weights (BatchNorm statistics recomputed) in the network when fit ends.

    Epochs are counted from 1, as `schedules.is_swa_epoch`: with swa_start=15 and
    swa_freq=1 the network is averaged after epochs 15, 16, ... The callback puts the
    optimizer's learning rates back as the user configured them when fit ends, so a second
    fit starts as the first did.

    Attaching it to a Model (fit does, or `set_model(model)`) makes `model.save(path)` also
    write the callback's state (average, count, schedule position) to `<path>.swa`, and
    `model.load(path)` read it back: a fit resumed from a checkpoint saved during fit
    (`save_dir=`) continues the same average and schedule. Give the resumed fit the remaining
    epochs. In a new process, call `swa.set_model(model)` before `model.load(path)`.

    Args:
        swa_start: first averaged epoch (1-based; 0: from the start, e.g. fine-tuning), or a
            fraction in (0, 1) of the fit's epochs: averaging starts after that fraction
            (0.8 of 10 epochs: epochs 9 and 10 are averaged, as Lightning counts).
        swa_freq: average every swa_freq epochs (the cycle length with lr_schedule="cyclic").
        swa_lr: the SWA rate, > 0; a list gives one rate per parameter group of the
            optimizer (Paddle 3.3's Model.fit cannot train parameter groups itself: its
            minimize() fails on them, measured; a loop that calls the hooks can); None leaves
            the rates alone.
        lr_schedule: "constant" (swa_lr from the first averaged epoch on, after the
            annealing epochs if any) or "cyclic" (`schedules.cyclic_lr` per batch, from the
            optimizer's initial rate down to swa_lr at each averaged epoch's end).
        anneal_epochs: with "constant", move from the initial rate to swa_lr over this many
            epochs starting at swa_start, as torch's SWALR (0: jump at once).
        anneal_strategy: "cos" or "linear" (see `schedules.anneal_lr`).
        bn_data: training data for the BatchNorm refresh at the end: a DataLoader, an
            iterable of batches, a paddle.io.Dataset or IterableDataset (batched with fit's
            batch size; in a data-parallel fit a Dataset is sharded over the ranks, other
            data is taken as this rank's share). Required when the network has BatchNorm;
            False skips the refresh.
        ema_decay: None for SWA's equal average; a decay d in [0, 1) for an exponential
            moving average updated after every batch from swa_start on.
        average_statistics: whether BatchNorm running statistics are averaged with the weights
            (True) or copied from the network (False, torch's use_buffers=False); see utils.SWA.
        steps_per_epoch: batches per epoch, needed only by "cyclic" when the data has no
            length and a cycle starts in the first epoch (otherwise it is counted in the first).

    Example:
        >>> swa = SWACallback(swa_start=0.75, swa_lr=0.01, anneal_epochs=3, bn_data=train)
        >>> model.fit(train, epochs=40, batch_size=64, save_dir="ckpt", callbacks=[swa])
        >>> # later, another process:
        >>> swa = SWACallback(swa_start=0.75, swa_lr=0.01, anneal_epochs=3, bn_data=train)
        >>> swa.set_model(model); model.load("ckpt/19")        # SGD weights and SWA state
        >>> model.fit(train, epochs=20, batch_size=64, callbacks=[swa])
    """

    def __init__(self, swa_start, swa_freq=1, swa_lr=None, lr_schedule="constant",
                 anneal_epochs=0, anneal_strategy="cos", bn_data=None, ema_decay=None,
                 average_statistics=True, steps_per_epoch=None):
        super().__init__()
        self.swa_start = _check_start(swa_start)
        self.swa_freq = _check_count("swa_freq", swa_freq, minimum=1)
        self.swa_lr = _check_rates(swa_lr)
        if lr_schedule not in ("constant", "cyclic"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cyclic', not {lr_schedule!r}")
        if lr_schedule == "cyclic" and swa_lr is None:
            raise ValueError("lr_schedule='cyclic' needs swa_lr (the rate at the end of a cycle)")
        self.anneal_epochs = _check_count("anneal_epochs", anneal_epochs, minimum=0)
        if self.anneal_epochs and (lr_schedule != "constant" or swa_lr is None):
            raise ValueError("anneal_epochs anneals into a constant swa_lr: give swa_lr and "
                             "lr_schedule='constant'")
        schedules.anneal_lr(0.0, 1.0, 1.0, anneal_strategy)  # refuses an unknown strategy
        if ema_decay is not None and not (isinstance(ema_decay, numbers.Real) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be None or in [0, 1), got {ema_decay!r}")
        if steps_per_epoch is not None:
            _check_count("steps_per_epoch", steps_per_epoch, minimum=1)
        self.lr_schedule, self.anneal_strategy = lr_schedule, anneal_strategy
        self.bn_data, self.ema_decay = bn_data, ema_decay
        self.average_statistics, self.steps_per_epoch = average_statistics, steps_per_epoch
        self.swa, self.sgd_state = None, None
        self._configured = {}       # id(optimizer) -> the rates the user gave it
        self._pending = None        # state read by model.load, used by the next fit
        self._fit = None            # what belongs to the fit under way

    # ----------------------------------------------------------------- attaching, saving

    def set_model(self, model):
        super().set_model(model)
        if getattr(model.save, "_swa_callback", None) is self:
            return
        save, load = model.save, model.load

        def save_with_swa(path, training=True):
            save(path, training)
            if training and self.swa is not None:
                checkpoints.atomic_save(self.state_dict(), path + ".swa")

        def load_with_swa(path, *args, **kwargs):
            result = load(path, *args, **kwargs)
            state_path = path + ".swa"
            self._pending = (checkpoints.read_file(state_path, "SWA state")
                             if os.path.isfile(state_path) else None)
            return result

        save_with_swa._swa_callback = load_with_swa._swa_callback = self
        model.save, model.load = save_with_swa, load_with_swa

    def state_dict(self):
        """The average, the epochs done and the schedule's position, for `<path>.swa`."""
        fit = self._fit or {}
        return {"swa": self.swa.state_dict(), "epochs_done": fit.get("epoch", -1) + 1,
                "swa_start": fit.get("swa_start"), "steps_per_epoch": fit.get("steps"),
                "rates": fit.get("rates"), "ema_decay": self.ema_decay}

    # ----------------------------------------------------------------- one fit

    def on_train_begin(self, logs=None):
        network, optimizer = self.model.network, self.model._optimizer
        if self.bn_data is None and utils.batch_norm_layers(network):
            raise ValueError("SWACallback needs bn_data (the training data) to recompute the "
                             "average's BatchNorm statistics, or bn_data=False to skip that")
        if self.swa_lr is not None and not isinstance(optimizer._learning_rate, numbers.Real):
            raise ValueError("SWACallback sets the learning rate itself (swa_lr): give the "
                             "optimizer a float learning rate, not an LRScheduler")
        rates = self._configured.setdefault(id(optimizer), _current_rates(optimizer))
        pending, self._pending = self._pending, None
        done = int(pending["epochs_done"]) if pending else 0
        epochs = done + int(self.params["epochs"])
        swa_start = pending["swa_start"] if pending else _resolve_start(self.swa_start, epochs)
        if swa_start > epochs:
            raise ValueError(f"swa_start={self.swa_start} is beyond the fit's {epochs} epochs: "
                             "nothing would be averaged; lower swa_start or fit longer")
        groups = len(rates["groups"]) or 1
        if isinstance(self.swa_lr, list) and len(self.swa_lr) != groups:
            raise ValueError(f"swa_lr has {len(self.swa_lr)} rates, the optimizer "
                             f"{groups} parameter group(s)")
        steps = self.params.get("steps") or self.steps_per_epoch or (pending or {}).get("steps_per_epoch")
        if self.lr_schedule == "cyclic" and not steps and swa_start - self.swa_freq <= done:
            raise ValueError("lr_schedule='cyclic' needs the number of batches per epoch from "
                             "the first epoch on, and the data has no length: pass steps_per_epoch")
        self._fit = dict(offset=done, epoch=done - 1, epochs=epochs, swa_start=swa_start,
                         steps=steps, counted=0, rates=pending["rates"] if pending else rates)
        self.swa = utils.SWA(network, ema_decay=self.ema_decay,
                             average_statistics=self.average_statistics)
        if pending:
            self.swa.set_state_dict(pending["swa"])

    def on_epoch_begin(self, epoch, logs=None):
        fit = self._fit
        fit["epoch"], fit["counted"] = fit["offset"] + epoch, 0
        if self.swa_lr is not None and self.lr_schedule == "constant":
            self._set_rates(self._constant_rates(fit["epoch"]))

    def on_train_batch_begin(self, step, logs=None):
        fit = self._fit
        if self.lr_schedule == "cyclic" and fit["epoch"] >= fit["swa_start"] - self.swa_freq:
            base = fit["rates"]
            self._set_rates([schedules.cyclic_lr(fit["epoch"], step, fit["steps"], initial, end,
                                                 fit["swa_start"], self.swa_freq)
                             for initial, end in zip(_initial_rates(base), self._swa_rates())])
        elif self.lr_schedule == "cyclic":
            self._set_rates(_initial_rates(fit["rates"]))

    def on_train_batch_end(self, step, logs=None):
        fit = self._fit
        fit["counted"] = step + 1
        if self.ema_decay is not None and fit["epoch"] + 1 >= fit["swa_start"]:
            self.swa.update(self.model.network)

    def on_epoch_end(self, epoch, logs=None):
        fit = self._fit
        fit["steps"] = fit["steps"] or fit["counted"]  # learnt from the first epoch
        if self.ema_decay is None and schedules.is_swa_epoch(fit["epoch"] + 1, fit["swa_start"],
                                                             self.swa_freq):
            self.swa.update(self.model.network)

    def on_train_end(self, logs=None):
        self._set_rates(_initial_rates(self._fit["rates"]), restore=True)
        if not self.swa.n:
            return
        network = self.model.network
        self.sgd_state = {k: v.clone() for k, v in network.state_dict().items()}
        if self.bn_data is not False and utils.batch_norm_layers(network):
            distributed = paddle.distributed.get_world_size() > 1
            self.swa.bn_update(self._bn_batches(distributed), distributed=distributed)
        utils.load_state_dict(network, self.swa.model.state_dict(), "the average")

    # ----------------------------------------------------------------- rates

    def _swa_rates(self):
        groups = len(self._fit["rates"]["groups"]) or 1
        return self.swa_lr if isinstance(self.swa_lr, list) else [self.swa_lr] * groups

    def _constant_rates(self, epoch):
        """Per group: the initial rate before swa_start, annealing, then swa_lr."""
        initial = _initial_rates(self._fit["rates"])
        into_swa = epoch + 1 - self._fit["swa_start"]  # 0 at the first averaged epoch
        if into_swa < 0:
            return initial
        if into_swa < self.anneal_epochs:
            t = (into_swa + 1) / self.anneal_epochs
            return [schedules.anneal_lr(t, a, b, self.anneal_strategy)
                    for a, b in zip(initial, self._swa_rates())]
        return self._swa_rates()

    def _set_rates(self, rates, restore=False):
        """Give parameter group g the rate rates[g] (absolute); restore=True puts the user's
        global rate and group multipliers back."""
        if self.swa_lr is None:
            return
        optimizer, configured = self.model._optimizer, self._fit["rates"]
        if not configured["groups"]:
            optimizer.set_lr(configured["lr"] if restore else rates[0])
            return
        # Paddle scales each group's rate by the global one: run with global 1 and the
        # absolute rates as the groups' factors, the user's back at the end.
        optimizer.set_lr(configured["lr"] if restore else 1.0)
        for group, factor, rate in zip(optimizer._param_groups, configured["groups"], rates):
            for p in group["params"]:
                p.optimize_attr["learning_rate"] = factor if restore else rate

    def _bn_batches(self, distributed):
        data = self.bn_data
        batch_size = self.params.get("batch_size") or 64
        if isinstance(data, paddle.io.IterableDataset):
            return paddle.io.DataLoader(data, batch_size=batch_size)
        if isinstance(data, paddle.io.Dataset):
            sampler = (paddle.io.DistributedBatchSampler(data, batch_size=batch_size)
                       if distributed else paddle.io.BatchSampler(data, batch_size=batch_size))
            return paddle.io.DataLoader(data, batch_sampler=sampler)
        return data

    def restore_sgd(self):
        """Put the last SGD weights back into the network (after fit ended)."""
        if self.sgd_state is None:
            raise ValueError("no SGD weights to restore: fit has not ended with an average")
        utils.load_state_dict(self.model.network, self.sgd_state, "the SGD weights")


def _current_rates(optimizer):
    """The optimizer's global rate and, with parameter groups, each group's factor."""
    groups = [g.get("learning_rate", 1.0) for g in getattr(optimizer, "_param_groups", [])
              if isinstance(g, dict)]
    return {"lr": float(optimizer.get_lr()), "groups": groups}


def _initial_rates(rates):
    """Each group's absolute initial rate (the global rate times the group's factor)."""
    return [rates["lr"] * factor for factor in rates["groups"]] or [rates["lr"]]


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


def _resolve_start(swa_start, epochs):
    """The first averaged (1-based) epoch: as given, or after the fraction of `epochs`."""
    return int(swa_start * epochs) + 1 if isinstance(swa_start, float) else swa_start


def _check_count(name, value, minimum):
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

