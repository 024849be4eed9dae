"""train.py --init CHECKPOINT --init_optimizer: a second stage (FGE, or SWA from an SGD
checkpoint) that takes the checkpoint's momentum along, as the FGE authors' fge.py loads the
checkpoint's optimizer state; and the one-line refusals when the state is missing or does not
fit."""
import numpy as np
import paddle
import pytest

import models
import train
from harness import checkpoints
from helpers import metrics_rows, one_line_error, run_main, write_mnist


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mnist")
    write_mnist(str(folder), train=24, test=8)
    return folder


def _flags(data_path):
    # MNIST has no augmentation, and one batch holds the whole training set: every epoch trains
    # on the same 24 images, in the order of that epoch (a function of the seed and the epoch).
    return ["--dataset", "mnist", "--data_path", data_path, "--no_download", "--model", "SimpleCNN",
            "--batch_size", "24", "--lr_init", "0.05", "--eval_freq", "1", "--no_visualdl"]


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory, data_path):
    """Two epochs of SGD, saved after each. The linear schedule without --swa holds --lr_init
    for t = epoch / epochs <= 1/2: both epochs train at 0.05, as does a one-epoch run."""
    run_dir = tmp_path_factory.mktemp("sgd") / "run"
    done = run_main(train.main, *_flags(data_path), "--epochs", "2", "--save_freq", "1", "--dir", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["lr"] for row in metrics_rows(run_dir)] == [0.05, 0.05]
    return run_dir


def _tensors(path, field="state_dict"):
    state = getattr(checkpoints.load_checkpoint(str(path)), field)
    return {k: v.numpy() for k, v in state.items()}


def test_init_optimizer_continues_the_momentum_as_the_uninterrupted_run_does(sgd_run, data_path, tmp_path):
    """The second epoch of the two-epoch run, against one epoch started from its checkpoint-1.

    Not bit-identical, and cannot be: a run's data order is a function of (seed, epoch), and
    the run started from checkpoint-1 counts its epoch as 0, so it sees the 24 images in another
    order than the uninterrupted run's epoch 1. The sums over the batch (the loss, the gradient,
    the BatchNorm statistics) then differ in float32 rounding only: 1e-6. What is exact is the
    momentum handed over, checked bit for bit in the run's own checkpoint-0."""
    flags = _flags(data_path) + ["--epochs", "1", "--init", sgd_run / "checkpoint-1.pdparams"]
    continued, restarted = tmp_path / "continued", tmp_path / "restarted"
    assert run_main(train.main, *flags, "--init_optimizer", "--dir", continued).returncode == 0
    assert run_main(train.main, *flags, "--dir", restarted).returncode == 0
    saved, handed = (_tensors(p, "optimizer") for p in (sgd_run / "checkpoint-1.pdparams",
                                                         continued / "checkpoint-0.pdparams"))
    assert sorted(saved) == sorted(handed) and len(saved) == 11  # a buffer per parameter
    for key in saved:
        np.testing.assert_array_equal(handed[key], saved[key], err_msg=key)
    assert np.abs(saved["linear_0.w_0_velocity_0"]).max() > 1e-3  # a momentum worth carrying
    uninterrupted = _tensors(sgd_run / "checkpoint-2.pdparams")
    after = {name: _tensors(d / "checkpoint-1.pdparams") for name, d in
             (("continued", continued), ("restarted", restarted))}
    for key, value in uninterrupted.items():
        np.testing.assert_allclose(after["continued"][key], value, rtol=0, atol=1e-6, err_msg=key)
    # From zero momentum instead the step is lr * mu * v smaller: far beyond the tolerance.
    gap = max(np.abs(after["restarted"][k] - v).max() for k, v in uninterrupted.items())
    assert gap > 1e-4


def _with_optimizer(source, target, change):
    """A copy of checkpoint `source` at `target` whose optimizer state is `change(state)`."""
    ckpt = checkpoints.load_checkpoint(str(source))
    ckpt.optimizer = change(dict(ckpt.optimizer))
    checkpoints.write_checkpoint(str(target), ckpt)
    return target


def test_an_optimizer_state_that_is_missing_or_does_not_fit_is_refused_in_one_line(sgd_run, data_path, tmp_path):
    flags = _flags(data_path) + ["--epochs", "1", "--init_optimizer", "--dir", tmp_path / "run"]
    weights = tmp_path / "weights.pdparams"
    paddle.save(models.build("SimpleCNN", 10, 1).state_dict(), str(weights))
    first = sgd_run / "checkpoint-1.pdparams"
    velocity = "conv2d_0.w_0_velocity_0"  # the momentum of features.0.weight, [16, 1, 3, 3]
    cases = [
        (weights, "holds no optimizer state (weights alone, not a checkpoint)"),
        (sgd_run / "checkpoint-0.pdparams", "holds no optimizer state (a checkpoint saved before the first step"),
        (_with_optimizer(first, tmp_path / "shape.pdparams",
                         lambda s: dict(s, **{velocity: paddle.zeros([16, 1, 3])})),
         "its momentum for features.0.weight has shape [16, 1, 3], the parameter [16, 1, 3, 3]"),
        (_with_optimizer(first, tmp_path / "missing.pdparams",
                         lambda s: {k: v for k, v in s.items() if k != velocity}),
         f"has no momentum for features.0.weight ({velocity})"),
        (_with_optimizer(first, tmp_path / "master.pdparams",
                         lambda s: dict(s, master_weights={})),
         "holds master_weights, which this run's optimizer has not"),
        (_with_optimizer(first, tmp_path / "nan.pdparams",
                         lambda s: dict(s, **{velocity: paddle.full([16, 1, 3, 3], float("nan"))})),
         f"the optimizer state {velocity} holds NaN"),
    ]
    for path, message in cases:
        one_line_error(run_main(train.main, *flags, "--init", path), f"--init {path}" if
                       "no optimizer state" not in message else str(path), message)
        assert not (tmp_path / "run").exists(), message
    one_line_error(run_main(train.main, *flags, "--init", first, "--amp", "O2"),
                   "--init_optimizer does not carry --amp O2's float32 master weights")
