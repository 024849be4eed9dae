"""Nothing lost: bit-identical resume after SIGKILL (mid-epoch, mid-save, mid-refresh), SIGTERM
and SIGINT, also of a checkpoint holding an older version's Paddle generator states; the
EMA's warm-up step by step; NaN losses and weights stop the run; seeds."""
import os

import numpy as np
import pytest

from harness import checkpoints
import train
import utils
from helpers import checkpoint_tensors, metrics_rows, run_main, run_script

RUN = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "6", "--swa", "--swa_start", "3",
       "--swa_lr", "0.05", "--save_freq", "1", "--eval_freq", "2"]


def _weights(run_dir, epoch=6):
    return checkpoint_tensors(run_dir / f"checkpoint-{epoch}.pdparams")


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


VARIANTS = {"swa": [], "swag": ["--swag", "--swag_rank", "2"],
            "ema": ["--ema_decay", "0.9", "--ema_warmup"],  # the warm-up's decay depends on the count
            "val": ["--val_size", "300"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The uninterrupted run of a variant (plain SWA, with SWAG, with a warmed-up EMA, with a
    validation split), made when first asked for: finished("swa") is its folder."""
    base, done = tmp_path_factory.mktemp("resume"), set()

    def run(variant):
        if variant not in done:
            result = run_main(train.main, *RUN, *VARIANTS[variant], "--dir", base / variant)
            assert result.returncode == 0, result.stderr[-2000:]
            done.add(variant)
        return base / variant
    return run


def _numpy_ema(models, decay):
    """The EMA of `models` (dicts of float64 arrays): a copy of the first, then
    avg = d_n * avg + (1 - d_n) * model_n with d_n = decay(n), n = 1, 2, ..."""
    average = dict(models[0])
    for n, model in enumerate(models[1:], start=1):
        d = decay(n)
        average = {k: d * average[k] + (1 - d) * model[k] for k in average}
    return average


def test_an_ema_run_with_warmup_averages_each_step_with_timms_warmed_up_decay(tmp_path, monkeypatch):
    # The SGD weights train.py hands the EMA after each step, recorded on their way in.
    handed, update = [], utils.SWA.update

    def recorded_update(self, model):
        handed.append({k: v.numpy().astype(np.float64) for k, v in model.state_dict().items()})
        return update(self, model)

    monkeypatch.setattr(utils.SWA, "update", recorded_update)
    # D = 0.7: timm's 1 - (1 + n) ** (-2/3) passes it at n = 6 (0.726), so both the warm-up
    # and its cap at D act within the 12 steps (12 batches of digits) of epoch 3.
    run_dir = tmp_path / "run"
    result = run_main(train.main, *RUN, "--epochs", "3", "--ema_decay", "0.7", "--ema_warmup",
                      "--dir", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(handed) == 12
    average = checkpoints.load_checkpoint(str(run_dir / "checkpoint-3.pdparams")).swa_state_dict
    weights = [k for k in average if not k.endswith(("_mean", "_variance"))]  # BN stats: refreshed
    warmed = _numpy_ema(handed, lambda n: min(0.7, 1 - (1 + n) ** (-2 / 3)))
    for key in weights:
        np.testing.assert_allclose(average[key].numpy(), warmed[key], rtol=0, atol=1e-6, err_msg=key)
    # Without the warm-up, or without its cap, the average would be measurably elsewhere.
    for decay in (lambda n: 0.7, lambda n: 1 - (1 + n) ** (-2 / 3)):
        other = _numpy_ema(handed, decay)
        assert max(np.abs(average[k].numpy() - other[k]).max() for k in weights) > 1e-4


@pytest.fixture(scope="module")
def uninterrupted(finished):
    return finished("swa")


def test_same_seed_twice_gives_identical_weights(uninterrupted, tmp_path):
    result = run_main(train.main, *RUN, "--dir", tmp_path / "again")
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_identical(_weights(uninterrupted), _weights(tmp_path / "again"))
    other = run_main(train.main, *RUN, "--seed", "2", "--dir", tmp_path / "seed2")
    assert other.returncode == 0
    assert not np.array_equal(_weights(uninterrupted)["swa_state_dict/fc.weight"],
                              _weights(tmp_path / "seed2")["swa_state_dict/fc.weight"])


SLOW = pytest.mark.slow  # one case stays in the everyday selection (-m "not slow")


@pytest.mark.parametrize("point, nth, sig, extra, variant", [
    ("step", 25, "KILL", [], "swa"),                      # mid-epoch 3, while preparing a batch
    pytest.param("save", 3, "KILL", [], "swa", marks=SLOW),     # half of checkpoint-2 on disk
    pytest.param("bn", 2, "KILL", [], "swa", marks=SLOW),       # inside the second BatchNorm refresh
    pytest.param("step", 30, "TERM", ["--num_workers", "2"], "swa", marks=SLOW),  # worker threads
    pytest.param("bn", 1, "INT", [], "swa", marks=SLOW),        # Ctrl-C during a refresh
    pytest.param("step", 40, "TERM", [], "swag", marks=SLOW),   # SWAG statistics mid-run
    pytest.param("step", 40, "KILL", [], "ema", marks=SLOW),    # an EMA updated every step
    pytest.param("step", 30, "KILL", [], "val", marks=SLOW),    # a validation split
])
def test_interrupted_run_resumes_bit_identically(finished, tmp_path, point, nth, sig, extra, variant):
    uninterrupted = finished(variant)
    extra = extra + VARIANTS[variant]
    run_dir = tmp_path / "run"
    killed = run_script(os.path.join("tests", "interrupt.py"), point, nth, sig, *RUN, *extra,
                        "--dir", run_dir)
    expected_code = {"KILL": -9, "TERM": 143, "INT": 130}[sig]
    assert killed.returncode == expected_code, killed.stderr[-2000:]
    if sig != "KILL":
        message = killed.stderr.strip().splitlines()[-1]
        assert "--resume auto" in message and "saved" in message
    for name in os.listdir(run_dir):  # every checkpoint left behind loads
        if name.endswith(".pdparams"):
            checkpoints.load_checkpoint(str(run_dir / name))
    assert not (run_dir / "checkpoint-6.pdparams").exists()

    resumed = run_main(train.main, *RUN, *extra, "--dir", run_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    _assert_identical(_weights(uninterrupted), _weights(run_dir))
    assert metrics_rows(run_dir) == metrics_rows(uninterrupted)
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]


def test_nan_loss_stops_at_once_and_keeps_checkpoints(tmp_path):
    run_dir = tmp_path / "nan"
    result = run_main(train.main, *RUN, "--lr_init", "1e5", "--dir", run_dir)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "loss became nan at epoch 1 step" in message and "Traceback" not in result.stderr
    ckpt = checkpoints.load_checkpoint(str(run_dir / "checkpoint-0.pdparams"))
    assert all(np.isfinite(v.numpy()).all() for v in ckpt.state_dict.values())
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pdparams")) == ["checkpoint-0.pdparams"]


def test_weights_gone_nan_under_a_finite_loss_stop_the_run_keeping_only_finite_checkpoints(tmp_path):
    # At this rate BatchNorm's running variance overflows in epoch 1 while the loss, computed
    # with the batches' own statistics, stays finite (about 57).
    run_dir = tmp_path / "run"
    result = run_main(train.main, "--dataset", "digits", "--model", "SimpleCNN", "--epochs", "3",
                      "--lr_init", "200", "--swa", "--swa_start", "2", "--swa_lr", "200",
                      "--no_visualdl", "--dir", run_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr
    assert "weights became NaN or infinite at epoch 1" in lines[0]
    assert "_variance" in lines[0] and "checkpoints in --dir are those saved before" in lines[0]
    saved = sorted(n for n in os.listdir(run_dir) if n.endswith(".pdparams"))
    assert saved == ["checkpoint-0.pdparams"]
    assert all(np.isfinite(v).all() for v in checkpoint_tensors(run_dir / saved[0]).values())


def test_first_non_finite_names_the_models_bad_parameter_or_statistic():
    import paddle

    import models
    from harness import engine

    sgd, average = models.build("SimpleCNN", 10, 1), models.build("SimpleCNN", 10, 1)
    named = {"the SGD model's": sgd, "the average's": average}
    assert engine.first_non_finite(named) is None
    variance = next(k for k in average.state_dict() if k.endswith("_variance"))
    average.state_dict()[variance].set_value(paddle.full(average.state_dict()[variance].shape, float("inf")))
    assert engine.first_non_finite(named) == f"the average's {variance}"
    sgd.state_dict()["fc.weight"].set_value(paddle.full(sgd.state_dict()["fc.weight"].shape, float("nan")))
    assert engine.first_non_finite(named) == "the SGD model's fc.weight"


def test_resume_auto_in_an_empty_dir_starts_fresh(uninterrupted, tmp_path):
    result = run_main(train.main, *RUN, "--dir", tmp_path / "fresh", "--resume", "auto")
    assert result.returncode == 0 and "resuming" not in result.stdout
    _assert_identical(_weights(uninterrupted), _weights(tmp_path / "fresh"))


@pytest.mark.slow
def test_a_checkpoint_carrying_paddle_generator_states_of_another_device_set_resumes_bit_identically(
        uninterrupted, tmp_path):
    import paddle

    run_dir = tmp_path / "run"
    killed = run_script(os.path.join("tests", "interrupt.py"), "step", 25, "TERM", *RUN, "--dir", run_dir)
    assert killed.returncode == 143, killed.stderr[-2000:]
    path = next(run_dir / n for n in os.listdir(run_dir) if "-step" in n)
    ckpt = checkpoints.load_checkpoint(str(path))
    assert set(ckpt.rng) == {"python", "numpy"}  # what this version records
    # As an older version saved an 8-GPU run: one Paddle generator state per device, each
    # of another seed than any this run uses.
    kept, states = paddle.get_rng_state(), []
    for device in range(8):
        paddle.seed(1000 + device)
        paddle.rand([3])
        states += paddle.get_rng_state()
    paddle.set_rng_state(kept)
    ckpt.rng["paddle"] = states
    paddle.save(ckpt.to_dict(), str(path))
    in_file = paddle.load(str(path))["rng"]["paddle"]  # Paddle's own reader: the states are there
    assert [type(s).__name__ for s in in_file] == ["GeneratorState"] * 8
    resumed = run_main(train.main, *RUN, "--dir", run_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {path}" in resumed.stdout  # that file, not an epoch's checkpoint
    _assert_identical(_weights(uninterrupted), _weights(run_dir))
