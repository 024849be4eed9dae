"""A small conv net with BatchNorm for CPU runs on small images (8x8 to 32x32, 1 or 3 channels).

Three conv-BN-ReLU blocks (16, 32, 64 channels), max-pooling after the first two, global
average pooling and a linear classifier: about 24k parameters, a few million
multiply-adds per 32x32 image.
"""
from paddle import nn
import paddle.nn.functional as F

from .layers import batch_norm, conv2d, linear


class SimpleCNN(nn.Layer):
    def __init__(self, num_classes=10, in_channels=3, widths=(16, 32, 64)):
        super().__init__()
        blocks = []
        for i, width in enumerate(widths):
            # No conv bias: the BatchNorm that follows has its own.
            blocks += [conv2d(in_channels, width, 3, padding=1, bias=False), batch_norm(width),
                       nn.ReLU()]
            if i < len(widths) - 1:
                blocks.append(nn.MaxPool2D(2, 2))
            in_channels = width
        self.features = nn.Sequential(*blocks)
        self.fc = linear(in_channels, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(x.flatten(1))
