"""Fast Geometric Ensembling (train.py --fge, eval.py --ensemble/--ensemble_of): the rate
against the authors' worked out by hand, the snapshots, the ensemble against probabilities
averaged in numpy, and a resume after SIGKILL mid-cycle."""
import os
import re

import numpy as np
import paddle
import pytest

import eval as evaluation
import models
import train
from harness import checkpoints, data, schedules
from helpers import finished_run, metrics_rows, one_line_error, run_main, run_script

FGE = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "12", "--swa_start", "6", "--fge",
       "--fge_cycle", "2", "--fge_lr1", "0.05", "--fge_lr2", "0.005", "--eval_freq", "1",
       "--no_visualdl"]


# The authors' rate (dnn-mode-connectivity, fge.py): within a cycle of c epochs, at iteration i
# of I of the cycle's epoch e (0-based), t = (e + i / I) / c and the rate is
# (1 - 2t) lr1 + 2t lr2 for t <= 1/2, (2 - 2t) lr2 + (2t - 1) lr1 after. Worked out by hand
# for cycles starting at 0-based epoch 6 (--swa_start 6).
CYCLE_2 = [  # c = 2, I = 4 iterations, lr1 = 0.05, lr2 = 0.01
    (6, 0, 0.05),   # t = 0:   lr1
    (6, 1, 0.04),   # t = 1/8: 0.75 * 0.05 + 0.25 * 0.01 = 0.0375 + 0.0025
    (6, 2, 0.03),   # t = 1/4: 0.5 * 0.05 + 0.5 * 0.01
    (6, 3, 0.02),   # t = 3/8: 0.25 * 0.05 + 0.75 * 0.01 = 0.0125 + 0.0075
    (7, 0, 0.01),   # t = 1/2: lr2, the midpoint
    (7, 1, 0.02),   # t = 5/8: 0.75 * 0.01 + 0.25 * 0.05
    (7, 2, 0.03),   # t = 3/4: 0.5 * 0.01 + 0.5 * 0.05
    (7, 3, 0.04),   # t = 7/8: 0.25 * 0.01 + 0.75 * 0.05
    (8, 0, 0.05),   # the next cycle: t = 0 again
    (9, 2, 0.03),   # t = 3/4, as at epoch 7
]
CYCLE_3 = [  # c = 3, I = 2 iterations, lr1 = 0.07, lr2 = 0.01
    (6, 0, 0.07),   # t = 0
    (6, 1, 0.05),   # t = 1/6: (2/3) 0.07 + (1/3) 0.01 = 0.15 / 3
    (7, 0, 0.03),   # t = 1/3: (1/3) 0.07 + (2/3) 0.01 = 0.09 / 3
    (7, 1, 0.01),   # t = 1/2: lr2, inside the cycle's middle epoch
    (8, 0, 0.03),   # t = 2/3: (2/3) 0.01 + (1/3) 0.07
    (8, 1, 0.05),   # t = 5/6: (1/3) 0.01 + (2/3) 0.07
    (9, 0, 0.07),   # the next cycle
]


@pytest.mark.parametrize("epoch, i, rate", CYCLE_2)
def test_the_rate_over_a_two_epoch_cycle_is_the_authors_triangle(epoch, i, rate):
    assert schedules.fge_lr(epoch, i, 4, 6, 2, 0.05, 0.01) == pytest.approx(rate, rel=1e-12)


@pytest.mark.parametrize("epoch, i, rate", CYCLE_3)
def test_the_rate_over_an_odd_cycle_is_the_authors_triangle(epoch, i, rate):
    assert schedules.fge_lr(epoch, i, 2, 6, 3, 0.07, 0.01) == pytest.approx(rate, rel=1e-12)


@pytest.fixture(scope="module")
def fge_result(tmp_path_factory):
    return finished_run(tmp_path_factory, "fge", *FGE)


@pytest.fixture(scope="module")
def fge_run(fge_result):
    return fge_result[0]


def test_the_lr_column_is_labelled_as_the_rate_of_each_epochs_first_batch(fge_result):
    run_dir, result = fge_result
    assert "FGE from epoch 6, cycles of 2 (the lr column: each epoch's first batch)" in result.stdout
    rows = {int(row["ep"]): row["lr"] for row in metrics_rows(run_dir)}
    # The authors' fge.py prints lr_schedule(1.0), the rate at the epoch's end: lr2 = 0.005 for
    # the snapshot epoch 7 (t = 1/2) and lr1 = 0.05 for epoch 8 (t = 1). Here the first batch's:
    # epoch 7 starts its cycle (t = 0), epoch 8 its second half (t = 1/2).
    assert (rows[7], rows[8]) == pytest.approx((0.05, 0.005))


def test_a_run_snapshots_at_each_midpoint_and_lists_them(fge_run):
    assert sorted(n for n in os.listdir(fge_run) if n.startswith("fge-")) == \
        ["fge-11.pdparams", "fge-7.pdparams", "fge-9.pdparams"]
    lrs = {int(row["ep"]): row["lr"] for row in metrics_rows(fge_run)}
    assert [lrs[e] for e in (7, 8, 9, 10)] == pytest.approx([0.05, 0.005, 0.05, 0.005])
    ckpt = checkpoints.load_checkpoint(str(fge_run / "checkpoint-12.pdparams"))
    assert ckpt.fge_snapshots == ["fge-7.pdparams", "fge-9.pdparams", "fge-11.pdparams"]


def _probabilities(path):
    """A snapshot's test-set probabilities, by hand: its weights, the training normalisation,
    a numpy softmax."""
    ckpt = checkpoints.load_checkpoint(str(path))
    model = models.build("SimpleCNN", 10, 1)
    model.set_state_dict(ckpt.state_dict)
    model.eval()
    ds = data.load_dataset("digits")
    mean, std = (np.array(ckpt.normalization[k], np.float32) for k in ("mean", "std"))
    x = (ds.test.images.astype(np.float32) / 255 - mean) / std
    with paddle.no_grad():
        logits = model(paddle.to_tensor(x.transpose(0, 3, 1, 2))).numpy().astype(np.float64)
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True), ds.test.labels


def test_the_ensemble_is_the_mean_of_its_snapshots_probabilities(fge_run):
    out = run_main(evaluation.main, "--model_path", fge_run / "checkpoint-12.pdparams", "--ensemble")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("FGE ensemble of 3"))
    accuracy, nll = (float(v) for v in re.search(r"accuracy ([\d.]+)%\s+NLL ([\d.]+)", line).groups())
    members = [_probabilities(fge_run / f"fge-{e}.pdparams") for e in (7, 9, 11)]
    probs, labels = np.mean([p for p, _ in members], axis=0), members[0][1]
    assert accuracy == pytest.approx(100 * (probs.argmax(1) == labels).mean(), abs=1e-4)
    assert nll == pytest.approx(-np.log(probs[np.arange(len(labels)), labels]).mean(), abs=1e-4)
    member_nll = []
    for e in (7, 9, 11):
        alone = run_main(evaluation.main, "--model_path", fge_run / f"fge-{e}.pdparams", "--sgd")
        member_nll.append(float(re.search(r"NLL ([\d.]+)", alone.stdout)[1]))
    assert nll <= np.mean(member_nll)
    of = run_main(evaluation.main, "--ensemble_of", *(fge_run / f"fge-{e}.pdparams" for e in (7, 9, 11)))
    assert f"accuracy {accuracy:.4f}%  NLL {nll:.4f}" in of.stdout


@pytest.mark.slow
def test_a_run_killed_mid_cycle_resumes_bit_identically_with_the_same_snapshots(fge_run, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_script(os.path.join("tests", "interrupt.py"), "step", 80, "KILL", *FGE, "--dir", run_dir)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_main(train.main, *FGE, "--dir", run_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ["checkpoint-12.pdparams", "fge-7.pdparams", "fge-9.pdparams", "fge-11.pdparams"]:
        a = checkpoints.load_checkpoint(str(fge_run / name)).state_dict
        b = checkpoints.load_checkpoint(str(run_dir / name)).state_dict
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=f"{name} {key}")
    assert sorted(os.listdir(run_dir)) == sorted(os.listdir(fge_run))
    assert metrics_rows(run_dir) == metrics_rows(fge_run)


def test_fge_with_swa_averages_the_snapshots(tmp_path):
    run_dir = tmp_path / "run"
    assert run_main(train.main, *FGE, "--swa", "--swa_lr", "0.05", "--dir", run_dir).returncode == 0
    ckpt = checkpoints.load_checkpoint(str(run_dir / "checkpoint-12.pdparams"))
    assert ckpt.swa_n == 3
    snapshots = [checkpoints.load_checkpoint(str(run_dir / f"fge-{e}.pdparams")).state_dict
                 for e in (7, 9, 11)]
    np.testing.assert_allclose(ckpt.swa_state_dict["fc.weight"].numpy(),
                               np.mean([s["fc.weight"].numpy() for s in snapshots], axis=0),
                               rtol=1e-5, atol=1e-6)


def test_fge_refusals_are_one_line(fge_run, tmp_path):
    one_line_error(run_main(train.main, *FGE, "--swa", "--ema_decay", "0.9", "--dir", tmp_path / "a"),
                   "--fge snapshots at its cycles' midpoints")
    one_line_error(run_main(train.main, *FGE, "--epochs", "6", "--dir", tmp_path / "b"),
                   "--fge: the first snapshot is after epoch 7, beyond --epochs 6")
    one_line_error(run_main(train.main, *FGE, "--swa", "--swa_c_epochs", "2", "--dir", tmp_path / "c"),
                   "--swa_c_epochs 2: with --fge the average takes FGE's snapshots", "drop --swa_c_epochs")
    assert not (tmp_path / "c").exists()
    one_line_error(run_main(evaluation.main, "--model_path", fge_run / "checkpoint-0.pdparams",
                            "--ensemble"), "lists no FGE snapshot")
    one_line_error(run_main(train.main, *FGE, "--epochs", "14", "--dir", fge_run, "--resume",
                            fge_run / "fge-11.pdparams"), "is an FGE snapshot, not a training checkpoint")


def test_an_ensemble_of_other_datasets_is_refused(fge_run, tmp_path):
    from helpers import write_mnist

    write_mnist(str(tmp_path / "data"), train=24, test=8)
    other = tmp_path / "mnist"
    assert run_main(train.main, "--dataset", "mnist", "--data_path", tmp_path / "data", "--model",
                    "SimpleCNN", "--epochs", "1", "--batch_size", "8", "--no_download",
                    "--no_visualdl", "--dir", other).returncode == 0
    one_line_error(run_main(evaluation.main, "--ensemble_of", fge_run / "fge-7.pdparams",
                            other / "checkpoint-1.pdparams"), "is of MNIST", "one dataset")
