"""SWA through Paddle's high-level API: `paddle.Model.fit` with `callbacks.SWACallback`, on the
embedded digits data. Runs from any folder: python scripts/fit_example.py

The part to copy into your own script is `fit_with_swa`; the rest only makes data and a model.
"""
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # callbacks.py and models/ live in the repository's folder
# Paddle's own notices, not about your code: at import, and from inside Model.fit (3.3)
for notice in ("No ccache found", "To copy construct from a tensor", "When training, we now always"):
    warnings.filterwarnings("ignore", message=notice)

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import callbacks  # noqa: E402
import models  # noqa: E402


class Digits(paddle.io.Dataset):
    """The embedded 8x8 digits, scaled to [0, 1], as (image, label) pairs."""

    def __init__(self, split):
        with np.load(os.path.join(ROOT, "data", "digits.npz")) as f:
            self.images = (f[f"{split}_images"][:, None] / 16.0).astype("float32")
            self.labels = f[f"{split}_labels"].astype("int64")[:, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def fit_with_swa(model, train_dataset, test_dataset, epochs=20):
    """Train with SGD, average from 75% of the epochs on; returns the test accuracy of the
    average (left in the network by the callback) and of the last SGD weights."""
    swa = callbacks.SWACallback(swa_start=0.75, swa_lr=0.01, anneal_epochs=3, bn_data=train_dataset)
    model.fit(train_dataset, epochs=epochs, batch_size=64, callbacks=[swa], verbose=0)
    averaged = model.evaluate(test_dataset, batch_size=256, verbose=0)["acc"]
    swa.restore_sgd()                                 # back to the last SGD weights
    sgd = model.evaluate(test_dataset, batch_size=256, verbose=0)["acc"]
    return averaged, sgd


def main():
    paddle.seed(1)
    network = models.build("SimpleCNN", num_classes=10, in_channels=1)
    model = paddle.Model(network)
    model.prepare(paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=network.parameters()),
                  paddle.nn.CrossEntropyLoss(), paddle.metric.Accuracy())
    averaged, sgd = fit_with_swa(model, Digits("train"), Digits("test"))
    print(f"test accuracy: SWA {100 * averaged:.2f}%, SGD {100 * sgd:.2f}%")


if __name__ == "__main__":
    main()
