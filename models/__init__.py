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


# Per-channel input normalisation of the original code (timgaripov/swa) for 3-channel
# (CIFAR) images: ImageNet's statistics for the VGGs, CIFAR's for the ResNets. SimpleCNN is
# this project's own and uses the dataset's statistics.
_NORMALIZATION = {
    "VGG": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "ResNet": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}
_FAMILY = {"VGG16": "VGG", "VGG16BN": "VGG", "VGG19": "VGG", "VGG19BN": "VGG",
           "PreResNet110": "ResNet", "PreResNet164": "ResNet", "WideResNet28x10": "ResNet"}


def normalization(name):
    """(mean, std) per channel with which the original code fed 3-channel images to model
    `name`, or None when it defines none (then the dataset's own statistics are used)."""
    family = _FAMILY.get(canonical_name(name))
    return _NORMALIZATION[family] if family else None


def names():
    """The registered model names, sorted."""
    return sorted(_FACTORIES)


def canonical_name(name):
    """The registered spelling of `name`, read as dataset names are (case, '-' and '_' aside:
    vgg16-bn is VGG16BN); ValueError listing the valid names."""
    def key(text):
        return text.lower().replace("-", "").replace("_", "")
    by_key = {key(registered): registered for registered in _FACTORIES}
    try:
        return by_key[key(name)]
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
