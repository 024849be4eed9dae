"""The GPU paths, where Paddle has CUDA (skipped elsewhere): training, evaluation, AMP O2 fits."""
import re

import numpy as np
import paddle
import pytest

import callbacks
from harness import checkpoints
from harness import data
import eval as evaluation
import models
import train
from helpers import run_main

pytestmark = pytest.mark.skipif(
    not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0),
    reason="Paddle has no CUDA device here")

RUN = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "4", "--swa", "--swa_start", "3",
       "--eval_freq", "1", "--no_visualdl", "--device", "gpu"]


@pytest.mark.parametrize("extra", [[], ["--ema_decay", "0.9"], ["--swag", "--swag_rank", "2"]])
def test_training_on_a_gpu_and_eval_reproduce_the_last_row(tmp_path, extra):
    result = run_main(train.main, *RUN, *extra, "--dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert ", gpu;" in result.stdout
    last = [line for line in result.stdout.splitlines() if re.match(r"\s+4\s", line)][-1].split()
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "run" / "checkpoint-4.pdparams"))
    assert {str(v.dtype) for v in ckpt.swa_state_dict.values()} == {"paddle.float32"}
    evaluated = run_main(evaluation.main, "--model_path", tmp_path / "run" / "checkpoint-4.pdparams",
                         "--device", "gpu")
    accuracy = float(re.search(r"accuracy ([\d.]+)%", evaluated.stdout)[1])
    assert accuracy == pytest.approx(float(last[7]), abs=1e-3)


def test_a_fit_with_amp_o2_averages_in_float32_and_keeps_the_network_float16():
    paddle.set_device("gpu:0")
    try:
        ds = data.load_dataset("digits")
        batches = [[x.numpy(), y.numpy()] for x, y in data.Batches(ds.train, 128, ds.mean, ds.std)(epoch=0)]
        network = models.build("SimpleCNN", 10, 1)
        model = paddle.Model(network)
        model.prepare(paddle.optimizer.Momentum(0.05, parameters=network.parameters(), multi_precision=True),
                      paddle.nn.CrossEntropyLoss(), amp_configs={"level": "O2"})
        swa = callbacks.SWACallback(swa_start=1, swa_lr=0.02, bn_data=batches)
        model.fit(batches, epochs=2, verbose=0, callbacks=[swa])
        assert {str(p.dtype) for p in swa.swa.model.parameters()} == {"paddle.float32"}
        weight = network.fc.weight
        assert str(weight.dtype) == "paddle.float16"
        np.testing.assert_allclose(weight.astype("float32").numpy(),
                                   swa.swa.model.fc.weight.numpy(), rtol=1e-3, atol=1e-3)
    finally:
        paddle.set_device("cpu")


def _tensors(path):
    ckpt = checkpoints.load_checkpoint(str(path))
    return {f"{part}/{k}": v.astype("float32").numpy() for part in ("state_dict", "swa_state_dict")
            for k, v in ckpt[part].items()}, ckpt


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_amp_runs_train_resume_and_average_in_float32(tmp_path, level):
    amp = ["--amp", level, "--save_freq", "1"]
    whole = run_main(train.main, *RUN, *amp, "--dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    assert f"AMP {level} float16" in whole.stdout
    header = next(line for line in whole.stdout.splitlines() if line.split()[:2] == ["ep", "lr"])
    assert "skipped" in header.split()
    half = run_main(train.main, *[a if a != "4" else "3" for a in RUN], *amp, "--dir", tmp_path / "part")
    assert half.returncode == 0, half.stderr
    resumed = run_main(train.main, *RUN, *amp, "--dir", tmp_path / "part", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    expected, ckpt = _tensors(tmp_path / "whole" / "checkpoint-4.pdparams")
    got, resumed_ckpt = _tensors(tmp_path / "part" / "checkpoint-4.pdparams")
    for key in expected:  # at an epoch's end, on the same GPU: bit-identical
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert {str(v.dtype) for v in ckpt.swa_state_dict.values()} == {"paddle.float32"}
    assert ckpt.amp_scaler is not None and resumed_ckpt.amp_scaler is not None


def test_an_overflow_in_one_step_is_skipped_and_counted_not_taken_for_a_nan(tmp_path, monkeypatch):
    from harness import engine

    cross_entropy, calls = engine.F.cross_entropy, []

    def overflowing(logits, labels):
        loss = cross_entropy(logits, labels)
        calls.append(paddle.is_grad_enabled())
        training_steps = sum(calls)
        # a finite loss (float32) whose float16 gradients overflow at the scaler's 2**16
        return loss * 1e6 if paddle.is_grad_enabled() and training_steps == 3 else loss

    monkeypatch.setattr(engine.F, "cross_entropy", overflowing)
    result = run_main(train.main, *RUN, "--amp", "O1", "--epochs", "1", "--swa_start", "1",
                      "--dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    from helpers import metrics_rows
    assert metrics_rows(tmp_path / "run")[0]["skipped"] == 1
