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


@pytest.fixture(scope="module")
def swag_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("swag") / "run"
    assert train.main(QUICK + ["--dir", str(run_dir)]) == 0
    return run_dir


def test_eval_compares_sgd_swa_and_swag_on_digits(swag_run, tmp_path, capsys):
    ckpt = checkpoints.load_checkpoint(str(swag_run / "checkpoint-6.pdparams"))
    assert len(ckpt.swag_deviations) == 3 and ckpt.swa_n == 4
    capsys.readouterr()
    path = str(swag_run / "checkpoint-6.pdparams")
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


def test_eval_says_the_scale_and_divisor_it_samples_with_and_refuses_idle_swag_flags(swag_run):
    from helpers import one_line_error, run_main

    path = swag_run / "checkpoint-6.pdparams"
    diagonal = run_main(evaluation.main, "--model_path", path, "--swag_samples", "1", "--swag_diag")
    assert "SWAG (1 samples, scale 1, diagonal covariance, from 4 models): accuracy" in diagonal.stdout
    authors = run_main(evaluation.main, "--model_path", path, "--swag_samples", "1",
                       "--swag_rank_divisor", "max_rank", "--swag_scale", "0.25")
    assert ("SWAG (1 samples, scale 0.25, diagonal + rank 3 divided by sqrt(3 - 1) covariance, "
            "from 4 models): accuracy") in authors.stdout
    one_line_error(run_main(evaluation.main, "--model_path", path, "--swag_rank_divisor", "max_rank"),
                   "--swag_rank_divisor shapes the SWAG samples: add --swag_samples S")
    one_line_error(run_main(evaluation.main, "--model_path", path, "--swag_samples", "1", "--swag_diag",
                            "--swag_rank_divisor", "max_rank"), "which --swag_diag drops")


# --------------------------------------------------------------------------- the authors' sampler

# Hand-made weights of Tiny: three updates of a SWAG keeping up to five deviations, so the
# low-rank term is sampled before the rank is full (K = 3 of K_max = 5).
HAND_MADE = [np.array([1.0, -2.0, 0.5, 4.0]), np.array([1.5, -1.0, 0.0, 3.0]),
             np.array([0.5, -2.5, 1.0, 5.5])]


def _swa_gaussian_sample(thetas, max_num_models, scale, z1, z2, cov=True):
    """The sample of the SWAG authors' code (wjmaddox/swa_gaussian, SWAG.collect_model and
    SWAG.sample_fullrank), written out from its formulas in float64:
      collect: mean <- mean n/(n+1) + theta/(n+1); sq_mean likewise with theta^2; the
               deviation theta - mean (the new mean) appended, the oldest dropped beyond
               max_num_models;
      sample:  var = clamp(sq_mean - mean^2, min=1e-30),
               theta = mean + sqrt(scale) (sqrt(var) z1 + D^T z2 / sqrt(max_num_models - 1)),
               D the deviations as rows; without cov the D term is left out.
    Its normals are torch's; here z1, z2 are given (those the sampler under test draws)."""
    mean, sq_mean, rows = np.zeros(4), np.zeros(4), []
    for n, theta in enumerate(thetas):
        mean = mean * n / (n + 1.0) + theta / (n + 1.0)
        sq_mean = sq_mean * n / (n + 1.0) + theta ** 2 / (n + 1.0)
        rows = (rows + [theta - mean])[-max_num_models:]
    var = np.maximum(sq_mean - mean ** 2, 1e-30)
    noise = np.sqrt(var) * z1
    if cov:
        noise = noise + np.array(rows).T @ z2 / np.sqrt(max_num_models - 1)
    return mean + np.sqrt(scale) * noise


def _normals(seed, rank):
    """The normals SWAG.sample draws for `seed`: its own numpy generator, z1 (one per sampled
    weight) first, then z2 (one per deviation held), float32."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(4, dtype=np.float32).astype(np.float64),
            rng.standard_normal(rank, dtype=np.float32).astype(np.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_max_rank_divisor_reproduces_the_authors_sample_before_the_rank_is_full(seed):
    model = Tiny()
    swag = utils.SWAG(model, max_rank=5)
    _fill(swag, model, HAND_MADE)
    z1, z2 = _normals(seed, 3)
    theirs = _swa_gaussian_sample(HAND_MADE, 5, 0.5, z1, z2)
    ours = swag.sample(scale=0.5, seed=seed, rank_divisor="max_rank").w.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # The default divides by sqrt(K - 1) = sqrt(2) instead of sqrt(4): the same diagonal
    # term, the low-rank term sqrt(2) = 1.41 times the authors'.
    held = swag.sample(scale=0.5, seed=seed).w.numpy()
    diagonal = _swa_gaussian_sample(HAND_MADE, 5, 0.5, z1, z2, cov=False)
    np.testing.assert_allclose(held - diagonal, np.sqrt(2) * (theirs - diagonal), rtol=1e-5, atol=1e-6)
    assert np.abs(held - theirs).max() > 1e-2


def test_once_the_rank_is_full_both_divisors_draw_the_same_sample():
    thetas = HAND_MADE + [np.array([2.0, 0.0, -0.5, 4.5]), np.array([1.0, -1.5, 0.25, 2.0]),
                          np.array([0.0, -3.0, 0.75, 4.0])]  # six updates, five deviations kept
    model = Tiny()
    swag = utils.SWAG(model, max_rank=5)
    _fill(swag, model, thetas)
    np.testing.assert_array_equal(swag.sample(seed=4).w.numpy(),
                                  swag.sample(seed=4, rank_divisor="max_rank").w.numpy())
    z1, z2 = _normals(4, 5)
    np.testing.assert_allclose(swag.sample(seed=4).w.numpy(),
                               _swa_gaussian_sample(thetas, 5, 0.5, z1, z2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rank_divisor must be one of held, max_rank"):
        swag.sample(rank_divisor="K")


def test_by_default_swag_samples_at_scale_one_half_and_swag_diagonal_at_scale_one():
    # swa_gaussian's uncertainty experiments: --scale=0.5 for SWAG, 1 for SWAG-diagonal.
    model = Tiny()
    swag = utils.SWAG(model, max_rank=5)
    _fill(swag, model, HAND_MADE)
    z1, z2 = _normals(6, 3)
    np.testing.assert_allclose(swag.sample(cov=False, seed=6).w.numpy(),
                               _swa_gaussian_sample(HAND_MADE, 5, 1.0, z1, z2, cov=False),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(swag.sample(seed=6, rank_divisor="max_rank").w.numpy(),
                               _swa_gaussian_sample(HAND_MADE, 5, 0.5, z1, z2), rtol=1e-6, atol=1e-6)
