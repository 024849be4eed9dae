"""The SWA core (utils.py) against values computed independently with numpy."""
import numpy as np
import paddle
import pytest

import models
import utils


def _snapshot(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _randomise(model, rng):
    with paddle.no_grad():
        for p in model.parameters():
            p.set_value(rng.standard_normal(p.shape).astype("float32"))


def test_average_of_k_snapshots_is_their_mean():
    rng = np.random.default_rng(0)
    model = models.build("SimpleCNN", num_classes=4, in_channels=1)
    swa = utils.SWA(model)
    snapshots = []
    for _ in range(5):
        _randomise(model, rng)
        snapshots.append(_snapshot(model))
        swa.update(model)
    assert swa.n == 5
    averaged = _snapshot(swa.model)
    for key in averaged:
        expected = np.mean([s[key] for s in snapshots], axis=0, dtype=np.float64)
        np.testing.assert_allclose(averaged[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    # BatchNorm statistics are averaged too (documented), so they are really covered.
    assert any(key.endswith("_variance") for key in averaged)


def test_moving_average_weights_and_refuses_other_architectures():
    a = models.build("SimpleCNN", num_classes=3)
    b = models.build("SimpleCNN", num_classes=3)
    before_a, before_b = _snapshot(a), _snapshot(b)
    utils.moving_average(a, b, 0.25)
    for key, value in _snapshot(a).items():
        np.testing.assert_allclose(value, 0.75 * before_a[key] + 0.25 * before_b[key],
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="models differ"):
        utils.moving_average(a, models.build("SimpleCNN", num_classes=5), 0.5)


class BNFirst(paddle.nn.Layer):
    """A model whose first layer is BatchNorm, so its input statistics are known exactly."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.fc = paddle.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(x).reshape([x.shape[0], 3, -1]).mean(axis=2))


def _batches(data, batch_size, with_labels):
    for i in range(0, len(data), batch_size):
        x = paddle.to_tensor(data[i:i + batch_size])
        yield (x, paddle.zeros([x.shape[0]], dtype="int64")) if with_labels else x


@pytest.mark.parametrize("layer, shape", [
    (lambda: paddle.nn.BatchNorm2D(3, momentum=0.7), (103, 3, 4, 5)),
    (lambda: paddle.nn.BatchNorm1D(3, momentum=0.7), (103, 3, 6)),
    (lambda: paddle.nn.BatchNorm3D(3, momentum=0.7), (103, 3, 2, 2, 3)),
    (lambda: paddle.nn.BatchNorm(3, momentum=0.7), (103, 3, 4, 5)),
])
@pytest.mark.parametrize("with_labels", [True, False])
def test_bn_update_gives_dataset_mean_and_weighted_batch_variance(layer, shape, with_labels):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal(shape) * 2.0 + 3.0).astype("float32")
    data[:, 1] = data[:, 1] * 0.3 - 1.0  # channels with different statistics
    batch_size = 25  # 103 samples: batches of 25, 25, 25, 25 and a ragged 3
    model = BNFirst(layer())
    model.eval()
    model.fc.train()  # mixed modes must come back as they were
    axes = (0,) + tuple(range(2, len(shape)))

    seen = utils.bn_update(_batches(data, batch_size, with_labels), model)

    assert seen == 103
    expected_mean = data.astype(np.float64).mean(axis=axes)
    chunks = [data[i:i + batch_size].astype(np.float64) for i in range(0, 103, batch_size)]
    expected_var = sum(len(c) * c.var(axis=axes) for c in chunks) / 103  # biased, as Paddle's
    np.testing.assert_allclose(model.bn._mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn._variance.numpy(), expected_var, rtol=1e-5)
    # The ragged batch matters: an unweighted mean of batch variances differs.
    unweighted = np.mean([c.var(axis=axes) for c in chunks], axis=0)
    assert not np.allclose(unweighted, expected_var, rtol=1e-4)
    assert model.bn._momentum == pytest.approx(0.7)
    assert not model.training and not model.bn.training and model.fc.training


def test_bn_update_leaves_model_without_batchnorm_untouched_and_reads_nothing():
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.ReLU())
    before = _snapshot(model)

    def loader():
        raise AssertionError("bn_update read data from a model without BatchNorm")
        yield

    assert utils.bn_update(loader(), model) == 0
    for key, value in _snapshot(model).items():
        np.testing.assert_array_equal(value, before[key])


def test_bn_update_restores_statistics_when_the_pass_fails():
    model = BNFirst(paddle.nn.BatchNorm2D(3))
    with paddle.no_grad():
        model.bn._mean.set_value(np.array([1.0, 2.0, 3.0], dtype="float32"))

    def failing():
        yield paddle.ones([4, 3, 2, 2])
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        utils.bn_update(failing(), model)
    np.testing.assert_array_equal(model.bn._mean.numpy(), [1.0, 2.0, 3.0])
    assert model.bn._momentum == pytest.approx(0.9)


def test_bn_update_skips_layers_that_use_global_stats():
    model = BNFirst(paddle.nn.BatchNorm2D(3, use_global_stats=True))
    with paddle.no_grad():
        model.bn._mean.set_value(np.array([1.0, 2.0, 3.0], dtype="float32"))
    assert utils.bn_update(_batches(np.ones((8, 3, 2, 2), "float32"), 4, True), model) == 0
    np.testing.assert_array_equal(model.bn._mean.numpy(), [1.0, 2.0, 3.0])


@pytest.mark.parametrize("epoch, swa, expected", [
    (0, True, 0.1),                     # start
    (80, True, 0.1),                    # t = 80/160 = 0.5: last epoch at the full rate
    (112, True, 0.1 - 0.05 * 0.5),      # t = 0.7: halfway down the ramp
    (144, True, 0.05),                  # t = 0.9: end of the ramp
    (199, True, 0.05),                  # end of training
    (0, False, 0.1),
    (100, False, 0.1),                  # t = 0.5 without SWA (epochs=200)
    (180, False, 0.001),                # t = 0.9: lr_init / 100
    (199, False, 0.001),
])
def test_piecewise_linear_lr_at_change_points_and_ends(epoch, swa, expected):
    kwargs = dict(swa_start=160, swa_lr=0.05) if swa else {}
    assert utils.piecewise_linear_lr(epoch, 0.1, 200, **kwargs) == pytest.approx(expected)


def test_piecewise_linear_lr_just_past_the_change_points_and_swa_start_zero():
    just_after = utils.piecewise_linear_lr(81, 0.1, 200, swa_start=160, swa_lr=0.05)
    assert 0.05 < just_after < 0.1
    assert utils.piecewise_linear_lr(143, 0.1, 200, swa_start=160, swa_lr=0.05) > 0.05
    assert utils.piecewise_linear_lr(0, 0.1, 10, swa_start=0, swa_lr=0.02) == pytest.approx(0.02)


def test_is_swa_epoch_counts_as_the_original():
    assert sum(utils.is_swa_epoch(k, 4) for k in range(1, 9)) == 5
    assert [k for k in range(1, 13) if utils.is_swa_epoch(k, 3, 4)] == [3, 7, 11]


def test_checkpoint_round_trip_restores_average_and_count(tmp_path):
    rng = np.random.default_rng(2)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model)
    for _ in range(3):
        _randomise(model, rng)
        swa.update(model)
    path = utils.save_checkpoint(str(tmp_path), 7, state_dict=model.state_dict(),
                                 optimizer={}, **swa.state_dict())
    assert path.endswith("checkpoint-7.pdparams")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7.pdparams"]  # no temp left

    ckpt = utils.load_checkpoint(path)
    for key in utils.CHECKPOINT_KEYS:
        assert key in ckpt
    restored = utils.SWA(models.build("SimpleCNN", num_classes=3))
    restored.set_state_dict(ckpt)
    assert restored.n == 3 and ckpt["epoch"] == 7
    expected = _snapshot(swa.model)
    for key, value in _snapshot(restored.model).items():
        np.testing.assert_array_equal(value, expected[key])


def test_load_checkpoint_refuses_bad_files(tmp_path):
    model = models.build("SimpleCNN")
    path = utils.save_checkpoint(str(tmp_path), 1, state_dict=model.state_dict(), optimizer={})
    truncated = tmp_path / "truncated.pdparams"
    whole = open(path, "rb").read()
    truncated.write_bytes(whole[:len(whole) // 2])
    noise = tmp_path / "noise.pdparams"
    noise.write_bytes(np.random.default_rng(0).bytes(2000))
    plain = tmp_path / "plain.pdparams"
    paddle.save({"weight": paddle.ones([2])}, str(plain))
    for bad in (truncated, noise, plain, tmp_path / "missing.pdparams"):
        with pytest.raises(utils.CheckpointError, match=bad.name):
            utils.load_checkpoint(str(bad))


def test_load_weights_refuses_another_architecture():
    with pytest.raises(ValueError, match="does not match"):
        utils.load_weights(models.build("SimpleCNN", num_classes=3),
                           models.build("SimpleCNN", num_classes=4).state_dict())


def _run_updates(model_name, snapshots_rng, k=3, swa_factory=utils.SWA):
    model = models.build(model_name, num_classes=3)
    swa = swa_factory(model)
    for _ in range(k):
        _randomise(model, snapshots_rng)
        swa.update(model)
    return _snapshot(swa.model)


def test_fused_update_equals_per_tensor_path_and_fallback(monkeypatch):
    fused = _run_updates("PreResNet110", np.random.default_rng(5))
    # Per-tensor reference: moving_average with the same weights.
    rng = np.random.default_rng(5)
    model = models.build("PreResNet110", num_classes=3)
    reference = utils.SWA(model).model
    for n in range(3):
        _randomise(model, rng)
        utils.moving_average(reference, model, 1.0 / (n + 1))
    expected = _snapshot(reference)
    for key in fused:
        np.testing.assert_allclose(fused[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)

    def broken(*args, **kwargs):
        raise TypeError("merged_momentum_(): signature changed")

    monkeypatch.setattr(utils._C_ops, "merged_momentum_", broken)
    fallback = _run_updates("PreResNet110", np.random.default_rng(5))
    for key in fused:
        np.testing.assert_allclose(fallback[key], expected[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_update_pairs_with_a_new_model_object():
    a = models.build("SimpleCNN", num_classes=3)
    b = models.build("SimpleCNN", num_classes=3)
    _randomise(b, np.random.default_rng(9))
    swa = utils.SWA(a)
    swa.update(a)
    swa.update(b)  # another object: must average b, not a again
    for key, value in _snapshot(swa.model).items():
        np.testing.assert_allclose(value, (_snapshot(a)[key] + _snapshot(b)[key]) / 2,
                                   rtol=1e-5, atol=1e-6, err_msg=key)


def test_flat_update_sees_optimizer_steps_set_value_and_new_storage(tmp_path):
    """SWA.update views both models' tensors into flat buffers; every way of changing a
    weight afterwards must still reach the average, and checkpoints must still hold it."""
    paddle.seed(3)
    model = models.build("PreResNet110", num_classes=3)
    optimizer = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=model.parameters())
    swa = utils.SWA(model)
    snapshots = []

    def add():
        snapshots.append(_snapshot(model))
        swa.update(model)
        expected = {k: np.mean([s[k] for s in snapshots], axis=0) for k in snapshots[0]}
        for key, value in _snapshot(swa.model).items():
            np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)

    add()
    x = paddle.randn([4, 3, 32, 32])
    for _ in range(2):  # optimizer kernels and the BatchNorm forward write in place
        utils.run_epoch([(x, paddle.to_tensor([0, 1, 2, 0]))], model, optimizer)
    add()
    _randomise(model, np.random.default_rng(1))  # set_value
    add()
    first = next(iter(model.parameters()))
    paddle.full(first.shape, 0.5)._share_buffer_to(first)  # new storage, as a re-pack would
    add()
    assert first._is_shared_buffer_with(swa._averager.new.buffer())
    path = str(tmp_path / "model.pdparams")
    paddle.save(model.state_dict(), path)
    for key, value in paddle.load(path).items():
        np.testing.assert_array_equal(value.numpy(), snapshots[-1][key], err_msg=key)
