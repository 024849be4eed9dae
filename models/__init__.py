"""The model zoo: factories registered by name.

    >>> import models
    >>> models.names()
    ['PreResNet110', 'PreResNet164', 'SimpleCNN', 'VGG16', 'VGG16BN', 'VGG19', 'VGG19BN', 'WideResNet28x10']
    >>> net = models.build("PreResNet110", num_classes=100)
"""
from functools import partial

import paddle

from .preresnet import PreResNet
from .simple_cnn import SimpleCNN
from .vgg import VGG
from .wide_resnet import WideResNet

_FACTORIES = {
    "VGG16": partial(VGG, depth=16),
    "VGG16BN": partial(VGG, depth=16, batch_norm=True),
    "VGG19": partial(VGG, depth=19),
    "VGG19BN": partial(VGG, depth=19, batch_norm=True),
    "PreResNet110": partial(PreResNet, depth=110),
    "PreResNet164": partial(PreResNet, depth=164),
    "WideResNet28x10": partial(WideResNet, depth=28, widen_factor=10),
    "SimpleCNN": SimpleCNN,
}


def names():
    """The registered model names, sorted."""
    return sorted(_FACTORIES)


def canonical_name(name):
    """The registered spelling of `name` (case-insensitive); ValueError listing the valid names."""
    by_lower = {key.lower(): key for key in _FACTORIES}
    try:
        return by_lower[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names())}") from None


def build(name, num_classes=10, in_channels=3):
    """A new model `name` (case-insensitive) for `num_classes` classes and `in_channels` channels.

    Parameters get the same names in every build (a fresh name scope), so optimizer state
    saved by one process loads in another.
    """
    factory = _FACTORIES[canonical_name(name)]
    with paddle.utils.unique_name.guard():
        return factory(num_classes=num_classes, in_channels=in_channels)
