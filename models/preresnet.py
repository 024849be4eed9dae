"""Pre-activation ResNet for CIFAR (He et al. 2016), as used in the SWA paper.

Depth 9n+2 uses bottleneck blocks (PreResNet-110: n=12, PreResNet-164: n=18); depth 6n+2
below 44 uses basic blocks. Shortcuts that change shape are a bare 1x1 convolution.
ReLUs and residual additions work in place, as in the original (same gradients, and on CPU
fewer fresh allocations to fault in).
"""
from paddle import nn
import paddle.nn.functional as F

from .layers import batch_norm, conv2d, linear


class BasicBlock(nn.Layer):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shortcut=None):
        super().__init__()
        self.bn1 = batch_norm(in_planes)
        self.conv1 = conv2d(in_planes, planes, 3, stride, 1, bias=False, init="he_fan_out")
        self.bn2 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, 1, 1, bias=False, init="he_fan_out")
        self.shortcut = shortcut

    def forward(self, x):
        out = self.conv1(F.relu_(self.bn1(x)))
        out = self.conv2(F.relu_(self.bn2(out)))
        return out.add_(x if self.shortcut is None else self.shortcut(x))


class Bottleneck(nn.Layer):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, shortcut=None):
        super().__init__()
        self.bn1 = batch_norm(in_planes)
        self.conv1 = conv2d(in_planes, planes, 1, bias=False, init="he_fan_out")
        self.bn2 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, stride, 1, bias=False, init="he_fan_out")
        self.bn3 = batch_norm(planes)
        self.conv3 = conv2d(planes, planes * 4, 1, bias=False, init="he_fan_out")
        self.shortcut = shortcut

    def forward(self, x):
        out = self.conv1(F.relu_(self.bn1(x)))
        out = self.conv2(F.relu_(self.bn2(out)))
        out = self.conv3(F.relu_(self.bn3(out)))
        return out.add_(x if self.shortcut is None else self.shortcut(x))


class PreResNet(nn.Layer):
    def __init__(self, num_classes=10, depth=110, in_channels=3):
        super().__init__()
        if depth >= 44:
            if (depth - 2) % 9:
                raise ValueError(f"PreResNet depth {depth} must be 9n+2 (bottleneck blocks)")
            block, n = Bottleneck, (depth - 2) // 9
        else:
            if (depth - 2) % 6:
                raise ValueError(f"PreResNet depth {depth} must be 6n+2 (basic blocks)")
            block, n = BasicBlock, (depth - 2) // 6
        self.conv1 = conv2d(in_channels, 16, 3, padding=1, bias=False, init="he_fan_out")
        self.in_planes = 16
        self.layer1 = self._stage(block, 16, n, stride=1)
        self.layer2 = self._stage(block, 32, n, stride=2)
        self.layer3 = self._stage(block, 64, n, stride=2)
        self.bn = batch_norm(64 * block.expansion)
        self.fc = linear(64 * block.expansion, num_classes)

    def _stage(self, block, planes, blocks, stride):
        out_planes = planes * block.expansion
        shortcut = None
        if stride != 1 or self.in_planes != out_planes:
            shortcut = conv2d(self.in_planes, out_planes, 1, stride, bias=False, init="he_fan_out")
        layers = [block(self.in_planes, planes, stride, shortcut)]
        self.in_planes = out_planes
        layers += [block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu_(self.bn(x))
        # Global average pooling: the original's AvgPool2d(8) on CIFAR's 8x8 maps, and
        # still defined for other input sizes.
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.flatten(1))
