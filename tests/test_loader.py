"""The batch loader (data.Batches) against the batches written out sample by sample in numpy."""
import collections
import os
import signal
import sys
import threading

import numpy as np
import paddle
import pytest

from harness import data, engine, session


def scaling(mean, std):
    """The per-channel float32 scale and shift the loader has always normalised with."""
    std32, mean32 = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    return (1.0 / (255.0 * std32)).astype(np.float32), (mean32 / std32).astype(np.float32)


def reference_batches(images, labels, batch_size, mean, std, augment, shuffle, seed, epoch,
                      stream=0):
    """An epoch's batches as the loader defines them, one sample at a time: the epoch's draws
    from numpy's generator seeded [seed, epoch, stream] (the order, then crop offsets, then
    flips), each image zero-padded, cropped, mirrored, then `x * scale - shift` in float32."""
    n, height, width = len(labels), images.shape[1], images.shape[2]
    pad = augment.pad
    rng = np.random.default_rng([seed, epoch, stream])
    order = rng.permutation(n) if shuffle else np.arange(n)
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)) if pad else np.zeros((n, 2), np.int64)
    flips = rng.random(n) < 0.5 if augment.flip else np.zeros(n, bool)
    scale, shift = scaling(mean, std)
    batches = []
    for first in range(0, n, batch_size):
        xs = []
        for i in order[first:first + batch_size]:
            padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
            top, left = offsets[i]
            crop = padded[top:top + height, left:left + width]
            if flips[i]:
                crop = crop[:, ::-1]
            xs.append((crop.astype(np.float32) * scale - shift).transpose(2, 0, 1))
        batches.append((np.stack(xs), labels[order[first:first + batch_size]]))
    return batches


def assert_bit_identical(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected):
        assert x.dtype == np.float32 and x.shape == ex.shape
        assert x.tobytes() == ex.tobytes()  # every bit: -0.0 is not 0.0 here
        np.testing.assert_array_equal(y, ey)


def as_numpy(batches):
    return [(x.numpy(), y.numpy()) for x, y in batches]


CASES = {  # image shape, augmentation: the datasets' own, and odd sizes
    "cifar": ((32, 32, 3), data.Augment(pad=4, flip=True)),
    "digits": ((8, 8, 1), data.Augment(pad=1)),
    "mnist": ((28, 28, 1), data.Augment()),
    "flip only, odd size": ((7, 5, 2), data.Augment(flip=True)),
    "pad wider than the image": ((3, 4, 3), data.Augment(pad=5, flip=True)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_are_bit_identical_to_padding_cropping_flipping_each_sample_in_numpy(case, shuffle):
    shape, augment = CASES[case]
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (150, *shape), dtype=np.uint8)
    labels = rng.integers(0, 10, 150)
    mean, std = rng.uniform(0.2, 0.6, shape[-1]), rng.uniform(0.1, 0.4, shape[-1])
    loader = data.Batches(data.ArrayDataset(images, labels), 32, mean, std, shuffle=shuffle,
                          augment=augment, seed=11)
    expected = reference_batches(images, labels, 32, mean, std, augment, shuffle, 11, epoch=3)
    assert_bit_identical(as_numpy(loader(epoch=3)), expected)  # 4 batches of 32 and one of 22
    assert_bit_identical(as_numpy(loader(epoch=3, start=2)), expected[2:])  # a resumed epoch
    refresh = reference_batches(images, labels, 32, mean, std, augment, shuffle, 11, 3, stream=1)
    assert_bit_identical(as_numpy(loader(epoch=3, stream=1)), refresh)


def test_normalisation_is_bit_identical_to_the_float32_formula_for_every_pixel_value_and_channel():
    values = np.arange(256, dtype=np.uint8)
    # One image of 16 x 16 pixels per channel order: every value in every channel.
    images = np.stack([np.roll(values, 85 * k).reshape(16, 16) for k in range(3)], axis=-1)[None]
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]  # CIFAR-10's, float64
    x, _ = next(iter(data.Batches(data.ArrayDataset(images, np.zeros(1, np.int64)), 1, mean,
                                  std)()))
    scale, shift = scaling(mean, std)
    for c in range(3):
        expected = images[0, :, :, c].astype(np.float32) * scale[c] - shift[c]
        assert x.numpy()[0, c].tobytes() == expected.tobytes()



# --------------------------------------------------------------------------- loading ahead

class Observed(data.Batches):
    """The loader, telling which batches it has assembled so far (`done`, an Event each)."""

    def __init__(self, *args, fail_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.done, self.fail_at = collections.defaultdict(threading.Event), fail_at
        self.niceness = set()  # of the threads that assembled batches

    def assemble(self, plan, step):
        if step == self.fail_at:
            raise MemoryError(f"stand-in failure assembling batch {step}")
        if hasattr(os, "getpriority"):
            self.niceness.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        arrays = super().assemble(plan, step)
        self.done[step].set()
        return arrays


class StandInStep(paddle.nn.Layer):
    """A model whose step k waits (up to `patience` seconds) for the loader to have assembled
    batch k + 1, as a GPU's queued step leaves the host free; it records the batches it got
    and whether batch k + 1 was ready during step k."""

    def __init__(self, loader, first, patience):
        super().__init__()
        self.linear = paddle.nn.Linear(3 * 32 * 32, 10)
        self.loader, self.step, self.patience = loader, first, patience
        self.seen, self.next_ready = [], []

    def forward(self, x):
        self.seen.append(x.numpy())
        if self.step + 1 < len(self.loader):
            # Once a wait has run out, the rest do not wait: the test fails without delay.
            patience = self.patience if all(self.next_ready) else 0.0
            self.next_ready.append(self.loader.done[self.step + 1].wait(patience))
        self.step += 1
        return self.linear(x.flatten(1))


def cifar_like(n=200, seed=9):
    rng = np.random.default_rng(seed)
    return (data.ArrayDataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                              rng.integers(0, 10, n)), rng.uniform(0.3, 0.6, 3), rng.uniform(0.2, 0.3, 3))


def train_through(loader, epoch=1, start=0, patience=0.0, **kwargs):
    model = StandInStep(loader, start, patience)
    optimizer = paddle.optimizer.SGD(0.01, parameters=model.parameters())
    result = engine.train_pass(loader(epoch, start), model, optimizer, lambda step: 0.01,
                               lambda step: step, first_step=start, **kwargs)
    return model, result


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("batches")]


def test_where_steps_overlap_each_step_runs_while_the_next_batch_is_assembled_and_batches_are_unchanged(monkeypatch):
    ds, mean, std = cifar_like()
    augment = data.Augment(pad=4, flip=True)
    expected = reference_batches(ds.images, ds.labels, 16, mean, std, augment, True, 4, epoch=1)
    monkeypatch.setattr(data, "steps_overlap", lambda: True)  # as on a GPU
    loader = Observed(ds, 16, mean, std, shuffle=True, augment=augment, seed=4)
    # In the caller the next batch would not be begun before the step ends: the wait would
    # run out (30 s) and the test fail.
    model, _ = train_through(loader, patience=30.0)
    assert model.next_ready == [True] * (len(loader) - 1)
    if sys.platform.startswith("linux"):  # the lowest priority: the step's thread goes first
        assert loader.niceness == {19}
    assert_bit_identical(list(zip(model.seen, [y for _, y in expected])), expected)
    assert not loader_threads()


def test_on_a_cpu_batches_are_assembled_in_the_loop_between_steps_by_default():
    assert not data.steps_overlap()  # Paddle runs on the CPU here
    ds, mean, std = cifar_like()
    augment = data.Augment(pad=4, flip=True)
    loader = Observed(ds, 16, mean, std, shuffle=True, augment=augment, seed=4)
    model, _ = train_through(loader)
    assert model.next_ready == [False] * (len(loader) - 1)  # never one ahead of the step
    expected = reference_batches(ds.images, ds.labels, 16, mean, std, augment, True, 4, epoch=1)
    assert_bit_identical(list(zip(model.seen, [y for _, y in expected])), expected)


def test_a_signal_stops_training_ahead_of_the_step_cleanly_and_the_epoch_resumes_with_the_same_batches():
    ds, mean, std = cifar_like()
    augment = data.Augment(pad=4, flip=True)
    loader = Observed(ds, 16, mean, std, shuffle=True, augment=augment, seed=4, num_workers=1)

    def on_sync(done, sums):  # as train.py's: a signal asks the pass to stop after this step
        if done == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return stop.signal is not None

    with session.StopFlag() as stop:
        model, result = train_through(loader, on_sync=on_sync)
    assert result["steps"] == 5 and stop.signal == signal.SIGTERM
    assert not loader_threads()  # the threads assembling ahead stopped with the pass
    resumed, _ = train_through(loader, start=5)
    expected = reference_batches(ds.images, ds.labels, 16, mean, std, augment, True, 4, epoch=1)
    assert_bit_identical(list(zip(model.seen + resumed.seen, [y for _, y in expected])), expected)


def test_a_failure_in_a_step_or_in_assembling_ahead_leaves_no_loader_thread_behind():
    ds, mean, std = cifar_like()
    loader = Observed(ds, 16, mean, std, shuffle=True, seed=4, num_workers=2)

    def fail(done, sums):
        if done == 3:
            raise RuntimeError("stand-in failure in a step")

    # Checked while the error (and its traceback, which holds the pass's frame) is alive, as
    # it is while train.py reports it: the threads stop with the pass, not when it is dropped.
    with pytest.raises(RuntimeError, match="in a step") as failed:
        train_through(loader, on_sync=fail)
    assert failed.value.__traceback__ is not None and not loader_threads()
    failing = Observed(ds, 16, mean, std, shuffle=True, seed=4, num_workers=2, fail_at=6)
    with pytest.raises(MemoryError, match="assembling batch 6") as failed:  # its own error
        train_through(failing)
    assert failed.value.__traceback__ is not None and not loader_threads()


def test_the_training_pass_counts_the_time_its_steps_waited_for_batches(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock["now"])

    def slow_batches():  # each batch takes 0.25 s of the stand-in clock to come
        rng = np.random.default_rng(0)
        for _ in range(4):
            clock["now"] += 0.25
            yield (paddle.to_tensor(rng.standard_normal((2, 3)).astype("float32")),
                   paddle.to_tensor(np.array([0, 1])))

    model = paddle.nn.Linear(3, 2)

    def step_takes_a_second():
        clock["now"] += 1.0  # the steps' time is not the batches'

    result = engine.train_pass(slow_batches(), model, paddle.optimizer.SGD(0.1, parameters=model.parameters()),
                               lambda step: 0.1, lambda step: step, after_step=step_takes_a_second)
    assert result["data_wait"] == 1.0 and result["steps"] == 4
