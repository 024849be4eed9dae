"""Data-parallel SWA under paddle.distributed.launch on CPU processes (gloo)."""
import json
import os
import re

import numpy as np
import pytest

from helpers import finish, free_port, launch, run_script, start

RUN = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "4", "--swa", "--swa_start", "2",
       "--swa_lr", "0.05", "--eval_freq", "2"]


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
    assert any(k.endswith("_variance") for k in swa_keys)
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


def test_distributed_bn_update_equals_single_process(tmp_path):
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


def test_two_nodes_on_one_machine_with_the_launch_script(tmp_path):
    port = free_port()
    nodes = [start(["bash", os.path.join("scripts", "launch_machines.sh"), f"127.0.0.1:{port}",
                    2, rank, 1, *RUN, "--epochs", 2, "--dir", tmp_path / "run"],
                   env={"LAUNCH_LOG_DIR": str(tmp_path / f"logs{rank}")})
             for rank in (1, 0)]
    machine1, machine0 = finish(nodes)
    assert "2 processes x 64" in machine0 and re.search(r"\n\s+2\s+0\.1\s", machine0)
    assert sorted(os.listdir(tmp_path / "run")) == [".lock", "args.json", "checkpoint-0.pdparams",
                                                    "checkpoint-2.pdparams", "command.sh",
                                                    "convergence.png", "metrics.csv", "run.json", "vdl"]
