"""Data-parallel SWA under paddle.distributed.launch on CPU processes (gloo)."""
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from harness import checkpoints
from harness import report
from helpers import checkpoint_tensors, finish, free_port, launch, metrics_rows, run_script, start

pytestmark = pytest.mark.slow  # every test here launches processes

RUN = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "4", "--swa", "--swa_start", "2",
       "--swa_lr", "0.05", "--eval_freq", "2", "--swag", "--swag_rank", "2"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    proc = launch([os.path.join("tests", "dist_probe.py"), base / "probe", *RUN,
                   "--dir", base / "run"], base / "logs", nproc=2, port=free_port())
    output, = finish([proc])
    return base, output


def test_rank_zero_alone_writes(two_process_run):
    base, output = two_process_run
    rank0 = json.loads((base / "probe" / "rank0.json").read_text())
    rank1 = json.loads((base / "probe" / "rank1.json").read_text())
    assert rank0["saves"] == 2 and rank0["record_run"] == 1 and rank0["metrics_files"] == 1
    assert rank1 == dict(rank1, saves=0, record_run=0, metrics_files=0)
    assert sorted(os.listdir(base / "run")) == [".lock", "args.json", "checkpoint-0.pdparams",
                                                "checkpoint-4.pdparams", "command.sh",
                                                "convergence.png", "metrics.csv", "run.json", "vdl"]
    assert "2 processes x 64" in output


def test_average_and_batchnorm_statistics_identical_on_every_rank(two_process_run):
    base, _ = two_process_run
    rank0, rank1 = (np.load(base / "probe" / f"rank{r}.npz") for r in (0, 1))
    assert sorted(rank0.files) == sorted(rank1.files)
    swa_keys = [k for k in rank0.files if k.startswith("swa/")]
    assert any(k.endswith("_variance") for k in swa_keys) and "swag/deviation1" in rank0.files
    for key in rank0.files:  # SGD weights and statistics too (synchronised every epoch)
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_reported_accuracy_is_over_the_whole_test_set(two_process_run):
    base, output = two_process_run
    for r in (0, 1):  # each rank evaluated its shard, and reports the all-reduced count
        counts = json.loads((base / "probe" / f"rank{r}.json").read_text())["test_counts"]
        assert counts and set(counts) == {359}
    last = [line for line in output.splitlines() if re.match(r"\s+4\s", line)][-1].split()
    swa_acc = float(last[7])
    evaluated = run_script("eval.py", "--model_path", base / "run" / "checkpoint-4.pdparams")
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(re.search(r"accuracy ([\d.]+)%", evaluated.stdout)[1]) == pytest.approx(swa_acc, abs=1e-4)


def test_distributed_bn_update_equals_single_process_and_a_failure_on_one_rank_raises_on_all(tmp_path):
    proc = launch([os.path.join("tests", "dist_bn_check.py"), tmp_path / "out"], tmp_path / "logs",
                  nproc=2, port=free_port())
    finish([proc])
    rank0, rank1 = (np.load(tmp_path / "out" / f"rank{r}.npz") for r in (0, 1))
    for key in rank0.files:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    for key in [k for k in rank0.files if k.startswith("dist/")]:
        alone = rank0["alone/" + key[len("dist/"):]]
        # Same batches in another order: equal up to float32 rounding of the running averages.
        np.testing.assert_allclose(rank0[key], alone, rtol=1e-5, atol=1e-5, err_msg=key)
    # a refresh failing on one rank raises on both, each keeping its statistics
    assert (tmp_path / "out" / "rank0.txt").read_text() == "OtherRankFailed; statistics kept"
    assert (tmp_path / "out" / "rank1.txt").read_text() == "own error: disk gone; statistics kept"


def test_two_nodes_on_one_machine_with_the_launch_script(tmp_path):
    port = free_port()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "launch_machines.sh")
    nodes = [start(["bash", script, f"127.0.0.1:{port}", 2, rank, 1, *RUN, "--epochs", 2,
                    "--dir", "run"],  # relative to the caller's folder
                   env={"LAUNCH_LOG_DIR": str(tmp_path / f"logs{rank}")}, cwd=tmp_path)
             for rank in (1, 0)]
    machine1, machine0 = finish(nodes)
    assert "2 processes x 64" in machine0 and re.search(r"\n\s+2\s+0\.1\s", machine0)
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "args.json", "checkpoint-0.pdparams",
                                                    "checkpoint-2.pdparams", "command.sh",
                                                    "convergence.png", "metrics.csv", "run.json", "vdl"]


# --------------------------------------------------------------------------- faults

def _faulty(fault, n, ranks, run_dir, logs, extra=()):
    """A 2-process run of RUN with a fault; returns (launcher's exit code, seconds from the
    first SIGTERM to the end, rank 0's log)."""
    logs.mkdir(parents=True)
    proc = launch([os.path.join("tests", "dist_faults.py"), fault, n, ranks, *RUN, *extra,
                   "--dir", run_dir], logs, nproc=2, port=free_port(), env={"FAULT_NOTES": str(logs)})
    try:
        proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    killed = [float((logs / name).read_text()) for name in os.listdir(logs) if name.startswith("killed")]
    return proc.returncode, ended - min(killed) if killed else None, (logs / "workerlog.0").read_text()


@pytest.mark.parametrize("fault, n, ranks", [
    ("term-step", 5, "all"),     # every process, mid-epoch 1
    ("term-epoch", 1, "1"),      # one worker, right at the end of epoch 1
    ("term-step", 20, "1"),      # one worker, mid-epoch 2
])
def test_sigterm_ends_the_whole_job_in_seconds_and_it_resumes_bit_identically(
        two_process_run, tmp_path, fault, n, ranks):
    base, _ = two_process_run
    run_dir = tmp_path / "run"
    code, seconds, log = _faulty(fault, n, ranks, run_dir, tmp_path / "logs")
    assert code != 0 and seconds is not None and seconds < 20, (code, seconds, log[-2000:])
    assert "stopped by SIGTERM" in log and "--resume auto" in log
    # Resumed with the one-machine script, from another folder, --dir relative to it.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "launch_one_machine.sh")
    resumed = start(["bash", script, 2, *RUN, "--dir", "run", "--resume", "auto"], cwd=tmp_path,
                    env={"LAUNCH_LOG_DIR": str(tmp_path / "logs2")})
    output, = finish([resumed])
    assert "resuming from" in output
    expected = checkpoint_tensors(base / "run" / "checkpoint-4.pdparams")
    resumed_tensors = checkpoint_tensors(run_dir / "checkpoint-4.pdparams")
    assert "swag/deviation1" in resumed_tensors and resumed_tensors.keys() == expected.keys()
    for key, value in resumed_tensors.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert metrics_rows(run_dir) == metrics_rows(base / "run")


def test_a_nan_on_one_rank_ends_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    code, _, log = _faulty("nan-step", 15, "1", run_dir, tmp_path / "logs")
    other = (tmp_path / "logs" / "workerlog.1").read_text()
    assert code != 0
    assert "loss became non-finite on another rank at epoch 2 step 3" in log
    assert "loss became nan at epoch 2 step 3" in other
    assert sorted(n for n in os.listdir(run_dir) if n.endswith(".pdparams")) == ["checkpoint-0.pdparams"]


def test_a_missing_dataset_is_downloaded_once_and_read_intact_by_every_rank(tmp_path):
    (tmp_path / "data").mkdir()
    notes = tmp_path / "downloads.txt"
    logs = tmp_path / "logs"
    proc = launch([os.path.join("tests", "dist_faults.py"), "download", notes, "all",
                   "--dataset", "CIFAR10", "--data_path", tmp_path / "data", "--model", "SimpleCNN",
                   "--epochs", 1, "--batch_size", 16, "--dir", tmp_path / "run"], logs, nproc=2,
                  port=free_port())
    finish([proc])
    assert notes.read_text() == "rank 0\n"
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "run" / "checkpoint-1.pdparams"))
    assert ckpt.dataset == "CIFAR10"
    assert "(40 train / 8 test)" in (logs / "workerlog.0").read_text()


def test_a_data_parallel_fit_with_the_callback_ends_with_one_average_on_every_rank(tmp_path):
    proc = launch([os.path.join("tests", "dist_fit.py"), tmp_path / "out"], tmp_path / "logs",
                  nproc=2, port=free_port())
    finish([proc])
    assert [(tmp_path / "out" / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2 1", "2 1"]
    rank0, rank1 = (np.load(tmp_path / "out" / f"rank{r}.npz") for r in (0, 1))
    assert any(k.endswith("_variance") for k in rank0.files)
    for key in rank0.files:  # the averaged weights and the all-reduced refresh
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_a_one_process_run_continues_on_two_at_an_epoch_end(tmp_path):
    import train
    from helpers import run_main
    assert run_main(train.main, *RUN, "--epochs", 2, "--save_freq", 1, "--dir", tmp_path / "run").returncode == 0
    proc = launch(["train.py", *RUN, "--save_freq", 1, "--dir", tmp_path / "run", "--resume", "auto"],
                  tmp_path / "logs", nproc=2, port=free_port())
    output, = finish([proc])
    assert "2 processes x 64" in output and "resuming from" in output
    assert report.read_metrics(str(tmp_path / "run"))[-1]["ep"] == 4


def test_ctrl_c_on_the_launch_script_prints_what_was_saved_and_the_command_to_continue(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "launch_one_machine.sh")
    flags = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", 300, "--no_visualdl",
             "--dir", tmp_path / "run"]
    proc = start(["bash", script, 2, *flags], env={"LAUNCH_LOG_DIR": str(tmp_path / "logs")})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # a few epochs in
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    tail = out.splitlines()[-3:]
    assert tail[0].startswith("stopped by ") and "saved " + str(tmp_path / "run") in tail[0], out[-2000:]
    assert tail[1] == f"continue with: {script} 2 " + " ".join(map(str, flags)) + " --resume auto"
    assert tail[2] == f"each process's output: {tmp_path / 'logs'}/workerlog.<rank>"
