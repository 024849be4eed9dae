"""SWA-Gaussian (utils.SWAG, train.py --swag, eval.py --swag_samples) against numpy."""
import re

import numpy as np
import paddle
import pytest

from harness import checkpoints
import eval as evaluation
import train
import utils


class Tiny(paddle.nn.Layer):
    """Four sampled weights and a BatchNorm, whose statistics must not be sampled."""

    def __init__(self):
        super().__init__()
        self.w = self.create_parameter([4])
        self.bn = paddle.nn.BatchNorm1D(2, weight_attr=False, bias_attr=False)

    def forward(self, x):
        return self.bn(x * self.w[:2])


def _fill(swag, model, thetas):
    for theta in thetas:
        with paddle.no_grad():
            model.w.set_value(theta.astype("float32"))
            model.bn._mean.set_value(theta[:2].astype("float32"))
        swag.update(model)


def _thetas(count, seed=0):
    rng = np.random.default_rng(seed)
    # Spreads of 0.5 and 3 per weight: std and variance differ a lot, and so would a sample
    # whose noise were multiplied by the variance instead of the standard deviation.
    return [rng.standard_normal(4) * np.array([0.5, 3.0, 1.0, 2.0]) + np.array([1.0, -2.0, 0.0, 5.0])
            for _ in range(count)]


def test_moments_and_the_last_deviations_after_more_updates_than_max_rank():
    thetas = _thetas(7)
    model = Tiny()
    swag = utils.SWAG(model, max_rank=3)
    _fill(swag, model, thetas)
    stack = np.array(thetas)
    np.testing.assert_allclose(swag.flat(swag.model).numpy(), stack.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swag.variance().numpy(), stack.var(0), rtol=1e-4)
    np.testing.assert_allclose(swag.sq_mean().numpy(), (stack ** 2).mean(0), rtol=1e-5)
    expected = [stack[i] - stack[:i + 1].mean(0) for i in (4, 5, 6)]  # mean after including theta
    assert len(swag.deviations) == 3
    for got, want in zip(swag.deviations, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    assert swag.names == ["w"]  # BatchNorm statistics are not sampled


@pytest.mark.parametrize("cov", [True, False])
def test_samples_follow_the_swag_gaussian(cov):
    thetas = _thetas(4, seed=1)  # K = 4 deviations held, fewer than max_rank: divides by K - 1
    model = Tiny()
    swag = utils.SWAG(model, max_rank=20)
    _fill(swag, model, thetas)
    stack = np.array(thetas)
    deviations = np.array([stack[i] - stack[:i + 1].mean(0) for i in range(4)]).T  # 4 x K
    scale = 0.5
    expected = scale * np.diag(stack.var(0))
    if cov:
        expected += scale * deviations @ deviations.T / (4 - 1)
    out, draws = None, []
    for seed in range(4000):
        out = swag.sample(scale=scale, cov=cov, seed=seed, out=out)
        draws.append(out.w.numpy().copy())
    draws = np.array(draws, dtype=np.float64)
    np.testing.assert_allclose(draws.mean(0), stack.mean(0), atol=0.15)
    spread = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    np.testing.assert_array_less(np.abs(np.cov(draws.T) - expected), 0.1 * spread + 1e-3)
    np.testing.assert_allclose(out.bn._mean.numpy(), swag.model.bn._mean.numpy())


def test_same_seed_same_sample_and_scale_zero_is_the_mean(tmp_path):
    thetas = _thetas(5, seed=2)
    model = Tiny()
    swag = utils.SWAG(model, max_rank=3)
    _fill(swag, model, thetas)
    a, b = swag.sample(seed=7).w.numpy(), swag.sample(seed=7).w.numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, swag.sample(seed=8).w.numpy())
    np.testing.assert_allclose(swag.sample(scale=0.0, seed=3).w.numpy(), np.mean(thetas, 0), rtol=1e-5)
    path = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=5,
                                       state_dict=model.state_dict(), optimizer={},
                                       **swag.state_dict()))
    restored = utils.SWAG(Tiny(), max_rank=3)
    restored.set_state_dict(checkpoints.load_checkpoint(path).average_state())
    np.testing.assert_array_equal(restored.sample(seed=7).w.numpy(), a)
    with pytest.raises(ValueError, match="2 or more"):
        one = utils.SWAG(model)
        one.update(model)
        one.sample()


QUICK = ["--dataset", "digits", "--model", "SimpleCNN", "--epochs", "6", "--swa", "--swa_start", "3",
         "--swa_lr", "0.05", "--swag", "--swag_rank", "3", "--eval_freq", "3", "--no_visualdl"]


def test_eval_compares_sgd_swa_and_swag_on_digits(tmp_path, capsys):
    assert train.main(QUICK + ["--dir", str(tmp_path / "run")]) == 0
    ckpt = checkpoints.load_checkpoint(str(tmp_path / "run" / "checkpoint-6.pdparams"))
    assert len(ckpt.swag_deviations) == 3 and ckpt.swa_n == 4
    capsys.readouterr()
    path = str(tmp_path / "run" / "checkpoint-6.pdparams")
    assert evaluation.main(["--model_path", path, "--swag_samples", "3", "--reliability",
                            str(tmp_path / "rel.png")]) == 0
    out = capsys.readouterr().out
    for weights in ("SGD weights", "SWA weights (average of 4 models)",
                    "SWAG (3 samples, scale 0.5, diagonal + rank 3 covariance, from 4 models)"):
        assert re.search(re.escape(weights) + r": accuracy [\d.]+%  NLL [\d.]+  ECE [\d.]+%", out), out
    assert (tmp_path / "rel.png").stat().st_size > 10_000
    # Samples at scale 0 are the mean: their average predicts exactly as SWA does.
    assert evaluation.main(["--model_path", path, "--swag_samples", "2", "--swag_scale", "0",
                            "--bn_update"]) == 0
    lines = capsys.readouterr().out.splitlines()
    swa = next(line for line in lines if line.startswith("SWA")).split(": ", 1)[1]
    swag = next(line for line in lines if line.startswith("SWAG")).split(": ", 1)[1]
    assert swa == swag
