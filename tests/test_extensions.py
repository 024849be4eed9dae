"""The ways users asked for SWA: fit callback, schedules, pretrained start, offline averaging,
SGD-vs-SWA comparisons, label noise."""
import os
import re

import numpy as np
import paddle
import pytest

import data
import models
import report
import utils
from helpers import one_line_error, run_script

QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--no_visualdl"]


# --------------------------------------------------------------------------- callback

class Recorder(paddle.callbacks.Callback):
    """Snapshots the network after every epoch and the rate before every batch."""

    def __init__(self):
        super().__init__()
        self.snapshots, self.rates = [], []

    def on_train_batch_begin(self, step, logs=None):
        self.rates.append(self.model._optimizer.get_lr())

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append({k: v.numpy().copy() for k, v in self.model.network.state_dict().items()})


def _fit(epochs, callback_kwargs):
    ds = data.load_dataset("digits")
    batches = [[x.numpy(), y.numpy()] for x, y in data.Batches(ds.train, 128, ds.mean, ds.std)(epoch=0)]
    paddle.seed(0)
    network = models.build("SimpleCNN", 10, 1)
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.Momentum(0.1, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss())
    swa = utils.SWACallback(bn_data=batches, **callback_kwargs)
    recorder = Recorder()
    model.fit(batches, epochs=epochs, verbose=0, callbacks=[swa, recorder])
    return model, swa, recorder, batches


def test_callback_leaves_the_mean_of_its_snapshots_with_fresh_batchnorm(tmp_path):
    model, swa, recorder, batches = _fit(5, dict(swa_start=3, swa_lr=0.02))
    averaged = recorder.snapshots[2:]  # after epochs 3, 4, 5
    assert swa.swa.n == 3
    final = {k: v.numpy() for k, v in model.network.state_dict().items()}
    trainable = [n for n, p in model.network.named_parameters() if not p.stop_gradient]
    for key in trainable:
        np.testing.assert_allclose(final[key], np.mean([s[key] for s in averaged], axis=0),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    # BatchNorm statistics: those of the mean weights, recomputed on the same batches.
    reference = models.build("SimpleCNN", 10, 1)
    utils.load_weights(reference, {k: np.mean([s[k] for s in averaged], axis=0) for k in final})
    utils.bn_update(batches, reference)
    for key, value in reference.state_dict().items():
        if key.endswith(("_mean", "_variance")):
            np.testing.assert_allclose(final[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    # Constant SWA rate from the first averaged epoch on.
    steps = len(batches)
    assert recorder.rates[:2 * steps] == [pytest.approx(0.1)] * (2 * steps)
    assert recorder.rates[2 * steps:] == [pytest.approx(0.02)] * (3 * steps)
    # Saved and loaded with paddle.Model like any weights; SGD weights come back on request.
    model.save(str(tmp_path / "swa"))
    loaded = paddle.Model(models.build("SimpleCNN", 10, 1))
    loaded.load(str(tmp_path / "swa"), skip_mismatch=False, reset_optimizer=True)
    for key, value in loaded.network.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), final[key])
    swa.restore_sgd()
    for key, value in model.network.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), recorder.snapshots[-1][key])


def test_callback_cyclic_rates_and_refusals():
    _, swa, recorder, batches = _fit(4, dict(swa_start=2, swa_freq=2, swa_lr=0.01,
                                             lr_schedule="cyclic"))
    steps = len(batches)
    expected = [utils.cyclic_lr(e, s, steps, 0.1, 0.01, 2, 2) for e in range(4) for s in range(steps)]
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    assert recorder.rates[2 * steps - 1] == pytest.approx(0.01) and swa.swa.n == 2
    with pytest.raises(ValueError, match="bn_data"):
        network = models.build("SimpleCNN", 10, 1)
        model = paddle.Model(network)
        model.prepare(paddle.optimizer.Momentum(0.1, parameters=network.parameters()),
                      paddle.nn.CrossEntropyLoss())
        model.fit(batches, epochs=1, verbose=0, callbacks=[utils.SWACallback(swa_start=1)])
    with pytest.raises(ValueError, match="swa_lr"):
        utils.SWACallback(swa_start=1, lr_schedule="cyclic")


# --------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("epoch, step, expected", [
    (0, 0, 0.1),                         # before the first cycle
    (7, 9, 0.1),                         # last batch before the first cycle (starts at epoch 8)
    (8, 0, 0.1 - 0.09 / 20),             # first iteration of a cycle: t = 1/20
    (8, 9, 0.1 - 0.09 * 10 / 20),        # half-way
    (9, 9, 0.01),                        # last iteration: swa_lr, the model is averaged
    (10, 0, 0.1 - 0.09 / 20),            # next cycle
    (11, 9, 0.01),
])
def test_cyclic_lr_change_points(epoch, step, expected):
    assert utils.cyclic_lr(epoch, step, 10, 0.1, 0.01, swa_start=10, swa_c_epochs=2) == \
        pytest.approx(expected)


@pytest.mark.parametrize("epoch, expected", [(0, 0.1), (39, 0.1), (40, 0.01), (59, 0.01),
                                             (60, 0.001), (79, 0.001), (80, 0.05), (99, 0.05)])
def test_step_decay_lr_change_points(epoch, expected):
    assert utils.step_decay_lr(epoch, 0.1, 100, swa_start=80, swa_lr=0.05) == pytest.approx(expected)


def test_step_decay_without_swa_and_schedule_dispatch():
    assert [utils.step_decay_lr(e, 1.0, 100) for e in (49, 50, 75, 99)] == \
        pytest.approx([1.0, 0.1, 0.01, 0.01])
    assert utils.learning_rate("descent", 80, 0, 10, 0.1, 100, 80, 0.05) == pytest.approx(0.05)
    assert utils.learning_rate("linear", 0, 0, 10, 0.1, 100, 0, 0.02) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="swa_start"):
        utils.learning_rate("cyclic", 0, 0, 10, 0.1, 100)


@pytest.mark.parametrize("schedule, flags", [
    ("cyclic", ["--swa_start", "4", "--swa_c_epochs", "2", "--swa_lr", "0.01"]),
    ("descent", ["--swa_start", "4", "--swa_lr", "0.05"]),
])
def test_train_py_follows_the_schedule(tmp_path, schedule, flags):
    result = run_script("train.py", *QUICK, "--epochs", 6, "--eval_freq", 1, "--swa", *flags,
                        "--lr_schedule", schedule, "--dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = report.read_metrics(str(tmp_path))
    swa_start = int(flags[1])
    c = int(flags[3]) if schedule == "cyclic" else 1
    swa_lr = float(flags[-1])
    expected = [utils.learning_rate(schedule, e, 0, 12, 0.1, 6, swa_start, swa_lr, c) for e in range(6)]
    np.testing.assert_allclose([r["lr"] for r in rows], expected, rtol=1e-4)
    assert [r["ep"] for r in rows if r["swa_te_acc"] is not None] == ([4, 6] if c == 2 else [4, 5, 6])


def test_cyclic_schedule_needs_swa(tmp_path):
    one_line_error(run_script("train.py", *QUICK, "--lr_schedule", "cyclic", "--dir", tmp_path),
                   "--lr_schedule cyclic", "--swa")


# --------------------------------------------------------------------------- pretrained start

def test_swa_fine_tunes_from_given_weights(tmp_path):
    first = run_script("train.py", *QUICK, "--epochs", 3, "--dir", tmp_path / "pre")
    assert first.returncode == 0, first.stderr
    pretrained = utils.load_checkpoint(str(tmp_path / "pre" / "checkpoint-3.pdparams"))["state_dict"]
    plain = tmp_path / "weights.pdparams"
    paddle.save(pretrained, str(plain))
    for source in (tmp_path / "pre" / "checkpoint-3.pdparams", plain):
        run_dir = tmp_path / f"ft-{source.stem}"
        result = run_script("train.py", *QUICK, "--epochs", 2, "--swa", "--swa_start", 0,
                            "--swa_lr", 0.01, "--init", source, "--dir", run_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"starting from {source}" in result.stdout
        start = utils.load_checkpoint(str(run_dir / "checkpoint-0.pdparams"))["state_dict"]
        for key, value in pretrained.items():
            np.testing.assert_array_equal(start[key].numpy(), value.numpy(), err_msg=key)
        rows = report.read_metrics(str(run_dir))
        assert [r["lr"] for r in rows] == [pytest.approx(0.01)] * 2  # swa_lr from the start
        assert utils.load_checkpoint(str(run_dir / "checkpoint-2.pdparams"))["swa_n"] == 2


def test_bad_init_files_are_refused(tmp_path):
    (tmp_path / "noise.pdparams").write_bytes(b"\x00\x01 not paddle")
    one_line_error(run_script("train.py", *QUICK, "--init", tmp_path / "noise.pdparams",
                              "--dir", tmp_path / "a"), "noise.pdparams", "unreadable")
    paddle.save(models.build("SimpleCNN", 10, 3).state_dict(), str(tmp_path / "rgb.pdparams"))
    one_line_error(run_script("train.py", *QUICK, "--init", tmp_path / "rgb.pdparams",
                              "--dir", tmp_path / "b"), "rgb.pdparams", "does not match")
    one_line_error(run_script("train.py", *QUICK, "--init", tmp_path / "none.pdparams",
                              "--dir", tmp_path / "c"), "none.pdparams does not exist")


# --------------------------------------------------------------------------- averaging offline

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    result = run_script("train.py", *QUICK, "--epochs", 4, "--save_freq", 1, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_average_checkpoints_is_their_mean_and_evaluates(saved_run, tmp_path):
    paths = [saved_run / f"checkpoint-{e}.pdparams" for e in (2, 3, 4)]
    out = tmp_path / "avg.pdparams"
    result = run_script(os.path.join("scripts", "average_checkpoints.py"), *paths, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "averaged 3 checkpoints (epochs 2, 3, 4)" in result.stdout
    averaged = utils.load_checkpoint(str(out))
    states = [utils.load_checkpoint(str(p))["state_dict"] for p in paths]
    for key, value in averaged["swa_state_dict"].items():
        expected = np.mean([s[key].numpy() for s in states], axis=0)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)
    printed = float(re.search(r"accuracy ([\d.]+)%", result.stdout)[1])
    evaluated = run_script("eval.py", "--model_path", out)
    assert evaluated.stdout.startswith("SWA weights (average of 3 models")
    assert float(re.search(r"accuracy ([\d.]+)%", evaluated.stdout)[1]) == pytest.approx(printed, abs=1e-4) \
        or "recomputed" in evaluated.stdout  # eval.py refreshes statistics that were only averaged
    refreshed = run_script(os.path.join("scripts", "average_checkpoints.py"), *paths, "--out",
                           tmp_path / "avg_bn.pdparams", "--bn_update")
    assert "statistics recomputed" in refreshed.stdout
    again = run_script("eval.py", "--model_path", tmp_path / "avg_bn.pdparams")
    assert float(re.search(r"accuracy ([\d.]+)%", again.stdout)[1]) == \
        pytest.approx(float(re.search(r"accuracy ([\d.]+)%", refreshed.stdout)[1]), abs=1e-4)


def test_average_checkpoints_refuses_mixed_architectures_and_overwrites(saved_run, tmp_path):
    other = models.build("SimpleCNN", 10, 3)
    foreign = utils.save_checkpoint(str(tmp_path), 9, state_dict=other.state_dict(), optimizer={})
    script = os.path.join("scripts", "average_checkpoints.py")
    one_line_error(run_script(script, saved_run / "checkpoint-4.pdparams", foreign, "--out",
                              tmp_path / "x.pdparams"), "checkpoint-9.pdparams", "same architecture")
    one_line_error(run_script(script, saved_run / "checkpoint-4.pdparams", "--out",
                              saved_run / "checkpoint-3.pdparams"), "exists", "--overwrite")
    assert not (tmp_path / "x.pdparams").exists()


# --------------------------------------------------------------------------- comparisons

def test_label_noise_changes_exactly_that_fraction():
    labels = np.arange(200) % 10
    ds = data.ArrayDataset(np.zeros((200, 2, 2, 1), np.uint8), labels)
    noisy = data.with_label_noise(ds, 0.3, 10, seed=4)
    assert (noisy.labels != labels).sum() == 60
    np.testing.assert_array_equal(noisy.labels, data.with_label_noise(ds, 0.3, 10, seed=4).labels)
    np.testing.assert_array_equal(ds.labels, labels)  # the original is untouched


def test_compare_script_reports_both_methods(tmp_path):
    out_dir = tmp_path / "cmp"
    result = run_script(os.path.join("scripts", "compare.py"), "--seeds", 1, 2, "--epochs", 3,
                        "--swa_start", 2, "--label_noise", 0.2, "--out_dir", out_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20% of training labels replaced" in result.stdout
    for method in ("SGD", "SWA"):
        assert re.search(rf"^{method}\s+[\d.]+ \+- [\d.]+\s+[\d.]+ \+- [\d.]+$", result.stdout, re.M)
    lines = (out_dir / "compare.csv").read_text().splitlines()
    assert lines[0] == "method,seed,test_acc,test_nll" and len(lines) == 5
    assert (out_dir / "compare.png").stat().st_size > 10_000
    swa_row = report.read_metrics(str(out_dir / "swa-seed1"))[-1]
    assert float(lines[3].split(",")[2]) == pytest.approx(swa_row["swa_te_acc"])
