"""Conv/Linear constructors with the initialisations the original PyTorch zoo used.

Paddle's default initialisers differ from PyTorch's (Paddle: He-normal over fan-in for
conv weights, Xavier for linear weights, zero biases; PyTorch: uniform +-1/sqrt(fan_in) for
weights and biases). The paper's recipes were tuned with PyTorch's, so every layer here
states its initialiser explicitly.
"""
import math

import paddle
from paddle import nn


def _uniform_fan_in(fan_in):
    """PyTorch's default for conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return paddle.ParamAttr(initializer=nn.initializer.Uniform(-bound, bound))


def conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
           init="torch_default"):
    """A Conv2D initialised as one of the original models did.

    init="torch_default": PyTorch's default (uniform over fan-in, weights and bias).
    init="he_fan_out": N(0, sqrt(2 / (k*k*out_channels))) weights and zero bias, as the
    original VGG and PreResNet set explicitly.
    """
    fan_in = in_channels * kernel_size * kernel_size
    if init == "torch_default":
        weight_attr = _uniform_fan_in(fan_in)
        bias_attr = _uniform_fan_in(fan_in) if bias else False
    elif init == "he_fan_out":
        std = math.sqrt(2.0 / (kernel_size * kernel_size * out_channels))
        weight_attr = paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, std))
        bias_attr = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if bias else False
    else:
        raise ValueError(f"unknown init {init!r}")
    return nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     weight_attr=weight_attr, bias_attr=bias_attr)


def linear(in_features, out_features):
    """A Linear layer with PyTorch's default initialisation."""
    return nn.Linear(in_features, out_features, weight_attr=_uniform_fan_in(in_features),
                     bias_attr=_uniform_fan_in(in_features))


def batch_norm(num_features, torch_momentum=0.1):
    """BatchNorm2D with weight 1, bias 0, taking the momentum in PyTorch's convention.

    PyTorch updates running = (1 - m) * running + m * batch; Paddle updates
    running = m * running + (1 - m) * batch. A PyTorch momentum m is Paddle's 1 - m.
    """
    return nn.BatchNorm2D(num_features, momentum=1.0 - torch_momentum)
