"""The ways users asked for SWA: schedules, pretrained start, offline averaging, SGD-vs-SWA
comparisons, label noise."""
import os
import re

import numpy as np
import paddle
import pytest

from harness import checkpoints
from harness import data
import models
from harness import report
from harness import schedules
import eval as evaluation
import train
from helpers import one_line_error, run_main, run_script, script

QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--no_visualdl"]


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
    assert schedules.cyclic_lr(epoch, step, 10, 0.1, 0.01, swa_start=10, swa_c_epochs=2) == \
        pytest.approx(expected)


@pytest.mark.parametrize("epoch, expected", [(0, 0.1), (39, 0.1), (40, 0.01), (59, 0.01),
                                             (60, 0.001), (79, 0.001), (80, 0.05), (99, 0.05)])
def test_step_decay_lr_change_points(epoch, expected):
    assert schedules.step_decay_lr(epoch, 0.1, 100, swa_start=80, swa_lr=0.05) == pytest.approx(expected)


def test_step_decay_without_swa_and_schedule_dispatch():
    assert [schedules.step_decay_lr(e, 1.0, 100) for e in (49, 50, 75, 99)] == \
        pytest.approx([1.0, 0.1, 0.01, 0.01])
    assert schedules.learning_rate("descent", 80, 0, 10, 0.1, 100, 80, 0.05) == pytest.approx(0.05)
    assert schedules.learning_rate("linear", 0, 0, 10, 0.1, 100, 0, 0.02) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="swa_start"):
        schedules.learning_rate("cyclic", 0, 0, 10, 0.1, 100)


# The rate train.py records for each epoch is that of its first batch; digits has 1438
# training images, 12 batches of 128 (the last partial). Worked out by hand:
# cyclic, the SWA paper's alpha(i) = (1 - t) lr_init + t swa_lr, t = (i mod 24 + 1) / 24 over
# the cycles of epochs 3-4 and 5-6 (2 x 12 batches, ending at the averages after 4 and 6):
#   epoch 3 or 5, the cycle's 1st batch:  0.1 - 0.09 * 1/24 = 0.1 - 0.00375 = 0.09625
#   epoch 4 or 6, its 13th batch:         0.1 - 0.09 * 13/24 = 0.1 - 0.04875 = 0.05125
# descent, with s = (epoch - 1) / swa_start: 0.1 for s < 1/2, 0.01 to 3/4, 0.001 to 1, then
# swa_lr: epochs 1-2 (s = 0, 1/4), 3 (s = 1/2), 4 (s = 3/4), 5-6 (s >= 1).
@pytest.mark.parametrize("schedule, flags, rates", [
    ("cyclic", ["--swa_start", "4", "--swa_c_epochs", "2", "--swa_lr", "0.01"],
     [0.1, 0.1, 0.09625, 0.05125, 0.09625, 0.05125]),
    ("descent", ["--swa_start", "4", "--swa_lr", "0.05"], [0.1, 0.1, 0.01, 0.001, 0.05, 0.05]),
])
def test_train_py_follows_the_schedule(tmp_path, schedule, flags, rates):
    result = run_main(train.main, *QUICK, "--epochs", 6, "--eval_freq", 1, "--swa", *flags,
                      "--lr_schedule", schedule, "--dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = report.read_metrics(str(tmp_path))
    np.testing.assert_allclose([r["lr"] for r in rows], rates, rtol=1e-4)
    averaged = [r["ep"] for r in rows if r["swa_te_acc"] is not None]
    assert averaged == ([4, 6] if schedule == "cyclic" else [4, 5, 6])


def test_cyclic_schedule_needs_swa(tmp_path):
    one_line_error(run_main(train.main, *QUICK, "--lr_schedule", "cyclic", "--dir", tmp_path),
                   "--lr_schedule cyclic", "--swa")


# --------------------------------------------------------------------------- pretrained start

def test_swa_fine_tunes_from_given_weights(tmp_path):
    first = run_main(train.main, *QUICK, "--epochs", 3, "--dir", tmp_path / "pre")
    assert first.returncode == 0, first.stderr
    pretrained = checkpoints.load_checkpoint(str(tmp_path / "pre" / "checkpoint-3.pdparams")).state_dict
    plain = tmp_path / "weights.pdparams"
    paddle.save(pretrained, str(plain))
    for source in (tmp_path / "pre" / "checkpoint-3.pdparams", plain):
        run_dir = tmp_path / f"ft-{source.stem}"
        result = run_main(train.main, *QUICK, "--epochs", 2, "--swa", "--swa_start", 0,
                            "--swa_lr", 0.01, "--init", source, "--dir", run_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"starting from {source}" in result.stdout
        start = checkpoints.load_checkpoint(str(run_dir / "checkpoint-0.pdparams")).state_dict
        for key, value in pretrained.items():
            np.testing.assert_array_equal(start[key].numpy(), value.numpy(), err_msg=key)
        rows = report.read_metrics(str(run_dir))
        assert [r["lr"] for r in rows] == [pytest.approx(0.01)] * 2  # swa_lr from the start
        assert checkpoints.load_checkpoint(str(run_dir / "checkpoint-2.pdparams")).swa_n == 2


def test_bad_init_files_are_refused(tmp_path):
    (tmp_path / "noise.pdparams").write_bytes(b"\x00\x01 not paddle")
    one_line_error(run_main(train.main, *QUICK, "--init", tmp_path / "noise.pdparams",
                              "--dir", tmp_path / "a"), "noise.pdparams", "unreadable")
    paddle.save(models.build("SimpleCNN", 10, 3).state_dict(), str(tmp_path / "rgb.pdparams"))
    one_line_error(run_main(train.main, *QUICK, "--init", tmp_path / "rgb.pdparams",
                              "--dir", tmp_path / "b"), "rgb.pdparams", "does not match")
    one_line_error(run_main(train.main, *QUICK, "--init", tmp_path / "none.pdparams",
                              "--dir", tmp_path / "c"), "none.pdparams does not exist")


# --------------------------------------------------------------------------- averaging offline

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("avg") / "run"
    result = run_main(train.main, *QUICK, "--epochs", 4, "--save_freq", 1, "--dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_average_checkpoints_is_their_mean_and_evaluates(saved_run, tmp_path):
    paths = [saved_run / f"checkpoint-{e}.pdparams" for e in (2, 3, 4)]
    out = tmp_path / "avg.pdparams"
    result = run_main(script("average_checkpoints").main, *paths, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "averaged 3 checkpoints (epochs 2, 3, 4)" in result.stdout
    averaged = checkpoints.load_checkpoint(str(out))
    states = [checkpoints.load_checkpoint(str(p)).state_dict for p in paths]
    for key, value in averaged.swa_state_dict.items():
        expected = np.mean([s[key].numpy() for s in states], axis=0)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=key)
    evaluated = run_main(evaluation.main, "--model_path", out)
    assert "SWA weights (average of 3 models, BatchNorm statistics recomputed)" in evaluated.stdout
    refreshed = run_main(script("average_checkpoints").main, *paths, "--out",
                           tmp_path / "avg_bn.pdparams", "--bn_update")
    assert "statistics recomputed" in refreshed.stdout
    again = run_main(evaluation.main, "--model_path", tmp_path / "avg_bn.pdparams")
    assert float(re.search(r"accuracy ([\d.]+)%", again.stdout)[1]) == \
        pytest.approx(float(re.search(r"accuracy ([\d.]+)%", refreshed.stdout)[1]), abs=1e-4)
    # its refresh is the one eval.py makes of the plain average (the run's batch size, seed
    # and last epoch's refresh batches): the same scores to the last digit printed
    scores = lambda out: re.search(r"accuracy ([\d.]+)%\s+NLL ([\d.]+)", out).groups()  # noqa: E731
    assert scores(refreshed.stdout) == scores(evaluated.stdout)


def test_average_checkpoints_refuses_mixed_architectures_and_overwrites(saved_run, tmp_path):
    other = models.build("SimpleCNN", 10, 3)
    foreign = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=9,
                                          state_dict=other.state_dict(), optimizer={}))
    average = script("average_checkpoints").main
    one_line_error(run_main(average, saved_run / "checkpoint-4.pdparams", foreign, "--out",
                              tmp_path / "x.pdparams"), "checkpoint-9.pdparams", "same architecture")
    one_line_error(run_main(average, saved_run / "checkpoint-4.pdparams", "--out",
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


def test_compare_trains_swa_for_one_and_a_half_budgets():
    compare = script("compare")
    args = compare.build_parser().parse_args(["--epochs", "60", "--swa_start", "40", "--methods", "swa1.5"])
    command = compare.train_command(args, "swa1.5", 1, [], "cpu")
    assert command[command.index("--epochs") + 1] == "90" and "--swa" in command
    assert compare.eval_commands(args, "swa1.5", 1, "cpu")[0][1][3].endswith("checkpoint-90.pdparams")


@pytest.mark.slow
def test_compare_script_reports_every_method_with_eval_scores(tmp_path):
    out_dir = tmp_path / "cmp"
    result = run_script(os.path.join("scripts", "compare.py"), "--seeds", 1, "--epochs", 3,
                        "--swa_start", 2, "--label_noise", 0.2, "--swag_samples", 2,
                        "--methods", "sgd", "swa", "fge", "--out_dir", out_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20% of training labels replaced" in result.stdout
    # eval.py's scales, the SWAG authors': 0.5 for SWAG, 1 for SWAG-diagonal
    assert "SWAG from 2 samples, SWAG at scale 0.5, SWAG-diag at scale 1;" in result.stdout
    for method in ("SGD", "FGE", "SWA", "SWAG-diag", "SWAG"):  # one seed: no spread shown
        assert re.search(rf"^{method}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$", result.stdout, re.M), method
    assert "+-" not in result.stdout and result.stderr.count("trained and scored in") == 3
    lines = (out_dir / "compare.csv").read_text().splitlines()
    assert lines[0] == "method,seed,test_acc,test_nll,test_ece" and len(lines) == 6
    assert (out_dir / "fge-seed1" / "fge-3.pdparams").exists()
    assert (out_dir / "compare.png").stat().st_size > 10_000
    swa_row = report.read_metrics(str(out_dir / "swa-seed1"))[-1]
    swa_line = next(line for line in lines if line.startswith("SWA,1,"))
    assert float(swa_line.split(",")[2]) == pytest.approx(swa_row["swa_te_acc"], abs=1e-3)
    assert float(swa_line.split(",")[3]) == pytest.approx(swa_row["swa_te_loss"], abs=1e-3)
    # Run again into the same folder with a second seed: seed 1's runs and scores are reused
    scores = out_dir / "sgd-seed1" / "compare-scores.json"
    before = scores.stat().st_mtime_ns
    again = run_script(os.path.join("scripts", "compare.py"), "--seeds", 1, 2, "--epochs", 3,
                       "--swa_start", 2, "--label_noise", 0.2, "--methods", "sgd", "--out_dir", out_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "sgd seed 1: already trained and scored" in again.stderr
    assert re.search(r"sgd seed 2: trained and scored", again.stderr)
    assert scores.stat().st_mtime_ns == before  # not scored again
    assert re.search(r"^SGD\s+[\d.]+ \+- [\d.]+", again.stdout, re.M)
