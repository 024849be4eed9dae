"""train.py --amp (refused where it cannot run) and --val_size (the split, its columns, its
identity), against values computed independently."""
import re

import numpy as np
import pytest

import eval as evaluation
import train
from harness import data
from helpers import finished_run, metrics_rows, one_line_error, run_main

HAS_CUDA = False
try:
    import paddle
    HAS_CUDA = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
except ImportError:
    pass

BASE = ["--dataset", "digits", "--model", "SimpleCNN", "--no_visualdl"]


def _help_entries(text):
    """{"--flag METAVAR": its description, wrapped lines joined} of --help's option lists
    (not the usage line, which names every flag without describing it)."""
    entries, current = {}, None
    for line in text.splitlines():
        match = re.match(r"  (--\S+(?: \S+)?)(?:  +(.*))?$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2) or ""
        elif current and line.startswith("     "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


def test_help_describes_amp_and_the_validation_split_with_their_defaults():
    result = run_main(train.main, "--help")
    assert result.returncode == 0
    entries = _help_entries(result.stdout)
    for flag, words, default in [("--amp {O1,O2}", "mixed precision", "None, float32"),
                                 ("--amp_dtype {float16,bfloat16}", "half-precision type", "float16"),
                                 ("--val_size N", "hold out N training images", "0")]:
        assert flag in entries, f"--help has no entry for {flag}"
        assert words in entries[flag] and entries[flag].endswith(f"(default: {default})"), entries[flag]


@pytest.mark.skipif(HAS_CUDA, reason="this Paddle has a GPU, where --amp runs")
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_on_the_cpu_is_refused_before_the_dir_exists(tmp_path, level):
    one_line_error(run_main(train.main, *BASE, "--amp", level, "--dir", tmp_path / "run"),
                   f"--amp {level}: mixed precision needs a GPU", "float32")
    assert not (tmp_path / "run").exists()


def _largest_remainder(counts, size):
    quota = np.array(counts, float) * size / sum(counts)
    share = np.floor(quota).astype(int)
    for i in sorted(range(len(counts)), key=lambda i: -(quota[i] - share[i]))[:size - share.sum()]:
        share[i] += 1
    return share


def test_the_split_is_stratified_disjoint_and_fixed_by_the_seed():
    ds = data.load_dataset("digits")
    split = data.split_validation(ds, 300, seed=1)
    counts = np.bincount(ds.train.labels, minlength=10)
    assert np.bincount(split.val.labels, minlength=10).tolist() == _largest_remainder(counts, 300).tolist()
    assert len(split.train) == len(ds.train) - 300 and len(split.val) == 300
    whole = {img.tobytes() + bytes([lab]) for img, lab in zip(ds.train.images, ds.train.labels)}
    parts = [{img.tobytes() + bytes([lab]) for img, lab in zip(d.images, d.labels)}
             for d in (split.train, split.val)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == whole
    again, other = data.split_validation(ds, 300, seed=1), data.split_validation(ds, 300, seed=2)
    np.testing.assert_array_equal(again.val.images, split.val.images)
    assert not np.array_equal(other.val.images, split.val.images)
    pixels = split.train.images.astype(np.float64) / 255
    np.testing.assert_allclose(split.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-5)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    run_dir, result = finished_run(tmp_path_factory, "val", *BASE, "--epochs", 3, "--swa",
                                   "--swa_start", 2, "--swa_lr", 0.05, "--eval_freq", 1,
                                   "--val_size", 300)
    return run_dir, result.stdout


def test_a_validation_run_reports_val_columns_and_the_test_set_once(validated):
    run_dir, stdout = validated
    assert "(train 1138, validation 300, test 359)" in stdout
    header = next(line for line in stdout.splitlines() if line.split()[:2] == ["ep", "lr"])
    assert header.split() == ["ep", "lr", "tr_loss", "tr_acc", "val_loss", "val_acc",
                              "swa_val_loss", "swa_val_acc", "time"]
    assert [row["ep"] for row in metrics_rows(run_dir)] == [1, 2, 3]
    assert all(row["val_acc"] is not None for row in metrics_rows(run_dir))
    test = re.search(r"test set \(359 images\): SGD loss ([\d.]+) accuracy ([\d.]+)%; SWA loss "
                     r"([\d.]+) accuracy ([\d.]+)%", stdout)
    # eval.py scores the same weights on the same test set (refreshing on the same split)
    swa = run_main(evaluation.main, "--model_path", run_dir / "checkpoint-3.pdparams")
    sgd = run_main(evaluation.main, "--model_path", run_dir / "checkpoint-3.pdparams", "--sgd")
    for out, acc, loss in ((sgd.stdout, test[2], test[1]), (swa.stdout, test[4], test[3])):
        found = re.search(r"accuracy ([\d.]+)%\s+NLL ([\d.]+)", out)
        assert float(found[1]) == pytest.approx(float(acc), abs=1e-4)
        assert float(found[2]) == pytest.approx(float(loss), abs=2e-4)


def test_a_resume_with_another_split_is_refused(validated):
    run_dir, _ = validated
    one_line_error(run_main(train.main, *BASE, "--epochs", 4, "--swa", "--swa_start", 2,
                            "--swa_lr", 0.05, "--eval_freq", 1, "--val_size", 200,
                            "--dir", run_dir, "--resume", "auto"),
                   "--val_size (run: 300, now: 200)")


@pytest.mark.parametrize("size, message", [(1438, "--val_size 1438 is not below the 1438 training images"),
                                           (1430, "would leave no training image of class")])
def test_a_split_too_large_is_one_line_and_writes_nothing(tmp_path, size, message):
    one_line_error(run_main(train.main, *BASE, "--val_size", size, "--dir", tmp_path / "run"), message)
    assert not (tmp_path / "run").exists()
