"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, as used in the SWA paper.

The original code keeps PyTorch's default initialisation for every layer, uses biased
convolutions, and builds its last BatchNorm with PyTorch momentum 0.9 (Paddle's 0.1).
"""
from paddle import nn
import paddle.nn.functional as F

from .layers import batch_norm, conv2d, linear


class WideBasic(nn.Layer):
    def __init__(self, in_planes, planes, dropout_rate, stride=1):
        super().__init__()
        self.bn1 = batch_norm(in_planes)
        self.conv1 = conv2d(in_planes, planes, 3, padding=1)
        self.dropout = nn.Dropout(dropout_rate)
        self.bn2 = batch_norm(planes)
        self.conv2 = conv2d(planes, planes, 3, stride=stride, padding=1)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = conv2d(in_planes, planes, 1, stride=stride)

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu_(self.bn1(x))))
        out = self.conv2(F.relu_(self.bn2(out)))
        return out.add_(x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Layer):
    def __init__(self, num_classes=10, depth=28, widen_factor=10, dropout_rate=0.0,
                 in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth {depth} must be 6n+4")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv2d(in_channels, 16, 3, padding=1)
        self.in_planes = 16
        self.layer1 = self._stage(widths[0], n, dropout_rate, stride=1)
        self.layer2 = self._stage(widths[1], n, dropout_rate, stride=2)
        self.layer3 = self._stage(widths[2], n, dropout_rate, stride=2)
        self.bn1 = batch_norm(widths[2], torch_momentum=0.9)
        self.linear = linear(widths[2], num_classes)

    def _stage(self, planes, blocks, dropout_rate, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(WideBasic(self.in_planes, planes, dropout_rate, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu_(self.bn1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.linear(x.flatten(1))
