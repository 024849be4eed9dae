"""callbacks.SWACallback in paddle.Model.fit, against hand-computed rates and numpy averages."""
import math
import warnings

import numpy as np
import paddle
import pytest

import callbacks
from harness import checkpoints
from harness import data
import models
from harness import schedules
import utils


def _digit_batches():
    ds = data.load_dataset("digits")
    return [[x.numpy(), y.numpy()] for x, y in data.Batches(ds.train, 128, ds.mean, ds.std)(epoch=0)]


BATCHES = _digit_batches()  # 12 batches


class Recorder(paddle.callbacks.Callback):
    """Snapshots the network after every batch and every epoch."""

    def __init__(self):
        super().__init__()
        self.batches, self.epochs = [], []

    def on_train_batch_end(self, step, logs=None):
        self.batches.append(_state(self.model.network))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(_state(self.model.network))


class StopAfter(paddle.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.after = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            self.model.stop_training = True


def _state(network):
    return {k: v.numpy().copy() for k, v in network.state_dict().items()}


def _model(network, optimizer=None, amp=None):
    paddle.seed(0)
    model = paddle.Model(network)
    model.prepare(optimizer or paddle.optimizer.Momentum(0.1, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss(), amp_configs=amp)
    return model


def _cnn():
    paddle.seed(0)
    return models.build("SimpleCNN", 10, 1)


def _fit(epochs, data_=BATCHES, network=None, extra=(), amp=None, **kwargs):
    model = _model(network or _cnn(), amp=amp)
    swa = callbacks.SWACallback(**dict(dict(bn_data=data_), **kwargs))
    recorder = Recorder()
    model.fit(data_, epochs=epochs, verbose=0, callbacks=[swa, recorder, *extra])
    return model, swa, recorder


class SumNet(paddle.nn.Layer):
    """Two groups of weights whose loss gradient is 1 everywhere: an SGD step lowers each
    weight by exactly the rate its group ran at."""

    def __init__(self):
        super().__init__()
        self.a = self.create_parameter([3], default_initializer=paddle.nn.initializer.Constant(0.0))
        self.b = self.create_parameter([2], default_initializer=paddle.nn.initializer.Constant(0.0))

    def forward(self, x):
        return (x.sum() * 0 + self.a.sum() + self.b.sum()).reshape([1, 1])


class Unsized:
    """Batches from an iterator: no len(), as a streaming loader."""

    def __iter__(self):
        return iter([[np.ones((2, 1), "float32"), np.zeros((2, 1), "int64")] for _ in range(4)])


def _rates_fit(epochs, data_=None, fits=1, **kwargs):
    """Fit SumNet with plain SGD; the rates run at, per batch, read off the weights."""
    net = SumNet()
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.SGD(0.1, parameters=net.parameters()), lambda out, label: out.sum())
    swa = callbacks.SWACallback(**kwargs)
    recorder = Recorder()
    runs = []
    for _ in range(fits):
        recorder.batches = []
        before = _state(net)
        model.fit(data_ or Unsized(), epochs=epochs, verbose=0, callbacks=[swa, recorder])
        states = [before] + recorder.batches
        runs.append([[float(states[i][k][0] - states[i + 1][k][0]) for k in ("a", "b")]
                     for i in range(len(states) - 1)])
        with paddle.no_grad():  # the next fit starts from the same weights
            net.a.set_value(before["a"])
            net.b.set_value(before["b"])
    return runs, swa


def _batch_norm_inputs_statistics(network, batches):
    """Per BatchNorm layer (by name): the mean of its inputs over all samples and the
    sample-weighted mean of the biased per-batch variances, computed in numpy from the inputs
    the layers see in training mode (where they normalise with batch statistics, so their
    inputs do not depend on the running ones)."""
    seen, hooks = {}, []
    for name, layer in network.named_sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            hooks.append(layer.register_forward_pre_hook(
                lambda layer, inputs, name=name: seen.setdefault(name, []).append(
                    inputs[0].numpy().astype(np.float64))))
    network.train()
    with paddle.no_grad():
        for x, _ in batches:
            network(paddle.to_tensor(x))
    for hook in hooks:
        hook.remove()
    result = {}
    for name, inputs in seen.items():
        sizes = np.array([len(x) for x in inputs], np.float64)
        mean = np.concatenate(inputs).mean(axis=(0, 2, 3))
        variances = np.array([x.var(axis=(0, 2, 3)) for x in inputs])
        result[name] = (mean, (variances * sizes[:, None]).sum(0) / sizes.sum())
    return result


# --------------------------------------------------------------------------- averages

def test_the_network_ends_holding_the_mean_with_fresh_batchnorm(tmp_path):
    model, swa, recorder = _fit(5, swa_start=3, swa_lr=0.02)
    averaged = recorder.epochs[2:]  # after epochs 3, 4, 5
    assert swa.swa.n == 3
    final = _state(model.network)
    for name, p in model.network.named_parameters():
        if p.trainable:
            np.testing.assert_allclose(final[name], np.mean([s[name] for s in averaged], axis=0),
                                       rtol=1e-5, atol=1e-6, err_msg=name)
    reference = models.build("SimpleCNN", 10, 1)
    checkpoints.load_weights(reference, {k: np.mean([s[k] for s in averaged], 0) for k in final})
    for key, (mean, variance) in _batch_norm_inputs_statistics(reference, BATCHES).items():
        np.testing.assert_allclose(final[key + "._mean"], mean, rtol=1e-4, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(final[key + "._variance"], variance, rtol=1e-4, atol=1e-5,
                                   err_msg=key)
    model.save(str(tmp_path / "swa"))
    loaded = paddle.Model(models.build("SimpleCNN", 10, 1))
    loaded.load(str(tmp_path / "swa"), skip_mismatch=False, reset_optimizer=True)
    for key, value in loaded.network.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), final[key])
    swa.restore_sgd()
    for key, value in model.network.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), recorder.epochs[-1][key])


def test_iterable_dataset_is_accepted_for_the_refresh():
    class Stream(paddle.io.IterableDataset):
        def __iter__(self):
            for x, y in BATCHES:
                yield from zip(x, y)

    model, swa, recorder = _fit(3, bn_data=Stream(), swa_start=2, swa_lr=0.02)
    assert swa.swa.n == 2 and swa.swa.bn_updated
    averaged = np.mean([s["fc.weight"] for s in recorder.epochs[1:]], axis=0)
    np.testing.assert_allclose(model.network.fc.weight.numpy(), averaged, rtol=1e-5, atol=1e-6)


def test_ema_through_the_callback_follows_the_numpy_recurrence():
    model, swa, recorder = _fit(3, swa_start=2, ema_decay=0.7, bn_data=False)
    steps = len(BATCHES)
    expected = None
    for snapshot in recorder.batches[steps:]:  # every batch of epochs 2 and 3
        expected = dict(snapshot) if expected is None else \
            {k: 0.7 * expected[k] + 0.3 * snapshot[k] for k in snapshot}
    assert swa.swa.n == 2 * steps
    for key, value in _state(model.network).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_statistics_can_be_left_out_of_the_average():
    model, swa, recorder = _fit(3, swa_start=2, bn_data=False, average_statistics=False)
    final = _state(model.network)
    np.testing.assert_array_equal(final["features.1._mean"], recorder.epochs[-1]["features.1._mean"])
    np.testing.assert_allclose(final["fc.weight"], np.mean([s["fc.weight"] for s in recorder.epochs[1:]], 0),
                               rtol=1e-5, atol=1e-6)


def test_amp_configs_fit_averages_in_float32():
    model, swa, recorder = _fit(2, swa_start=1, swa_lr=0.02, amp="O1")
    assert {str(p.dtype) for p in swa.swa.model.parameters()} == {"paddle.float32"}
    np.testing.assert_allclose(model.network.fc.weight.numpy(),
                               np.mean([s["fc.weight"] for s in recorder.epochs], 0), rtol=1e-5, atol=1e-6)


def test_fit_save_load_fit_equals_one_uninterrupted_fit(tmp_path):
    kwargs = dict(swa_start=3, swa_lr=0.02, anneal_epochs=2)
    whole, _, _ = _fit(6, **kwargs)
    # Each part in a fresh name scope, as in a process of its own: the optimizer's saved
    # state is keyed by generated names.
    with paddle.utils.unique_name.guard():
        first = _model(_cnn())
        first.fit(BATCHES, epochs=6, verbose=0, save_dir=str(tmp_path), save_freq=1,
                  callbacks=[callbacks.SWACallback(bn_data=BATCHES, **kwargs), StopAfter(4)])
    assert (tmp_path / "3.swa").exists() and not (tmp_path / "4.swa").exists()
    with paddle.utils.unique_name.guard():
        second = _model(models.build("SimpleCNN", 10, 1))
        swa = callbacks.SWACallback(bn_data=BATCHES, **kwargs)
        swa.set_model(second)  # in a new process, before load
        second.load(str(tmp_path / "3"))
        second.fit(BATCHES, epochs=2, verbose=0, callbacks=[swa])
    assert swa.swa.n == 4
    for key, value in _state(whole.network).items():
        np.testing.assert_array_equal(_state(second.network)[key], value, err_msg=key)


# --------------------------------------------------------------------------- rates

def _swalr_rates(lr, swa_lr, anneal_epochs, strategy, epochs):
    """torch.optim.swa_utils.SWALR's rates, stepped once per epoch (as Lightning steps it),
    written out from its get_lr: the rate of each epoch from the one it starts at."""
    shape = (lambda t: t) if strategy == "linear" else (lambda t: (1 - math.cos(math.pi * t)) / 2)
    rates = []
    for step in range(epochs):
        step = max(1, step) if anneal_epochs == 0 else step
        before = shape(max(0.0, min(1.0, (step - 1) / max(1, anneal_epochs))))
        initial = swa_lr if before == 1 else (lr - before * swa_lr) / (1 - before)
        alpha = shape(max(0.0, min(1.0, step / max(1, anneal_epochs))))
        lr = swa_lr * alpha + initial * (1 - alpha)
        rates.append(lr)
    return rates


@pytest.mark.parametrize("anneal_epochs, strategy", [(0, "cos"), (1, "cos"), (2, "cos"), (3, "linear")])
def test_annealing_gives_torch_swalr_rates_stepped_per_epoch(anneal_epochs, strategy):
    runs, _ = _rates_fit(7, swa_start=3, swa_lr=0.02, anneal_epochs=anneal_epochs,
                         anneal_strategy=strategy)
    per_epoch = [runs[0][4 * e][0] for e in range(7)]
    expected = [0.1, 0.1] + _swalr_rates(0.1, 0.02, anneal_epochs, strategy, 5)
    assert per_epoch == pytest.approx(expected, rel=1e-5)
    assert all(rates[0] == pytest.approx(per_epoch[i // 4], rel=1e-5) for i, rates in enumerate(runs[0]))


def test_fractional_start_counts_like_lightning():
    # Lightning: swa_epoch_start=0.8 of max_epochs=10 is int(0.8 * 10) = 8, its 0-based
    # swa_start max(8 - 1, 0) = 7: SWALR from the 8th epoch on, epochs 7..9 (0-based) averaged.
    first = max(int(0.8 * 10) - 1, 0)
    runs, swa = _rates_fit(10, swa_start=0.8, swa_lr=0.02)
    assert [runs[0][4 * e][0] for e in range(10)] == pytest.approx(
        [0.1] * first + [0.02] * (10 - first), rel=1e-5)
    assert swa.swa.n == 10 - first == 3


@pytest.mark.parametrize("fraction, epochs", [(0.8, 1), (0.4, 2)])
def test_a_fractional_start_rounding_to_zero_first_trains_at_the_initial_rate(fraction, epochs):
    # Lightning: int(f * E) = 0, its 0-based swa_start max(0 - 1, 0) = 0: SWALR is made at the
    # first epoch, which trains at the rate SWALR starts from, then anneals once per epoch.
    assert max(int(fraction * epochs) - 1, 0) == 0
    runs, swa = _rates_fit(epochs, swa_start=fraction, swa_lr=0.02, anneal_epochs=2)
    expected = _swalr_rates(0.1, 0.02, 2, "cos", epochs)
    assert expected[0] == 0.1
    assert [runs[0][4 * e][0] for e in range(epochs)] == pytest.approx(expected, rel=1e-5)
    assert swa.swa.n == epochs


def _drive(swa, groups, epochs, steps=4, learning_rate=0.1):
    """Run the callback's hooks around plain SGD steps of SumNet, as Model.fit calls them (Paddle
    3.3's fit cannot train an optimizer with parameter groups: its minimize() fails on them),
    an LRScheduler in the optimizer stepped after each batch as fit's LRScheduler callback does.
    Returns the rates per step and group, read off the weights."""
    net = SumNet()
    model = paddle.Model(net)
    optimizer = paddle.optimizer.SGD(learning_rate, parameters=[
        {"params": [net.a], "learning_rate": 1.0}, {"params": [net.b], "learning_rate": groups}])
    model.prepare(optimizer, lambda out, label: out.sum())
    swa.set_model(model)
    swa.set_params({"epochs": epochs, "steps": steps, "batch_size": 2})
    swa.on_train_begin()
    rates = []
    for epoch in range(epochs):
        swa.on_epoch_begin(epoch)
        for step in range(steps):
            swa.on_train_batch_begin(step)
            before = (float(net.a[0]), float(net.b[0]))
            net(paddle.ones([2, 1])).sum().backward()
            optimizer.step()
            optimizer.clear_grad()
            rates.append([before[0] - float(net.a[0]), before[1] - float(net.b[0])])
            swa.on_train_batch_end(step)
            if isinstance(optimizer._learning_rate, paddle.optimizer.lr.LRScheduler):
                optimizer._learning_rate.step()
        swa.on_epoch_end(epoch)
    swa.on_train_end()
    return rates, optimizer, net


def test_per_group_swa_rates():
    swa = callbacks.SWACallback(swa_start=2, swa_lr=[0.03, 0.01])
    rates, optimizer, net = _drive(swa, 0.5, 3)
    assert rates[0] == pytest.approx([0.1, 0.05], rel=1e-5)     # the groups' factors 1 and 0.5
    assert rates[4] == pytest.approx([0.03, 0.01], rel=1e-5)    # SWA's, absolute
    assert optimizer.get_lr() == pytest.approx(0.1)             # the user's back at the end
    assert net.b.optimize_attr["learning_rate"] == pytest.approx(0.5)
    rates, _, _ = _drive(callbacks.SWACallback(swa_start=2, swa_lr=0.02), 0.5, 3)
    assert rates[4] == pytest.approx([0.02, 0.02], rel=1e-5)
    with pytest.raises(ValueError, match="3 rates, the optimizer 2 parameter group"):
        _drive(callbacks.SWACallback(swa_start=1, swa_lr=[0.1, 0.2, 0.3]), 0.5, 1)


def test_per_group_swa_rates_take_over_from_a_scheduler_and_hand_it_back():
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=12)
    swa = callbacks.SWACallback(swa_start=3, swa_lr=[0.03, 0.01])
    with pytest.warns(UserWarning, match="CosineAnnealingDecay at epoch 3"):
        rates, optimizer, net = _drive(swa, 0.5, 3, learning_rate=scheduler)
    lr = [0.05 * (1 + math.cos(math.pi * t / 12)) for t in range(8)]  # Paddle's cosine, by step
    expected = [[r, 0.5 * r] for r in lr] + [[0.03, 0.01]] * 4  # the factors 1 and 0.5, then SWA's
    np.testing.assert_allclose(rates, expected, rtol=1e-5)
    assert optimizer._learning_rate is scheduler and scheduler.last_epoch == 8
    assert net.b.optimize_attr["learning_rate"] == pytest.approx(0.5)


def test_cyclic_rates_with_an_unsized_loader_are_learnt_from_the_first_epoch():
    runs, _ = _rates_fit(4, swa_start=3, swa_freq=2, swa_lr=0.01, lr_schedule="cyclic")
    expected = [schedules.cyclic_lr(e, s, 4, 0.1, 0.01, 3, 2) for e in range(4) for s in range(4)]
    np.testing.assert_allclose([r[0] for r in runs[0]], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        _rates_fit(2, swa_start=1, swa_lr=0.01, lr_schedule="cyclic")  # the cycle starts at once
    runs, _ = _rates_fit(2, swa_start=1, swa_lr=0.01, lr_schedule="cyclic", steps_per_epoch=4)
    expected = [schedules.cyclic_lr(e, s, 4, 0.1, 0.01, 1, 1) for e in range(2) for s in range(4)]
    np.testing.assert_allclose([r[0] for r in runs[0]], expected, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["constant", "cyclic"])
def test_a_second_fit_with_the_same_callback_runs_as_the_first(schedule):
    runs, _ = _rates_fit(4, fits=2, swa_start=3, swa_freq=2, swa_lr=0.01, lr_schedule=schedule)
    assert runs[0] == runs[1]
    assert runs[0][0][0] == pytest.approx(0.1)  # not the SWA rate the first fit ended with


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("kwargs, message", [
    (dict(swa_start=1.5), "whole epoch number or a fraction"),
    (dict(swa_start=-1), "swa_start must be >= 0"),
    (dict(swa_start=1, swa_lr=0.0), "swa_lr must be > 0"),
    (dict(swa_start=1, swa_lr=-0.1), "swa_lr must be > 0"),
    (dict(swa_start=1, swa_lr=float("inf")), "swa_lr must be > 0"),
    (dict(swa_start=1, swa_lr=[0.1, 0.0]), "swa_lr must be > 0"),
    (dict(swa_start=1, swa_freq=0), "swa_freq must be a whole number >= 1"),
    (dict(swa_start=1, lr_schedule="cyclic"), "needs swa_lr"),
    (dict(swa_start=1, swa_lr=0.1, anneal_epochs=2, lr_schedule="cyclic"), "anneal"),
    (dict(swa_start=1, anneal_strategy="step"), "anneal strategy"),
    (dict(swa_start=1, ema_decay=1.0), "ema_decay"),
])
def test_invalid_arguments_are_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        callbacks.SWACallback(**kwargs)


def test_a_start_beyond_the_fit_is_refused_before_training():
    network = _cnn()
    before = _state(network)
    with pytest.raises(ValueError, match="swa_start=9 is beyond the fit's 3 epochs"):
        _fit(3, network=network, swa_start=9)
    for key, value in _state(network).items():
        np.testing.assert_array_equal(value, before[key])
    with pytest.raises(ValueError, match="bn_data"):
        _fit(1, bn_data=None, swa_start=1)


# --------------------------------------------------------------------------- as the peers do

class Samples(paddle.io.Dataset):
    """The digits batches as a Dataset of single samples (in order)."""

    def __init__(self, batches):
        self.x = np.concatenate([x for x, _ in batches])
        self.y = np.concatenate([y for _, y in batches])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _in_batches(dataset, size):
    return [[dataset.x[i:i + size], dataset.y[i:i + size]] for i in range(0, len(dataset), size)]


@pytest.mark.parametrize("as_loader", [False, True])
def test_a_dataset_for_the_refresh_is_batched_as_training_was(as_loader):
    samples = Samples(BATCHES[:4])
    train = paddle.io.DataLoader(samples, batch_size=24) if as_loader else samples
    model = _model(_cnn())
    swa = callbacks.SWACallback(swa_start=2, swa_lr=0.02, bn_data=samples)
    recorder = Recorder()
    model.fit(train, batch_size=None if as_loader else 24, epochs=2, verbose=0, shuffle=False,
              callbacks=[swa, recorder])
    reference = models.build("SimpleCNN", 10, 1)
    checkpoints.load_weights(reference, recorder.epochs[-1])  # one model averaged: epoch 2
    final = _state(model.network)
    for key, (mean, variance) in _batch_norm_inputs_statistics(reference, _in_batches(samples, 24)).items():
        np.testing.assert_allclose(final[key + "._variance"], variance, rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def _ema_reference(snapshots, decay):
    expected = None
    for snapshot in snapshots:
        expected = dict(snapshot) if expected is None else \
            {k: decay * expected[k] + (1 - decay) * snapshot[k] for k in snapshot}
    return expected


def test_an_ema_with_accumulated_gradients_updates_once_per_optimizer_step():
    model = _model(_cnn())
    swa = callbacks.SWACallback(swa_start=1, ema_decay=0.7, bn_data=False)
    recorder = Recorder()
    model.fit(BATCHES, epochs=1, verbose=0, accumulate_grad_batches=2, callbacks=[swa, recorder])
    steps = len(BATCHES)
    stepped = [recorder.batches[i] for i in range(steps) if (i + 1) % 2 == 0 or i + 1 == steps]
    assert swa.swa.n == len(stepped) == 6
    expected = _ema_reference(stepped, 0.7)
    for key, value in _state(model.network).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_ema_every_n_steps_from_a_step_as_lightning_counts():
    model = _model(_cnn())
    swa = callbacks.SWACallback(swa_start=0, ema_decay=0.5, ema_every_n_steps=3, ema_start_step=4,
                                bn_data=False)
    recorder = Recorder()
    model.fit(BATCHES, epochs=1, verbose=0, callbacks=[swa, recorder])
    # Lightning's EMAWeightAveraging.should_update(step_idx): step_idx >= start and
    # step_idx % every == 0, with step_idx the 0-based index of the optimizer step just taken
    chosen = [s for i, s in enumerate(recorder.batches) if i >= 4 and i % 3 == 0]
    assert swa.swa.n == len(chosen) == 2  # optimizer steps 6 and 9 of 12
    expected = _ema_reference(chosen, 0.5)
    np.testing.assert_allclose(_state(model.network)["fc.weight"], expected["fc.weight"],
                               rtol=1e-5, atol=1e-6)


class EvalSpy(paddle.callbacks.Callback):
    """What the network holds when fit evaluates, and the average at that moment."""

    def __init__(self, swa):
        super().__init__()
        self.swa, self.seen = swa, []

    def on_eval_begin(self, logs=None):
        self.seen.append((_state(self.model.network), _state(self.swa.swa.model)))

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(_state(self.model.network))


def test_fit_evaluates_the_ema_and_trains_on_from_the_sgd_weights():
    model = _model(_cnn())
    swa = callbacks.SWACallback(swa_start=1, ema_decay=0.7, bn_data=False)
    recorder, spy = Recorder(), EvalSpy(swa)
    model.fit(BATCHES, eval_data=BATCHES[:2], epochs=2, verbose=0, callbacks=[swa, recorder, spy])
    evaluated, average = spy.seen[1]  # epoch 1 begins, then its evaluation
    for key in evaluated:
        np.testing.assert_array_equal(evaluated[key], average[key], err_msg=key)
    assert not np.array_equal(evaluated["fc.weight"], recorder.epochs[0]["fc.weight"])
    for key, value in spy.seen[2].items():  # epoch 2 begins with the SGD weights again
        np.testing.assert_array_equal(value, recorder.epochs[0][key], err_msg=key)


def test_an_average_of_nothing_is_refused_or_said():
    model = models.build("SimpleCNN", 10, 1)
    swa = utils.SWA(model)
    with pytest.raises(ValueError, match="0 updates"):
        swa.bn_update(BATCHES)
    with pytest.warns(UserWarning, match="0 updates"):
        swa.model
    with pytest.warns(UserWarning, match="before any model was averaged"):
        fitted, _, recorder = _fit(4, swa_start=3, swa_lr=0.02, extra=[StopAfter(1)])
    for key, value in _state(fitted.network).items():
        np.testing.assert_array_equal(value, recorder.epochs[0][key], err_msg=key)


class BeginSpy(paddle.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = _state(self.model.network)


def test_a_fit_resumed_from_the_final_checkpoint_trains_on_from_the_sgd_weights(tmp_path):
    with paddle.utils.unique_name.guard():
        first = _model(_cnn())
        swa = callbacks.SWACallback(swa_start=1, swa_lr=0.02, bn_data=BATCHES)
        first.fit(BATCHES, epochs=2, verbose=0, save_dir=str(tmp_path), callbacks=[swa])
    sgd = {k: v.numpy() for k, v in swa.sgd_state.items()}
    final = paddle.load(str(tmp_path / "final.pdparams"))
    np.testing.assert_array_equal(final["fc.weight"].numpy(), first.network.fc.weight.numpy())
    with paddle.utils.unique_name.guard():
        second = _model(models.build("SimpleCNN", 10, 1))
        again, spy = callbacks.SWACallback(swa_start=1, swa_lr=0.02, bn_data=BATCHES), BeginSpy()
        again.set_model(second)
        second.load(str(tmp_path / "final"))
        second.fit(BATCHES, epochs=1, verbose=0, callbacks=[again, spy])
    for key, value in spy.weights.items():
        np.testing.assert_array_equal(value, sgd[key], err_msg=key)
    assert again.swa.n == 3


def test_the_users_rates_are_read_afresh_at_each_fit_and_a_failed_fit_is_not_taken_for_them():
    net = SumNet()
    swa = callbacks.SWACallback(swa_start=1, swa_lr=0.02)
    model = paddle.Model(net)
    optimizer = paddle.optimizer.SGD(0.1, parameters=net.parameters())
    model.prepare(optimizer, lambda out, label: out.sum())
    model.fit(Unsized(), epochs=1, verbose=0, callbacks=[swa])
    assert optimizer.get_lr() == pytest.approx(0.1)
    optimizer.set_lr(0.5)  # the user's new rate for the next fit
    model.fit(Unsized(), epochs=1, verbose=0, callbacks=[swa])
    assert optimizer.get_lr() == pytest.approx(0.5)

    class Fails(paddle.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):  # fit stops at the SWA rate, before putting 0.5 back
        model.fit(Unsized(), epochs=1, verbose=0, callbacks=[swa, Fails()])
    assert optimizer.get_lr() == pytest.approx(0.02)
    model.fit(Unsized(), epochs=1, verbose=0, callbacks=[swa])
    assert optimizer.get_lr() == pytest.approx(0.5)


# --------------------------------------------------------------------------- the user's LRScheduler

def _cosine(t, lr, t_max):
    """Paddle's CosineAnnealingDecay (eta_min 0) after t steps, its documented closed form."""
    return lr * (1 + math.cos(math.pi * t / t_max)) / 2


def _warmup_cosine(t, warmup, start_lr, lr, t_max):
    """Paddle's LinearWarmup around a CosineAnnealingDecay, as documented: start_lr + (lr -
    start_lr) t / warmup for t < warmup, then the cosine after t - warmup steps."""
    return start_lr + (lr - start_lr) * t / warmup if t < warmup else _cosine(t - warmup, lr, t_max)


class RateSpy(paddle.callbacks.Callback):
    """The rate of each batch, read off SumNet's weight a (its gradient is 1)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, step, logs=None):
        self.before = float(self.model.network.a[0])

    def on_train_batch_end(self, step, logs=None):
        self.rates.append(self.before - float(self.model.network.a[0]))


def _scheduled(scheduler):
    net = SumNet()
    optimizer = paddle.optimizer.SGD(scheduler, parameters=net.parameters())
    model = paddle.Model(net)
    model.prepare(optimizer, lambda out, label: out.sum())
    return model, optimizer


def _scheduled_fit(scheduler, epochs, by_epoch, **kwargs):
    """Fit SumNet (4 batches an epoch) with SGD on `scheduler`, stepped by fit's own LRScheduler
    callback (by step) or by one given by epoch; the rates per batch and the optimizer."""
    model, optimizer = _scheduled(scheduler)
    spy = RateSpy()
    stepper = [paddle.callbacks.LRScheduler(by_step=False, by_epoch=True)] if by_epoch else []
    model.fit(Unsized(), epochs=epochs, verbose=0,
              callbacks=[callbacks.SWACallback(**kwargs), spy, *stepper])
    return spy.rates, optimizer


@pytest.mark.parametrize("by_epoch", [False, True])
def test_a_cosine_scheduler_runs_until_swa_start_then_swa_lr_and_is_handed_back(by_epoch):
    t_max = 6 if by_epoch else 24
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=t_max)
    with pytest.warns(UserWarning, match="over from the optimizer's CosineAnnealingDecay at epoch 4"):
        rates, optimizer = _scheduled_fit(scheduler, 6, by_epoch, swa_start=4, swa_lr=0.02)
    steps = [e if by_epoch else 4 * e + s for e in range(3) for s in range(4)]  # epochs 1 to 3
    expected = [_cosine(t, 0.1, t_max) for t in steps] + [0.02] * 12
    assert rates == pytest.approx(expected, abs=2e-6)
    # handed back as SWA found it: stepped 3 epochs' worth, not 6
    assert optimizer._learning_rate is scheduler
    assert scheduler.last_epoch == (3 if by_epoch else 12)
    assert optimizer.get_lr() == pytest.approx(_cosine(scheduler.last_epoch, 0.1, t_max))


@pytest.mark.parametrize("by_epoch", [False, True])
def test_a_warm_up_scheduler_hands_over_to_swalr_annealing_from_the_rate_it_reached(by_epoch):
    warmup, t_max = (2, 5) if by_epoch else (4, 20)
    scheduler = paddle.optimizer.lr.LinearWarmup(
        paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=t_max), warmup, 0.01, 0.1)
    with pytest.warns(UserWarning, match="LinearWarmup at epoch 4"):
        rates, optimizer = _scheduled_fit(scheduler, 6, by_epoch, swa_start=4, swa_lr=0.02,
                                          anneal_epochs=2, anneal_strategy="linear")
    position = (lambda e, s: e) if by_epoch else (lambda e, s: 4 * e + s)
    before = [_warmup_cosine(position(e, s), warmup, 0.01, 0.1, t_max)
              for e in range(3) for s in range(4)]
    reached = _warmup_cosine(position(3, 0), warmup, 0.01, 0.1, t_max)  # when SWA begins
    swalr = _swalr_rates(reached, 0.02, 2, "linear", 3)  # epochs 4 to 6
    assert rates == pytest.approx(before + [r for r in swalr for _ in range(4)], abs=2e-6)
    assert optimizer._learning_rate is scheduler and scheduler.last_epoch == position(3, 0)


def test_cyclic_rates_take_over_from_a_scheduler_at_the_first_cycle():
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=16)
    with pytest.warns(UserWarning, match="CosineAnnealingDecay at epoch 3"):
        rates, optimizer = _scheduled_fit(scheduler, 4, False, swa_start=4, swa_freq=2,
                                          swa_lr=0.02, lr_schedule="cyclic")
    # the SWA paper's cycle over epochs 3 and 4 (8 batches): (1 - t) a1 + t a2 with t = i / 8,
    # i = 1..8, from a1 = the rate the cosine reached after 8 steps down to a2 = swa_lr
    start = _cosine(8, 0.1, 16)
    cycle = [(1 - i / 8) * start + i / 8 * 0.02 for i in range(1, 9)]
    assert rates == pytest.approx([_cosine(t, 0.1, 16) for t in range(8)] + cycle, abs=2e-6)
    assert optimizer._learning_rate is scheduler and scheduler.last_epoch == 8


def _quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return function(*args, **kwargs)


@pytest.mark.parametrize("stop", [2, 5])  # the checkpoint before SWA takes over, or after
def test_a_resumed_fit_with_a_scheduler_runs_and_hands_it_back_as_one_uninterrupted(tmp_path, stop):
    kwargs = dict(swa_start=4, swa_lr=0.02, anneal_epochs=2, anneal_strategy="linear")
    whole = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=24)
    rates, _ = _quietly(_scheduled_fit, whole, 6, False, **kwargs)
    expected = [_cosine(t, 0.1, 24) for t in range(12)] + \
        [r for r in _swalr_rates(_cosine(12, 0.1, 24), 0.02, 2, "linear", 3) for _ in range(4)]
    assert rates == pytest.approx(expected, abs=2e-6)
    with paddle.utils.unique_name.guard():
        model, _ = _scheduled(paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=24))
        first = RateSpy()
        _quietly(model.fit, Unsized(), epochs=6, verbose=0, save_dir=str(tmp_path), save_freq=1,
                 callbacks=[callbacks.SWACallback(**kwargs), first, StopAfter(stop)])
    with paddle.utils.unique_name.guard():
        scheduler = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=24)
        model, optimizer = _scheduled(scheduler)
        swa, second = callbacks.SWACallback(**kwargs), RateSpy()
        swa.set_model(model)
        model.load(str(tmp_path / str(stop - 1)))
        _quietly(model.fit, Unsized(), epochs=6 - stop, verbose=0, callbacks=[swa, second])
    assert first.rates + second.rates == rates
    assert optimizer._learning_rate is scheduler
    assert scheduler.last_epoch == whole.last_epoch == 12 and scheduler() == whole()


def test_a_fit_failed_after_the_takeover_leaves_the_next_fit_the_users_scheduler():
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(0.1, T_max=8)
    model, optimizer = _scheduled(scheduler)
    swa = callbacks.SWACallback(swa_start=2, swa_lr=0.02)

    class Fails(paddle.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, step, logs=None):
            if self.epoch == 1:
                raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="takes the learning rate"):
        model.fit(Unsized(), epochs=2, verbose=0, callbacks=[swa, Fails()])
    assert optimizer.get_lr() == pytest.approx(0.02)  # fit stopped with SWA's rate in place
    spy = RateSpy()
    with pytest.warns(UserWarning, match="takes the learning rate"):
        model.fit(Unsized(), epochs=2, verbose=0, callbacks=[swa, spy])
    # the scheduler on from where SWA took it (4 steps), then SWA's rate again
    expected = [_cosine(t, 0.1, 8) for t in range(4, 8)] + [0.02] * 4
    assert spy.rates == pytest.approx(expected, abs=2e-6)
    assert optimizer._learning_rate is scheduler and scheduler.last_epoch == 8
