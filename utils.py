"""Stochastic Weight Averaging for PaddlePaddle: the averaging core, in one file.

SWA (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization",
UAI 2018) trains with SGD and keeps an equal-weight running average of the weights visited
late in training. BatchNorm running statistics of averaged weights are not the average of
the statistics, so they are recomputed with one pass over the training data (`bn_update`).

    >>> swa = SWA(model)                     # or SWA(model, ema_decay=0.999), SWAG(model)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(model, optimizer)
    ...     if epoch + 1 >= 161:
    ...         swa.update(model)
    >>> swa.bn_update(train_loader)          # BatchNorm statistics of the average
    >>> evaluate(swa.model)

What is here, in this order: `moving_average` (the plain update), `SWA` (equal average or
EMA, held in float32) and `check_ema_decay`, `SWAG` (SWA-Gaussian: a Gaussian over the
weights to sample models from), `bn_update`, three helpers other code needs
(`batch_norm_layers`, `batch_norm_statistics`, `load_state_dict`), then the tensor pairing
and the update. The average's float32 tensors are views of one buffer, so an update is a few
large operations whatever the number of tensors (on a CPU numpy, a cache-sized chunk at a
time; on a GPU one concatenation and one lerp_); `moving_average` is the plain per-tensor
update, which the tests hold the fast one to, bit for bit. The refresh reads the BatchNorm
layers' statistics and momentum, which Paddle keeps in attributes of its own. Nothing here
parses arguments, prints, touches files or talks to other processes (a data-parallel job
averages the refreshed statistics over its ranks itself). The average never changes the
model it reads: no tensor of it is moved, cast, re-pointed or written.
"""
import contextlib
import copy
import functools
import itertools
import math
import numbers
import operator
import warnings

import numpy as np
import paddle

__all__ = ["moving_average", "SWA", "check_ema_decay", "SWAG", "bn_update", "batch_norm_layers",
           "batch_norm_statistics", "load_state_dict"]


# --------------------------------------------------------------------------- averaging

def moving_average(swa_model, model, alpha):
    """Move `swa_model` towards `model`: swa <- (1 - alpha) * swa + alpha * model, in place.

    Every floating-point parameter and buffer is averaged, the BatchNorm running mean and
    variance included (in Paddle they are non-trainable parameters); averaged statistics
    are a usable approximation until `bn_update` replaces them with exact ones. Other
    tensors (integer buffers) are copied from `model`. The arithmetic is done in float32
    whatever the two models' dtypes, and `model` is only read.

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
        _Pairs(swa_model, model, average_statistics=True).lerp(alpha)
    return swa_model


class SWA:
    """A running average of a model's weights: the equal average of SWA or an EMA.

    The average is a float32 copy of the model (`swa.model`), whatever the model's dtype: a
    float16 or bfloat16 model (AMP O2, `paddle.amp.decorate`) is averaged in float32, as
    master weights are, and `swa.model` evaluates in float32 as it is (or under
    `paddle.amp.auto_cast`). `update` reads the model and writes only the average. Each
    update checks, cheaply, that the tensors of the model and of the average are still those
    it paired; a replaced layer or tensor (of either) or a dtype change is followed, a model
    that no longer fits (other shapes; another device, unless `device` is given) is refused
    with a ValueError naming the tensor.

    Args:
        model: the model being trained (a paddle.DataParallel wrapper is fine).
        ema_decay: None (default) for SWA's equal average of all updates; a decay d in
            [0, 1) for an exponential moving average avg <- d * avg + (1 - d) * model.
            Either way the first update copies the model.
        average_statistics: True (default): BatchNorm running statistics (and other
            floating-point buffers) are averaged like the weights, a usable approximation
            until `bn_update`. False: they are left out of the average and copied from the
            model at each update (torch's use_buffers=False leaves them out too, but keeps
            the values they had when the average was made); `bn_update` gives the average
            its own.
        device: where the average lives, e.g. "cpu" beside a model on a GPU (as torch's
            AveragedModel(device=...) and timm's ModelEmaV3(device="cpu")), so a large
            model's average costs no GPU memory; each update copies the model's weights
            across in one transfer. None (default): the model's device.
        ema_warmup: with ema_decay, timm's warm-up (ModelEmaV3(use_warmup=True)): after n
            updates the decay is min(ema_decay, 1 - (1 + n / warmup_gamma) ** -warmup_power),
            at least min_decay, so an EMA started at step 0 is not dominated by the initial
            weights. warmup_gamma (1.0), warmup_power (2/3), min_decay (0.0) as in timm.

    Memory: one float32 copy of the model, in one buffer (its tensors are views of it); on a
    GPU an update also holds, for its moment, the model's weights gathered in float32.

    Example:
        >>> swa = SWA(model)                  # ema = SWA(model, ema_decay=0.999)
        >>> swa.update(model)                 # after each averaging epoch (an EMA: each step)
        >>> swa.bn_update(train_loader)       # before evaluating swa.model
        >>> state = swa.state_dict()          # {'swa_state_dict': ..., 'swa_n': ..., ...}
        >>> swa.set_state_dict(state)
    """

    def __init__(self, model, ema_decay=None, average_statistics=True, device=None,
                 ema_warmup=False, warmup_gamma=1.0, warmup_power=2 / 3, min_decay=0.0):
        check_ema_decay(ema_decay)
        if ema_warmup and ema_decay is None:
            raise ValueError("ema_warmup warms up an EMA's decay: give ema_decay too")
        if not (warmup_gamma > 0 and warmup_power > 0 and 0.0 <= min_decay <= (ema_decay or 0.0)):
            raise ValueError(f"need warmup_gamma > 0, warmup_power > 0 and 0 <= min_decay <= "
                             f"ema_decay; got {warmup_gamma}, {warmup_power}, {min_decay}")
        self._model = _float32_copy(model)
        self.device = device
        if device is not None:
            self._model.to(device=device)
        self._buffer = None  # made at the first pairing (`pairs_with`)
        self.ema_decay = ema_decay
        self.ema_warmup, self.warmup_gamma, self.warmup_power = ema_warmup, warmup_gamma, warmup_power
        self.min_decay = min_decay
        self.average_statistics = average_statistics
        self.n = 0
        # Whether the BatchNorm statistics are those of the current average (bn_update ran
        # after the last update), or only the average of the models' statistics.
        self.bn_updated = False
        self._pairs = None

    @property
    def model(self):
        """The average, a float32 Layer like the model (warns while it holds no model yet)."""
        if self.n == 0:
            warnings.warn("the average holds no model yet (0 updates): swa.model has the "
                          "initial weights; call swa.update(model) first", stacklevel=2)
        return self._model

    def decay(self):
        """The EMA's decay at the next update: ema_decay, or with ema_warmup timm's warm-up
        min(ema_decay, 1 - (1 + n / warmup_gamma) ** -warmup_power), at least min_decay, after
        n updates (n = 0: the first update copies)."""
        if not self.ema_warmup:
            return self.ema_decay
        warm = 1.0 - (1.0 + self.n / self.warmup_gamma) ** -self.warmup_power
        return max(min(warm, self.ema_decay), self.min_decay)

    def weight(self):
        """The weight the next update gives the model: 1 / (n + 1), or 1 - decay (1 first)."""
        if self.n == 0:
            return 1.0
        return 1.0 / (self.n + 1) if self.ema_decay is None else 1.0 - self.decay()

    def update(self, model):
        """Add `model` to the average (see the class). Returns the number of updates so far."""
        pairs = self.pairs_with(model)
        with paddle.no_grad():
            if self.n == 0:
                pairs.copy()
            else:
                pairs.lerp(self.weight())
        self.n += 1
        self.bn_updated = False
        return self.n

    def pairs_with(self, model):
        """The average's tensors paired with `model`'s: kept between updates while the model's
        tensors stay the same objects, storage and dtypes (checked cheaply), made anew if not."""
        if self._pairs is None or not self._pairs.still_holds(model):
            self._buffer = _one_buffer(self._model, model, self._buffer)
            self._pairs = _Pairs(self._model, model, self.average_statistics,
                                 other_place=self.device is not None, buffer=self._buffer)
        return self._pairs

    def bn_update(self, loader):
        """Recompute the average's BatchNorm statistics; see `bn_update`. ValueError before
        any update: there is no average to refresh."""
        if self.n == 0:
            raise ValueError("bn_update: the average holds no model yet (0 updates); call "
                             "swa.update(model) first")
        seen = bn_update(loader, self._model)
        self.bn_updated = True
        return seen

    def state_dict(self):
        """The average and its count (the original checkpoints' key names), whether its
        statistics are fresh, and its kind (`swa_ema_decay`, None for the equal average)."""
        state = {"swa_state_dict": self._model.state_dict(), "swa_n": self.n,
                 "swa_bn_updated": self.bn_updated, "swa_ema_decay": self.ema_decay}
        if self.ema_warmup:
            state["swa_ema_warmup"] = [self.warmup_gamma, self.warmup_power, self.min_decay]
        return state

    def set_state_dict(self, state):
        """Restore what `state_dict` returned; ValueError if it does not fit this average."""
        saved_decay = state.get("swa_ema_decay")
        if saved_decay != self.ema_decay:
            kind = lambda d: "an equal average" if d is None else f"an EMA with decay {d}"  # noqa: E731
            raise ValueError(f"the saved average is {kind(saved_decay)}, this one "
                             f"{kind(self.ema_decay)}")
        warmup = [self.warmup_gamma, self.warmup_power, self.min_decay] if self.ema_warmup else None
        if state.get("swa_ema_warmup") != warmup:
            raise ValueError(f"the saved EMA's warm-up (gamma, power, min_decay) is "
                             f"{state.get('swa_ema_warmup')}, this one's {warmup}")
        n = state["swa_n"]
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"the saved average's count swa_n must be a whole number >= 0, got {n}")
        load_state_dict(self._model, state["swa_state_dict"], "the saved average")
        self.n = int(n)
        self.bn_updated = bool(state.get("swa_bn_updated", False))


def check_ema_decay(ema_decay):
    """Refuse an EMA decay outside [0, 1) (the check `SWA` makes; callers that take a decay
    from a user before making an SWA can call it to refuse early).

    Args:
        ema_decay: None (the equal average) or a real number.

    Returns:
        `ema_decay`, unchanged.

    Raises:
        ValueError: anything but None or a real number d with 0 <= d < 1 (NaN and bools too).

    Example:
        >>> check_ema_decay(0.999)
        0.999
    """
    if ema_decay is not None and not (isinstance(ema_decay, numbers.Real) and
                                      not isinstance(ema_decay, bool) and 0 <= ema_decay < 1):
        raise ValueError(f"ema_decay must be None or a number in [0, 1), got {ema_decay!r}")
    return ema_decay


# --------------------------------------------------------------------------- SWAG

class SWAG(SWA):
    """SWA-Gaussian (Maddox et al., NeurIPS 2019): the SWA average plus a Gaussian over the
    weights, fitted from the same updates, to sample models for Bayesian model averaging.

    Over the floating-point weights (not the BatchNorm statistics) it keeps the running mean
    (the SWA average, `self.model`), the variance, and the deviations theta - mean (mean after
    including theta) of the last `max_rank` updates. `sample` draws

        theta = mean + sqrt(scale) * (sqrt(var) * z1 + D z2 / sqrt(K - 1)),

    D the K deviations held (as columns), z1, z2 standard normal, var = mean of squares -
    mean^2 clamped at `VARIANCE_FLOOR`: covariance scale * (diag(var) + D D^T / (K - 1)).
    The divisor differs from the SWAG authors' code (swa_gaussian), which divides by
    sqrt(max_rank - 1) however many deviations it holds: the same once K = max_rank, but
    before that its low-rank noise is smaller (3 of 5 held: ours is sqrt(4 / 2) = 1.41 times
    larger). K - 1 is the sample covariance's divisor for the K deviations there are, so it is
    the default here; `sample(rank_divisor="max_rank")` reproduces the authors' samples.
    The variance is accumulated as a sum of squared deviations (Welford's update), which,
    unlike a float32 mean of squares minus the squared mean, does not lose its digits when
    the spread is small beside the mean (BatchNorm scales near 1); `sq_mean()` gives the mean
    of squares. BatchNorm statistics are not sampled: a sample carries the averaged ones and
    needs `bn_update` before use.

    Args:
        model: the model being trained.
        max_rank: the most deviations kept (20 in the paper); K grows to it, then stays.

    Memory: max_rank + 2 float32 copies of the weights (mean, variance, K deviations).

    Example:
        >>> swag = SWAG(model, max_rank=20)
        >>> swag.update(model)                        # at SWA's averaging epochs
        >>> sample = swag.sample(seed=0)              # a Layer like model (scale 0.5)
        >>> bn_update(train_loader, sample); evaluate(sample)
    """

    VARIANCE_FLOOR = 1e-30
    # The covariance scales of the authors' uncertainty experiments (swa_gaussian's
    # experiments/uncertainty README): 0.5 for SWAG, 1 for SWAG-diagonal.
    SCALE, SCALE_DIAGONAL = 0.5, 1.0
    RANK_DIVISORS = ("held", "max_rank")

    def __init__(self, model, max_rank=20):
        if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 2:
            raise ValueError(f"max_rank must be a whole number >= 2 (the low-rank term needs two "
                             f"deviations), got {max_rank}")
        super().__init__(model)
        self.max_rank = int(max_rank)
        self.names = [name for name, _ in _weights(model)]
        size = sum(int(np.prod(self._parameters_of(self._model)[name].shape)) for name in self.names)
        self.var_sum = paddle.zeros([size], dtype="float32")   # sum of (theta - mean)^2 terms
        self.deviations = []                                   # newest last, at most max_rank

    def _parameters_of(self, model):
        return dict(_unwrap(model).named_parameters())

    def flat(self, model):
        """The sampled parameters of `model` as one float32 vector (a copy)."""
        tensors = self._parameters_of(model)
        return paddle.concat([_as_float32(tensors[name]).reshape([-1]) for name in self.names])

    def update(self, model):
        """Add `model` to the mean, the variance and the deviations. Returns the count."""
        with paddle.no_grad():
            theta, before = self.flat(model), self.flat(self._model)
            count = super().update(model)
            deviation = theta - self.flat(self._model)
            self.var_sum += (theta - before) * deviation
            self.deviations = (self.deviations + [deviation])[-self.max_rank:]
        return count

    def variance(self):
        """The diagonal variance, clamped at VARIANCE_FLOOR."""
        return paddle.clip(self.var_sum / max(self.n, 1), min=self.VARIANCE_FLOOR)

    def sq_mean(self):
        """The mean of squares of the sampled parameters (as SWAG's papers keep it)."""
        mean = self.flat(self._model)
        return self.var_sum / max(self.n, 1) + mean * mean

    def sample(self, scale=None, cov=True, seed=None, out=None, rank_divisor="held"):
        """Draw a model from the Gaussian (see the class).

        Args:
            scale: the covariance scale (0 gives the mean); None: the authors' values, 0.5
                (`SCALE`) with the low-rank term, 1 (`SCALE_DIAGONAL`) without.
            cov: include the low-rank term (False: SWAG-diagonal). Needs 2 updates or more.
            seed: seed of the draw: the same seed gives the same sample; None draws afresh.
                The draw uses its own numpy generator (z1 first, then z2), so Paddle's
                global one is untouched.
            out: a Layer of the same architecture to write the sample into (reused between
                samples to save memory); None makes a new one.
            rank_divisor: "held" divides the low-rank term by sqrt(K - 1), K the deviations
                held; "max_rank" by sqrt(max_rank - 1) always, as swa_gaussian does (see the
                class).

        Returns:
            The sampled Layer, float32, its BatchNorm statistics the averaged ones.
        """
        if self.n == 0:
            raise ValueError("SWAG.sample: no model has been collected (call update first)")
        if scale is None:
            scale = self.SCALE if cov else self.SCALE_DIAGONAL
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        if rank_divisor not in self.RANK_DIVISORS:
            raise ValueError(f"rank_divisor must be one of {', '.join(self.RANK_DIVISORS)}, "
                             f"got {rank_divisor!r}")
        rank = len(self.deviations)
        if cov and rank < 2:
            raise ValueError(f"SWAG.sample: the low-rank term needs 2 or more collected models, "
                             f"there is {rank}; pass cov=False for SWAG-diagonal")
        divisor = math.sqrt((rank if rank_divisor == "held" else self.max_rank) - 1)
        rng = np.random.default_rng(seed)
        with paddle.no_grad():
            mean = self.flat(self._model)
            z1 = paddle.to_tensor(rng.standard_normal(int(mean.shape[0]), dtype=np.float32))
            noise = self.variance().sqrt() * z1
            if cov:
                z2 = rng.standard_normal(rank, dtype=np.float32)
                for weight, deviation in zip(z2, self.deviations):
                    noise += deviation * float(weight / divisor)
            theta = mean + math.sqrt(scale) * noise
            sample = _float32_copy(self._model) if out is None else out
            if out is not None:
                load_state_dict(out, self._model.state_dict(), "the SWAG mean")
            tensors = self._parameters_of(sample)
            start = 0
            for name in self.names:
                target = tensors[name]
                size = int(np.prod(target.shape))
                _assign(target, theta[start:start + size].reshape(target.shape))
                start += size
        return sample

    def state_dict(self):
        """SWA's state plus `swag_var_sum`, `swag_deviations` (oldest first), `swag_max_rank`
        and `swag_names` (the sampled parameters, in order)."""
        return dict(super().state_dict(), swag_var_sum=self.var_sum,
                    swag_deviations=list(self.deviations), swag_max_rank=self.max_rank,
                    swag_names=list(self.names))

    def set_state_dict(self, state):
        """Restore what `state_dict` returned; ValueError if it does not fit."""
        if "swag_var_sum" not in state:
            raise ValueError("the saved state holds no SWAG statistics (trained without SWAG)")
        if list(state["swag_names"]) != self.names:
            raise ValueError("the saved SWAG statistics are of other parameters than this model's")
        if int(state["swag_max_rank"]) != self.max_rank:
            raise ValueError(f"the saved SWAG keeps {state['swag_max_rank']} deviations, this "
                             f"one {self.max_rank}")
        super().set_state_dict(state)
        as_tensor = lambda v: v if isinstance(v, paddle.Tensor) else paddle.to_tensor(np.asarray(v))  # noqa: E731
        self.var_sum = as_tensor(state["swag_var_sum"]).astype("float32")
        self.deviations = [as_tensor(d).astype("float32") for d in state["swag_deviations"]]


# --------------------------------------------------------------------------- BatchNorm

def bn_update(loader, model):
    """Recompute the BatchNorm running statistics of `model` with one pass over `loader`.

    Each BatchNorm layer's running mean becomes the mean of its inputs over all samples,
    and its running variance the sample-weighted average of the (biased) batch variances,
    exactly, whatever the batch sizes and whatever the statistics held before (they are
    reset first, so even NaN goes): batch b, after n samples, is given momentum n / (n + b)
    in Paddle's convention (running = m * running + (1 - m) * batch). Runs without
    gradients, every layer in training mode, `paddle.jit.to_static` layers as plain Python
    (a traced graph would keep the first batch's momentum), SyncBatchNorm on this process's
    own batches; then restores each layer's momentum and train/eval mode. If the pass
    fails, the old statistics come back too. A model without BatchNorm is returned untouched
    and no data is read.

    In a data-parallel job each process can refresh from its own shard and the statistics
    then be averaged over the processes, weighted by the samples each saw: that gives the
    statistics of the union of the shards (harness/engine.py's `bn_update` does so).

    Args:
        loader: iterable of batches, each `(x, y, ...)` (list or tuple) or `x` alone.
        model: the Layer whose statistics are recomputed (a DataParallel wrapper is fine).

    Returns:
        The number of samples seen.

    Raises:
        ValueError: the loader yielded no samples (the statistics are left as they were).

    Example:
        >>> bn_update(train_loader, swa_model)
    """
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    stats = batch_norm_statistics(model)
    saved_stats = [t.clone() for t in stats]
    saved_momenta = [layer._momentum for layer in layers]
    saved_modes = [(layer, layer.training) for layer in _unwrap(model).sublayers(include_self=True)]
    seen = 0
    try:
        with paddle.no_grad(), _plain_python_forward(), _local_statistics(layers):
            for layer in layers:
                layer._mean.zero_()
                paddle.assign(paddle.ones_like(layer._variance), output=layer._variance)
            model.train()
            for batch in loader:
                x = _batch_input(batch, layers[0]._mean.place)
                size = int(x.shape[0])
                for layer in layers:
                    layer._momentum = seen / (seen + size)
                model(x)
                seen += size
        if seen == 0:
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
    return seen


def batch_norm_layers(model):
    """The BatchNorm layers of `model` whose running statistics `bn_update` recomputes.

    Args:
        model: a Layer (a DataParallel wrapper is fine).

    Returns:
        Its BatchNorm layers of every variant (1D/2D/3D, the old BatchNorm, SyncBatchNorm)
        except those told to always use their stored statistics (use_global_stats), in
        the order of `sublayers()`.

    Example:
        >>> if batch_norm_layers(model): bn_update(train_loader, model)
    """
    return [layer for layer in _unwrap(model).sublayers(include_self=True)
            if _is_batch_norm(layer) and not getattr(layer, "_use_global_stats", False)]


def batch_norm_statistics(model):
    """The running statistics that `bn_update` recomputes, e.g. to average them over processes.

    Args:
        model: a Layer (a DataParallel wrapper is fine).

    Returns:
        The running mean and variance tensors (the layers' own, not copies) of each of
        `batch_norm_layers(model)`, in order: [mean_1, variance_1, mean_2, ...].

    Example:
        >>> saved = [t.clone() for t in batch_norm_statistics(model)]
    """
    return [t for layer in batch_norm_layers(model) for t in (layer._mean, layer._variance)]


def load_state_dict(model, state, source="state dict"):
    """Copy `state` (name -> tensor or array) into `model`, requiring the same names and shapes;
    each value is cast to the dtype of the tensor it goes into. Paddle's own set_state_dict
    skips mismatches with a warning; this refuses them.

    Args:
        model: the Layer to load into (a DataParallel wrapper is fine).
        state: a state dict, e.g. `other.state_dict()` or one read with paddle.load.
        source: what `state` is, for the error message.

    Returns:
        `model`.

    Raises:
        ValueError: names or shapes differ; the message names the first difference.

    Example:
        >>> load_state_dict(model, swa.model.state_dict(), "the average")
    """
    tensors = dict(_unwrap(model).state_dict())
    missing = [k for k in tensors if k not in state]
    unexpected = [k for k in state if k not in tensors]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: {len(missing)} missing "
                         f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    with paddle.no_grad():
        for key, target in tensors.items():
            value = state[key]
            if list(value.shape) != list(target.shape):
                raise ValueError(f"{source} does not match the model: {key} has shape "
                                 f"{list(value.shape)}, the model {list(target.shape)}")
            value = value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value))
            if str(value.place) != str(target.place):
                value = value.to(target.place)
            _assign(target, value)
    return model


def _batch_input(batch, place):
    """A batch's input as a tensor on `place` (the refreshed model's: an average kept on
    another device than the data is refreshed where it is). A batch is `x` or a list or tuple
    `(x, y, ...)`, x a tensor or array of floating-point inputs, normalised as in training;
    float64 is cast to float32 (numpy's default, not a model's), non-float inputs refused."""
    x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if not isinstance(x, paddle.Tensor):
        try:
            x = np.asarray(x)
        except Exception:
            x = None
        if x is None or x.dtype == object or not x.shape:
            raise TypeError("bn_update: each batch must be x or (x, y, ...) with x a tensor or "
                            f"array of inputs, got {type(batch).__name__}; for dict batches pass "
                            "(batch['image'] for batch in loader)")
        x = paddle.to_tensor(x, place=place)
    if not x.is_floating_point():
        raise TypeError(f"bn_update: the inputs are {x.dtype}, not floating point: normalise them "
                        "as in training (e.g. images scaled and standardised to float32) first")
    if x.dtype == paddle.float64:
        x = x.astype("float32")
    return x if str(x.place) == str(place) else x.to(place)


@contextlib.contextmanager
def _plain_python_forward():
    """Run `paddle.jit.to_static` layers as plain Python for a while.

    A static graph reads a BatchNorm layer's momentum once, when it is traced; the refresh
    changes it every batch. Paddle's public switch turns to_static off for every layer; its
    previous state is read where this Paddle keeps it (assumed on if that cannot be read).
    """
    try:
        from paddle.jit.dy2static.program_translator import ProgramTranslator
        previous = bool(ProgramTranslator().enable_to_static)
    except (ImportError, AttributeError):
        previous = True
    paddle.jit.enable_to_static(False)
    try:
        yield
    finally:
        paddle.jit.enable_to_static(previous)


@contextlib.contextmanager
def _local_statistics(layers):
    """Make SyncBatchNorm layers normalise with their own process's batch, for a while.

    SyncBatchNorm all-reduces every batch's statistics, so a refresh in which the ranks see
    different numbers of batches would leave one rank waiting forever. Averaging the
    refreshed statistics over the ranks is the caller's, once, at the end.
    """
    patched = []
    for layer in layers:
        if isinstance(layer, paddle.nn.SyncBatchNorm):
            previous = layer.__dict__.get("forward")
            layer.forward = functools.partial(_local_batch_norm, layer)
            patched.append((layer, previous))
    try:
        yield
    finally:
        for layer, previous in patched:
            del layer.forward
            if previous is not None:
                layer.forward = previous


def _local_batch_norm(layer, x):
    return paddle.nn.functional.batch_norm(
        x, layer._mean, layer._variance, weight=layer.weight, bias=layer.bias, training=True,
        momentum=layer._momentum, epsilon=layer._epsilon, data_format=layer._data_format)


# --------------------------------------------------------------------------- tensors

def _unwrap(model):
    """The Layer inside a paddle.DataParallel wrapper, or the model itself."""
    return getattr(model, "_layers", model) if isinstance(model, paddle.DataParallel) else model


def _is_batch_norm(layer):
    return isinstance(layer, (paddle.nn.layer.norm._BatchNormBase, paddle.nn.BatchNorm))


def _named_tensors(model):
    """(name, tensor) for every parameter and persistable buffer, BatchNorm statistics
    included: what a state dict holds. Non-persistable buffers are a layer's working state
    (an RNN's dropout state: shape [] in a model, [0] in its deep copy), not its weights."""
    model = _unwrap(model)
    yield from model.named_parameters()
    seen = set()
    for prefix, layer in model.named_sublayers(include_self=True):
        skip = layer._non_persistable_buffer_names_set
        for key, tensor in layer._buffers.items():
            if tensor is not None and key not in skip and id(tensor) not in seen:
                seen.add(id(tensor))
                yield (f"{prefix}.{key}" if prefix else key), tensor


def _statistic_ids(model):
    """The ids of `model`'s statistics, as opposed to its weights: the running means and
    variances of its BatchNorm layers (parameters in Paddle, told apart by identity, not by
    `trainable`: a frozen weight is still a weight) and its buffers."""
    model = _unwrap(model)
    ids = {id(t) for layer in model.sublayers(include_self=True) if _is_batch_norm(layer)
           for t in (layer._mean, layer._variance)}
    return ids | {id(t) for _, t in model.named_buffers()}


def _weights(model):
    """(name, parameter) of the floating-point weights of `model` (no statistics)."""
    statistics = _statistic_ids(model)
    return [(name, p) for name, p in _unwrap(model).named_parameters()
            if p.is_floating_point() and id(p) not in statistics]


def _float32_copy(model):
    """A deep copy of `model` without gradients, its floating-point tensors in float32."""
    average = copy.deepcopy(_unwrap(model))
    average.float()
    for p in average.parameters():
        p.stop_gradient = True
    return average


def _as_float32(tensor):
    return tensor if tensor.dtype == paddle.float32 else tensor.astype("float32")


def _assign(target, value):
    """Copy `value` into `target` in `target`'s dtype (paddle.assign alone would give `target`
    the value's dtype)."""
    paddle.assign(value.astype(target.dtype) if value.dtype != target.dtype else value, output=target)


def _flat_pair(avg, new):
    """(avg, new, ready) for `_lerp_each`: a float32 pair as 1-D views of the same memory
    (ready), which stay right while the pairing holds; any other pair as it is, cast there.

    Why views, made once: Paddle's lerp_ is ~9x slower on 4-D tensors than on the same
    memory seen as 1-D (measured on CPU), and making the views at every update costs more
    than the lerp itself for small tensors (PreResNet110: 11 ms against 4 ms an update)."""
    if avg.dtype == paddle.float32 and new.dtype == paddle.float32 and avg.is_contiguous() and \
            new.is_contiguous():
        return avg.reshape([-1]), new.reshape([-1]), True
    return avg, new, False  # (a strided tensor's 1-D view would be a copy, frozen here)


def _lerp_each(pairs, alpha):
    """avg <- avg + alpha * (new - avg) for each (avg, new, ready) of `_flat_pair`, one tensor
    at a time, in float32; lerp_ reads each input once and writes once.

    The plain update: `moving_average`'s, the reference `_Block` is held to (bit for bit), and
    the path of tensors outside the average's buffer."""
    weight = paddle.full([], alpha, dtype="float32") if pairs else None
    for avg, new, ready in pairs:
        if ready:
            avg.lerp_(new, weight)
            continue
        value = _as_float32(avg).reshape([-1]).lerp(_as_float32(new).reshape([-1]), weight)
        _assign(avg, value.reshape(avg.shape))  # into avg's own memory, in its dtype


def _copy_each(pairs):
    for avg, new in pairs:
        _assign(avg, new if str(new.place) == str(avg.place) else new.to(avg.place))


def _moved(pairs):
    """`pairs` with the model's tensors brought to the average's device where they are on
    another: in float32, one transfer for them all (one buffer concatenated on their device,
    copied across, then split into views)."""
    across = [(avg, new) for avg, new in pairs if str(avg.place) != str(new.place)]
    if not across:
        return pairs
    flat = paddle.concat([_as_float32(new).reshape([-1]) for _, new in across])
    views = paddle.split(flat.to(across[0][0].place), [int(np.prod(new.shape)) for _, new in across])
    moved = {id(avg): view.reshape(avg.shape) for (avg, _), view in zip(across, views)}
    return [(avg, moved.get(id(avg), new)) for avg, new in pairs]


class _Pairs:
    """The (average, model) tensor pairs of two models, matched by name, and the update over
    them: `averaged` and `copied` (integer tensors, and statistics when they are left out of
    the average). A model that does not fit the average (other names or shapes, another
    device) is refused with a ValueError naming the tensor.

    The averaged pairs whose average tensor is a view of `buffer` are updated together
    (`_Block`); any others one at a time, as `_flat_pair` gives them. `still_holds` tells
    cheaply whether the pairing and the views are still right: the layers of both models hold
    the same sublayers and tensors, each with the same storage (a cast or a move gives a
    tensor new storage)."""

    def __init__(self, average, model, average_statistics, other_place=False, buffer=None):
        targets = dict(_named_tensors(average))
        statistics = _statistic_ids(model)
        self.averaged, self.copied = [], []
        for name, new in _named_tensors(model):
            avg = targets.pop(name, None)
            _check_fits(name, avg, new, other_place)
            if not (avg.is_floating_point() and new.is_floating_point()):
                self.copied.append((avg, new))
            elif id(new) in statistics and not average_statistics:
                self.copied.append((avg, new))
            else:
                self.averaged.append((avg, new))
        if targets:
            raise ValueError(f"the average has {next(iter(targets))}, which the model has not: "
                             "the architecture changed since the average was made; make a new one")
        offsets = [_offset(buffer, avg) for avg, _ in self.averaged]
        inside = [(at, new) for at, (_, new) in zip(offsets, self.averaged) if at is not None]
        self.block = _Block(buffer, inside) if inside else None
        self.outside = [pair for at, pair in zip(offsets, self.averaged) if at is None]
        self.flat = [_flat_pair(avg, new) for avg, new in self.outside]
        self.other_place = other_place
        self.root = _unwrap(model)
        # what the layers of both hold (the average's too: a tensor of it replaced by its user
        # is paired anew); Paddle changes these tables in place, never replaces them
        layers = self.root.sublayers(include_self=True) + _unwrap(average).sublayers(include_self=True)
        self.tables = [table for layer in layers for table in _LAYER_DICTS(layer)]
        self.tensors = [t for pair in self.averaged + self.copied for t in pair]
        self.signature = self._signature()

    def copy(self):
        """average <- model, for every pair (the first update)."""
        if self.block:
            self.block.copy()
        _copy_each((_moved(self.outside) if self.other_place else self.outside) + self.copied)

    def lerp(self, weight):
        """average <- average + weight * (model - average) for the averaged pairs; the copied
        ones copied."""
        if self.block:
            self.block.lerp(weight)
        flat = [_flat_pair(*p) for p in _moved(self.outside)] if self.other_place else self.flat
        _lerp_each(flat, weight)
        _copy_each(self.copied)

    def _signature(self):
        """The ids of what the layers of both models hold and the storage of every tensor
        paired: with C-level maps over the layers' tables found when pairing (a replaced
        sublayer changes its parent's), PreResNet110's two models take 0.25 ms here with warm
        caches, where walking the model alone (model.parameters()) takes 0.6 ms."""
        return (list(map(id, itertools.chain.from_iterable(map(dict.values, self.tables)))),
                list(map(paddle.Tensor.data_ptr, self.tensors)))

    def still_holds(self, model):
        return _unwrap(model) is self.root and self._signature() == self.signature


_LAYER_DICTS = operator.attrgetter("_sub_layers", "_parameters", "_buffers")


class _Block:
    """The averaged pairs whose average tensors are views of one float32 buffer, updated a
    block at a time and bit-identically to `_lerp_each` (the same float32 operations in the
    same order: avg + w * (new - avg)).

    On a CPU, with numpy, through zero-copy views of the model's tensors (they keep the
    model's storage alive, so a tensor given new storage cannot be mistaken for the old), a
    chunk of CHUNK floats at a time: the model's floats gathered into a scratch chunk (or read
    in place where one tensor covers the chunk), then three in-cache operations. Elsewhere
    (a GPU; bfloat16, which numpy lacks; an average on another device), each run of adjacent
    tensors of one dtype is one concatenation of the model's tensors (moved to the average's
    device at once) and one lerp_ into the buffer: two kernels, not one per tensor."""

    CHUNK = 1 << 16  # floats: 256 KB, so the chunk and its scratch stay in a 2 MB L2 cache

    def __init__(self, buffer, entries):
        entries = sorted(entries, key=lambda entry: entry[0])
        self.buffer = buffer
        views = _host_views(buffer, [new for _, new in entries])
        if views is not None:
            average = np.from_dlpack(buffer)
            self.chunks = [(average[a:b], p) for a, b, p in _chunks(_runs(entries, views), self.CHUNK)]
            self.scratch = np.empty(max(len(avg) for avg, _ in self.chunks), np.float32)
            return
        self.chunks = None
        same = lambda new, last: new.dtype == last.dtype  # noqa: E731  (one concatenation each)
        flat = [new.reshape([-1]) if new.is_contiguous() else new for _, new in entries]
        self.runs = [(buffer[a:b], run) for a, b, run in _runs(entries, flat, same)]

    def lerp(self, weight):
        if self.chunks is None:
            weight = paddle.full([], weight, dtype="float32")
            for target, run in self.runs:
                target.lerp_(self._gathered(run), weight)
            return
        weight = np.float32(weight)
        for avg, pieces in self.chunks:
            step = self.scratch[:len(avg)]
            if len(pieces) == 1:
                np.subtract(pieces[0], avg, out=step)
            else:
                np.concatenate(pieces, out=step)
                np.subtract(step, avg, out=step)
            np.multiply(step, weight, out=step)
            np.add(avg, step, out=avg)

    def copy(self):
        if self.chunks is None:
            for target, run in self.runs:
                paddle.assign(self._gathered(run), output=target)
            return
        for avg, pieces in self.chunks:
            np.concatenate(pieces, out=avg)

    def _gathered(self, run):
        run = [t if len(t.shape) == 1 else t.reshape([-1]) for t in run]  # a strided one, now
        block = _as_float32(run[0] if len(run) == 1 else paddle.concat(run))
        return block if str(block.place) == str(self.buffer.place) else block.to(self.buffer.place)


def _host_views(buffer, tensors):
    """Zero-copy read-only numpy views (1-D) of `tensors`, if the buffer and they all are in
    host memory and of dtypes numpy has (float32, float16); else None."""
    if not all(t.place.is_cpu_place() and t.dtype in (paddle.float32, paddle.float16) and
               t.is_contiguous() for t in [buffer] + tensors):
        return None  # (a strided tensor's 1-D view would be a copy, frozen at pairing)
    views = [np.from_dlpack(t.detach()).reshape(-1) for t in tensors]
    for view in views:
        view.flags.writeable = False  # the model is only read: numpy refuses any write
    return views


def _runs(entries, items, same=lambda new, last: True):
    """[(start, stop, [item, ...])]: the entries (offset, tensor), in offset order, grouped
    into runs of adjacent tensors (`same` as the run's last), each with its `items`."""
    runs = []
    for (offset, new), item in zip(entries, items):
        if runs and runs[-1][1] == offset and same(new, runs[-1][3]):
            runs[-1][1] += new.size
            runs[-1][2].append(item)
            runs[-1][3] = new
        else:
            runs.append([offset, offset + new.size, [item], new])
    return [(a, b, run) for a, b, run, _ in runs]


def _chunks(runs, size):
    """[(a, b, pieces)]: buffer[a:b] and the model's floats for it as slices of the views, at
    most `size` floats each and never across two runs."""
    chunks = []
    for start, _, views in runs:
        pieces, filled = [], 0
        for view in views:
            i = 0
            while i < view.size:
                take = min(view.size - i, size - filled)
                pieces.append(view[i:i + take])
                i, filled = i + take, filled + take
                if filled == size:
                    chunks.append((start, start + filled, pieces))
                    start, pieces, filled = start + filled, [], 0
        if pieces:
            chunks.append((start, start + filled, pieces))
    return chunks


def _one_buffer(average, model, buffer=None):
    """Point the float32 tensors of `average` at slices of one float32 buffer, which is
    returned (or `buffer`, if they all are views of it already; None if they are on several
    devices or this Paddle cannot re-point a tensor). Each stays the same object with the same
    values and attributes, so whatever holds it (an RNN's weight list, an optimizer) still
    does. They are laid out by the dtype of `model`'s tensor of the same name (then in order),
    so that a mixed-precision model's tensors form one run per dtype (`_Block`)."""
    tensors = {id(t): (name, t) for name, t in _named_tensors(average) if t.dtype == paddle.float32}
    named = list(tensors.values())
    if not named or not hasattr(paddle.Tensor, "_set_impl") or \
            len({str(t.place) for _, t in named}) > 1:
        return None
    if all(_offset(buffer, t) is not None for _, t in named):
        return buffer
    dtypes = {name: str(t.dtype) for name, t in _named_tensors(model)}
    ordered = [t for _, t in sorted(named, key=lambda item: dtypes.get(item[0], ""))]
    buffer = paddle.concat([t.detach().reshape([-1]) for t in ordered])
    offset = 0
    for t in ordered:
        t._set_impl(buffer[offset:offset + t.size].reshape(t.shape))
        offset += t.size
    return buffer


def _offset(buffer, tensor):
    """Where `tensor` is a contiguous float32 view of `buffer`, its offset in floats; else None.
    (Nothing else can lie in the buffer's memory while the buffer lives.)"""
    if buffer is None or tensor.dtype != paddle.float32 or str(tensor.place) != str(buffer.place):
        return None
    at = tensor.data_ptr() - buffer.data_ptr()
    inside = 0 <= at and at + 4 * tensor.size <= 4 * buffer.size and tensor.is_contiguous()
    return at // 4 if inside else None


def _check_fits(name, avg, new, other_place=False):
    if avg is None:
        raise ValueError(f"the model has {name}, which the average has not: the "
                         "architecture changed since the average was made; make a new one")
    if list(avg.shape) != list(new.shape):
        raise ValueError(f"the model's {name} has shape {list(new.shape)}, the average's "
                         f"{list(avg.shape)}: the architecture changed since the average "
                         "was made; make a new one")
    if str(avg.place) != str(new.place) and not other_place:
        raise ValueError(f"the model's {name} is on {new.place}, the average's on "
                         f"{avg.place}: move the average too (swa.model.to(...)), make "
                         "the average after moving the model, or give SWA(..., device=...)")
