"""A run directory holds one run: a checkpoint of another run or other defining flags refused,
one writer, flags that would do nothing and bad flags or data refused before the directory is
made, mid-epoch checkpoint names, a closed stdout, a full disk, temporary files."""
import os
import resource
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harness import checkpoints, config
import eval as evaluation
import train
from helpers import (ROOT, one_line_error, run_main, run_script, script, snapshot_dir, start,
                     write_cifar10, write_mnist)

RUN = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "3", "--swa", "--swa_start", "2",
       "--save_freq", "1", "--eval_freq", "3", "--no_visualdl"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the same flags, the second with another seed."""
    base = tmp_path_factory.mktemp("runs")
    for name, extra in (("a", []), ("b", ["--seed", "2"])):
        assert run_main(train.main, *RUN, *extra, "--dir", base / name).returncode == 0
    return base


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_of_another_run_is_refused_and_nothing_changes(runs, tmp_path):
    finished = _copy(runs / "a", tmp_path / "a")
    before = snapshot_dir(finished)
    foreign = runs / "b" / "checkpoint-1.pdparams"
    result = run_main(train.main, *RUN, "--seed", "2", "--dir", finished, "--resume", foreign)
    one_line_error(result, "checkpoint of another run")
    import shutil
    shutil.copy(foreign, finished / "checkpoint-99.pdparams")  # found by --resume auto
    before = snapshot_dir(finished)
    one_line_error(run_main(train.main, *RUN, "--seed", "2", "--dir", finished, "--resume", "auto"),
                   "checkpoint of another run")
    assert snapshot_dir(finished) == before


@pytest.mark.parametrize("change, named", [
    (lambda flags: [f for f in flags if f != "--swa"], "--swa (run: on, now: off)"),
    (lambda flags: flags + ["--batch_size", "64"], "--batch_size (run: 128, now: 64)"),
    (lambda flags: flags + ["--dataset", "MNIST"], "--dataset (run: digits, now: MNIST)"),
    (lambda flags: flags + ["--lr_init", "0.2", "--wd", "0"], "--lr_init (run: 0.1, now: 0.2); --wd"),
])
def test_resuming_with_other_defining_flags_is_refused_naming_each(runs, tmp_path, change, named):
    run_dir = _copy(runs / "a", tmp_path / "a")
    os.unlink(run_dir / "checkpoint-3.pdparams")  # an unfinished run
    before = snapshot_dir(run_dir)
    flags = change(RUN + ["--epochs", "3"])
    if "--swa" not in flags:  # --swa_start alone would be refused as doing nothing
        flags = [f for f in flags if f not in ("--swa_start", "2")]
    one_line_error(run_main(train.main, *flags, "--dir", run_dir, "--resume", "auto"), named)
    assert snapshot_dir(run_dir) == before


def test_flags_that_may_change_are_listed_and_accepted(runs, tmp_path):
    run_dir = _copy(runs / "a", tmp_path / "a")
    result = run_main(train.main, *RUN, "--epochs", "4", "--eval_freq", "1", "--save_freq", "2",
                      "--threads", "1", "--dir", run_dir, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "checkpoint-4.pdparams").exists()
    help_text = run_main(train.main, "--help").stdout
    for flag in ("--epochs (upward)", "--eval_freq", "--save_freq", "--num_workers", "--threads",
                 "--device"):
        assert flag in " ".join(help_text.split()), flag


def test_a_finished_run_says_so_and_lower_epochs_are_refused(runs, tmp_path):
    run_dir = _copy(runs / "a", tmp_path / "a")
    before = snapshot_dir(run_dir)
    result = run_main(train.main, *RUN, "--dir", run_dir, "--resume", "auto")
    assert result.returncode == 0 and "is finished (3 of 3 epochs)" in result.stdout
    one_line_error(run_main(train.main, *RUN, "--epochs", "2", "--dir", run_dir, "--resume", "auto"),
                   "--epochs 2 is below the checkpoint's epoch 3")
    assert snapshot_dir(run_dir) == before


def test_resuming_an_older_checkpoint_asks_before_discarding_later_ones(runs, tmp_path):
    run_dir = _copy(runs / "a", tmp_path / "a")
    before = snapshot_dir(run_dir)
    older = run_dir / "checkpoint-1.pdparams"
    one_line_error(run_main(train.main, *RUN, "--dir", run_dir, "--resume", older),
                   "checkpoint-2.pdparams, checkpoint-3.pdparams", "--overwrite")
    assert snapshot_dir(run_dir) == before
    result = run_main(train.main, *RUN, "--dir", run_dir, "--resume", older, "--overwrite")
    assert result.returncode == 0, result.stderr
    final = checkpoints.load_checkpoint(str(run_dir / "checkpoint-3.pdparams"))
    expected = checkpoints.load_checkpoint(str(runs / "a" / "checkpoint-3.pdparams"))
    for key, value in expected.swa_state_dict.items():
        np.testing.assert_array_equal(final.swa_state_dict[key].numpy(), value.numpy())
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs


@pytest.mark.slow
def test_two_writers_one_refused_and_a_killed_writer_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    slow = start([sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--epochs", "400",
                  "--dir", run_dir])
    try:
        deadline = time.time() + 60
        while not (run_dir / "checkpoint-0.pdparams").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = run_main(train.main, *RUN, "--epochs", "400", "--dir", run_dir, "--resume", "auto")
        one_line_error(second, f"being written by another process (PID {slow.pid})")
    finally:
        os.killpg(slow.pid, signal.SIGKILL)
        slow.wait()
    resumed = run_main(train.main, *RUN, "--dir", run_dir, "--resume", "auto", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr


BAD_FLAGS = [
    (["--momentum", "2"], "--momentum: must be < 1"),
    (["--momentum", "1"], "--momentum: must be < 1"),
    (["--lr_init", "inf"], "--lr_init: expected a finite number"),
    (["--swa_lr", "inf"], "--swa_lr: expected a finite number"),
    (["--momentum", "inf"], "--momentum: expected a finite number"),
    (["--wd", "inf"], "--wd: expected a finite number"),
    (["--wd", "nan"], "--wd: expected a finite number"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--seed", "1000000000000000"], "--seed: must be <= 4294967295"),
    (["--dir", ""], "--dir: must not be empty"),
    (["--label_noise", "1"], "--label_noise: must be < 1"),
    (["--ema_decay", "0.9"], "--ema_decay needs --swa"),
    (["--swa", "--ema_decay", "1"], "--ema_decay: ema_decay must be None or a number in [0, 1)"),
    (["--swa", "--ema_decay", "nan"], "--ema_decay: expected a finite number"),
    (["--swa", "--ema_warmup"], "--ema_warmup warms up an EMA's decay: add --ema_decay"),
    (["--swa", "--swag", "--ema_decay", "0.9"], "--swag fits a Gaussian around SWA's equal average"),
    (["--swa", "--swag", "--swag_rank", "1"], "--swag_rank: must be >= 2"),
]


@pytest.mark.parametrize("flags, needs, fix", [
    (["--swa_start", "5"], "--swa_start 5 needs --swa or --fge", "add --swa (or --fge), or drop --swa_start"),
    (["--swa_lr", "0.01"], "--swa_lr 0.01 needs --swa or --fge", "add --swa (or --fge), or drop --swa_lr"),
    (["--amp_dtype", "float16"], "--amp_dtype float16 needs --amp", "add --amp O1 (or O2), or drop --amp_dtype"),
    (["--amp_dtype", "bfloat16"], "--amp_dtype bfloat16 needs --amp", "drop --amp_dtype"),
    (["--swa_c_epochs", "2"], "--swa_c_epochs 2 needs --swa", "add --swa, or drop --swa_c_epochs"),
    (["--swa", "--swag_rank", "5"], "--swag_rank 5 needs --swag", "add --swa --swag, or drop"),
    (["--fge_cycle", "2"], "--fge_cycle 2 needs --fge", "add --fge, or drop --fge_cycle"),
    (["--swa", "--fge_lr1", "0.1"], "--fge_lr1 0.1 needs --fge", "drop --fge_lr1"),
    (["--fge_lr2", "0.001"], "--fge_lr2 0.001 needs --fge", "drop --fge_lr2"),
    (["--init_optimizer"], "--init_optimizer needs --init", "add --init CHECKPOINT, or drop --init_optimizer"),
])
def test_a_flag_that_would_do_nothing_alone_is_refused_naming_it_and_the_fix(tmp_path, flags, needs, fix):
    base = ["--dataset", "digits", "--model", "SimpleCNN", "--dir", str(tmp_path / "run")]
    one_line_error(run_main(train.main, *base, *flags), needs, fix)
    assert not (tmp_path / "run").exists()


def test_dependent_flags_are_taken_with_their_flag_and_default_to_the_documented_values():
    args = config.parse_args(["--dataset", "digits"])
    assert (args.swa_start, args.swa_lr, args.amp_dtype) == (161, 0.05, "float16")
    # FGE's as the authors' fge.py (dnn-mode-connectivity) defaults them: --cycle 4, --lr_1 0.05,
    # --lr_2 0.0001
    assert (args.swa_c_epochs, args.swag_rank, args.fge_cycle, args.fge_lr1, args.fge_lr2) == \
        (1, 20, 4, 0.05, 0.0001)
    assert args.init_optimizer is False
    fge = config.parse_args(["--fge", "--swa_start", "4", "--swa_lr", "0.01", "--epochs", "10"])
    assert (fge.swa_start, fge.swa_lr) == (4, 0.01)
    help_text = config.build_parser().format_help()
    assert "(default: 161)" in help_text and "(default: 0.05)" in help_text


def test_an_older_run_that_recorded_values_for_flags_doing_nothing_resumes(tmp_path):
    # Before these flags were refused alone, a run without --swa or --amp could record any
    # value for them; a resume cannot repeat them now, and need not: they defined nothing.
    run_dir = tmp_path / "run"
    flags = ["--dataset", "digits", "--model", "SimpleCNN", "--save_freq", "1", "--no_visualdl"]
    assert run_main(train.main, *flags, "--epochs", "1", "--dir", run_dir).returncode == 0
    path = run_dir / "checkpoint-1.pdparams"
    ckpt = checkpoints.load_checkpoint(str(path))
    ckpt.args.update(swa_start=50, swa_lr=0.3, amp_dtype="bfloat16")
    import paddle
    paddle.save(ckpt.to_dict(), str(path))
    resumed = run_main(train.main, *flags, "--epochs", "2", "--dir", run_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "checkpoint-2.pdparams").exists()
    changed = run_main(train.main, *flags, "--epochs", "3", "--lr_init", "0.2", "--dir", run_dir,
                       "--resume", "auto")
    one_line_error(changed, "--lr_init (run: 0.1, now: 0.2)")  # what defines it is still compared


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_are_refused_before_the_dir_is_made(tmp_path, flags, message):
    base = ["--dataset", "digits", "--model", "SimpleCNN", "--dir", str(tmp_path / "run")]
    one_line_error(run_main(train.main, *base, *flags), message)
    assert not (tmp_path / "run").exists()


def _bad_cifar(folder, problem):
    batches = write_cifar10(str(folder), per_batch=6)
    if problem == "labels":
        batches["test_batch"][b"labels"][2] = 10
    else:
        batches["data_batch_3"][b"labels"] = batches["data_batch_3"][b"labels"][:-1]
    import pickle
    import shutil
    extracted = folder / "cifar-10-batches-py"
    os.unlink(folder / "cifar-10-python.tar.gz")
    extracted.mkdir()
    for name, batch in batches.items():
        with open(extracted / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    shutil.rmtree(folder / "unused", ignore_errors=True)


@pytest.mark.parametrize("dataset, problem, message", [
    ("CIFAR10", "labels", "test_batch holds labels from"),
    ("CIFAR10", "count", "data_batch_3 holds 6 images but 5 labels"),
    ("MNIST", "labels", "train-labels-idx1-ubyte.gz holds labels from"),
    ("MNIST", "flat", "expected N x height x width images"),
])
def test_bad_dataset_files_are_named_before_the_dir_is_made(tmp_path, dataset, problem, message):
    folder = tmp_path / "data"
    if dataset == "CIFAR10":
        _bad_cifar(folder, problem)
    else:
        arrays = write_mnist(str(folder), train=12, test=4)
        import gzip
        from helpers import _idx
        if problem == "labels":
            arrays["train-labels-idx1-ubyte"][3] = 12
            name, array = "train-labels-idx1-ubyte", arrays["train-labels-idx1-ubyte"]
        else:
            name, array = "train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"].reshape(12, -1)
        with gzip.open(folder / (name + ".gz"), "wb") as f:
            f.write(_idx(array))
    result = run_main(train.main, "--dataset", dataset, "--model", "SimpleCNN", "--data_path", folder,
                      "--no_download", "--dir", tmp_path / "run")
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_eval_and_offline_averaging_refuse_bad_sizes_and_outputs(runs, tmp_path):
    ckpt = runs / "a" / "checkpoint-3.pdparams"
    for size in ("0", "-5"):
        one_line_error(run_main(evaluation.main, "--model_path", ckpt, "--batch_size", size),
                       "--batch_size: must be > 0")
    average = script("average_checkpoints").main
    one_line_error(run_main(average, ckpt, "--out", tmp_path / "missing" / "avg.pdparams"),
                   "does not exist or is not writable")
    one_line_error(run_main(average, ckpt, "--out", tmp_path), "is a folder")
    one_line_error(run_main(average, ckpt, "--out", tmp_path / "x.pdparams", "--bn_update",
                            "--batch_size", "0"), "--batch_size: must be > 0")
    assert os.listdir(tmp_path) == []
    compare = script("compare").main
    one_line_error(run_main(compare, "--jobs", "0"), "--jobs: must be > 0")
    (tmp_path / "file").write_text("")
    one_line_error(run_main(compare, "--out_dir", tmp_path / "file"), "is a file")


@pytest.mark.parametrize("flags, fragments", [
    (["--epochs", 5, "--swa_start", 9], ["refuse the swa run with seed 1", "--swa_start 9 is beyond --epochs 5"]),
    (["--dataset", "ImageNet"], ["refuse the sgd run", "unknown dataset 'ImageNet'"]),
    (["--methods", "sgd", "fge", "--epochs", 5, "--swa_start", 4, "--fge_cycle", 4],
     ["refuse the fge run", "first snapshot is after epoch 6, beyond --epochs 5"]),
    (["--", "--lr_init", "0"], ["refuse the sgd run", "--lr_init: must be > 0"]),
])
def test_compare_refuses_a_run_train_would_refuse_before_training_or_creating_anything(
        tmp_path, monkeypatch, flags, fragments):
    compare = script("compare")
    monkeypatch.setattr(compare, "run_all", lambda *a: pytest.fail("trained before checking every run"))
    one_line_error(run_main(compare.main, "--seeds", 1, 2, *flags, "--out_dir", tmp_path / "cmp"),
                   *fragments)
    assert os.listdir(tmp_path) == []


def test_a_mid_epoch_checkpoint_is_called_so_and_step_files_go_once_superseded(tmp_path):
    run_dir = tmp_path / "run"
    killed = run_script(os.path.join("tests", "interrupt.py"), "step", 17, "TERM", *RUN,
                        "--dir", run_dir)
    assert killed.returncode == 143, killed.stderr
    step_files = [n for n in os.listdir(run_dir) if "-step" in n]
    assert step_files == ["checkpoint-1-step5.pdparams"], os.listdir(run_dir)
    assert "at epoch 1 + 5 batches (mid-epoch)" in killed.stderr  # as the file name counts
    again = f"continue with: python train.py {shlex.join(map(str, RUN))} --dir {run_dir} --resume auto"
    assert again in killed.stderr, killed.stderr
    result = run_main(evaluation.main, "--model_path", run_dir / step_files[0])
    assert "SimpleCNN at epoch 1 + 5 batches (mid-epoch)" in result.stdout, result.stderr
    assert run_main(train.main, *RUN, "--dir", run_dir, "--resume", "auto").returncode == 0
    assert not [n for n in os.listdir(run_dir) if "-step" in n]


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_training(tmp_path):
    command = " ".join([sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--dir",
                        str(tmp_path / "run"), "| head -2; exit ${PIPESTATUS[0]}"])
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and "Error" not in done.stderr
    assert (tmp_path / "run" / "checkpoint-3.pdparams").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path):
    run_dir = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--dir", str(run_dir)],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit, cwd=ROOT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "file size limit reached writing" in lines[0] and "free some space" in lines[0]
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]


def test_the_visualdl_command_is_shell_quoted(tmp_path):
    run_dir = tmp_path / "my runs" / "a"
    result = run_main(train.main, *[f for f in RUN if f != "--no_visualdl"], "--epochs", "1",
                      "--swa_start", "1", "--dir", run_dir)
    assert f"visualdl --logdir '{run_dir / 'vdl'}'" in result.stdout


SHORT = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "2", "--swa", "--swa_start", "2",
         "--no_visualdl"]


def test_the_lock_is_held_all_run_also_when_main_is_called_inside_an_except_block(tmp_path, monkeypatch):
    from harness import errors, rundir, session

    run_dir, refused = tmp_path / "run", []
    record = session.Run.record

    def record_and_try_the_lock(self, row):
        record(self, row)
        try:  # a second open file of the lock: refused while the run holds it
            rundir.acquire_lock(str(run_dir)).close()
        except errors.UsageError:
            refused.append(row["ep"])

    monkeypatch.setattr(session.Run, "record", record_and_try_the_lock)
    try:
        raise KeyError("a caller's own exception, being handled")
    except KeyError:
        assert run_main(train.main, *SHORT, "--dir", run_dir).returncode == 0
    assert refused == [1, 2]


def test_a_start_clears_only_its_own_temporary_files_and_writes_json_to_disk(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.tmp").write_text("a user's file")
    (run_dir / "metrics.csv.4242.0badc0de.tmp").write_text("left by a killed write")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    assert run_main(train.main, *SHORT, "--dir", run_dir).returncode == 0
    assert (run_dir / "notes.tmp").read_text() == "a user's file"
    assert not (run_dir / "metrics.csv.4242.0badc0de.tmp").exists()
    assert any(".".join(os.path.basename(p).split(".")[:2]) == "run.json" for p in synced)
    assert any(".".join(os.path.basename(p).split(".")[:2]) == "args.json" for p in synced)
