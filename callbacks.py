"""SWA in Paddle's high-level API: `paddle.Model.fit(..., callbacks=[SWACallback(...)])`.

    >>> swa = SWACallback(swa_start=15, swa_lr=0.01, bn_data=train_dataset)
    >>> model.fit(train_dataset, epochs=20, batch_size=64, callbacks=[swa])
    >>> model.evaluate(test_dataset)          # the averaged weights
    >>> swa.restore_sgd()                     # back to the last SGD weights

`SWACallback` conducts; each part below it has one job: `_save_and_load_with` (the callback's
state beside model.save/load), `_Rates` (the learning rates set during fit and the user's put
back, with `_StandIn` in the place of the user's LRScheduler meanwhile), `_OptimizerSteps` (which steps update an EMA), `_EvalSwap` (the average in the network
while fit evaluates) and `_refresh_batches` (the data of the final BatchNorm refresh).
"""
import os
import warnings
import weakref

import paddle

import utils
from harness import checkpoints, distributed, engine, schedules


class SWACallback(paddle.callbacks.Callback):
    """Averages the network from an epoch on, drives the SWA learning rate, and leaves the
    averaged weights (BatchNorm statistics recomputed) in the network when fit ends.

    Epochs are counted from 1: with swa_start=15 and swa_freq=1 the network is averaged after
    epochs 15, 16, ... The optimizer's rates are put back as the user configured them when
    fit ends, so a second fit starts as the first did. An optimizer given an LRScheduler
    follows it (stepped by fit) until SWA's rates begin; the callback then sets the rate
    (with a warning), and puts the scheduler back when fit ends, as it was when SWA began.

    Attaching it to a Model (fit does, or `set_model(model)`) makes `model.save(path)` also
    write the callback's state to `<path>.swa`, and `model.load(path)` read it back: a fit
    resumed from a checkpoint saved during fit (`save_dir=`) continues the same average and
    schedule (give it the remaining epochs; in a new process call `set_model` before `load`).
    A checkpoint saved after fit ended (fit's `final`) holds the average as its weights and
    the last SGD weights in `.swa`, from which a resumed fit continues training.

    Args:
        swa_start, swa_lr, swa_freq, lr_schedule, anneal_epochs, anneal_strategy: when to
            average and the rates, see `schedules.SWASchedule` (a fraction swa_start counts
            as Lightning's swa_epoch_start; annealing as torch's SWALR stepped per epoch;
            docs/callback.md says what each matches).
            Paddle 3.3's Model.fit cannot train parameter groups itself (its minimize()
            fails on them, measured); a loop that calls the hooks can, with one rate each.
        bn_data: training data for the BatchNorm refresh at the end: a DataLoader or iterable
            of batches (used as given, as this rank's share in a data-parallel fit), or a
            paddle.io.Dataset/IterableDataset, batched with `bn_batch_size`, by default the
            size of fit's first training batch (sharded over the ranks in a data-parallel
            fit). Required when the network has BatchNorm; False skips the refresh.
        bn_batch_size: see bn_data.
        ema_decay: None for SWA's equal average; a decay in [0, 1) for an EMA, updated after
            every optimizer step (once per `accumulate_grad_batches` batches) from swa_start
            on, every `ema_every_n_steps` steps from step index `ema_start_step` (0-based,
            as Lightning's EMAWeightAveraging update_every_n_steps/update_starting_at_step).
        ema_warmup: timm's decay warm-up, see `utils.SWA`.
        evaluate_average: fit's evaluation (`eval_data=`) scores the average instead of the
            SGD weights, swapped in for it and out again, as Lightning's WeightAveraging
            does, with the average's statistics as they are (averaged, not refreshed; the
            refresh is made once, at the end). Default: on for an EMA, off for SWA.
        average_statistics, device: see `utils.SWA` (device: e.g. "cpu" for a GPU network).
        steps_per_epoch: batches per epoch, needed only by "cyclic" when the data has no
            length and a cycle starts in the first epoch (otherwise it is counted in the first).

    Example:
        >>> swa = SWACallback(swa_start=0.75, swa_lr=0.01, anneal_epochs=3, bn_data=train)
        >>> model.fit(train, epochs=40, batch_size=64, save_dir="ckpt", callbacks=[swa])
    """

    def __init__(self, swa_start, swa_freq=1, swa_lr=None, lr_schedule="constant",
                 anneal_epochs=0, anneal_strategy="cos", bn_data=None, bn_batch_size=None,
                 ema_decay=None, ema_warmup=False, ema_every_n_steps=1, ema_start_step=0,
                 evaluate_average=None, average_statistics=True, device=None,
                 steps_per_epoch=None):
        super().__init__()
        self.schedule = schedules.SWASchedule(swa_start, swa_lr, swa_freq, lr_schedule,
                                              anneal_epochs, anneal_strategy)
        utils.check_ema_decay(ema_decay)
        counts = dict(bn_batch_size=(bn_batch_size, 1), steps_per_epoch=(steps_per_epoch, 1),
                      ema_every_n_steps=(ema_every_n_steps, 1), ema_start_step=(ema_start_step, 0))
        for name, (value, minimum) in counts.items():
            if value is not None:
                schedules.check_count(name, value, minimum)
        self.bn_data, self.bn_batch_size = bn_data, bn_batch_size
        self.steps_per_epoch = steps_per_epoch
        self.ema = dict(decay=ema_decay, warmup=ema_warmup, every=ema_every_n_steps,
                        start=ema_start_step)
        self.evaluate_average = (ema_decay is not None) if evaluate_average is None \
            else evaluate_average
        self.average_statistics, self.device = average_statistics, device
        self.swa, self.sgd_state = None, None
        self._rates, self._swap = _Rates(), _EvalSwap()
        self._pending = None        # state read by model.load, used by the next fit
        self._fit = None            # what belongs to the fit under way (or the last one)

    @property
    def ema_decay(self):
        return self.ema["decay"]

    # ----------------------------------------------------------------- attaching, saving

    def set_model(self, model):
        super().set_model(model)
        _save_and_load_with(model, self, lambda: self.state_dict() if self.swa is not None else None,
                            self._receive)

    def _receive(self, state):
        self._pending = state

    def state_dict(self):
        """The average, the epochs and optimizer steps done, the schedule's position and,
        once fit has put the average in the network, the last SGD weights: for `<path>.swa`."""
        fit = self._fit or {}
        steps = fit.get("optimizer_steps")
        return {"swa": self.swa.state_dict(), "epochs_done": fit.get("epoch", -1) + 1,
                "swa_start": fit.get("swa_start"), "steps_per_epoch": fit.get("steps"),
                "rates": fit.get("rates"), "ema_decay": self.ema_decay,
                "optimizer_steps": steps.done if steps else 0,
                "sgd_state": self.sgd_state if fit.get("ended") else None}

    # ----------------------------------------------------------------- one fit

    def on_train_begin(self, logs=None):
        network, optimizer = self.model.network, self.model._optimizer
        if utils.batch_norm_layers(network) and (self.bn_data is None or (
                isinstance(self.bn_data, (list, tuple)) and not self.bn_data)):
            raise ValueError("SWACallback needs bn_data (the training data) to recompute the "
                             "average's BatchNorm statistics, or bn_data=False to skip that")
        configured = self._rates.configured(optimizer)
        scheduled = isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler)
        pending, self._pending = self._pending or {}, None
        if pending.get("sgd_state") is not None:  # a checkpoint saved after fit: train on from SGD
            utils.load_state_dict(network, pending["sgd_state"], "the SGD weights")
        done = int(pending.get("epochs_done", 0))
        epochs = done + int(self.params["epochs"])
        swa_start = pending.get("swa_start")
        swa_start = self.schedule.first_epoch(epochs) if swa_start is None else swa_start
        if swa_start > epochs:
            raise ValueError(f"swa_start={self.schedule.swa_start} is beyond the fit's {epochs} "
                             "epochs: nothing would be averaged; lower swa_start or fit longer")
        # the rates SWA's schedule starts from: the user's float ones, or with an LRScheduler
        # the rates it has reached when the callback takes over (None until then)
        rates = pending.get("rates") or (None if scheduled else configured)
        groups = len(configured["groups"]) or 1
        if isinstance(self.schedule.swa_lr, list) and len(self.schedule.swa_lr) != groups:
            raise ValueError(f"swa_lr has {len(self.schedule.swa_lr)} rates, the optimizer "
                             f"{groups} parameter group(s)")
        steps = self.params.get("steps") or self.steps_per_epoch or pending.get("steps_per_epoch")
        if self.schedule.kind == "cyclic" and not steps and \
                swa_start - self.schedule.swa_freq <= done:
            raise ValueError("lr_schedule='cyclic' needs the number of batches per epoch from "
                             "the first epoch on, and the data has no length: pass steps_per_epoch")
        optimizer_steps = _OptimizerSteps(self.ema["every"], self.ema["start"],
                                          int(pending.get("optimizer_steps", 0)))
        self._fit = dict(offset=done, epoch=done - 1, swa_start=swa_start, steps=steps, counted=0,
                         rates=rates, configured=configured, optimizer_steps=optimizer_steps,
                         batch_size=self.bn_batch_size, ended=False)
        self.swa = utils.SWA(network, ema_decay=self.ema_decay, ema_warmup=self.ema["warmup"],
                             average_statistics=self.average_statistics, device=self.device)
        if pending:
            self.swa.set_state_dict(pending["swa"])

    def on_epoch_begin(self, epoch, logs=None):
        self._fit["epoch"], self._fit["counted"] = self._fit["offset"] + epoch, 0

    def on_train_batch_begin(self, step, logs=None):
        fit, optimizer = self._fit, self.model._optimizer
        if self.schedule.swa_lr is None:
            return  # the user's rates, or LRScheduler, run untouched
        if fit["rates"] is None:  # the user's LRScheduler runs until the callback takes over
            if fit["epoch"] < self.schedule.takeover_epoch(fit["swa_start"]):
                return
            fit["rates"] = _current_rates(optimizer)
        rates = self.schedule.rates(fit["epoch"], step, fit["steps"], _initial_rates(fit["rates"]),
                                    fit["swa_start"])
        self._rates.set(optimizer, rates, fit["configured"], fit["epoch"])

    def on_train_batch_end(self, step, logs=None):
        fit = self._fit
        fit["counted"] = step + 1
        if fit["batch_size"] is None and logs and logs.get("batch_size"):
            ranks = max(paddle.distributed.get_world_size(), 1)  # fit logs the total over ranks
            fit["batch_size"] = int(logs["batch_size"]) // ranks
        accumulate = getattr(self.model, "_accumulate", 1) or 1  # fit's accumulate_grad_batches
        ema_step = fit["optimizer_steps"].after_batch(step, accumulate, self.params.get("steps"))
        if ema_step and self.ema_decay is not None and fit["epoch"] + 1 >= fit["swa_start"]:
            self.swa.update(self.model.network)

    def on_epoch_end(self, epoch, logs=None):
        fit = self._fit
        fit["steps"] = fit["steps"] or fit["counted"]  # learnt from the first epoch
        if self.ema_decay is None and schedules.is_swa_epoch(fit["epoch"] + 1, fit["swa_start"],
                                                             self.schedule.swa_freq):
            self.swa.update(self.model.network)

    def on_eval_begin(self, logs=None):
        fit = self._fit
        if self.evaluate_average and fit and not fit["ended"] and self.swa and self.swa.n:
            self._swap.swap_in(self.model.network, self.swa.model)

    def on_eval_end(self, logs=None):
        self._swap.swap_out(self.model.network)

    def on_train_end(self, logs=None):
        if self.schedule.swa_lr is not None:
            self._rates.put_back(self.model._optimizer, self._fit["configured"])
        if not self.swa.n:
            warnings.warn("SWACallback: fit ended before any model was averaged (0 updates); "
                          "the network keeps its SGD weights", stacklevel=2)
            return
        network = self.model.network
        self.sgd_state = _copy_state(network)
        if self.bn_data is not False and utils.batch_norm_layers(network):
            context = distributed.Distributed(paddle.distributed.get_rank(),
                                          paddle.distributed.get_world_size())
            batches = _refresh_batches(self.bn_data, self._fit["batch_size"] or 64, context.enabled)
            engine.bn_update(batches, self.swa, context)
        utils.load_state_dict(network, self.swa.model.state_dict(), "the average")
        self._fit["ended"] = True

    def restore_sgd(self):
        """Put the last SGD weights back into the network (after fit ended)."""
        if self.sgd_state is None:
            raise ValueError("no SGD weights to restore: fit has not ended with an average")
        utils.load_state_dict(self.model.network, self.sgd_state, "the SGD weights")
        self._fit["ended"] = False


# --------------------------------------------------------------------------- the parts

def _save_and_load_with(model, owner, state, receive):
    """Make `model.save(path)` also write `state()` to `<path>.swa` (when it is not None, and
    only for a training checkpoint), and `model.load(path)` hand what `<path>.swa` holds (None
    if there is none) to `receive`. Done once per owner: attaching again changes nothing."""
    if getattr(model.save, "_swa_callback", None) is owner:
        return
    save, load = model.save, model.load

    def save_with_swa(path, training=True):
        save(path, training)
        current = state() if training else None
        if current is not None:
            checkpoints.atomic_save(current, path + ".swa")

    def load_with_swa(path, skip_mismatch=False, reset_optimizer=False):
        # Paddle's Model.load unpickles these files with pickle.load, which can run code:
        # each is first read with our data-only reader, which refuses anything else.
        # The files as Paddle names them (it strips these suffixes), each checked if it
        # exists at all: read_file refuses a folder or a pipe that Paddle would open.
        root, suffix = os.path.splitext(path)
        base = root if suffix in (".pdparams", ".pdopt", ".pdmodel") else path
        for suffix in (".pdparams",) + (() if reset_optimizer else (".pdopt",)) + (".pdscaler",):
            if os.path.lexists(base + suffix):
                checkpoints.read_file(base + suffix, "saved model")
        result = load(path, skip_mismatch, reset_optimizer)
        state_path = path + ".swa"
        receive(checkpoints.read_file(state_path, "SWA state") if os.path.isfile(state_path) else None)
        return result

    save_with_swa._swa_callback = load_with_swa._swa_callback = owner
    model.save, model.load = save_with_swa, load_with_swa


class _Rates:
    """Sets an optimizer's rates during fit and puts the user's back at the end.

    An optimizer given an LRScheduler keeps it until the callback first sets a rate: then the
    scheduler's place is taken by a `_StandIn` (so fit's LRScheduler callback, which steps what
    is in the optimizer, no longer moves the rate), and the scheduler itself is put back when
    fit ends, not stepped meanwhile.

    It remembers the rates a fit left the optimizer at (through a weak reference, so no
    optimizer is kept alive by it), so that a fit that failed before putting the user's rates
    back is not taken for the user's configuration by the next fit."""

    def __init__(self):
        self.left = None  # (the optimizer, the rates it was left at, the user's rates)

    def configured(self, optimizer):
        """The rates the user gave `optimizer` (its global rate, or its LRScheduler's current
        one, and the groups' factors), after putting back those a failed fit left it at."""
        left = self.left
        if left and left[0]() is optimizer and left[1] == _current_rates(optimizer):
            self.put_back(optimizer, left[2])
        elif isinstance(optimizer._learning_rate, _StandIn):  # left by another callback's fit
            optimizer.set_lr_scheduler(optimizer._learning_rate.user)
        return _current_rates(optimizer)

    def set(self, optimizer, rates, configured, epoch):
        """Give parameter group g the rate rates[g] (absolute); `configured`: the user's rates;
        `epoch`: the 0-based epoch under way (for the warning when a scheduler is replaced)."""
        held = optimizer._learning_rate
        if isinstance(held, paddle.optimizer.lr.LRScheduler) and not isinstance(held, _StandIn):
            warnings.warn(f"SWACallback takes the learning rate over from the optimizer's "
                          f"{type(held).__name__} at epoch {epoch + 1}; the scheduler, not "
                          "stepped from here, is put back when fit ends", stacklevel=3)
            optimizer.set_lr_scheduler(_StandIn(held))
        # Paddle scales each group's rate by the global one: with parameter groups, run with
        # global 1 and the absolute rates as the groups' factors.
        global_rate = 1.0 if configured["groups"] else rates[0]
        if isinstance(optimizer._learning_rate, _StandIn):
            optimizer._learning_rate.hold(global_rate)
        else:
            optimizer.set_lr(global_rate)
        for group, rate in zip(optimizer._param_groups if configured["groups"] else (), rates):
            for p in group["params"]:
                p.optimize_attr["learning_rate"] = rate
        self.left = (weakref.ref(optimizer), _current_rates(optimizer), configured)

    def put_back(self, optimizer, configured):
        """The user's global rate, or LRScheduler, and group factors (`configured`) back."""
        held = optimizer._learning_rate
        if isinstance(held, _StandIn):
            optimizer.set_lr_scheduler(held.user)
        elif not isinstance(held, paddle.optimizer.lr.LRScheduler):
            optimizer.set_lr(configured["lr"])
        for group, factor in zip(optimizer._param_groups if configured["groups"] else (),
                                 configured["groups"]):
            for p in group["params"]:
                p.optimize_attr["learning_rate"] = factor
        self.left = None


class _StandIn(paddle.optimizer.lr.LRScheduler):
    """Holds the place of the user's LRScheduler `user` in the optimizer while the callback
    sets the rate: stepping it changes nothing, and its state is the user's scheduler's (so a
    checkpoint saved meanwhile holds that scheduler's state, and loading one restores it)."""

    def __init__(self, user):
        self.user = user
        super().__init__(float(user()))

    def get_lr(self):
        return self.base_lr

    def hold(self, rate):
        self.base_lr = self.last_lr = float(rate)

    def state_dict(self):
        return self.user.state_dict()

    def set_state_dict(self, state_dict):
        self.user.set_state_dict(state_dict)

    set_dict = set_state_dict


class _OptimizerSteps:
    """Counts fit's optimizer steps, one per `accumulate_grad_batches` batches and one at an
    epoch's last batch, and tells which update an EMA: those whose 0-based index is at least
    `start` and a multiple of `every` (Lightning's update_starting_at_step and
    update_every_n_steps)."""

    def __init__(self, every, start, done=0):
        self.every, self.start, self.done = every, start, done

    def after_batch(self, step, accumulate, steps_in_epoch):
        """After 0-based batch `step`: whether it ended an optimizer step that updates an EMA."""
        if (step + 1) % accumulate and step + 1 != steps_in_epoch:
            return False  # gradients accumulated, no optimizer step yet
        index, self.done = self.done, self.done + 1
        return index >= self.start and index % self.every == 0


class _EvalSwap:
    """The average in the network while fit evaluates, the SGD weights back afterwards."""

    def __init__(self):
        self.saved = None

    def swap_in(self, network, average):
        self.saved = _copy_state(network)
        utils.load_state_dict(network, average.state_dict(), "the average")

    def swap_out(self, network):
        if self.saved is not None:
            utils.load_state_dict(network, self.saved, "the SGD weights")
            self.saved = None


def _refresh_batches(data, batch_size, distributed):
    """`bn_data` as batches: a Dataset or IterableDataset batched by `batch_size` (a Dataset
    sharded over the ranks when `distributed`), anything else as given."""
    if isinstance(data, paddle.io.IterableDataset):
        return paddle.io.DataLoader(data, batch_size=batch_size)
    if isinstance(data, paddle.io.Dataset):
        sampler = (paddle.io.DistributedBatchSampler(data, batch_size=batch_size)
                   if distributed else paddle.io.BatchSampler(data, batch_size=batch_size))
        return paddle.io.DataLoader(data, batch_sampler=sampler)
    return data


def _copy_state(network):
    return {k: v.clone() for k, v in network.state_dict().items()}


def _current_rates(optimizer):
    """The optimizer's global rate and, with parameter groups, each group's factor."""
    groups = [g.get("learning_rate", 1.0) for g in getattr(optimizer, "_param_groups", [])
              if isinstance(g, dict)]
    return {"lr": float(optimizer.get_lr()), "groups": groups}


def _initial_rates(rates):
    """Each group's absolute initial rate (the global rate times the group's factor)."""
    return [rates["lr"] * factor for factor in rates["groups"]] or [rates["lr"]]
