"""The zoo matches the original PyTorch architectures."""
import paddle
import pytest

import models

# Trainable parameters of the original PyTorch models for 10 classes, counted by building
# timgaripov/swa's definitions in PyTorch (BatchNorm running statistics are not parameters
# there; in Paddle they are, but not trainable).
ORIGINAL_PARAMETERS = {
    "VGG16": 15_245_130,
    "VGG16BN": 15_253_578,
    "VGG19": 20_554_826,
    "VGG19BN": 20_565_834,
    "PreResNet110": 1_146_842,
    "PreResNet164": 1_703_258,
    "WideResNet28x10": 36_489_290,
}
ORIGINAL_BATCHNORM_LAYERS = {"VGG16": 0, "VGG16BN": 13, "VGG19": 0, "VGG19BN": 16,
                             "PreResNet110": 109, "PreResNet164": 163, "WideResNet28x10": 25}


def _count(model):
    return sum(int(p.numel()) for p in model.parameters() if p.trainable)


def test_registry_lists_every_model_and_rejects_unknown_names():
    assert set(ORIGINAL_PARAMETERS) | {"SimpleCNN"} == set(models.names())
    with pytest.raises(ValueError, match="VGG16BN"):
        models.build("ResNet50")
    assert models.canonical_name("preresnet110") == "PreResNet110"


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMETERS))
def test_zoo_model_matches_original(name):
    model = models.build(name, num_classes=100)
    model.eval()
    with paddle.no_grad():
        out = model(paddle.randn([2, 3, 32, 32]))
    assert out.shape == [2, 100]
    ten_class = models.build(name, num_classes=10)
    assert _count(ten_class) == ORIGINAL_PARAMETERS[name]
    batch_norms = [l for l in ten_class.sublayers() if isinstance(l, paddle.nn.BatchNorm2D)]
    assert len(batch_norms) == ORIGINAL_BATCHNORM_LAYERS[name]


def test_wide_resnet_last_batchnorm_momentum_translated():
    # The original sets PyTorch momentum 0.9 on the last BatchNorm: Paddle's 0.1.
    model = models.build("WideResNet28x10")
    assert model.bn1._momentum == pytest.approx(0.1)
    assert model.layer1[0].bn1._momentum == pytest.approx(0.9)


def test_builds_are_named_alike():
    # Optimizer state is keyed by parameter names; a second build must not rename them.
    first = [p.name for p in models.build("SimpleCNN").parameters()]
    assert first == [p.name for p in models.build("SimpleCNN").parameters()]


@pytest.mark.parametrize("channels, size", [(1, 8), (1, 28), (3, 32)])
def test_simple_cnn_handles_small_images(channels, size):
    model = models.build("SimpleCNN", num_classes=10, in_channels=channels)
    assert model(paddle.randn([4, channels, size, size])).shape == [4, 10]
    assert _count(model) < 30_000


def test_model_names_are_read_as_dataset_names_are():
    from harness import data

    assert models.canonical_name("vgg16-bn") == models.canonical_name("VGG16_BN") == "VGG16BN"
    assert data.canonical_name("fashion-mnist") == data.canonical_name("Fashion_MNIST") == "FashionMNIST"
    with pytest.raises(ValueError, match="unknown model 'VGG17'"):
        models.canonical_name("VGG17")


def test_the_start_up_line_says_how_many_cpu_threads_and_why(monkeypatch):
    from harness import runtime

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 4)
    assert runtime.tune_cpu(0, "PreResNet110").startswith(
        "2 CPU threads (chosen for PreResNet110 on 4 cores: more threads lose speed whenever the host "
        "is busy; --threads N to change)")
    assert runtime.tune_cpu(0, "VGG16").startswith("4 CPU threads (chosen for VGG16 on 4 cores: it gains")
    assert runtime.tune_cpu(3, "VGG16").startswith("3 CPU threads (--threads)")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.tune_cpu(0, "SimpleCNN").startswith("2 CPU threads (OMP_NUM_THREADS)")
    runtime.tune_cpu(1, "SimpleCNN")  # back to what the other tests run with
