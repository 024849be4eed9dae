"""train.py and eval.py end to end, as a user runs them."""
import csv
import dataclasses
import json
import os
import re

import numpy as np
import paddle
import pytest

from harness import checkpoints
import eval as evaluation
from harness import scoring
import train
from helpers import one_line_error, run_main, snapshot_dir, write_cifar10, write_mnist

QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "4", "--swa",
         "--swa_start", "3", "--swa_lr", "0.05", "--eval_freq", "2", "--save_freq", "2"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short SWA run on digits, shared by the tests that read its outputs."""
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    result = run_main(train.main, *QUICK, "--dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def _table(stdout):
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ep", "lr"])
    return lines[header].split(), [line for line in lines[header + 1:]
                                   if line.split() and line.split()[0].isdigit()]


def test_training_writes_table_checkpoints_and_command(digits_run):
    run_dir, result = digits_run
    columns, rows = _table(result.stdout)
    assert columns == ["ep", "lr", "tr_loss", "tr_acc", "te_loss", "te_acc",
                       "swa_te_loss", "swa_te_acc", "time"]
    assert [int(r.split()[0]) for r in rows] == [1, 2, 3, 4]
    assert len(rows[-1].split()) == 9           # last epoch: SGD and SWA evaluated
    assert len(rows[2].split()) == 5            # epoch 3: no evaluation (eval_freq 2)
    names = sorted(os.listdir(run_dir))
    assert names == [".lock", "args.json", "checkpoint-0.pdparams", "checkpoint-2.pdparams",
                     "checkpoint-4.pdparams", "command.sh", "convergence.png", "metrics.csv",
                     "run.json", "vdl"]
    assert "--swa_start 3" in (run_dir / "command.sh").read_text()
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["model"] == "SimpleCNN" and saved["swa_start"] == 3
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["ep"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    ckpt = checkpoints.load_checkpoint(str(run_dir / "checkpoint-4.pdparams"))
    assert ckpt.swa_n == 2 and ckpt.epoch == 4 and ckpt.swa_bn_updated


def test_eval_reproduces_final_swa_and_sgd_accuracy(digits_run):
    run_dir, result = digits_run
    last = _table(result.stdout)[1][-1].split()
    te_acc, swa_loss, swa_acc = float(last[5]), float(last[6]), float(last[7])
    out = run_main(evaluation.main, "--model_path", run_dir / "checkpoint-4.pdparams")
    assert out.returncode == 0, out.stderr
    match = re.search(r"accuracy ([\d.]+)%\s+NLL ([\d.]+)\s+ECE ([\d.]+)%", out.stdout)
    assert out.stdout.splitlines()[1].startswith("SWA weights (average of 2 models): accuracy")
    assert float(match[1]) == pytest.approx(swa_acc, abs=1e-4)
    assert float(match[2]) == pytest.approx(swa_loss, abs=2e-4)
    sgd = run_main(evaluation.main, "--model_path", run_dir / "checkpoint-4.pdparams", "--sgd")
    assert float(re.search(r"accuracy ([\d.]+)%", sgd.stdout)[1]) == pytest.approx(te_acc, abs=1e-4)


def test_eval_recomputes_stale_batchnorm_statistics_as_train_did(tmp_path, digits_run):
    run_dir, result = digits_run
    swa_acc = float(_table(result.stdout)[1][-1].split()[7])
    ckpt = checkpoints.load_checkpoint(str(run_dir / "checkpoint-4.pdparams"))
    stale = dataclasses.replace(ckpt, swa_bn_updated=False, swa_state_dict=dict(ckpt.swa_state_dict))
    for key, value in stale.swa_state_dict.items():
        if key.endswith("_mean"):  # statistics no refresh would leave: far off and marked stale
            stale.swa_state_dict[key] = paddle.full(value.shape, 50.0)
    path = checkpoints.write_checkpoint(str(tmp_path / "stale.pdparams"), stale)
    out = run_main(evaluation.main, "--model_path", path)
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[1]
    assert line.startswith("SWA weights (average of 2 models, BatchNorm statistics recomputed)")
    # the refresh eval.py makes is the one train.py made: the same accuracy as its last row
    assert float(re.search(r"accuracy ([\d.]+)%", line)[1]) == pytest.approx(swa_acc, abs=1e-4)


def test_eval_refuses_sgd_with_a_comparison(digits_run):
    run_dir, _ = digits_run
    for flags in (["--reliability", "x.png"], ["--swag_samples", "2"]):
        one_line_error(run_main(evaluation.main, "--model_path", run_dir / "checkpoint-4.pdparams",
                                "--sgd", *flags), "--sgd", flags[0], "drop --sgd")


def test_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> bin 13 (acc 1), 0.6 -> bin 8 (acc 0), 0.7 -> bin 10 (acc 1),
    # 0.8 -> bin 11 (acc 1): ECE = (0.1 + 0.6 + 0.3 + 0.2) / 4
    assert scoring.calibration_error(probs, labels) == pytest.approx(0.3)
    s = scoring.scores(scoring.softmax(np.log(probs)), labels)
    assert s["accuracy"] == pytest.approx(75.0)
    assert s["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.7, 0.8])))


def test_cifar10_and_mnist_train_from_official_files(tmp_path):
    write_cifar10(str(tmp_path / "data"), per_batch=8)
    write_mnist(str(tmp_path / "data"), train=24, test=8)
    for dataset in ("CIFAR10", "mnist"):
        result = run_main(train.main, "--dataset", dataset, "--data_path", tmp_path / "data",
                            "--model", "SimpleCNN", "--epochs", "2", "--swa", "--swa_start", "2",
                            "--batch_size", "16", "--dir", tmp_path / dataset, "--no_download")
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("SimpleCNN on " + dataset).upper() in result.stdout.upper()
        assert (tmp_path / dataset / "checkpoint-2.pdparams").exists()


@pytest.fixture
def previous_run(tmp_path):
    """A --dir holding a run's files, which no bad input may change."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = paddle.nn.Linear(2, 2)
    checkpoints.save_checkpoint(str(run_dir), checkpoints.Checkpoint(epoch=3,
                                state_dict=model.state_dict(), optimizer={},
                          swa_state_dict=None, swa_n=None))
    (run_dir / "metrics.csv").write_text("ep,lr\n1,0.1\n")
    return run_dir, snapshot_dir(run_dir)


BAD_TRAIN_INPUTS = [
    (["--model", "ResNet50"], ["unknown model 'ResNet50'", "VGG16BN", "SimpleCNN"]),
    (["--dataset", "ImageNet"], ["unknown dataset 'ImageNet'", "CIFAR100", "digits"]),
    (["--swa", "--swa_start", "9", "--epochs", "5"], ["--swa_start 9 is beyond --epochs 5"]),
    (["--lr_init", "0"], ["--lr_init", "must be > 0"]),
    (["--swa_lr", "-0.1"], ["--swa_lr", "must be > 0"]),
    (["--batch_size", "0"], ["--batch_size", "must be > 0"]),
    (["--epochs", "-3"], ["--epochs", "must be > 0"]),
    (["--epochs", "ten"], ["--epochs", "expected a whole number"]),
]


@pytest.mark.parametrize("flags, fragments", BAD_TRAIN_INPUTS)
def test_bad_train_input_is_one_line_and_changes_nothing(previous_run, flags, fragments):
    run_dir, before = previous_run
    base = ["--dataset", "digits", "--model", "SimpleCNN", "--dir", str(run_dir), "--overwrite"]
    one_line_error(run_main(train.main, *base, *flags), *fragments)
    assert snapshot_dir(run_dir) == before


def test_missing_and_corrupt_data_files_are_named(tmp_path):
    args = ["--dataset", "CIFAR10", "--model", "SimpleCNN", "--no_download", "--dir", tmp_path / "r"]
    one_line_error(run_main(train.main, *args, "--data_path", tmp_path / "empty"),
                   "cifar-10-python.tar.gz", "--data_path")
    assert not (tmp_path / "r").exists()  # nothing created by a run that could not start
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    one_line_error(run_main(train.main, *args, "--data_path", tmp_path / "bad"),
                   "cifar-10-python.tar.gz is unreadable")


def test_previous_run_is_not_overwritten(previous_run):
    run_dir, before = previous_run
    result = run_main(train.main, *QUICK, "--dir", run_dir)
    one_line_error(result, "holds a previous run", "--resume auto", "--overwrite")
    assert snapshot_dir(run_dir) == before


def test_unwritable_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    one_line_error(run_main(train.main, *QUICK, "--dir", blocker / "run"),
                   "cannot write to --dir")


def _bad_checkpoints(tmp_path, digits_run):
    run_dir, _ = digits_run
    whole = (run_dir / "checkpoint-4.pdparams").read_bytes()
    truncated = tmp_path / "truncated.pdparams"
    truncated.write_bytes(whole[: len(whole) // 2])
    noise = tmp_path / "noise.pdparams"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    other = tmp_path / "other"
    other.mkdir()
    model = paddle.nn.Linear(3, 3)
    foreign = checkpoints.save_checkpoint(str(other), checkpoints.Checkpoint(epoch=1,
                                          state_dict=model.state_dict(), optimizer={}))
    return [(truncated, "unreadable"), (noise, "unreadable"), (foreign, "does not record the flags")]


def test_bad_resume_file_is_named_and_changes_nothing(tmp_path, digits_run, previous_run):
    run_dir, before = previous_run
    for path, problem in _bad_checkpoints(tmp_path, digits_run):
        result = run_main(train.main, *QUICK, "--dir", run_dir, "--resume", path)
        one_line_error(result, os.path.basename(str(path)), problem)
        assert snapshot_dir(run_dir) == before


def test_bad_model_path_is_named(tmp_path, digits_run):
    for path, problem in _bad_checkpoints(tmp_path, digits_run):
        one_line_error(run_main(evaluation.main, "--model_path", path), os.path.basename(str(path)))
    one_line_error(run_main(evaluation.main, "--model_path", tmp_path / "nope.pdparams"),
                   "nope.pdparams does not exist")
