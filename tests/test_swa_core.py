"""The averaging core (utils.py) against values computed independently with numpy."""
import copy

import numpy as np
import paddle
import pytest

from harness import checkpoints, engine, errors
import models
import utils

HAS_CUDA = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _snapshot(model):
    """Every tensor of the state dict as float64 numpy (bfloat16 read through float32)."""
    return {k: v.astype("float32").numpy().astype(np.float64) if v.is_floating_point() else v.numpy()
            for k, v in model.state_dict().items()}


def _randomise(model, rng):
    with paddle.no_grad():
        for p in model.parameters():
            value = paddle.to_tensor(rng.standard_normal(p.shape).astype("float32"))
            paddle.assign(value.astype(p.dtype), output=p)


def _pointers(model):
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name: t.data_ptr() for name, t in named}


def _feed(swa, model, rng, count):
    """`count` updates with random weights; returns the weights given (float64 snapshots)."""
    snapshots = []
    for _ in range(count):
        _randomise(model, rng)
        snapshots.append(_snapshot(model))
        swa.update(model)
    return snapshots


def _assert_mean(swa, snapshots, rtol=1e-5, atol=1e-6):
    for key, value in _snapshot(swa.model).items():
        expected = np.mean([s[key] for s in snapshots], axis=0)
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol, err_msg=key)


# --------------------------------------------------------------------------- equal average

def test_average_of_k_snapshots_is_their_mean():
    rng = np.random.default_rng(0)
    model = models.build("SimpleCNN", num_classes=4, in_channels=1)
    swa = utils.SWA(model)
    snapshots = _feed(swa, model, rng, 5)
    assert swa.n == 5
    _assert_mean(swa, snapshots)
    # BatchNorm statistics are averaged too (documented), so they are really covered.
    assert any(key.endswith("_variance") for key in _snapshot(swa.model))


def test_update_never_changes_the_trained_models_memory_or_values():
    rng = np.random.default_rng(1)
    model = models.build("PreResNet110", num_classes=3)
    swa = utils.SWA(model)
    pointers = _pointers(model)
    for _ in range(3):
        _randomise(model, rng)
        before = _snapshot(model)
        swa.update(model)
        assert _pointers(model) == pointers
        for key, value in _snapshot(model).items():
            np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert not set(_pointers(swa.model).values()) & set(pointers.values())


def _against_the_plain_update(model, swa, rng, weights):
    """Feed `swa` and, beside it, the plain per-tensor update (moving_average into a float32
    copy) the same random weights; returns the largest difference of the two averages."""
    plain = copy.deepcopy(model)
    plain.float()
    for i, weight in enumerate(weights):
        _randomise(model, rng)
        swa.update(model)
        if i == 0:
            utils.load_state_dict(plain, model.state_dict())
        else:
            utils.moving_average(plain, model, weight)
    mine, theirs = swa.model.state_dict(), plain.state_dict()
    return max(float(np.abs(mine[k].numpy() - theirs[k].numpy()).max()) for k in theirs)


def _pieces(swa):
    block = swa._pairs.block
    return "numpy" if block.chunks is not None else "paddle"


@pytest.mark.parametrize("chunk", [7, 1 << 16])  # 7 floats: chunks across tensors, within tensors
@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_the_one_buffer_update_is_the_plain_per_tensor_update_bit_for_bit(monkeypatch, chunk,
                                                                          ema_decay):
    monkeypatch.setattr(utils._Block, "CHUNK", chunk)
    rng = np.random.default_rng(30)
    model = models.build("SimpleCNN" if chunk == 7 else "PreResNet110", num_classes=3)
    swa = utils.SWA(model, ema_decay=ema_decay)
    weights = [1.0] + ([1 / (n + 1) for n in range(1, 4)] if ema_decay is None else [0.1] * 3)
    largest = _against_the_plain_update(model, swa, rng, weights)
    assert _pieces(swa) == "numpy" and not swa._pairs.outside
    assert largest == 0.0, f"largest difference from the per-tensor update: {largest}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32 through Paddle"])
def test_the_update_through_paddle_or_from_float16_is_the_plain_update(monkeypatch, dtype):
    # bfloat16 (numpy has none) and a GPU take the concatenation + lerp_ path; float32 is
    # sent there too by refusing the zero-copy views, as a GPU would.
    if dtype == "float32 through Paddle":
        monkeypatch.setattr(utils, "_host_views", lambda buffer, tensors: None)
    rng = np.random.default_rng(31)
    model = models.build("PreResNet110", num_classes=3)
    model.to(dtype=dtype.split()[0])
    swa = utils.SWA(model)
    largest = _against_the_plain_update(model, swa, rng, [1.0, 1 / 2, 1 / 3])
    assert _pieces(swa) == ("numpy" if dtype == "float16" else "paddle")
    assert largest == 0.0, f"largest difference from the per-tensor update: {largest}"


def test_the_averages_tensors_are_views_of_one_buffer_through_refresh_and_reload():
    model = models.build("PreResNet110", num_classes=3)
    swa = utils.SWA(model)
    swa.update(model)
    start, size = swa._buffer.data_ptr(), 4 * swa._buffer.size

    def inside():
        return all(start <= p.data_ptr() < start + size for p in swa.model.parameters())
    assert inside() and size == 4 * sum(p.size for p in swa.model.parameters())
    swa.bn_update([paddle.randn([4, 3, 8, 8])])
    swa.set_state_dict(swa.state_dict())
    assert inside() and swa._buffer.data_ptr() == start
    assert swa.pairs_with(model) is swa._pairs  # the pairing held: no re-packing


def test_an_rnns_average_evaluates_as_the_mean_through_its_own_weight_list():
    # Paddle's LSTM runs its forward from the tensors listed in _all_weights when it was made,
    # and keeps a non-persistable dropout state ([] in a model, [0] in its deep copy).
    paddle.seed(32)
    model = paddle.nn.LSTM(4, 8)
    swa = utils.SWA(model)
    snapshots = _feed(swa, model, np.random.default_rng(32), 3)
    mean = {k: np.mean([s[k] for s in snapshots], axis=0).astype("float32") for k in snapshots[0]}
    loaded = paddle.nn.LSTM(4, 8)
    loaded.set_state_dict({k: paddle.to_tensor(v) for k, v in mean.items()})
    x = paddle.randn([2, 5, 4])
    np.testing.assert_allclose(swa.model(x)[0].numpy(), loaded(x)[0].numpy(), atol=1e-5)


def test_the_averages_tensors_keep_their_objects_and_attributes():
    attr = paddle.ParamAttr(learning_rate=0.0, regularizer=paddle.regularizer.L2Decay(0.5),
                            need_clip=False)
    model = paddle.nn.Sequential(paddle.nn.Linear(3, 2, weight_attr=attr))
    swa = utils.SWA(model)
    swa.update(model)
    held = swa.model[0].weight  # as an optimizer over swa.model would hold it
    swa.model.to(dtype="float16")  # new storage for every tensor: the buffer is made anew
    swa.model.to(dtype="float32")
    swa.update(model)
    assert swa.model[0].weight is held and utils._offset(swa._buffer, held) is not None
    assert (held.optimize_attr, held.need_clip) == ({"learning_rate": 0.0}, False)
    assert held.regularizer is not None and held.stop_gradient


def test_a_tensor_of_the_average_replaced_by_its_user_is_averaged_from_then_on():
    model = paddle.nn.Sequential(paddle.nn.Linear(2, 2))
    swa = utils.SWA(model)
    swa.update(model)
    swa.model[0].weight = swa.model[0].create_parameter(
        [2, 2], default_initializer=paddle.nn.initializer.Constant(0.0))
    for value in (10.0, 20.0, 30.0):  # weights 1/2, 1/3, 1/4 from 0: 5, 10, 15
        model[0].weight.set_value(np.full([2, 2], value, np.float32))
        swa.update(model)
    np.testing.assert_array_equal(swa.model[0].weight.numpy(), np.full([2, 2], 15.0, np.float32))


@pytest.mark.parametrize("path", ["numpy", "paddle"])
def test_strided_tensors_of_the_model_changed_in_place_are_read_afresh(monkeypatch, path):
    if path == "paddle":
        monkeypatch.setattr(utils, "_host_views", lambda buffer, tensors: None)

    class Strided(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.w = paddle.base.framework.EagerParamBase.from_tensor(paddle.zeros([5, 4]).T)
            self.register_buffer("b", paddle.zeros([5, 4]).T)

    model = Strided()
    assert not model.w.is_contiguous()
    swa = utils.SWA(model)
    for _ in range(3):  # 1, 2, 3 in place (the storage stays): their mean is 2
        with paddle.no_grad():
            model.w.add_(paddle.ones_like(model.w))
            model.b.add_(paddle.ones_like(model.b))
        swa.update(model)
    for value in swa.model.state_dict().values():
        np.testing.assert_array_equal(value.numpy(), np.full([4, 5], 2.0, np.float32))


def test_moving_average_weights_and_refuses_other_architectures():
    a = models.build("SimpleCNN", num_classes=3)
    b = models.build("SimpleCNN", num_classes=3)
    before_a, before_b = _snapshot(a), _snapshot(b)
    utils.moving_average(a, b, 0.25)
    for key, value in _snapshot(a).items():
        np.testing.assert_allclose(value, 0.75 * before_a[key] + 0.25 * before_b[key],
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="fc.weight has shape"):
        utils.moving_average(a, models.build("SimpleCNN", num_classes=5), 0.5)


def test_an_optimizers_in_place_steps_between_updates_are_averaged():
    # The optimizer writes the weights in place (their storage stays): each update must read
    # the values of that moment, not those of the first update.
    rng = np.random.default_rng(15)
    model = models.build("SimpleCNN", num_classes=3, in_channels=1)
    optimizer = paddle.optimizer.Momentum(0.5, parameters=model.parameters())
    swa, snapshots, pointers = utils.SWA(model), [], _pointers(model)
    for _ in range(4):
        x = paddle.to_tensor(rng.standard_normal((8, 1, 8, 8)).astype("float32"))
        paddle.nn.functional.cross_entropy(model(x), paddle.to_tensor(rng.integers(0, 3, 8))).backward()
        optimizer.step()
        optimizer.clear_grad()
        snapshots.append(_snapshot(model))
        swa.update(model)
    assert _pointers(model) == pointers  # in place indeed
    assert not np.allclose(snapshots[0]["fc.weight"], snapshots[-1]["fc.weight"])
    _assert_mean(swa, snapshots)


@pytest.mark.parametrize("change", ["loaded", "cast and cast back"])
def test_an_average_changed_by_the_user_between_updates_goes_on_from_its_new_values(change):
    rng = np.random.default_rng(16)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model, ema_decay=0.5)
    _feed(swa, model, rng, 2)
    if change == "loaded":  # written into the average's own tensors
        other = models.build("SimpleCNN", num_classes=3)
        _randomise(other, rng)
        utils.load_state_dict(swa.model, other.state_dict())
    else:  # every tensor of the average gets new storage
        pointers = _pointers(swa.model)
        swa.model.to(dtype="float16")
        swa.model.to(dtype="float32")
        assert set(_pointers(swa.model).values()).isdisjoint(pointers.values())
    expected = _snapshot(swa.model)
    for now in _feed(swa, model, rng, 2):
        expected = {k: 0.5 * expected[k] + 0.5 * now[k] for k in now}
    for key, value in _snapshot(swa.model).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_model_cast_to_float16_after_an_update_is_followed_and_left_float16():
    rng = np.random.default_rng(2)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model)
    _randomise(model, rng)
    snapshots = [_snapshot(model)]
    swa.update(model)
    model.to(dtype="float16")
    _randomise(model, rng)
    snapshots.append(_snapshot(model))  # the float16 values, exactly, in float64
    pointers = _pointers(model)
    swa.update(model)
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.float16"}
    assert _pointers(model) == pointers
    assert {str(p.dtype) for p in swa.model.parameters()} == {"paddle.float32"}
    _assert_mean(swa, snapshots)


def test_a_replaced_layer_is_averaged_from_then_on():
    rng = np.random.default_rng(3)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model)
    _randomise(model, rng)
    first = _snapshot(model)
    swa.update(model)
    model.fc = paddle.nn.Linear(64, 3)  # fine-tuning swaps the head
    second = _snapshot(model)
    swa.update(model)
    np.testing.assert_allclose(_snapshot(swa.model)["fc.weight"],
                               (first["fc.weight"] + second["fc.weight"]) / 2, rtol=1e-6, atol=1e-7)


def test_a_model_that_no_longer_fits_is_refused_naming_the_tensor():
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model)
    swa.update(model)
    model.fc = paddle.nn.Linear(64, 7)
    with pytest.raises(ValueError, match=r"fc.weight has shape \[64, 7\], the average's \[64, 3\]"):
        swa.update(model)
    model.extra = paddle.nn.Linear(2, 2)
    model.fc = paddle.nn.Linear(64, 3)
    with pytest.raises(ValueError, match="extra.weight, which the average has not"):
        swa.update(model)


def test_bfloat16_model_is_averaged_in_float32_with_equal_weights():
    rng = np.random.default_rng(4)
    model = models.build("SimpleCNN", num_classes=3)
    model.to(dtype="bfloat16")
    swa = utils.SWA(model)
    snapshots = _feed(swa, model, rng, 3)  # weights 1, 1/2, 1/3 (0.33398 in bfloat16)
    assert {str(p.dtype) for p in swa.model.parameters()} == {"paddle.float32"}
    _assert_mean(swa, snapshots, rtol=1e-6, atol=1e-6)


def test_amp_o2_model_is_averaged_in_float32_and_the_average_evaluates():
    # paddle.amp.decorate(level="O2") casts a model on a GPU and is a no-op on a CPU; its
    # casting step is applied directly here, keeping BatchNorm in float32 as it does.
    rng = np.random.default_rng(5)
    model = models.build("SimpleCNN", num_classes=3)
    paddle.amp.decorate(models=model, level="O2", dtype="bfloat16")
    from paddle.amp.auto_cast import amp_initialize
    amp_initialize([model], "bfloat16", None)
    dtypes = {name: str(p.dtype) for name, p in model.named_parameters()}
    assert dtypes["fc.weight"] == "paddle.bfloat16" and dtypes["features.1._mean"] == "paddle.float32"
    swa = utils.SWA(model)
    snapshots = _feed(swa, model, rng, 2)
    _assert_mean(swa, snapshots)
    assert {name: str(p.dtype) for name, p in model.named_parameters()} == dtypes
    # The average's buffer is laid out by the model's dtypes: one concatenation + lerp_ each.
    assert _pieces(swa) == "paddle" and len(swa._pairs.block.runs) == 2
    swa.model.eval()
    with paddle.no_grad():
        out = swa.model(paddle.randn([2, 3, 16, 16]))
    assert out.dtype == paddle.float32 and np.isfinite(out.numpy()).all()


def test_many_tensors_of_a_float16_model_are_averaged_in_float32_from_the_same_objects():
    # PreResNet110: 550 tensors, about half of them BatchNorm's; each update pairs them by
    # the model's tensor objects, so all must keep being followed, none averaged twice.
    rng = np.random.default_rng(6)
    model = models.build("PreResNet110", num_classes=3)
    model.to(dtype="float16")
    swa = utils.SWA(model)
    snapshots = _feed(swa, model, rng, 3)
    _assert_mean(swa, snapshots, rtol=1e-5, atol=1e-6)


def test_statistics_left_out_of_the_average_are_the_models_latest():
    rng = np.random.default_rng(9)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model, average_statistics=False)
    snapshots = []
    for _ in range(3):
        _randomise(model, rng)
        with paddle.no_grad():
            model.features[1]._mean.set_value(rng.standard_normal(16).astype("float32"))
        snapshots.append(_snapshot(model))
        swa.update(model)
    averaged = _snapshot(swa.model)
    np.testing.assert_array_equal(averaged["features.1._mean"], snapshots[-1]["features.1._mean"])
    np.testing.assert_allclose(averaged["fc.weight"], np.mean([s["fc.weight"] for s in snapshots], 0),
                               rtol=1e-5, atol=1e-6)


def test_a_frozen_weight_is_averaged_as_a_weight_not_copied_as_a_statistic():
    rng = np.random.default_rng(9)
    model = models.build("SimpleCNN", num_classes=3)
    model.fc.weight.trainable = False  # frozen (fine-tuning), but still a weight
    swa = utils.SWA(model, average_statistics=False)
    snapshots = _feed(swa, model, rng, 3)
    np.testing.assert_allclose(_snapshot(swa.model)["fc.weight"],
                               np.mean([s["fc.weight"] for s in snapshots], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_snapshot(swa.model)["features.1._mean"],
                                  snapshots[-1]["features.1._mean"])


def _average_kept_on_the_cpu():
    rng = np.random.default_rng(9)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model, device="cpu")
    snapshots = _feed(swa, model, rng, 3)
    assert {str(p.place) for p in swa.model.parameters()} == {"Place(cpu)"}
    _assert_mean(swa, snapshots)
    return swa


def test_device_cpu_for_a_model_already_on_the_cpu_gives_the_plain_average():
    # Only the same-device case can run without a GPU; the transfer is the GPU test's below.
    _average_kept_on_the_cpu()


@pytest.mark.skipif(not HAS_CUDA, reason="two places need a CUDA device; this Paddle has none")
def test_an_average_kept_on_the_cpu_beside_a_gpu_model_is_exact():
    paddle.set_device("gpu:0")
    try:
        swa = _average_kept_on_the_cpu()  # the model on the GPU, the average on the CPU
        x = paddle.randn([8, 3, 8, 8])  # on the GPU: the refresh brings batches to the average
        assert swa.bn_update([x]) == 8
    finally:
        paddle.set_device("cpu")


# --------------------------------------------------------------------------- EMA

def test_ema_follows_the_numpy_recurrence_and_copies_first():
    rng = np.random.default_rng(10)
    model = models.build("SimpleCNN", num_classes=3)
    ema = utils.SWA(model, ema_decay=0.9)
    expected = None
    for _ in range(6):
        _randomise(model, rng)
        now = _snapshot(model)
        expected = dict(now) if expected is None else {k: 0.9 * expected[k] + 0.1 * now[k] for k in now}
        ema.update(model)
    for key, value in _snapshot(ema.model).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert ema.n == 6
    with pytest.raises(ValueError, match="ema_decay"):
        utils.SWA(model, ema_decay=1.0)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), True, "0.9", [0.9]])
def test_an_ema_decay_outside_zero_to_one_is_refused_by_the_cores_one_check(decay):
    with pytest.raises(ValueError, match=r"ema_decay must be None or a number in \[0, 1\)"):
        utils.check_ema_decay(decay)
    with pytest.raises(ValueError, match="ema_decay"):
        utils.SWA(models.build("SimpleCNN", num_classes=3), ema_decay=decay)
    for good in (None, 0, 0.0, 0.999, np.float32(0.5)):
        assert utils.check_ema_decay(good) is good


def test_ema_warmup_follows_timms_decay_and_its_floor_binds():
    model = models.build("SimpleCNN", num_classes=3)
    # min_decay 0.55 is above the warm decay of the first two EMA steps (0.370, 0.519)
    ema = utils.SWA(model, ema_decay=0.9, ema_warmup=True, min_decay=0.55)
    rng = np.random.default_rng(3)
    expected, decays = None, []
    for n in range(8):  # n updates so far; timm's ModelEmaV3.get_decay with update_after_step=0
        _randomise(model, rng)
        weights = _snapshot(model)
        if expected is None:
            expected = weights  # the first update copies
        else:
            decays.append(max(min(1 - (1 + n / 1.0) ** (-2 / 3), 0.9), 0.55))
            expected = {k: decays[-1] * expected[k] + (1 - decays[-1]) * weights[k] for k in weights}
        ema.update(model)
    assert decays[:2] == [0.55, 0.55] and 0.55 < decays[2] < 0.9  # the floor binds, then not
    for key, value in _snapshot(ema.model).items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_ema_resumed_from_its_state_is_bit_identical(tmp_path):
    rng = np.random.default_rng(11)
    model = models.build("SimpleCNN", num_classes=3)
    weights = []
    for _ in range(5):
        _randomise(model, rng)
        weights.append(copy.deepcopy(model.state_dict()))
    whole = utils.SWA(model, ema_decay=0.8)
    for w in weights:
        model.set_state_dict(w)
        whole.update(model)
    first = utils.SWA(model, ema_decay=0.8)
    for w in weights[:2]:
        model.set_state_dict(w)
        first.update(model)
    path = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=2,
                                       state_dict=model.state_dict(), optimizer={},
                                       **first.state_dict()))
    resumed = utils.SWA(models.build("SimpleCNN", num_classes=3), ema_decay=0.8)
    resumed.set_state_dict(checkpoints.load_checkpoint(path).average_state())
    for w in weights[2:]:
        model.set_state_dict(w)
        resumed.update(model)
    for key, value in _snapshot(resumed.model).items():
        np.testing.assert_array_equal(value, _snapshot(whole.model)[key], err_msg=key)
    with pytest.raises(ValueError, match="an EMA with decay 0.8, this one an equal average"):
        utils.SWA(model).set_state_dict(first.state_dict())


# --------------------------------------------------------------------------- BatchNorm

class BNFirst(paddle.nn.Layer):
    """A model whose first layer is BatchNorm, so its input statistics are known exactly."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn
        self.fc = paddle.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.bn(x).reshape([x.shape[0], 3, -1]).mean(axis=2))


def _batches(data, batch_size, with_labels=False):
    for i in range(0, len(data), batch_size):
        x = paddle.to_tensor(data[i:i + batch_size])
        yield (x, paddle.zeros([x.shape[0]], dtype="int64")) if with_labels else x


def _expected_statistics(data, batch_size, axes):
    chunks = [data[i:i + batch_size].astype(np.float64) for i in range(0, len(data), batch_size)]
    mean = data.astype(np.float64).mean(axis=axes)
    var = sum(len(c) * c.var(axis=axes) for c in chunks) / len(data)  # biased, as Paddle's
    return mean, var, chunks


def _data(shape, seed=1):
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * 2.0 + 3.0).astype("float32")
    data[:, 1] = data[:, 1] * 0.3 - 1.0  # channels with different statistics
    return data


@pytest.mark.parametrize("layer, shape", [
    (lambda: paddle.nn.BatchNorm2D(3, momentum=0.7), (103, 3, 4, 5)),
    (lambda: paddle.nn.BatchNorm1D(3, momentum=0.7), (103, 3, 6)),
    (lambda: paddle.nn.BatchNorm3D(3, momentum=0.7), (103, 3, 2, 2, 3)),
    (lambda: paddle.nn.BatchNorm(3, momentum=0.7), (103, 3, 4, 5)),
    (lambda: paddle.nn.SyncBatchNorm(3, momentum=0.7), (103, 3, 4, 5)),
])
@pytest.mark.parametrize("with_labels", [True, False])
def test_bn_update_gives_dataset_mean_and_weighted_batch_variance(layer, shape, with_labels):
    data = _data(shape)
    batch_size = 25  # 103 samples: batches of 25, 25, 25, 25 and a ragged 3
    model = BNFirst(layer())
    model.eval()
    model.fc.train()  # mixed modes must come back as they were
    axes = (0,) + tuple(range(2, len(shape)))

    seen = utils.bn_update(_batches(data, batch_size, with_labels), model)

    assert seen == 103
    mean, var, chunks = _expected_statistics(data, batch_size, axes)
    np.testing.assert_allclose(model.bn._mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn._variance.numpy(), var, rtol=1e-5)
    # The ragged batch matters: an unweighted mean of batch variances differs.
    assert not np.allclose(np.mean([c.var(axis=axes) for c in chunks], axis=0), var, rtol=1e-4)
    assert model.bn._momentum == pytest.approx(0.7)
    assert not model.training and not model.bn.training and model.fc.training
    assert "forward" not in model.bn.__dict__  # SyncBatchNorm's own forward is back


def test_bn_update_replaces_nan_statistics():
    data = _data((40, 3, 2, 2))
    model = BNFirst(paddle.nn.BatchNorm2D(3))
    with paddle.no_grad():
        model.bn._mean.set_value(np.full(3, np.nan, "float32"))
        model.bn._variance.set_value(np.full(3, np.inf, "float32"))
    utils.bn_update(_batches(data, 16), model)
    mean, var, _ = _expected_statistics(data, 16, (0, 2, 3))
    np.testing.assert_allclose(model.bn._mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn._variance.numpy(), var, rtol=1e-5)


@pytest.mark.parametrize("full_graph", [True, False])
def test_bn_update_of_a_to_static_model_is_exact(full_graph):
    data = _data((60, 3, 4, 4))
    for i in range(0, 60, 12):  # batches with very different means: the last one dominates a
        data[i:i + 12] += i      # refresh that keeps only the first batch's momentum
    model = paddle.jit.to_static(BNFirst(paddle.nn.BatchNorm2D(3)), full_graph=full_graph)
    utils.bn_update(_batches(data, 12), model)
    mean, var, _ = _expected_statistics(data, 12, (0, 2, 3))
    np.testing.assert_allclose(model.bn._mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn._variance.numpy(), var, rtol=1e-5)
    from paddle.jit.dy2static.program_translator import ProgramTranslator
    assert ProgramTranslator().enable_to_static  # switched back on


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

    with pytest.raises(RuntimeError, match="disk gone"):
        utils.bn_update(failing(), model)
    np.testing.assert_array_equal(model.bn._mean.numpy(), [1.0, 2.0, 3.0])
    assert model.bn._momentum == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no samples"):
        utils.bn_update([], model)
    np.testing.assert_array_equal(model.bn._mean.numpy(), [1.0, 2.0, 3.0])


def test_bn_update_skips_layers_that_use_global_stats():
    model = BNFirst(paddle.nn.BatchNorm2D(3, use_global_stats=True))
    with paddle.no_grad():
        model.bn._mean.set_value(np.array([1.0, 2.0, 3.0], dtype="float32"))
    assert utils.bn_update(_batches(np.ones((8, 3, 2, 2), "float32"), 4, True), model) == 0
    np.testing.assert_array_equal(model.bn._mean.numpy(), [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_restores_average_and_count(tmp_path):
    rng = np.random.default_rng(12)
    model = models.build("SimpleCNN", num_classes=3)
    swa = utils.SWA(model)
    for _ in range(3):
        _randomise(model, rng)
        swa.update(model)
    path = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=7,
                                       state_dict=model.state_dict(),
                                       optimizer={}, **swa.state_dict()))
    assert path.endswith("checkpoint-7.pdparams")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-7.pdparams"]  # no temp left
    assert set(checkpoints.ORIGINAL_KEYS) <= set(checkpoints.read_file(path))  # the original's keys
    ckpt = checkpoints.load_checkpoint(path)
    restored = utils.SWA(models.build("SimpleCNN", num_classes=3))
    restored.set_state_dict(ckpt.average_state())
    assert restored.n == 3 and ckpt.epoch == 7
    for key, value in _snapshot(restored.model).items():
        np.testing.assert_array_equal(value, _snapshot(swa.model)[key])


def test_load_checkpoint_refuses_bad_files(tmp_path):
    model = models.build("SimpleCNN")
    path = checkpoints.save_checkpoint(str(tmp_path), checkpoints.Checkpoint(epoch=1,
                                       state_dict=model.state_dict(), optimizer={}))
    truncated = tmp_path / "truncated.pdparams"
    whole = open(path, "rb").read()
    truncated.write_bytes(whole[:len(whole) // 2])
    noise = tmp_path / "noise.pdparams"
    noise.write_bytes(np.random.default_rng(0).bytes(2000))
    plain = tmp_path / "plain.pdparams"
    paddle.save({"weight": paddle.ones([2])}, str(plain))
    newer = tmp_path / "newer.pdparams"
    paddle.save({"format": "swa-paddle/99", "epoch": 1, "state_dict": {}}, str(newer))
    for bad in (truncated, noise, plain, newer, tmp_path / "missing.pdparams"):
        with pytest.raises(errors.CheckpointError, match=bad.name):
            checkpoints.load_checkpoint(str(bad))
    with pytest.raises(errors.CheckpointError, match="swa-paddle/99"):
        checkpoints.load_checkpoint(str(newer))


def test_load_weights_refuses_another_architecture():
    with pytest.raises(ValueError, match="does not match"):
        utils.load_state_dict(models.build("SimpleCNN", num_classes=3),
                              models.build("SimpleCNN", num_classes=4).state_dict())
    with pytest.raises(errors.CheckpointError, match="fc.weight has shape"):
        checkpoints.load_weights(models.build("SimpleCNN", num_classes=3),
                                 models.build("SimpleCNN", num_classes=4).state_dict())


# --------------------------------------------------------------------------- the training pass

def test_train_pass_reading_every_few_steps_gives_the_same_sums_and_catches_nan():
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(64, 3))  # NaN in, NaN out
    rng = np.random.default_rng(13)
    batches = [(paddle.to_tensor(rng.standard_normal((5, 1, 8, 8)).astype("float32")),
                paddle.to_tensor(rng.integers(0, 3, 5))) for _ in range(7)]
    state = copy.deepcopy(model.state_dict())
    results = []
    for sync_every in (1, 3):
        model.set_state_dict(state)
        optimizer = paddle.optimizer.Momentum(0.1, parameters=model.parameters())
        results.append(engine.train_pass(batches, model, optimizer, lambda step: 0.1,
                                         lambda step: step, sync_every=sync_every))
    assert results[0]["loss_sum"] == results[1]["loss_sum"] and results[0]["count"] == 35
    assert results[0]["correct"] == results[1]["correct"]
    poisoned = list(batches)
    poisoned[4] = (paddle.full([5, 1, 8, 8], float("nan")), batches[4][1])
    for sync_every in (1, 3):
        with pytest.raises(engine.NonFiniteLoss) as caught:
            engine.train_pass(poisoned, model, paddle.optimizer.SGD(0.1, parameters=model.parameters()),
                              lambda step: 0.1, lambda step: step, sync_every=sync_every)
        assert caught.value.step == 4


# --------------------------------------------------------------------------- GPU

@pytest.mark.skipif(not HAS_CUDA, reason="Paddle has no CUDA device here")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_averaging_is_in_float32_and_leaves_the_model_untouched(dtype):
    paddle.set_device("gpu:0")
    try:
        rng = np.random.default_rng(14)
        model = models.build("PreResNet110", num_classes=3)
        optimizer = paddle.optimizer.Momentum(0.1, parameters=model.parameters())
        if dtype == "float16":
            model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2")
        swa = utils.SWA(model)
        snapshots, pointers = [], _pointers(model)
        for _ in range(3):
            _randomise(model, rng)
            snapshots.append(_snapshot(model))
            swa.update(model)
        assert _pointers(model) == pointers
        _assert_mean(swa, snapshots)
        assert {str(p.dtype) for p in swa.model.parameters()} == {"paddle.float32"}
        assert _pieces(swa) == "paddle" and not swa._pairs.outside  # one concat + lerp_ per run
    finally:
        paddle.set_device("cpu")


def test_the_benchmarks_averaging_worker_times_both_updates_and_the_floor_warm_and_cold():
    from helpers import script
    result = script("bench").worker_averaging("SimpleCNN", 2, 1, "-")
    assert result["floats"] == sum(p.size for p in models.build("SimpleCNN").parameters())
    for caches in ("warm", "cold"):
        assert set(result[caches]) == {"swa", "ema", "check", "floor"} and min(result[caches].values()) > 0
