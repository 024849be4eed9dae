"""Inputs that try to run code, lose data or train nonsense: each refused in one line (exit 2),
before anything is changed."""
import os
import pickle

import numpy as np
import paddle
import pytest

import eval as evaluation
import train
from harness import checkpoints, errors
from hostile_pickles import RunsACommand
from helpers import finished_run, one_line_error, run_main, script, snapshot_dir

QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "2", "--swa", "--swa_start", "2",
         "--no_visualdl"]


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "shared.pdparams"
    path.write_bytes(pickle.dumps({"epoch": 3, "state_dict": RunsACommand(f"touch {marker}")},
                                  protocol=4))
    return path, marker


def _entry_points(path, tmp_path):
    return [
        (evaluation.main, ["--model_path", path]),
        (train.main, [*QUICK, "--init", path, "--dir", tmp_path / "a"]),
        (train.main, [*QUICK, "--resume", path, "--dir", tmp_path / "b"]),
        (script("export").main, ["--model_path", path, "--out", tmp_path / "exported"]),
        (script("flatness").main, ["--model_path", path, "--out", tmp_path / "flat"]),
        (script("average_checkpoints").main, [path, "--out", tmp_path / "avg.pdparams"]),
    ]


def test_a_checkpoint_that_would_run_code_is_refused_by_every_entry_point(hostile, tmp_path):
    path, marker = hostile
    for main, argv in _entry_points(path, tmp_path):
        one_line_error(run_main(main, *argv), "shared.pdparams", "tries to load posix.system",
                       "refused before building it")
        assert not marker.exists(), main
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_callback_state_that_would_run_code_is_refused(hostile, tmp_path):
    import callbacks
    import models

    path, marker = hostile
    os.replace(path, tmp_path / "fit.swa")
    model = paddle.Model(models.build("SimpleCNN", 10, 1))
    model.prepare(paddle.optimizer.SGD(0.1, parameters=model.parameters()))
    paddle.save(model.network.state_dict(), str(tmp_path / "fit.pdparams"))
    callbacks.SWACallback(swa_start=1).set_model(model)
    with pytest.raises(errors.CheckpointError, match="posix.system"):
        model.load(str(tmp_path / "fit"))
    assert not marker.exists()


def test_our_files_papers_state_dicts_and_the_old_layout_still_load(tmp_path):
    import models

    model = models.build("SimpleCNN", 10, 1)
    paddle.save(model.state_dict(), str(tmp_path / "plain.pdparams"))
    legacy = {k: v.numpy() for k, v in model.state_dict().items()}
    legacy["StructuredToParameterName@@"] = {k: k for k in legacy}
    with open(tmp_path / "legacy.pdparams", "wb") as f:
        pickle.dump(legacy, f, protocol=2)
    for name in ("plain.pdparams", "legacy.pdparams"):
        loaded = checkpoints.read_file(str(tmp_path / name))
        for key, value in model.state_dict().items():
            assert isinstance(loaded[key], paddle.Tensor), (name, key)
            np.testing.assert_array_equal(loaded[key].numpy(), value.numpy())
    saved = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=1,
                                        state_dict=model.state_dict(), optimizer={},
                                        rng=checkpoints.get_rng_state()))
    ckpt = checkpoints.load_checkpoint(saved)
    assert isinstance(ckpt.rng["numpy"][1], np.ndarray)  # arrays beside tensors stay numpy


@pytest.mark.parametrize("kind", ["folder", "fifo", "devnull"])
def test_a_checkpoint_that_is_no_regular_file_is_named_so(tmp_path, kind):
    path = {"folder": tmp_path / "ckpt", "fifo": tmp_path / "pipe", "devnull": "/dev/null"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    problem = "is a folder" if kind == "folder" else "is not a regular file"
    for main, argv in _entry_points(path, tmp_path):
        one_line_error(run_main(main, *argv), str(path), problem)


def test_an_empty_init_path_is_refused(tmp_path):
    one_line_error(run_main(train.main, *QUICK, "--init", "", "--dir", tmp_path / "run"),
                   "--init: must not be empty")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch SWA run on digits."""
    return finished_run(tmp_path_factory, "hostile", *QUICK)[0]


def _copy(src, dst):
    import shutil
    return shutil.copytree(src, dst)


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(run, tmp_path):
    run_dir = _copy(run, tmp_path / "run")
    target = tmp_path / "notes.txt"
    target.write_text("a user's notes")
    os.unlink(run_dir / ".lock")
    os.symlink(target, run_dir / ".lock")
    before = snapshot_dir(run_dir)
    one_line_error(run_main(train.main, *QUICK, "--epochs", 3, "--dir", run_dir, "--resume", "auto"),
                   ".lock is not a lock file this code made")
    assert target.read_text() == "a user's notes" and snapshot_dir(run_dir) == before


def test_non_finite_weights_are_refused_where_they_are_loaded_naming_the_tensor(run, tmp_path):
    import models

    model = models.build("SimpleCNN", 10, 1)
    state = model.state_dict()
    state["fc.weight"] = paddle.full(state["fc.weight"].shape, float("nan"))
    paddle.save(state, str(tmp_path / "nan.pdparams"))
    one_line_error(run_main(train.main, *QUICK, "--init", tmp_path / "nan.pdparams",
                            "--dir", tmp_path / "a"), "fc.weight holds NaN or infinite values")
    ckpt = checkpoints.load_checkpoint(str(run / "checkpoint-2.pdparams"))
    ckpt.swa_state_dict["fc.bias"] = paddle.full(ckpt.swa_state_dict["fc.bias"].shape, float("inf"))
    paddle.save(ckpt.to_dict(), str(tmp_path / "inf.pdparams"))
    for main, argv in ((evaluation.main, ["--model_path", tmp_path / "inf.pdparams"]),
                       (script("export").main, ["--model_path", tmp_path / "inf.pdparams",
                                                "--out", tmp_path / "exp" / "m"])):
        one_line_error(run_main(main, *argv), "fc.bias holds NaN or infinite values")


def test_a_checkpoint_with_non_finite_optimizer_state_is_refused_on_resume(run, tmp_path):
    run_dir = _copy(run, tmp_path / "run")
    path = run_dir / "checkpoint-2.pdparams"
    ckpt = checkpoints.load_checkpoint(str(path))
    key = next(iter(ckpt.optimizer))
    ckpt.optimizer[key] = paddle.full(ckpt.optimizer[key].shape, float("nan"))
    paddle.save(ckpt.to_dict(), str(path))
    before = snapshot_dir(run_dir)
    one_line_error(run_main(train.main, *QUICK, "--epochs", 3, "--dir", run_dir, "--resume", "auto"),
                   "checkpoint-2.pdparams", f"optimizer state {key} holds NaN or infinite values",
                   "earlier checkpoint")
    assert snapshot_dir(run_dir) == before


def test_an_offline_average_is_not_resumed_as_training(run, tmp_path):
    run_dir = _copy(run, tmp_path / "run")
    out = tmp_path / "avg.pdparams"
    assert run_main(script("average_checkpoints").main, run_dir / "checkpoint-2.pdparams",
                    "--out", out).returncode == 0
    before = snapshot_dir(run_dir)
    one_line_error(run_main(train.main, *QUICK, "--epochs", 3, "--dir", run_dir, "--resume", out),
                   "is an offline average of checkpoints", "--init")
    assert snapshot_dir(run_dir) == before


def test_swag_and_swa_refuse_impossible_values():
    import models
    import utils

    model = models.build("SimpleCNN", 10, 1)
    with pytest.raises(ValueError, match="max_rank must be a whole number >= 2"):
        utils.SWAG(model, max_rank=1)
    swag = utils.SWAG(model, max_rank=2)
    swag.update(model)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            swag.sample(scale=scale, cov=False)
    swa = utils.SWA(model)
    swa.update(model)
    with pytest.raises(ValueError, match="swa_n must be a whole number >= 0"):
        swa.set_state_dict(dict(swa.state_dict(), swa_n=-5))


@pytest.mark.parametrize("flags, message", [(["--max_distance", "1e308"], "--max_distance: must be <="),
                                            (["--points", "100000000"], "--points: must be <= 1001")])
def test_flatness_ranges_are_checked_before_any_work(run, tmp_path, flags, message):
    one_line_error(run_main(script("flatness").main, "--model_path", run / "checkpoint-2.pdparams",
                            "--out", tmp_path / "flat", *flags), message)


def test_overwrite_removes_only_this_projects_files_and_resume_reads_only_its_names(run, tmp_path):
    run_dir = _copy(run, tmp_path / "run")
    (run_dir / "checkpoint-best.pdparams").write_bytes(b"a user's best model")
    os.replace(run_dir / "checkpoint-2.pdparams", run_dir / "checkpoint-010.pdparams")
    assert sorted(checkpoints.list_checkpoints(str(run_dir))) == [(0, 0)]
    assert run_main(script("average_checkpoints").main, run_dir / "checkpoint-0.pdparams",
                    "--out", run_dir / "averaged.pdparams").returncode == 0
    assert run_main(train.main, *QUICK, "--dir", run_dir, "--overwrite").returncode == 0
    assert (run_dir / "checkpoint-best.pdparams").read_bytes() == b"a user's best model"
    assert (run_dir / "checkpoint-010.pdparams").exists()  # not ours by name: kept
    assert not (run_dir / "averaged.pdparams").exists()  # the old run's average goes with it


@pytest.mark.parametrize("name", ["metrics.csv", "convergence.png", "command.sh", ".lock"])
def test_a_folder_where_a_run_file_goes_is_one_line_before_training(run, tmp_path, name):
    run_dir = _copy(run, tmp_path / "run")
    os.replace(run_dir / name, tmp_path / "moved") if (run_dir / name).exists() else None
    (run_dir / name).mkdir()
    before = snapshot_dir(run_dir)
    result = run_main(train.main, *QUICK, "--epochs", 3, "--dir", run_dir, "--resume", "auto")
    one_line_error(result, name)
    assert "ep " not in result.stdout and snapshot_dir(run_dir) == before


def test_a_dir_name_too_long_for_the_file_system_is_one_line(tmp_path):
    one_line_error(run_main(train.main, *QUICK, "--dir", tmp_path / ("x" * 300)),
                   "cannot make --dir", "File name too long")


@pytest.mark.parametrize("name, message", [("out.json", "must end in one of .png"),
                                           ("file/out.png", "cannot make the folder"),
                                           ("exists.png", "exists; choose another name or pass --overwrite")])
def test_eval_checks_its_figure_before_any_work(run, tmp_path, name, message):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "exists.png").write_bytes(b"a user's figure")
    one_line_error(run_main(evaluation.main, "--model_path", run / "checkpoint-2.pdparams",
                            "--reliability", tmp_path / name), message)
    assert (tmp_path / "exists.png").read_bytes() == b"a user's figure"


def test_swag_samples_of_a_checkpoint_before_any_averaging_is_one_line(tmp_path):
    run_dir = tmp_path / "swag"
    assert run_main(train.main, *QUICK, "--swag", "--swag_rank", 2, "--dir", run_dir).returncode == 0
    one_line_error(run_main(evaluation.main, "--model_path", run_dir / "checkpoint-0.pdparams",
                            "--swag_samples", 3, "--swag_diag"), "SWAG holds no model yet")


def test_bn_update_says_what_a_batch_must_be_and_casts_float64():
    import models
    import utils

    model = models.build("SimpleCNN", 10, 1)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8))
    with pytest.raises(TypeError, match="for dict batches pass"):
        utils.bn_update([{"image": x}], model)
    with pytest.raises(TypeError, match="not floating point: normalise them"):
        utils.bn_update([(x * 100).astype(np.uint8)], model)
    assert utils.bn_update([x], model) == 4  # float64, as numpy makes it: cast to float32


def test_messages_name_the_real_problem(run, tmp_path):
    one_line_error(run_main(train.main, *QUICK, "--threads", 100000, "--dir", tmp_path / "a"),
                   "--threads: must be <= 1024")
    one_line_error(run_main(script("compare").main, "--seeds", 1, 1, "--out_dir", tmp_path / "c"),
                   "repeats a seed")
    assert not (tmp_path / "c").exists()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.csv").write_text("not,a\ntable,at all\n")
    plotted = run_main(script("plot").main, tmp_path / "garbage")
    one_line_error(plotted, "holds no rows of train.py's table")
    one_line_error(run_main(script("export").main, "--model_path", run / "checkpoint-2.pdparams",
                            "--out", str(tmp_path / "exp") + "/"), "names a folder")
    diverged = run_main(train.main, *QUICK, "--wd", "1e30", "--dir", tmp_path / "wd")
    assert diverged.returncode == 1 and "--wd" in diverged.stderr.strip().splitlines()[-1]


def test_the_callback_refuses_empty_refresh_data_before_training():
    import callbacks
    import models

    network = models.build("SimpleCNN", 10, 1)
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.SGD(0.1, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="needs bn_data"):
        model.fit([[np.zeros((2, 1, 8, 8), "float32"), np.zeros((2, 1), "int64")]], epochs=1,
                  verbose=0, callbacks=[callbacks.SWACallback(swa_start=1, bn_data=[])])


def test_export_makes_its_output_folder(run, tmp_path):
    out = tmp_path / "exported" / "digits"
    result = run_main(script("export").main, "--model_path", run / "checkpoint-2.pdparams", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "exported" / "digits.pdiparams").exists()


def test_a_resume_on_changed_dataset_files_is_refused_naming_the_change(tmp_path):
    from helpers import write_cifar10

    data_dir = tmp_path / "data"
    write_cifar10(str(data_dir), per_batch=8, seed=0)
    flags = ["--dataset", "CIFAR10", "--data_path", data_dir, "--model", "SimpleCNN", "--epochs", 2,
             "--batch_size", 16, "--no_download", "--no_visualdl", "--dir", tmp_path / "run"]
    assert run_main(train.main, *[f if f != 2 else 1 for f in flags]).returncode == 0  # 1 epoch
    for per_batch, seed, change in ((8, 1, "the same sizes, other contents"),
                                    (9, 0, "40 training and 8 test images then, 45 and 9 now")):
        write_cifar10(str(data_dir), per_batch=per_batch, seed=seed)
        before = snapshot_dir(tmp_path / "run")
        one_line_error(run_main(train.main, *flags, "--resume", "auto"), "files in --data_path changed", change)
        assert snapshot_dir(tmp_path / "run") == before
