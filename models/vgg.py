"""VGG-16/19 for 32x32 inputs, with or without BatchNorm (CIFAR variant of the SWA paper).

Five conv stages with max-pooling reduce 32x32 to 1x1; the classifier is
512-512-num_classes with dropout, as in the original SWA code.
"""
from paddle import nn

from .layers import batch_norm, conv2d, linear

STAGES = {
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _features(depth, batch_norm_, in_channels):
    layers = []
    for widths in STAGES[depth]:
        for width in widths:
            layers.append(conv2d(in_channels, width, 3, padding=1, init="he_fan_out"))
            if batch_norm_:
                layers.append(batch_norm(width))
            layers.append(nn.ReLU())
            in_channels = width
        layers.append(nn.MaxPool2D(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGG(nn.Layer):
    def __init__(self, num_classes=10, depth=16, batch_norm=False, in_channels=3):
        super().__init__()
        self.features = _features(depth, batch_norm, in_channels)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), linear(512, 512), nn.ReLU(),
            nn.Dropout(0.5), linear(512, 512), nn.ReLU(),
            linear(512, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.flatten(1))
